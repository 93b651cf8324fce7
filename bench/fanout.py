"""Fan-out benchmark: ``python -m bench fanout [--quick]``.

Plans one job for 10,000 companies × 8 partitions (80,000 tasks; ``--quick``: 1,000 × 8) with
the synthetic connector on PostgreSQL + RabbitMQ, and times ``plan_job`` until it returns the
job id, then until every message is on the queue (passive ``queue_declare`` polling).

Baseline, on the same database and broker: a bare COPY of the same number of rows into a
table like ``sync_tasks`` (same columns and indexes), then a bare pika ``BlockingConnection``
publishing as many messages of the same size (delivery_mode 2, no confirms). Each side runs
``--repeat`` times, interleaved; the best run of each is compared.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import pika
import psycopg
from dramatiq import Message
from sqlalchemy import text

from actors.broker import make_broker
from actors.tasks import SYNC_PARTITION, Actors, declare_actors
from bench._report import Row, at_most, best, load_line, print_table, row, spread
from bench._stack import (
    Stack,
    add_synthetic_companies,
    amqp_channel,
    database_dsn,
    retrying_blips,
    stack,
    wait_for_depth,
)
from pipeline.dispatch import Dispatcher
from pipeline.models import utcnow
from pipeline.planning import plan_job
from pipeline.runtime import Runtime

if TYPE_CHECKING:
    from pyinstrument import Profiler

QUEUE = "sync"
BASELINE_QUEUE = "bench-baseline"
BASELINE_TABLE = "bench_copy"
COPY_COLUMNS = ("job_id, company_id, resource, partition_key, status, attempts, chunks, record_count, "
                "created_at, updated_at")


@dataclass(frozen=True)
class Timing:
    returned_s: float
    queued_s: float


def add_companies(rt: Runtime, count: int) -> None:
    """``count`` synthetic companies (7 schedule days + users = 8 partitions each), in one statement."""
    add_synthetic_companies(rt, count, {"jobs_per_day": 50})


def reset(rt: Runtime, amqp_url: str) -> None:
    with rt.engine.begin() as conn:
        conn.execute(text(f"TRUNCATE sync_jobs, sync_tasks, job_log, {BASELINE_TABLE} RESTART IDENTITY CASCADE"))
    for queue in (QUEUE, BASELINE_QUEUE):
        with amqp_channel(amqp_url) as channel, contextlib.suppress(pika.exceptions.ChannelClosedByBroker):
            channel.queue_purge(queue)  # a queue not declared yet closes the channel: nothing to purge
    with rt.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE sync_tasks"))
        conn.execute(text(f"VACUUM ANALYZE {BASELINE_TABLE}"))


def measured(rt: Runtime, st: Stack, what: str, measure: Callable[[], Timing]) -> Timing:
    """Empty the tables and queues, then measure; again if a shared service restarts meanwhile."""
    assert st.amqp_url is not None
    amqp_url = st.amqp_url

    def attempt() -> Timing:
        reset(rt, amqp_url)
        return measure()

    return retrying_blips(attempt, what=what)


def run_ours(rt: Runtime, actors: Dispatcher, amqp_url: str, expected: int, profile: Path | None) -> Timing:
    profiler = _profiler(profile)
    start = time.perf_counter()
    planned = plan_job(rt.engine, actors, trigger="schedule")
    returned = time.perf_counter()
    if profiler is not None:
        profiler.stop()
        assert profile is not None
        profile.write_text(profiler.output_text(unicode=True, color=False, show_all=False))
    if planned is None or planned.total_tasks != expected:
        raise RuntimeError(f"planned {planned and planned.total_tasks} tasks, expected {expected}")
    queued = wait_for_depth(amqp_url, QUEUE, expected, timeout=600)
    return Timing(returned - start, queued - start)


def _profiler(path: Path | None) -> Profiler | None:
    if path is None:
        return None
    from pyinstrument import Profiler

    profiler = Profiler(interval=0.001)
    profiler.start()
    return profiler


def message_size() -> int:
    """The size of one encoded ``sync_partition`` message, so the baseline publishes the same bytes."""
    return len(Message(queue_name=QUEUE, actor_name=SYNC_PARTITION, args=(1_000_000,), kwargs={},
                       options={}).encode())


def run_baseline(dsn: str, amqp_url: str, count: int, size: int) -> Timing:
    job = str(uuid.uuid4())
    start = time.perf_counter()
    stamp = utcnow().isoformat()
    buffer = io.StringIO()
    for index in range(count):
        buffer.write(f"{job}\t{index // 8 + 1}\tschedule\t2030-01-{index % 8 + 1:02d}\tpending\t0\t0\t0"
                     f"\t{stamp}\t{stamp}\n")
    with psycopg.connect(dsn) as conn, conn.cursor() as cursor:
        with cursor.copy(f"COPY {BASELINE_TABLE} ({COPY_COLUMNS}) FROM STDIN") as copy:
            copy.write(buffer.getvalue())
        conn.commit()
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        channel = connection.channel()
        properties = pika.BasicProperties(delivery_mode=2)
        padding = b"x" * max(0, size - len(b'{"task_id":1000000,"pad":""}'))
        for index in range(count):
            body = b'{"task_id":%d,"pad":"%s"}' % (1_000_000 + index, padding)
            channel.basic_publish(exchange="", routing_key=BASELINE_QUEUE, body=body, properties=properties)
        returned = time.perf_counter()
    finally:
        connection.close()
    queued = wait_for_depth(amqp_url, BASELINE_QUEUE, count, timeout=600)
    return Timing(returned - start, queued - start)


@dataclass
class PerMessage:
    """The dispatcher as it was before batching: ``actor.send`` per task (``--compare-send``)."""

    actors: Actors

    def enqueue(self, task_ids: Sequence[int], *, priority: str = "normal") -> None:
        actor = self.actors.high if priority == "high" else self.actors.normal
        for task_id in task_ids:
            actor.send(task_id)

    def coordinate(self, job_id: uuid.UUID, *, priority: str = "normal") -> None:
        self.actors.coordinate(job_id, priority=priority)

    def backlog(self) -> int | None:
        return self.actors.backlog()


@contextlib.contextmanager
def declared(st: Stack, rt: Runtime) -> Iterator[Actors]:
    broker = make_broker(rt.settings)
    try:
        yield declare_actors(broker, rt)
    finally:
        broker.close()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench fanout", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1,000 companies instead of 10,000")
    parser.add_argument("--companies", type=int, help="number of companies (overrides --quick)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each side; the best counts (default 3)")
    parser.add_argument("--profile", type=Path,
                        help="write a pyinstrument profile of one extra, untimed plan_job here")
    parser.add_argument("--compare-send", action="store_true",
                        help="also time plan_job with one actor.send per task (the dispatcher before batching)")
    args = parser.parse_args(argv)
    companies = args.companies or (1_000 if args.quick else 10_000)
    expected = companies * 8

    with stack("fanout", s3=False) as st:
        assert st.amqp_url is not None
        rt = Runtime.from_settings(st.settings(blob="local"))
        st.cleanups.callback(rt.close)
        add_companies(rt, companies)
        st.admin_sql(f"CREATE TABLE {BASELINE_TABLE} (LIKE sync_tasks INCLUDING ALL)")
        with amqp_channel(st.amqp_url) as channel:
            channel.queue_declare(BASELINE_QUEUE, durable=True)
        actors = st.cleanups.enter_context(declared(st, rt))
        size = message_size()
        dsn = database_dsn(st.database_url)
        print(f"fanout: {companies:,} companies × 8 partitions = {expected:,} tasks; "
              f"messages of {size} bytes; best of {args.repeat}", flush=True)
        ours: list[Timing] = []
        bare: list[Timing] = []
        per_message: list[Timing] = []
        if args.profile is not None:  # a run of its own: the profiler's overhead counts in no figure
            measured(rt, st, "plan_job, profiled",
                     partial(run_ours, rt, actors, st.amqp_url, expected, args.profile))
            print(f"  profile of one plan_job (not timed): {args.profile}", flush=True)
        for attempt in range(args.repeat):
            bare.append(measured(rt, st, "baseline", partial(run_baseline, dsn, st.amqp_url, expected, size)))
            ours.append(measured(rt, st, "plan_job", partial(run_ours, rt, actors, st.amqp_url, expected, None)))
            line = (f"  run {attempt + 1}: plan_job {ours[-1].returned_s:.2f} s (all queued {ours[-1].queued_s:.2f} s)"
                    f" · baseline {bare[-1].returned_s:.2f} s (all queued {bare[-1].queued_s:.2f} s)")
            if args.compare_send:
                per_message.append(measured(rt, st, "plan_job, actor.send per task",
                                            partial(run_ours, rt, PerMessage(actors), st.amqp_url, expected, None)))
                line += f" · actor.send per task {per_message[-1].returned_s:.2f} s"
            print(line, flush=True)

    returned = best([t.returned_s for t in ours])
    queued = best([t.queued_s for t in ours])
    rows: list[Row] = [
        row("fanout", f"plan_job returns ({expected:,} tasks)", returned, best([t.returned_s for t in bare]), "s",
            at_most(1.5), note=f"plan_job over the runs: {spread([t.returned_s for t in ours])} s"),
        row("fanout", "all messages on the queue", queued, best([t.queued_s for t in bare]), "s", at_most(1.5)),
        row("fanout", "tasks queued per second", expected / queued, expected / best([t.queued_s for t in bare]),
            "/s"),
    ]
    if per_message:
        rows.append(row("fanout", "plan_job, actor.send per task (before)", best([t.returned_s for t in per_message]),
                        best([t.returned_s for t in bare]), "s",
                        note="the dispatcher before batching, measured in the same run"))
    print_table(rows)
    print(load_line())
    return 0 if all(r.met is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
