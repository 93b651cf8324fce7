"""Workers dying: SIGKILL at random, twenty times, and a SIGTERM in the middle of a chunk."""

from __future__ import annotations

import itertools
import random
import threading
import time
from collections import Counter, defaultdict
from typing import Any

import pytest
from sqlalchemy import select

from pipeline.models import TASKS
from tests.fakes.upstreams import ScheduleApi
from tests.reliability.harness import SIZES, TINY, Harness, Size, rest_schedule_config
from tests.services import wait_for

# A quarter of the companies have partitions of six chunks, each taking a moment upstream, so
# that a kill often lands between two checkpoints of a task.
CHUNKED = {"jobs_per_day": 12, "employees": 2, "teams": 1, "page_size": 2, "chunk_delay_s": 0.05}
KILLS = 20


def expected_chunks(config: dict[str, Any], resource: str) -> int:
    total = int(config["jobs_per_day"] if resource == "schedule" else config["employees"])
    return max(1, -(-total // int(config["page_size"])))


@pytest.mark.parametrize("size", SIZES)
def test_sigkill_of_random_workers_twenty_times_loses_and_doubles_nothing(
    make_harness: Any, size: Size
) -> None:
    h: Harness = make_harness(size)
    chunked = h.add_companies(size.companies // 4, CHUNKED, name="chunked")
    h.add_companies(size.companies - len(chunked), TINY)
    h.start_workers()
    h.start_sweeper()
    job = h.plan()
    rng = random.Random(20)
    step = job.total_tasks // (KILLS + 5)
    midway: set[int] = set()  # chunked tasks caught between two checkpoints by a kill
    for kill in range(1, KILLS + 1):
        h.wait_for_done(job.job_id, at_least=kill * step)
        victim = rng.choice(h.fleet.alive)
        h.fleet.kill(victim)
        with h.engine.connect() as conn:
            midway.update(conn.execute(select(TASKS.c.id).where(
                TASKS.c.job_id == job.job_id, TASKS.c.company_id.in_(chunked), TASKS.c.status == "processing",
                TASKS.c.chunks > 0)).scalars())
        h.fleet.start(threads=size.threads)
    assert not h.progress(job.job_id).finished, "the job ended before the twentieth kill"

    [report] = h.finish(job.job_id)

    assert report.states == {"completed": job.total_tasks}
    assert report.retried_tasks > 0, "no kill hit a task in flight"
    with h.engine.connect() as conn:
        tasks = list(conn.execute(select(TASKS).where(TASKS.c.job_id == job.job_id, TASKS.c.company_id.in_(chunked))))
    # Some kills took a task down between two checkpoints; it resumed from its saved cursor (a
    # restart from the first chunk would count extra chunks, and redo the work).
    resumed = [task.id for task in tasks if task.id in midway and task.attempts > 1]
    assert resumed, "no kill caught a chunked task mid-partition"
    wrong = [(task.id, task.resource, task.chunks) for task in tasks
             if task.chunks != expected_chunks(CHUNKED, task.resource)]
    assert not wrong, f"tasks whose chunk count shows work redone from the start: {wrong[:10]}"
    assert h.sweeper is not None and h.sweeper.resent > 0


class ChunkWatcher:
    """Samples the ``chunks`` of some tasks until stopped, to show that it never goes backwards."""

    def __init__(self, h: Harness, task_ids: list[int]) -> None:
        self.h = h
        self.task_ids = task_ids
        self.samples: dict[int, list[int]] = defaultdict(list)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> ChunkWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.wait(0.05):
            with self.h.engine.connect() as conn:
                rows = conn.execute(select(TASKS.c.id, TASKS.c.chunks).where(TASKS.c.id.in_(self.task_ids)))
                for task_id, chunks in rows:
                    self.samples[task_id].append(chunks)

    def backwards(self) -> dict[int, list[int]]:
        return {task_id: seq for task_id, seq in self.samples.items()
                if any(b < a for a, b in itertools.pairwise(seq))}


@pytest.mark.parametrize("size", SIZES)
def test_sigterm_mid_chunk_checkpoints_exits_cleanly_and_redoes_nothing(make_harness: Any, size: Size) -> None:
    pages = 60  # long enough that a task three chunks in is far from done when the signal lands
    with ScheduleApi(pages, users=2) as api:
        h: Harness = make_harness(size)
        # The first company's two days are one-record pages (one chunk each); the rest one page a day.
        expect = {"jobs_per_day": pages, "employees": 2}
        [slow] = h.add_companies(1, rest_schedule_config(api, page_size=1, days_ahead=2),
                                 connector="rest", name="slow", expect=expect)
        h.add_companies(size.companies - 1, rest_schedule_config(api, page_size=100, days_ahead=size.days_ahead),
                        connector="rest", expect=expect)
        [first] = h.start_workers(1)
        h.start_sweeper()
        job = h.plan()
        with h.engine.connect() as conn:
            slow_tasks = list(conn.execute(select(TASKS.c.id).where(TASKS.c.job_id == job.job_id,
                                                                     TASKS.c.company_id == slow,
                                                                     TASKS.c.resource == "schedule")).scalars())

        def in_flight() -> list[Any]:
            with h.engine.connect() as conn:
                return list(conn.execute(select(TASKS).where(
                    TASKS.c.id.in_(slow_tasks), TASKS.c.status == "processing", TASKS.c.chunks.between(3, 20))))

        with ChunkWatcher(h, slow_tasks) as watcher:
            wait_for(lambda: bool(in_flight()), timeout=60, what="a slow task three chunks in")
            busy = in_flight()
            signalled = time.monotonic()
            h.fleet.terminate(first)
            code = first.wait(timeout=60)
            exit_s = time.monotonic() - signalled
            with h.engine.connect() as conn:
                after_stop = {row.id: row for row in conn.execute(select(TASKS).where(TASKS.c.id.in_(slow_tasks)))}
            h.start_workers(size.workers)
            [report] = h.finish(job.job_id)

        assert code == 0, f"the worker exited with {code}\n{h.fleet.logs()}"
        assert exit_s < 15, f"the worker took {exit_s:.1f}s to stop"
        stopped = [task for task in busy if after_stop[task.id].status == "pending"]
        assert stopped, f"no task in flight was handed off at a chunk boundary: {[after_stop[t.id] for t in busy]}"
        for task in stopped:
            assert 0 < after_stop[task.id].chunks < pages, "the cursor saved at the stop is mid-partition"
        notes = [entry.message for entry in h.job_log(job.job_id) if "worker stopping" in entry.message]
        assert len(notes) >= len(stopped), notes
        assert not watcher.backwards(), f"chunk counts went backwards: {watcher.backwards()}"
        assert report.states == {"completed": job.total_tasks}

        # Each page (= chunk) of the slow partitions was fetched once, the ones in hand at most twice.
        fetches = Counter((r.params["startDate"], r.params["page"]) for r in api.requests
                          if r.status == 200 and r.params.get("pageSize") == "1")
        assert len(fetches) == len(slow_tasks) * (pages + 1), "every page and the empty one that ends each day"
        assert max(fetches.values()) <= 2, fetches.most_common(3)
        assert sum(fetches.values()) - len(fetches) <= len(busy), "work redone beyond the chunks in hand"
