"""A model-based test of the task protocol on real PostgreSQL and the real blob store.

Hypothesis drives workers through the protocol's own steps — claim, fetch and stage a chunk,
the fenced save, hand-off, publish, a failed attempt, a crash — interleaved with the lease
expiring (the database clock passing ``lease_until``), the sweeper, cancel, retry, GC, a
second overlapping job and the upstream changing its data. After every step the invariants
hold; when the rules stop, the system is driven to the end and every task must be terminal.

The upstream serves pages ``0..N-1``; page ``p`` at upstream version ``v`` has ``size(p, v)``
records, each tagged with ``p`` and ``v``. The model remembers which version of each page a
task's lineage *committed* (a successful fenced save); a published document must be exactly
those pages — a zombie's late write, a stale lineage or a lost part would show as a
difference. A frozen worker whose lease a rival took (``rival_reclaims``) may wake up later
(``stalled_worker_resumes_late``) or right after the rival staged the same indexes
(``overtaken_worker_resumes``, always enabled): with defect 1's fix reverted (token-less staging
keys, assembly by index) the ci run fails within 3–14 examples (12 runs of 12). Every publish
must replace the version its lineage started from (``_published_by``): with the compare-and-swap
removed, ``retry_overlaps_a_newer_job`` exposes it in about one run in three (the interleaving
needs two lineages and an operator; the regression test in test_protocol.py pins it).
Examples and steps: the ``ci`` profile (60 examples of up to 40 steps per upstream kind, no
shrinking; about 30 s for the file) by default, ``--hypothesis-profile long`` for long runs.

The machine runs once per upstream kind, with the same rules: ``scripted`` (the in-process
test connector) and ``graphql`` (the real ``graphql`` connector resource — relay paginator, one
page per chunk, HTTP client, SSRF guard with loopback allowlisted — against ``PagesApi``, a
graphql-core fake on loopback). Every fetch a rule or a delivery makes goes through the
company's connector, and the upstream serves the model's pages at the variant the model
expects for that claim, so the exactness check holds for both kinds.
"""

from __future__ import annotations

import functools
import hashlib
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from hypothesis import Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import select, text

from connectors import registry
from connectors.base import Chunk, FetchRequest, Record, ResourceSpec
from errors import LeaseLost, PipelineError, TaskCancelled, VersionChanged
from pipeline.attempt import Attempt
from pipeline.cleanup import collect_garbage
from pipeline.control import InvalidJobState, cancel_job, retry_job
from pipeline.execution import Outcome, RetryTask, _failed, finish, run_task
from pipeline.jobs import claim_task
from pipeline.models import DATASETS, JOBS, TASKS, Base
from pipeline.oauth_tokens import token_store
from pipeline.planning import plan_job
from pipeline.runtime import Runtime
from pipeline.secrets import unseal
from pipeline.sweeper import sweep
from tests.fakes import scripted
from tests.fakes.graphql_api import PagesApi, pages_config
from tests.fakes.scripted import Script, install
from tests.invariants import check_job_counters

pytestmark = pytest.mark.usefixtures("scripted_connector")
WORKERS = 3
MAX_ATTEMPTS = 3
CI_EXAMPLES = 60
STATS: dict[str, int] = {"examples": 0, "steps": 0, "claims": 0, "saves": 0, "publishes": 0, "refused_writes": 0,
                         "reclaims": 0, "late_stages": 0, "late_stages_over_a_live_part": 0}


def size(page: int, version: int) -> int:
    return 3 + (page * 7 + version * 5) % 6


def page_records(page: int, version: int) -> list[Record]:
    return [{"id": page * 100 + i, "p": page, "v": version} for i in range(size(page, version))]


class Broker:
    """Records what the sweeper and retry send (RabbitMQ only wakes workers)."""

    def __init__(self) -> None:
        self.sent: list[int] = []

    def enqueue(self, task_ids: Sequence[int], *, priority: str = "normal") -> None:
        self.sent.extend(task_ids)

    def backlog(self) -> int | None:
        return 0


@dataclass
class Held:
    """What one worker holds: its claim's attempt, its view of the lineage, a staged part."""

    attempt: Attempt
    state: dict[str, Any]
    chunks: int
    staged: tuple[str, int, Any, bool] | None = None  # (key, version, cursor, done) staged but not yet saved
    versions: list[int] = field(default_factory=list)


def make_machine(rt: Runtime, upstream: PagesApi | None) -> type[RuleBasedStateMachine]:
    """The machine on ``rt``; its upstream is ``upstream`` (a ``graphql`` resource) or, for
    ``None``, the ``scripted`` connector."""

    class ProtocolModel(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            STATS["examples"] += 1
            tables = ", ".join(table.name for table in Base.metadata.sorted_tables)
            with rt.engine.begin() as conn:
                conn.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
            for info in list(rt.store.list()):
                rt.store.delete(info.key)
            self.version = 0
            self.pages = 1
            self.held: dict[int, Held] = {}
            self.committed: dict[int, list[int]] = {}  # task -> versions of the pages its lineage saved
            self.published: list[int] | None = None  # page versions of the current document
            self.jobs: list[uuid.UUID] = []
            # The partition's version (checksum) when each task's lineage started, and now.
            self.base: dict[int, str | None] = {}
            self.current: str | None = None
            self.tasks: list[int] = []
            self.broker = Broker()
            # The variant the upstream serves now: set before each fetch to the claim's.
            self.serving: Callable[[], int] = lambda: 0

        # --- setup ---------------------------------------------------------------------------

        @initialize(pages=st.integers(1, 4))
        def setup(self, pages: int) -> None:
            self.pages = pages
            # What the upstream serves differs per attempt, so any part written by the wrong claim shows.
            def served() -> list[list[Record]]:
                variant = self.serving()
                return [page_records(p, variant) for p in range(self.pages)]

            from pipeline.companies import add_company

            if upstream is None:
                self.company = add_company(rt.engine, name="model", connector=scripted.NAME,
                                           config=install(Script(pages=lambda request: served()))).id
            else:
                upstream.source = served
                self.company = add_company(rt.engine, name="model", connector="graphql",
                                           config=pages_config(upstream, scripted.RESOURCE),
                                           context=rt.connector_context, secrets=rt.secrets).id
            self.spec = ResourceSpec(name=scripted.RESOURCE, primary_key="id", transform="identity")
            self._plan()

        def _plan(self) -> None:
            planned = plan_job(rt.engine, None, trigger="api", company_ids=[self.company])
            assert planned is not None
            self.jobs.append(planned.job_id)
            self.tasks.extend(planned.task_ids)
            for task in planned.task_ids:
                self.committed[task] = []

        def _variant(self, attempt: int) -> int:
            return self.version * 100 + attempt

        def _row(self, task: int) -> Any:
            with rt.engine.connect() as conn:
                return conn.execute(select(TASKS).where(TASKS.c.id == task)).one()

        def _fetch(self, held: Held) -> tuple[Chunk, int]:
            """The next chunk of ``held``'s lineage through the company's connector, as ``run_task``
            fetches it, and the variant served (the claim's attempt)."""
            claim = held.attempt.claim
            variant = self._variant(claim.attempts)
            self.serving = lambda: variant
            connector = registry.build(claim.connector, unseal(claim.connector_config, rt.secrets),
                                       context=rt.connector_context, tokens=token_store(rt, claim.company_id))
            try:
                chunk = connector.fetch(FetchRequest(
                    company_id=claim.company_id, external_id=claim.external_id, resource=claim.resource,
                    partition=claim.partition, state=held.state.get("cursor"), attempt=claim.attempts))
            finally:
                connector.close()
            assert [r["p"] for r in chunk.records] == [held.chunks] * size(held.chunks, variant)
            return chunk, variant

        def _delivery_variant(self, task: int) -> int:
            """The variant a delivery of ``task`` is served: its claim's attempt, read at fetch time."""
            return self._variant(self._row(task).attempts)

        def _published_by(self, task: int) -> None:
            """``task`` has just published: the version it replaced must be the one its lineage
            started from (or its own content). Stale data never lands on newer data (defect 7)."""
            STATS["publishes"] += 1
            with rt.engine.connect() as conn:
                checksum = conn.execute(select(DATASETS.c.checksum_sha256)).scalar_one()
            assert self.current in (self.base.get(task), checksum), (
                f"task {task} published over version {self.current}, published after its lineage "
                f"started from {self.base.get(task)}: stale data over newer")
            self.current = checksum

        def _drop(self, worker: int) -> None:
            self.held.pop(worker, None)

        def _refused(self, worker: int) -> None:
            STATS["refused_writes"] += 1
            self._drop(worker)

        # --- rules ---------------------------------------------------------------------------
        # The first rule is what Hypothesis shrinks towards: a worker making progress.

        @rule(worker=st.integers(0, WORKERS - 1), which=st.integers(0, 1), burst=st.integers(1, 6))
        def worker_progresses(self, worker: int, which: int, burst: int) -> None:
            """A worker's next ``burst`` steps of the happy path: claim, chunk boundaries, publish."""
            for _ in range(burst):
                held = self.held.get(worker)
                if held is None:
                    self.claim(worker, which)
                    if worker not in self.held:
                        return
                elif held.staged is not None:
                    self._save(worker)
                elif not held.state.get("done") and not (self.pages == 1 and held.chunks == 0 and which):
                    self._fetch_chunk(worker)
                else:
                    self._publish(worker)
                    return

        @rule(worker=st.integers(0, WORKERS - 1), which=st.integers(0, 1))
        def claim(self, worker: int, which: int) -> None:
            """A message is delivered to a worker (maybe a duplicate; maybe a task leased by another)."""
            STATS["steps"] += 1
            self._claim(worker, self.tasks[min(which, len(self.tasks) - 1)])

        def _claim(self, worker: int, task: int) -> None:
            claim = claim_task(rt.engine, task, lease_s=600, max_attempts=MAX_ATTEMPTS)
            if claim is None:
                return
            STATS["claims"] += 1
            state = dict(claim.fetch_state or {})
            if "base" not in state and claim.chunks == 0:
                state["base"] = claim.base_checksum
            if claim.chunks == 0:
                self.base[task] = self.current
                self.committed[task] = []
            self.held[worker] = Held(Attempt.start(rt, claim), state, claim.chunks,
                                     versions=list(self.committed[task][:claim.chunks]))

        @precondition(lambda self: any(h.staged is None and not h.state.get("done") for h in self.held.values()))
        @rule(data=st.data())
        def stage(self, data: st.DataObject) -> None:
            STATS["steps"] += 1
            worker = data.draw(st.sampled_from(sorted(
                w for w, h in self.held.items() if h.staged is None and not h.state.get("done"))))
            held = self.held[worker]
            chunk, variant = self._fetch(held)
            held.staged = (held.attempt.stage(held.chunks, chunk.records), variant, chunk.state, chunk.done)

        @precondition(lambda self: any(h.staged is None and not h.state.get("done") for h in self.held.values()))
        @rule(data=st.data())
        def fetch_chunk(self, data: st.DataObject) -> None:
            """Stage the next chunk and save it: one chunk boundary."""
            self._fetch_chunk(data.draw(st.sampled_from(sorted(
                w for w, h in self.held.items() if h.staged is None and not h.state.get("done")))))

        def _fetch_chunk(self, worker: int) -> None:
            held = self.held[worker]
            chunk, variant = self._fetch(held)
            held.staged = (held.attempt.stage(held.chunks, chunk.records), variant, chunk.state, chunk.done)
            self._save(worker)

        def _stale(self, held: Held) -> bool:
            """Whether another claim (or the task's end) has taken ``held``'s lease."""
            row = self._row(held.attempt.claim.task_id)
            return bool(row.status != "processing" or row.lease_token != held.attempt.claim.token)

        @precondition(lambda self: any(h.staged is None and not h.state.get("done") for h in self.held.values()))
        @rule(data=st.data(), progress=st.integers(0, 3))
        def rival_reclaims(self, data: st.DataObject, progress: int) -> None:
            """A worker freezes (a GC pause, a partitioned host) between two chunks for longer than
            its lease; the sweeper's message reaches another worker, which claims the task and makes
            up to ``progress`` chunks of headway (staging the very indexes the frozen one will
            stage) while the first is still frozen (it may resume later, or never)."""
            STATS["steps"] += 1
            self._overtake(data, progress)

        @rule(data=st.data(), before=st.integers(0, 2), progress=st.integers(1, 3))
        def overtaken_worker_resumes(self, data: st.DataObject, before: int, progress: int) -> None:
            """As ``rival_reclaims``, and the frozen worker wakes up right after the rival's headway:
            it stages its next chunk at an index the live lineage has just recorded (defect 1's
            interleaving: 70 of 150 records published). When no worker holds a task, a free one
            claims the first open task and saves ``before`` chunks first, so this rule is always
            enabled."""
            STATS["steps"] += 1
            if not any(h.staged is None and not h.state.get("done") for h in self.held.values()):
                free = [w for w in range(WORKERS) if w not in self.held]
                open_tasks = [t for t in self.tasks if self._row(t).status in ("pending", "processing")]
                if not free or not open_tasks:
                    return
                self._claim(free[0], open_tasks[0])
                for _ in range(before):
                    held = self.held.get(free[0])
                    if held is None or held.state.get("done"):
                        break
                    self._fetch_chunk(free[0])
                if not any(h.staged is None and not h.state.get("done") for h in self.held.values()):
                    return
            stalled = self._overtake(data, progress)
            if stalled is not None and stalled in self.held:
                self._resume_late(stalled)

        def _overtake(self, data: st.DataObject, progress: int) -> int | None:
            """Freeze a worker past its lease and let a free one claim its task and make
            ``progress`` chunks; the frozen worker, or ``None`` if no worker was free."""
            stalled = data.draw(st.sampled_from(sorted(
                w for w, h in self.held.items() if h.staged is None and not h.state.get("done"))))
            free = [w for w in range(WORKERS) if w not in self.held]
            if not free:
                return None
            rival = data.draw(st.sampled_from(free))
            task = self.held[stalled].attempt.claim.task_id
            with rt.engine.begin() as conn:
                conn.execute(text("UPDATE sync_tasks SET lease_until = clock_timestamp() - interval '1 second' "
                                  "WHERE id = :id AND status = 'processing'"), {"id": task})
            self._claim(rival, task)
            if rival not in self.held:
                return None
            STATS["reclaims"] += 1
            for _ in range(progress):
                held = self.held.get(rival)
                if held is None or held.state.get("done"):
                    break
                self._fetch_chunk(rival)
            return stalled

        @precondition(lambda self: any(h.staged is None and not h.state.get("done") for h in self.held.values()))
        @rule(data=st.data())
        def stalled_worker_resumes_late(self, data: st.DataObject) -> None:
            """A worker whose lease another claim took wakes up where it froze: it fetches its next
            chunk (its own attempt's variant of the page, often shorter than the live one's),
            stages it under its claim and tries the fenced save, which refuses it. Whatever it
            staged must never be read by the live lineage (defect 1)."""
            STATS["steps"] += 1
            stale = [w for w, h in sorted(self.held.items())
                     if h.staged is None and not h.state.get("done") and self._stale(h)]
            if not stale:
                return
            self._resume_late(data.draw(st.sampled_from(stale)))

        def _resume_late(self, worker: int) -> None:
            held = self.held[worker]
            live = self._row(held.attempt.claim.task_id)
            STATS["late_stages"] += 1
            if live.status in ("pending", "processing") and live.chunks > held.chunks:
                STATS["late_stages_over_a_live_part"] += 1  # the open lineage recorded a part at this index
            self._fetch_chunk(worker)
            assert worker not in self.held, "a worker that lost its lease saved its progress"

        @precondition(lambda self: any(h.staged is not None for h in self.held.values()))
        @rule(data=st.data())
        def save(self, data: st.DataObject) -> None:
            """A worker that staged a chunk earlier (and maybe stalled since) saves it."""
            self._save(data.draw(st.sampled_from(sorted(w for w, h in self.held.items() if h.staged is not None))))

        def _save(self, worker: int) -> None:
            STATS["steps"] += 1
            held = self.held[worker]
            assert held.staged is not None
            key, version, cursor, done = held.staged
            assert done == (held.chunks + 1 >= self.pages)
            parts = [*held.state.get("parts", []), key]
            chunks = held.chunks + 1
            state = {**held.state, "parts": parts, "cursor": cursor, "done": done}
            try:
                held.attempt.save(state, chunks)
            except (LeaseLost, TaskCancelled):
                self._refused(worker)
                return
            STATS["saves"] += 1
            held.state, held.chunks, held.staged = state, chunks, None
            held.versions.append(version)
            self.committed[held.attempt.claim.task_id] = list(held.versions)

        @precondition(lambda self: any(h.staged is None and not h.state.get("done") and h.chunks
                                       for h in self.held.values()))
        @rule(data=st.data())
        def hand_off(self, data: st.DataObject) -> None:
            STATS["steps"] += 1
            worker = data.draw(st.sampled_from(sorted(
                w for w, h in self.held.items() if h.staged is None and not h.state.get("done") and h.chunks)))
            try:
                self.held[worker].attempt.hand_off("continuation (model)")
            except (LeaseLost, TaskCancelled):
                STATS["refused_writes"] += 1
            self._drop(worker)

        @precondition(lambda self: any(h.state.get("done") or (self.pages == 1 and h.chunks == 0)
                                       for h in self.held.values()))
        @rule(data=st.data())
        def publish(self, data: st.DataObject) -> None:
            STATS["steps"] += 1
            self._publish(data.draw(st.sampled_from(sorted(
                w for w, h in self.held.items() if h.state.get("done") or (self.pages == 1 and h.chunks == 0)))))

        def _publish(self, worker: int) -> None:
            held = self.held[worker]
            single = None
            versions = list(held.versions)
            if held.chunks == 0:  # one page: nothing staged
                chunk, variant = self._fetch(held)
                assert chunk.done
                single, versions = chunk.records, [variant]
            try:
                finish(held.attempt, self.spec, held.state, held.chunks, single=single)
            except (LeaseLost, TaskCancelled):
                self._refused(worker)
                return
            except PipelineError as exc:
                # As run_task does: classified and recorded under the fence (a zombie whose parts
                # were cleaned up gets LeaseLost there; a stale lineage starts over).
                try:
                    _failed(held.attempt, exc, 0.0)
                except RetryTask:
                    pass
                if isinstance(exc, VersionChanged):
                    self.committed[held.attempt.claim.task_id] = []
                self._refused(worker)
                return
            self._published_by(held.attempt.claim.task_id)
            self.published = versions
            self._drop(worker)

        @precondition(lambda self: bool(self.held))
        @rule(data=st.data(), how=st.sampled_from(["retryable", "permanent", "killed"]))
        def worker_fails(self, data: st.DataObject, how: str) -> None:
            """The attempt fails (recorded), or the worker is killed (OOM, kill -9: nothing more
            is ever written by it)."""
            STATS["steps"] += 1
            worker = data.draw(st.sampled_from(sorted(self.held)))
            held = self.held[worker]
            if how != "killed":
                final = how == "permanent" or held.attempt.claim.attempts >= MAX_ATTEMPTS
                try:
                    held.attempt.fail("injected upstream error", final=final)
                except (LeaseLost, TaskCancelled):
                    STATS["refused_writes"] += 1
            self._drop(worker)

        @rule(sweeper=st.booleans())
        def leases_expire(self, sweeper: bool) -> None:
            """The database clock passes every lease (a stalled worker may still resume later),
            and maybe the sweeper runs."""
            STATS["steps"] += 1
            with rt.engine.begin() as conn:
                conn.execute(text("UPDATE sync_tasks SET lease_until = clock_timestamp() - interval '1 second' "
                                  "WHERE status = 'processing'"))
            if sweeper:
                sweep(rt.engine, self.broker, pending_grace_s=0.001)

        @rule(action=st.sampled_from(["cancel", "retry", "gc"]), which=st.integers(0, 1))
        def operator(self, action: str, which: int) -> None:
            """An operator cancels or retries a job, or GC runs. Retrying the older job while a
            newer one's task is open leaves the older task as it is (no second open task)."""
            STATS["steps"] += 1
            job = self.jobs[min(which, len(self.jobs) - 1)]
            if action == "gc":
                collect_garbage(rt.engine, rt.store, grace_s=0)
                return
            try:
                if action == "cancel":
                    cancel_job(rt.engine, job_id=job, requested_by="model")
                    return
                retry_job(rt.engine, self.broker, job_id=job, requested_by="model")
            except InvalidJobState:
                return
            for task in self.tasks:
                if self._row(task).fetch_state is None:
                    self.committed[task] = []

        @precondition(lambda self: len(self.tasks) < 2)
        @rule()
        def retry_overlaps_a_newer_job(self) -> None:
            """An operator cancels the first job, a person syncs the partition again (a second job,
            planned since no task is open), then the operator retries the first job while the
            second's task is open: the retry must leave the first job's task as it is (two open
            tasks of a partition would both publish), as planning does."""
            STATS["steps"] += 1
            try:
                cancel_job(rt.engine, job_id=self.jobs[0], requested_by="model")
            except InvalidJobState:
                pass
            self._plan()
            try:
                retry_job(rt.engine, self.broker, job_id=self.jobs[0], requested_by="model")
            except InvalidJobState:
                return
            self.committed[self.tasks[0]] = []

        @rule(overlapping_job=st.booleans())
        def world_changes(self, overlapping_job: bool) -> None:
            """The upstream changes its data, or a person syncs the same partition while the
            first job is still open (a second open task)."""
            STATS["steps"] += 1
            if overlapping_job and len(self.tasks) < 2:
                self._plan()
            else:
                self.version += 1

        # --- invariants ----------------------------------------------------------------------

        def _document(self) -> list[Record] | None:
            """The current document's records (its bytes checked against the row's sha256)."""
            with rt.engine.connect() as conn:
                rows = conn.execute(select(DATASETS)).all()
            if not rows:
                return None
            (row,) = rows
            data = rt.store.get(row.storage_key)
            assert hashlib.sha256(data).hexdigest() == row.checksum_sha256
            records: list[Record] = orjson.loads(data)["records"]
            assert len(records) == row.record_count, "the row's record count is not the document's"
            return records

        @invariant()
        def every_page_is_published_whole_from_one_upstream_response(self) -> None:
            """Without the model's bookkeeping: every page is there, and its records are exactly
            what the upstream served for it in one response (no record missing, none foreign)."""
            records = self._document()
            if records is None:
                return
            pages: dict[int, list[Record]] = {}
            for record in records:
                pages.setdefault(record["p"], []).append(record)
            assert sorted(pages) == list(range(self.pages)), f"pages published: {sorted(pages)}"
            for page, got in pages.items():
                variants = {r["v"] for r in got}
                assert len(variants) == 1, f"page {page} mixes upstream responses {sorted(variants)}"
                (variant,) = variants
                assert got == page_records(page, variant), (
                    f"page {page}: {len(got)} records published, the upstream served {size(page, variant)}")

        @invariant()
        def the_current_document_is_exactly_what_its_lineage_saved(self) -> None:
            """No document has fewer records than the upstream served the lineage that published it,
            and every published record equals the upstream's: a zombie's late part, a stale
            lineage or a lost part shows here."""
            records = self._document()
            if records is None:
                return
            assert self.published is not None
            expected = [(p, v, r["id"]) for p, v in enumerate(self.published) for r in page_records(p, v)]
            assert len(records) >= len(expected), (
                f"published {len(records)} records, fewer than the {len(expected)} its upstream served")
            got = [(r["p"], r["v"], r["id"]) for r in records]
            assert got == expected, (
                f"the document is not the pages its lineage saved: versions "
                f"{[sorted({r['v'] for r in records if r['p'] == p}) for p in range(self.pages)]}, "
                f"saved {self.published}")

        @invariant()
        def no_task_is_processing_without_a_lease_and_attempts_are_bounded(self) -> None:
            with rt.engine.connect() as conn:
                for task in conn.execute(select(TASKS)).all():
                    if task.status == "processing":
                        assert task.lease_until is not None and task.lease_token is not None
                    assert task.attempts <= MAX_ATTEMPTS

        @invariant()
        def a_partition_has_at_most_one_open_task(self) -> None:
            """Planning and retry both skip a partition with an open task (defect 7)."""
            with rt.engine.connect() as conn:
                open_tasks = conn.execute(select(TASKS.c.id).where(
                    TASKS.c.status.in_(("pending", "processing")))).scalars().all()
            assert len(open_tasks) <= 1, f"the partition has {len(open_tasks)} open tasks: {sorted(open_tasks)}"

        @invariant()
        def finished_jobs_add_up(self) -> None:
            with rt.engine.connect() as conn:
                finished = conn.execute(select(JOBS.c.id).where(
                    JOBS.c.status.in_(("completed", "failed", "cancelled")))).scalars().all()
            for job_id in finished:
                check_job_counters(rt.engine, job_id)

        def teardown(self) -> None:
            """Every task ends once the rules stop: stalled workers never come back, the
            sweeper re-sends, and real deliveries run each task to its end."""
            self.held.clear()
            for _ in range(4 * MAX_ATTEMPTS):
                with rt.engine.begin() as conn:
                    conn.execute(text("UPDATE sync_tasks SET lease_until = clock_timestamp() - interval '1 second' "
                                      "WHERE status = 'processing'"))
                open_tasks = [t for t in self.tasks if self._row(t).status in ("pending", "processing")]
                if not open_tasks:
                    break
                for task in open_tasks:
                    saved = self._row(task).chunks
                    if saved == 0:  # this delivery starts the lineage
                        self.base[task] = self.current
                    # A delivery's claim makes the next attempt: the upstream serves its variant.
                    self.serving = functools.partial(self._delivery_variant, task)
                    try:
                        outcome = run_task(rt, task)
                    except RetryTask:
                        continue
                    if outcome is Outcome.COMPLETED:
                        self._published_by(task)
                        resumed = self.committed[task][:saved]
                        variant = self._variant(self._row(task).attempts)
                        self.published = resumed + [variant] * (self.pages - len(resumed))
            for task in self.tasks:
                assert self._row(task).status in ("completed", "failed", "cancelled"), f"task {task} never ended"
            for job_id in self.jobs:
                check_job_counters(rt.engine, job_id)
            self.every_page_is_published_whole_from_one_upstream_response()
            self.the_current_document_is_exactly_what_its_lineage_saved()

    return ProtocolModel


def model_settings() -> settings:
    """The loaded profile's settings, for CI (the ``ci`` profile) with two changes: at least
    ``CI_EXAMPLES`` examples (one costs about a tenth of a second here), so that a frozen worker's
    late part (defect 1) is reached by several of them; and no shrinking, which replays every
    step on the real services and outlasts the test's timeout (a failure is reported unshrunk,
    with its steps, in seconds). ``--hypothesis-profile long`` keeps its own count and shrinks."""
    current = settings.default
    assert current is not None
    if settings.get_current_profile_name() != "ci":
        return current
    return settings(current, max_examples=max(current.max_examples, CI_EXAMPLES),
                    phases=[phase for phase in current.phases if phase is not Phase.shrink])


@pytest.fixture(params=["scripted", "graphql"])
def model_upstream(request: pytest.FixtureRequest) -> Iterator[PagesApi | None]:
    """The upstream kind the machine syncs from: ``None`` for the ``scripted`` connector, or a
    started ``PagesApi`` on loopback for a ``graphql`` resource (the stack allowlists loopback)."""
    if request.param == "scripted":
        yield None
        return
    with PagesApi() as api:
        yield api


def test_the_task_protocol_keeps_its_invariants_under_any_interleaving(
    stack: Runtime, model_upstream: PagesApi | None
) -> None:
    rt = Runtime(settings=stack.settings.model_copy(update={"max_attempts": MAX_ATTEMPTS, "lease_s": 600.0}),
                 engine=stack.engine, store=stack.store)
    STATS.update(dict.fromkeys(STATS, 0))
    kind = "scripted" if model_upstream is None else "graphql"
    try:
        run_state_machine_as_test(make_machine(rt, model_upstream), settings=model_settings())
    finally:  # also when an example failed: how far it got (examples include the shrinking's)
        requests = "" if model_upstream is None else f", {len(model_upstream.requests)} upstream requests"
        print(f"protocol model ({kind}{requests}): {STATS}")
    assert STATS["publishes"] > 0, "no example published"

