"""`pipeline worker` as deployed: prefetch sized to its threads, heartbeats on, clean SIGTERM."""

from __future__ import annotations

import subprocess
from urllib.parse import unquote, urlparse

from actors.tasks import Actors
from pipeline.runtime import Runtime
from tests.integration.conftest import WorkerFleet
from tests.services import wait_for


def consumers(vhost: str) -> list[tuple[str, int]]:
    out = subprocess.run(
        ["rabbitmqctl", "list_consumers", "--vhost", vhost, "--no-table-headers", "--quiet",
         "queue_name", "prefetch_count"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout
    rows = [line.split("\t") for line in out.splitlines() if line.strip()]
    return [(name, int(prefetch)) for name, prefetch in rows]


def connections_heartbeat(vhost: str) -> list[int]:
    out = subprocess.run(
        ["rabbitmqctl", "list_connections", "--no-table-headers", "--quiet", "vhost", "timeout"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout
    return [int(timeout) for line in out.splitlines() if line.strip()
            for name, timeout in [line.split("\t")] if name == vhost]


def test_worker_prefetches_no_more_than_its_threads_and_sends_heartbeats(
    stack: Runtime, actors: Actors, worker_fleet: WorkerFleet
) -> None:
    assert stack.settings.broker_url is not None
    vhost = unquote(urlparse(stack.settings.broker_url).path.lstrip("/"))
    worker_fleet.start(processes=1, threads=3)
    queue = stack.settings.queue_name

    def ours() -> list[tuple[str, int]]:
        return [(name, prefetch) for name, prefetch in consumers(vhost) if name.startswith(queue)]

    wait_for(lambda: len(ours()) >= 2, timeout=60, what="the worker's consumers", interval=0.5)
    by_queue = dict(ours())
    assert by_queue[queue] == 3 and by_queue[f"{queue}-high"] == 3
    assert connections_heartbeat(vhost) and all(0 < t <= 60 for t in connections_heartbeat(vhost))


def test_worker_exits_cleanly_on_sigterm(stack: Runtime, actors: Actors, worker_fleet: WorkerFleet) -> None:
    assert stack.settings.broker_url is not None
    vhost = unquote(urlparse(stack.settings.broker_url).path.lstrip("/"))
    proc = worker_fleet.start(processes=1, threads=2)
    wait_for(lambda: any(n.startswith(stack.settings.queue_name) for n, _ in consumers(vhost)), timeout=60,
             what="the worker to consume", interval=0.5)
    worker_fleet.terminate(proc)
    assert proc.wait(timeout=60) == 0
