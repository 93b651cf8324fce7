"""A zombie worker on another host (issue 11): the first test of workers on separate hosts.

A ``pipeline worker`` runs in a network namespace of its own (``ip netns``), joined to this
host by a veth pair with a private /30: it reaches PostgreSQL, RabbitMQ and the run's S3 server
only through forwarders bound to the host side of the veth (the services listen on loopback).
It claims a task of many chunks; mid-task its link is cut (``ip link set … down``) for longer
than the lease, and a worker on this host takes the task over and finishes it. When the link
comes back, the zombie carries on from where it froze: every write it then attempts must be
refused by the fence (its log says the task is no longer held), the document must be complete
and published once, and the parts the zombie staged must never be read.

Needs root (namespaces, links); skipped with the reason otherwise.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
from sqlalchemy import select
from sqlalchemy.engine import make_url

from pipeline.datasets import staging_key, staging_prefix
from pipeline.models import DATASETS, TASKS
from tests.integration.conftest import settings_env
from tests.reliability.harness import CI, Harness, TcpProxy
from tests.services import wait_for

# One task of ten chunks, a second each upstream: the cut lands between two checkpoints.
EMPLOYEES = 20
CHUNKED = {"jobs_per_day": 1, "employees": EMPLOYEES, "teams": 1, "page_size": 2, "chunk_delay_s": 1.0}
LEASE_S = 4.0
LEASE_LOST = "is no longer held by this worker"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} exited {result.returncode}: {result.stderr.strip()}")
    return result


def _unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root: network namespaces and veth links"
    if shutil.which("ip") is None:
        return "needs iproute2's ip"
    probe = f"zprobe{os.getpid() % 100000}"
    if _ip("netns", "add", probe, check=False).returncode != 0:
        return "ip netns add is refused here (no CAP_SYS_ADMIN or no netns support)"
    _ip("netns", "delete", probe, check=False)
    return None


@dataclass(frozen=True)
class OtherHost:
    """A network namespace joined to this host by a veth pair: ``host_ip`` is this host's end."""

    netns: str
    host_link: str
    host_ip: str
    ns_ip: str

    def cut(self) -> None:
        _ip("link", "set", self.host_link, "down")

    def restore(self) -> None:
        _ip("link", "set", self.host_link, "up")
        # The namespace's end comes back with the carrier.
        wait_for(lambda: "LOWER_UP" in _ip("-n", self.netns, "link", "show", "dev", f"{self.host_link}n").stdout,
                 timeout=30, what="the veth link to come back")


@pytest.fixture
def other_host() -> Iterator[OtherHost]:
    """A namespace and veth pair of this test's own (10.213.N.0/30), removed afterwards whatever happened."""
    reason = _unavailable()
    if reason is not None:
        pytest.skip(reason)
    n = os.getpid() % 250
    host = OtherHost(netns=f"zombie{os.getpid()}", host_link=f"zh{os.getpid() % 100000}",
                     host_ip=f"10.213.{n}.1", ns_ip=f"10.213.{n}.2")
    ns_link = f"{host.host_link}n"
    try:
        _ip("netns", "add", host.netns)
        _ip("link", "add", host.host_link, "type", "veth", "peer", "name", ns_link)
        _ip("link", "set", ns_link, "netns", host.netns)
        _ip("addr", "add", f"{host.host_ip}/30", "dev", host.host_link)
        _ip("link", "set", host.host_link, "up")
        _ip("netns", "exec", host.netns, "ip", "addr", "add", f"{host.ns_ip}/30", "dev", ns_link)
        _ip("netns", "exec", host.netns, "ip", "link", "set", ns_link, "up")
        _ip("netns", "exec", host.netns, "ip", "link", "set", "lo", "up")
        yield host
    finally:
        _ip("link", "delete", host.host_link, check=False)  # deletes its peer too
        _ip("netns", "delete", host.netns, check=False)


def _forward(stack: ExitStack, host: OtherHost, target: str) -> str:
    """A forwarder on the host end of the veth to ``target`` (host:port); its address."""
    target_host, _, port = target.rpartition(":")
    proxy = TcpProxy(target_host, int(port), bind_host=host.host_ip).start()
    stack.callback(proxy.stop)
    return proxy.endpoint


def _zombie_settings(h: Harness, host: OtherHost, stack: ExitStack) -> Any:
    """The harness's worker settings, with every service reached through the veth."""
    settings = h.worker_settings
    database = make_url(settings.database_url)
    db_host, _, db_port = _forward(stack, host, f"{database.host}:{database.port or 5432}").partition(":")
    assert settings.broker_url is not None
    broker = urlsplit(settings.broker_url)
    credentials, _, _ = broker.netloc.rpartition("@")
    amqp_endpoint = _forward(stack, host, f"{broker.hostname}:{broker.port or 5672}")
    return settings.model_copy(update={
        "database_url": database.set(host=db_host, port=int(db_port)).render_as_string(hide_password=False),
        "broker_url": urlunsplit(broker._replace(netloc=f"{credentials}@{amqp_endpoint}" if credentials
                                                 else amqp_endpoint)),
        "s3_endpoint": _forward(stack, host, h.s3.endpoint),
        "upstream_allowlist": f"127.0.0.0/8,{host.host_ip}/32",
    })


def _start_zombie(h: Harness, host: OtherHost, settings: Any, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            ["ip", "netns", "exec", host.netns, sys.executable, "-m", "pipeline.cli", "worker",
             "--processes", "1", "--threads", "1"],
            env=settings_env(settings), start_new_session=True, stdout=out, stderr=subprocess.STDOUT,
        )


def _task(h: Harness, task_id: int) -> Any:
    with h.engine.connect() as conn:
        return conn.execute(select(TASKS).where(TASKS.c.id == task_id)).one()


def test_a_zombie_on_another_host_whose_link_comes_back_after_its_lease_writes_nothing_anyone_reads(
    make_harness: Any, other_host: OtherHost, tmp_path: Path
) -> None:
    h: Harness = make_harness(CI, lease_s=LEASE_S)
    (company,) = h.add_companies(1, CHUNKED, name="zombie")
    log = tmp_path / "zombie.log"
    with ExitStack() as stack:
        zombie = _start_zombie(h, other_host, _zombie_settings(h, other_host, stack), log)

        def stop_zombie() -> None:
            if zombie.poll() is None:
                with suppress(ProcessLookupError):
                    os.killpg(zombie.pid, signal.SIGKILL)
                zombie.wait(timeout=10)

        stack.callback(stop_zombie)
        stack.callback(other_host.restore)  # never leave the link down, even on failure
        wait_for(lambda: h.consumers() >= 1, timeout=60, what="the worker in the namespace to consume")
        job = h.plan(resources=["users"])
        (task_id,) = job.task_ids

        # The zombie holds the task and has checkpointed two chunks: cut right after a checkpoint,
        # while it waits on the upstream (a second per chunk), not inside a transaction.
        wait_for(lambda: _task(h, task_id).chunks >= 2, timeout=60, what="the zombie to save two chunks",
                 interval=0.02)
        other_host.cut()
        frozen = _task(h, task_id)
        assert frozen.status == "processing" and frozen.attempts == 1
        zombie_token = frozen.lease_token
        assert zombie_token is not None

        # Longer than the lease: a worker on this host is sent the task and finishes it.
        h.start_sweeper()
        h.start_workers(1)
        h.wait_for_job(job.job_id, timeout=120)
        done = _task(h, task_id)
        assert done.status == "completed" and done.attempts == 2, (done.status, done.attempts, done.error_message)
        assert zombie.poll() is None, "the zombie is still alive, cut off"
        with h.engine.connect() as conn:
            published = conn.execute(select(DATASETS).where(DATASETS.c.company_id == company)).one()
        document_keys = sorted(info.key for info in h.rt.store.list(f"{company}/"))

        # The link comes back: the zombie resumes where it froze, and the fence refuses it.
        other_host.restore()
        wait_for(lambda: LEASE_LOST in log.read_text(errors="replace"), timeout=90,
                 what="the zombie to be told it lost the task")
        zombie_parts = [info.key for info in h.rt.store.list(staging_prefix(task_id))
                        if info.key.startswith(f"{staging_prefix(task_id)}{zombie_token}/")]
        after = _task(h, task_id)
        with h.engine.connect() as conn:
            still = conn.execute(select(DATASETS).where(DATASETS.c.company_id == company)).one()
        stop_zombie()

    text = log.read_text(errors="replace")
    assert after.status == "completed" and after.attempts == 2 and after.record_count == EMPLOYEES
    assert after.updated_at == done.updated_at, "the zombie changed the finished task"
    assert (still.storage_key, still.checksum_sha256, still.synced_at) == (
        published.storage_key, published.checksum_sha256, published.synced_at), "the zombie published again"
    assert still.record_count == EMPLOYEES
    assert sorted(info.key for info in h.rt.store.list(f"{company}/")) == document_keys, "a second upload"
    # The zombie's staging is named after its claim. The lineage resumed from the parts the
    # zombie saved while it held the lease (its first chunks), and from none it staged after:
    # those were written once the task was done, and nothing read them.
    parts = (after.fetch_state or {}).get("parts", [])
    assert [key for key in parts if zombie_token in key] == [
        staging_key(task_id, zombie_token, index) for index in range(frozen.chunks)]
    assert not set(zombie_parts) & set(parts), f"a part the zombie staged late was recorded: {zombie_parts}"
    reports = h.finish(job.job_id, expected_records=lambda task: EMPLOYEES)
    assert reports[0].states == {"completed": 1} and reports[0].max_attempts == 2
    print(f"\nzombie: cut after chunk {frozen.chunks}; its parts after the link came back: {len(zombie_parts)}; "
          f"log lines: {[line for line in text.splitlines() if LEASE_LOST in line or 'task' in line][-5:]}; "
          f"job {uuid.UUID(str(job.job_id))} {reports[0]}")
