"""Small helpers for the console tests."""

from __future__ import annotations

from pipeline.immediate import run_in_request
from pipeline.planning import PlannedJob, SubmittedJob, coordinate_job
from pipeline.runtime import Runtime


def run_planned(rt: Runtime, submitted: SubmittedJob) -> PlannedJob:
    """Plan a submitted job (the coordinator's ``coordinate_job``) and run its tasks in this
    thread, through the workers' own ``run_task``."""
    planned = coordinate_job(rt.engine, None, submitted.job_id)
    assert planned is not None, "the job did not plan"
    assert run_in_request(rt, None, planned, limiter=None, timeout_s=120), "the job did not finish in time"
    return planned
