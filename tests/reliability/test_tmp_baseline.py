import time
from tests.reliability.harness import CI, TINY


def test_baseline(make_harness):
    h = make_harness(CI)
    t0 = time.monotonic()
    h.add_companies(CI.companies, TINY)
    t1 = time.monotonic()
    h.start_workers()
    t2 = time.monotonic()
    h.start_sweeper()
    job = h.plan()
    report = h.finish(job.job_id)
    t3 = time.monotonic()
    print("companies", t1 - t0, "workers", t2 - t1, "run", t3 - t2, h.timings, report)
