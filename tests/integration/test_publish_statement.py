"""The one-statement publish (migration 0007) on its failure paths: nothing is left locked."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from sqlalchemy import text

from pipeline.execution import Outcome, RetryTask, run_task
from pipeline.planning import plan_job
from pipeline.runtime import Runtime
from pipeline.settings import Settings
from tests.integration.control_helpers import add_synthetic
from tests.invariants import check_job_counters
from tests.reliability.harness import TcpProxy

ADVISORY_LOCKS = text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                      "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())")


def test_an_upload_that_fails_under_the_partition_lock_releases_it_and_the_retry_publishes(
    stack: Runtime, make_settings: Callable[..., Settings]
) -> None:
    assert stack.settings.s3_endpoint is not None
    host, port = stack.settings.s3_endpoint.rsplit(":", 1)
    proxy = TcpProxy(host, int(port)).start()
    rt = Runtime.from_settings(make_settings(s3_endpoint=proxy.endpoint), pre_ping=False)
    try:
        company = add_synthetic(rt, "cut-off", days_ahead=1, jobs_per_day=4)
        planned = plan_job(rt.engine, None, trigger="cli", company_ids=[company], resources=["schedule"])
        assert planned is not None and len(planned.task_ids) == 1
        proxy.cut()  # the S3 server is unreachable: the PUT under the session lock fails

        with pytest.raises(RetryTask, match=r"S3 upload of .* failed"):
            run_task(rt, planned.task_ids[0])

        with rt.engine.connect() as conn:
            assert conn.execute(ADVISORY_LOCKS).scalar_one() == 0, "the partition's session lock was left held"
        proxy.restore()
        assert run_task(rt, planned.task_ids[0]) is Outcome.COMPLETED
        with rt.engine.connect() as conn:
            assert conn.execute(ADVISORY_LOCKS).scalar_one() == 0
        check_job_counters(rt.engine, planned.job_id)
    finally:
        proxy.stop()
        rt.close()
