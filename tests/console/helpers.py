"""Small helpers for the console tests."""

from __future__ import annotations

from pipeline.immediate import run_in_request
from pipeline.planning import PlannedJob
from pipeline.runtime import Runtime


def run_planned(rt: Runtime, planned: PlannedJob) -> None:
    """Run a planned job's tasks in this thread, through the workers' own ``run_task``."""
    assert run_in_request(rt, None, planned, limiter=None, timeout_s=120), "the job did not finish in time"
