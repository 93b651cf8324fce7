"""One attempt at a task: the claim's fencing token, its deadline and its lease heartbeat.

Modelled on Temporal's activity context: the code running a task never touches the outside
world except through its :class:`Attempt`. Staged parts are named after the claim's token, so
a worker that lost its lease can only write parts nobody reads; the part list lives in
``fetch_state`` and is written by the fenced save, so assembly reads exactly the parts its own
lineage recorded (defect 1). Long phases (merge, upload) call :meth:`Attempt.heartbeat`, which
renews the lease under the fence, and run inside :meth:`Attempt.keeping_lease`, which renews it
from a timer while one blocking call (a single PUT over a slow link) lasts longer (defect 5);
rate-limit waits and HTTP requests are bounded by :attr:`Attempt.deadline` (defect 8).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, BinaryIO, TypeVar

from pipeline.datasets import stage_chunk, staging_key
from pipeline.errors import DeadlineExceeded
from pipeline.jobs import Claim, hand_off, record_attempt_failure, renew_lease, save_progress
from pipeline.runtime import Runtime

T = TypeVar("T")
# Records between two looks at the clock while merging.
HEARTBEAT_EVERY = 2000
# How often the lease keeper looks for work when it keeps no lease (a new one due sooner wakes it).
IDLE_LOOK_S = 1.0


@dataclass
class Attempt:
    """The context of one claim of one task.

    Parameters:
        rt: engine, blob store and settings.
        claim: what the claim returned, including its fencing token.
        deadline: ``time.monotonic()`` value after which the fetch hands the task off.
        finish_by: ``time.monotonic()`` value after which not even the final merge and upload
            may renew the lease (the attempt then fails, retryably).
        saved_state: the ``fetch_state`` as last saved (by the claim or by :meth:`save`).
    """

    rt: Runtime
    claim: Claim
    deadline: float
    finish_by: float
    should_stop: Callable[[], bool] = lambda: False
    renewals: int = 0
    saved_state: dict[str, Any] | None = None
    _renewed: float = field(default_factory=time.monotonic)

    @classmethod
    def start(cls, rt: Runtime, claim: Claim, *, should_stop: Callable[[], bool] | None = None) -> Attempt:
        now = time.monotonic()
        settings = rt.settings
        return cls(rt=rt, claim=claim, deadline=now + settings.task_time_budget_s,
                   finish_by=now + settings.task_time_budget_s + settings.publish_budget_s,
                   should_stop=should_stop or (lambda: False), saved_state=claim.fetch_state, _renewed=now)

    @property
    def lease_s(self) -> float:
        return self.rt.settings.lease_seconds

    def lease_deadline(self) -> float:
        """``time.monotonic()`` value by which waits and requests must be over: two thirds into
        the lease as last renewed (the rest is room for the fenced save)."""
        return self._renewed + self.lease_s * 2 / 3

    def out_of_time(self) -> bool:
        return time.monotonic() >= self.deadline

    # --- side effects, all fenced or token-named ---------------------------------------------

    def stage(self, index: int, records: Iterable[Any]) -> str:
        """Stage one chunk under this claim's token; returns the part's key (to record in the
        part list by :meth:`save`)."""
        key = staging_key(self.claim.task_id, self.claim.token, index)
        with self.keeping_lease():  # one PUT may outlast the lease on a slow link
            stage_chunk(self.rt.store, key, records)
        return key

    def save(self, fetch_state: dict[str, Any], chunks: int) -> None:
        """The fenced save of the cursor and part list; renews the lease."""
        save_progress(self.rt.engine, self.claim, fetch_state=fetch_state, chunks=chunks, lease_s=self.lease_s)
        self.saved_state = fetch_state
        self._renewed = time.monotonic()

    def heartbeat(self) -> None:
        """Renew the lease under the fence once a third of it has passed since the last renewal.

        Raises:
            LeaseLost / TaskCancelled: the task is no longer this attempt's; stop.
            DeadlineExceeded: the attempt ran past its budget for the final phase.
        """
        now = time.monotonic()
        if now - self._renewed < self.lease_s / 3 - 0.01:
            return
        if now >= self.finish_by:
            raise DeadlineExceeded(
                f"task {self.claim.task_id}: assembly and publish ran past the attempt's budget "
                f"(PIPELINE_TASK_TIME_BUDGET_S + PIPELINE_PUBLISH_BUDGET_S)")
        renew_lease(self.rt.engine, self.claim, lease_s=self.lease_s)
        self._renewed = now
        self.renewals += 1

    @contextmanager
    def keeping_lease(self) -> Iterator[None]:
        """Renew the lease every third of it while the block runs, so one blocking call (a PUT of
        a whole document over a slow link) cannot outlast it. The renewals come from the
        process's one :class:`LeaseKeeper` thread (not a thread per block: starting one cost
        more than a small task's upload). They stop at :attr:`finish_by`, so a block that hangs
        still loses its lease in bounded time; a renewal the fence refuses stops them and is
        raised when the block ends (unless the block raised first: the fenced publish then
        reports the loss itself)."""
        kept = KEEPER.keep(self)
        try:
            yield
        finally:
            KEEPER.release(kept)
        if kept.refused is not None:
            raise kept.refused

    def beating(self, items: Iterable[T]) -> Iterator[T]:
        """``items``, with a heartbeat every ``HEARTBEAT_EVERY`` of them (a long merge)."""
        for count, item in enumerate(items, 1):
            if count % HEARTBEAT_EVERY == 0:
                self.heartbeat()
            yield item

    def reader(self, file: BinaryIO) -> BinaryIO:
        """``file`` for an upload: every read is also a heartbeat (a long upload)."""
        return _BeatingReader(file, self)  # type: ignore[return-value]

    def hand_off(self, note: str, fetch_state: dict[str, Any] | None = None) -> None:
        hand_off(self.rt.engine, self.claim, note=note, fetch_state=fetch_state)

    def fail(self, error: str, *, final: bool, restart: bool = False, code: str = "internal") -> bool:
        return record_attempt_failure(self.rt.engine, self.claim, error, final=final, restart=restart, code=code)


class _BeatingReader:
    def __init__(self, file: BinaryIO, attempt: Attempt) -> None:
        self._file = file
        self._attempt = attempt

    def read(self, size: int = -1) -> bytes:
        self._attempt.heartbeat()
        return self._file.read(size)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)


@dataclass(eq=False)
class _Kept:
    """One block of :meth:`Attempt.keeping_lease`, as the keeper sees it."""

    attempt: Attempt
    due: float
    refused: BaseException | None = None
    busy: bool = False
    released: bool = False


class LeaseKeeper:
    """One daemon thread per process that renews the leases of the attempts inside
    :meth:`Attempt.keeping_lease`, each every third of its lease (``Attempt.heartbeat``, fenced)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._kept: list[_Kept] = []
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._wake_at = 0.0  # when the thread will look again by itself

    def keep(self, attempt: Attempt) -> _Kept:
        kept = _Kept(attempt, due=time.monotonic() + attempt.lease_s / 3)
        with self._cond:
            self._kept.append(kept)
            if self._thread is None or self._pid != os.getpid() or not self._thread.is_alive():
                # First use in this process (a forked worker inherits no threads).
                self._pid = os.getpid()
                self._thread = threading.Thread(target=self._run, name="lease-keeper", daemon=True)
                self._thread.start()
            elif kept.due < self._wake_at:
                self._cond.notify()  # due before the thread's next look (otherwise: no wake-up per task)
        return kept

    def release(self, kept: _Kept) -> None:
        """Stop renewing; waits for a renewal of this block in progress to finish."""
        with self._cond:
            kept.released = True
            while kept.busy:
                self._cond.wait()
            if kept in self._kept:
                self._kept.remove(kept)

    def _run(self) -> None:
        while True:
            with self._cond:
                now = time.monotonic()
                due = [kept for kept in self._kept if kept.due <= now]
                if not due:
                    self._wake_at = min((kept.due for kept in self._kept), default=now + IDLE_LOOK_S)
                    self._cond.wait(self._wake_at - now)
                    continue
                for kept in due:
                    kept.busy = True
            for kept in due:
                self._renew(kept)
            with self._cond:
                for kept in due:
                    kept.busy = False
                self._cond.notify_all()

    def _renew(self, kept: _Kept) -> None:
        attempt = kept.attempt
        kept.due = time.monotonic() + attempt.lease_s / 3
        if kept.released:
            return
        try:
            attempt.heartbeat()
        except Exception as exc:  # LeaseLost, TaskCancelled, DeadlineExceeded, an outage
            kept.refused = exc
            with self._cond:
                if kept in self._kept:
                    self._kept.remove(kept)


KEEPER = LeaseKeeper()
