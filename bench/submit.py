"""Submit benchmark: ``python -m bench submit [--quick]``.

``POST /sync`` for every company (10,000 companies × 8 partitions; ``--quick``: 1,000), over
HTTP to the real control API served by uvicorn in this process, on PostgreSQL + RabbitMQ: the
answer (202) comes once the job row is recorded and the one ``coordinate_sync`` message is sent
— the coordinator actor plans the 80,000 tasks later, on a worker (none runs here).

Beside it, in the same run and on the same database and broker: today's synchronous planning
(``plan_job``, what ``POST /sync`` did before the coordinator: the whole plan and every
publish inside the request). Rounds interleave (``--posts`` requests, then one synchronous plan);
the target is every answer under 100 ms (the slowest counts), the comparison is best against best.
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import sys
import threading
import time
from collections.abc import Iterator

import httpx
import pika
import uvicorn
from fastapi import FastAPI
from sqlalchemy import func, select, text

from actors.broker import make_broker
from actors.tasks import Actors, declare_actors
from bench._report import Row, at_most, best, load_line, print_table, row, spread
from bench._stack import add_synthetic_companies, amqp_channel, stack
from pipeline.api import create_app
from pipeline.api.control import ControlState
from pipeline.models import TASKS
from pipeline.planning import plan_job
from pipeline.runtime import Runtime

ADMIN_KEY = "bench-submit-admin-key"
BUDGET_MS = 100.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def served(app: FastAPI) -> Iterator[str]:
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def reset(rt: Runtime) -> None:
    with rt.engine.begin() as conn:
        conn.execute(text("TRUNCATE sync_jobs, sync_tasks, job_log RESTART IDENTITY CASCADE"))


def post_sync(client: httpx.Client, rt: Runtime, posts: int) -> list[float]:
    """``posts`` requests in a row on emptied tables, each for every company: their durations."""
    reset(rt)
    elapsed: list[float] = []
    for _ in range(posts):
        started = time.perf_counter()
        answer = client.post("/sync", json={})
        elapsed.append(time.perf_counter() - started)
        if answer.status_code != 202 or answer.json()["status"] != "planning":
            raise RuntimeError(f"POST /sync answered {answer.status_code}: {answer.text}")
    with rt.engine.connect() as conn:
        if conn.execute(select(func.count()).select_from(TASKS)).scalar_one():
            raise RuntimeError("tasks exist before any coordinator ran")
    return elapsed


def synchronous_plan(rt: Runtime, actors: Actors, expected: int) -> float:
    reset(rt)
    started = time.perf_counter()
    planned = plan_job(rt.engine, actors, trigger="api")
    elapsed = time.perf_counter() - started
    if planned is None or planned.total_tasks != expected:
        raise RuntimeError(f"planned {planned and planned.total_tasks} tasks, expected {expected}")
    return elapsed


def purge(amqp_url: str, actors: Actors) -> None:
    for queue in actors.queues:
        with amqp_channel(amqp_url) as channel, contextlib.suppress(pika.exceptions.ChannelClosedByBroker):
            channel.queue_purge(queue)  # a queue not declared yet closes the channel: nothing to purge


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench submit", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1,000 companies instead of 10,000")
    parser.add_argument("--companies", type=int, help="number of companies (overrides --quick)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds of each side (default 3)")
    parser.add_argument("--posts", type=int, default=10, help="POST /sync requests per round (default 10)")
    args = parser.parse_args(argv)
    companies = args.companies or (1_000 if args.quick else 10_000)
    expected = companies * 8

    with stack("submit", s3=False) as st:
        assert st.amqp_url is not None
        settings = st.settings(blob="local", admin_api_key=ADMIN_KEY, max_unfinished_jobs=1000,
                               jwt_secret="bench-submit-jwt-secret-0123456789abcdef")
        rt = Runtime.from_settings(settings)
        st.cleanups.callback(rt.close)
        add_synthetic_companies(rt, companies, {"jobs_per_day": 50})
        broker = make_broker(rt.settings)
        st.cleanups.callback(broker.close)
        actors = declare_actors(broker, rt)
        app = create_app(rt)
        app.state.control = ControlState(rt, dispatcher=actors)
        base = st.cleanups.enter_context(served(app))
        client = st.cleanups.enter_context(httpx.Client(base_url=base, headers={"X-API-Key": ADMIN_KEY},
                                                        timeout=120))
        print(f"submit: POST /sync for {companies:,} companies × 8 partitions ({expected:,} tasks); "
              f"best of {args.repeat}, rounds interleaved", flush=True)
        post_sync(client, rt, 1)  # warm-up: connections, the app's first request
        ours: list[float] = []
        sync: list[float] = []
        for attempt in range(args.repeat):
            answers = post_sync(client, rt, args.posts)
            ours.extend(answers)
            sync.append(synchronous_plan(rt, actors, expected))
            purge(st.amqp_url, actors)
            print(f"  round {attempt + 1}: POST /sync ×{len(answers)} {spread([t * 1000 for t in answers])} ms · "
                  f"synchronous planning {sync[-1] * 1000:.0f} ms", flush=True)

    slowest_ms = max(ours) * 1000
    rows: list[Row] = [
        row("submit", f"POST /sync 202, slowest of {len(ours)} ({companies:,} companies)", slowest_ms, BUDGET_MS, "ms",
            at_most(1.0), note=f"baseline = the {BUDGET_MS:.0f} ms budget, which every answer must meet; all "
                               f"answers: {spread([t * 1000 for t in ours])} ms"),
        row("submit", "POST /sync vs synchronous plan_job, best", best(ours) * 1000, best(sync) * 1000, "ms",
            note=f"synchronous planning over the rounds: {spread([t * 1000 for t in sync])} ms"),
    ]
    print_table(rows)
    print(load_line())
    return 0 if all(r.met is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
