"""The S3 server itself dies mid-run: SIGKILL, an outage, then a restart on the same data directory.

Beside the TCP-proxy cut in ``test_service_outages`` (the server survives, the network does not),
this drill takes the server down for real, on a SeaweedFS of the test's own: requests in flight
are cut, nothing is flushed, and what the server acknowledged before the kill must still be
there, byte for byte, when it comes back.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

import pytest
from sqlalchemy import select

from pipeline.models import Dataset
from storage.seaweed import SeaweedFS
from tests import services
from tests.reliability.harness import SIZES, TINY, Harness, Size


@pytest.mark.parametrize("size", SIZES)
def test_s3_server_killed_mid_run_and_restarted_completes_every_task_and_keeps_every_object(
    killable_s3: SeaweedFS, make_harness: Any, size: Size
) -> None:
    # killable_s3 comes first: it is torn down after the harness has emptied its bucket on it.
    # Workers stay up: a long lease keeps a slow machine from adding claims the outage did not cause.
    h: Harness = make_harness(size, s3=services.seaweed_service(killable_s3), lease_s=60.0)
    h.add_companies(size.companies, TINY)
    h.start_workers()
    h.start_sweeper()
    job = h.plan()
    h.wait_for_done(job.job_id, at_least=job.total_tasks // 2)

    killed_pid = killable_s3.pid
    killable_s3.kill()
    with h.engine.connect() as conn:
        # Committed before the kill: each points at an object the server acknowledged before it.
        published = conn.execute(select(Dataset.storage_key, Dataset.checksum_sha256, Dataset.size_bytes)).all()
    try:
        assert killed_pid is not None and not killable_s3.running()
        time.sleep(8 if size.name == "ci" else 30)  # the outage itself: workers meet a dead server
        during = h.progress(job.job_id)
    finally:
        killable_s3.start()
    assert killable_s3.pid != killed_pid, "a new server process, on the same data directory and ports"

    [report] = h.finish(job.job_id)
    assert during.failed_tasks == 0
    assert report.states == {"completed": job.total_tasks}
    # Tasks did hit the outage, and it cost them no attempt.
    assert any("blob storage unavailable" in entry.message for entry in h.job_log(job.job_id))
    assert report.max_attempts == 1
    assert len(published) >= job.total_tasks // 2
    client = killable_s3.client()
    for key, checksum, size_bytes in published:
        response = client.get_object(h.bucket, key)
        try:
            data = response.read()
        finally:
            response.close()
            response.release_conn()
        assert len(data) == size_bytes and hashlib.sha256(data).hexdigest() == checksum, key
