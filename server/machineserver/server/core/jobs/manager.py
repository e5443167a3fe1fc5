"""Regression jobs: CreateJob's matrix checked and expanded (core/jobs/matrix.py), the job
and its runs persisted before the call is answered (an acknowledged job is never lost),
its runs scheduled on a :class:`RunEngine` (local or Ray), retried, watched, cancelled,
merged into one coverage report, exported as JUnit XML.

Retries: a run that comes back ERRORED with ``retryable`` (the engine, its worker or its
node failed) runs again, up to ``criteria.retries`` more attempts; ``JobRun.attempts``
counts them. FAILED and non-retryable ERRORED runs are never retried.

After a restart (:meth:`JobManager.start`), every job that had not ended goes on: its
QUEUED runs run; a run that was RUNNING when the server stopped was interrupted, which
counts as an attempt that errored: it runs again while its retries allow, else it is
ERRORED ("the server restarted while the run was running"). A run whose program or
snapshot blob is gone by then errors when it runs (not retried). Nothing that a CreateJob
answered is lost: the job and all its runs were written before the answer.

Jobs do not count against session quotas (a run is not a session; the engine's
concurrency bounds what they take).
"""

from __future__ import annotations

import asyncio
import builtins
import contextvars
import json
import secrets
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

import structlog

from machineserver.server.core import tenancy
from machineserver.server.core.backends import BackendRegistry
from machineserver.server.core.catalog import BoardCatalog
from machineserver.server.core.coverage import Collection, CoverageManager, blocks_from_list
from machineserver.server.core.errors import NotFound
from machineserver.server.core.jobs import junit
from machineserver.server.core.jobs.matrix import JobRequest, plan
from machineserver.server.core.jobs.model import RunEngine, RunResult, RunSpec, Verdict
from machineserver.server.core.jobs.records import (
    JOBS,
    RUNS,
    JobRecord,
    JobState,
    RunRecord,
    counts_of,
    job_row,
    plan_fields,
    run_row,
    run_spec,
)
from machineserver.server.core.jobs.runner import coverage_blocks
from machineserver.server.core.listing import (
    FieldGetters,
    Page,
    match_terms,
    paginate,
    parse_filter,
    resource_id,
)
from machineserver.server.core.models import from_row, now
from machineserver.server.core.programs import ProgramStore
from machineserver.server.core.pubsub import Hub
from machineserver.server.core.snapshots import SnapshotStore
from machineserver.server.drivers.base import merge_blocks
from machineserver.server.store.blobs import BlobStore
from machineserver.server.store.db import Database

log = structlog.get_logger(__name__)

RESTARTED = "the server restarted while the run was running"


@dataclass(frozen=True)
class JobEvent:
    job: str  # job id
    run: RunRecord | None  # the run that changed (None: the job itself)
    ended: bool = False


class _Blobs:
    """The server's blob store as a run engine's BlobSource."""

    def __init__(self, blobs: BlobStore) -> None:
        self._blobs = blobs

    def read(self, sha256: str) -> bytes:
        return self._blobs.get(sha256)


class _Live:
    """A job that has not ended: its runs in memory, its driving task."""

    def __init__(self, job: JobRecord, runs: list[RunRecord]) -> None:
        self.job = job
        self.runs = runs
        self.task: asyncio.Task[None] | None = None


class JobManager:
    def __init__(self, db: Database, blobs: BlobStore, programs: ProgramStore, catalog: BoardCatalog,
                 backends: BackendRegistry, snapshots: SnapshotStore, coverage: CoverageManager,
                 run_engine: RunEngine) -> None:
        self._db = db
        self._blobs = _Blobs(blobs)
        self._programs = programs
        self._catalog = catalog
        self._backends = backends
        self._snapshots = snapshots
        self._coverage = coverage
        self.run_engine = run_engine
        self._live: dict[str, _Live] = {}
        self.events: Hub[JobEvent] = Hub(maxlen=4096)
        self._closing = False

    def use_engine(self, run_engine: RunEngine) -> None:
        """The engine runs go to (before start)."""
        self.run_engine = run_engine

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Jobs that had not ended go on (see the module's docstring)."""
        for row in self._db.rows(JOBS, "state = ?", [JobState.RUNNING.value]):
            job = from_row(JobRecord, row["data"])
            runs = [from_row(RunRecord, r["data"])
                    for r in self._db.rows(RUNS, "job = ?", [job.id], order_by="idx")]
            retries = int(job.criteria.get("retries", 0))
            for run in runs:
                if run.verdict == Verdict.RUNNING.value:
                    if run.attempts <= retries:
                        run.verdict = Verdict.QUEUED.value
                        run.failure_reason = f"{RESTARTED} (attempt {run.attempts}); queued again"
                    else:
                        run.verdict = Verdict.ERRORED.value
                        run.failure_reason = f"{RESTARTED} (attempt {run.attempts}; no retries left)"
                        run.end_time = now()
                    run.update_time = now()
                    self._db.put(RUNS, run_row(run))
            live = _Live(job, runs)
            self._live[job.id] = live
            log.info("job_resumed", job=job.id, left=sum(not r.final for r in runs))
            self._drive_later(live)

    async def close(self) -> None:
        """Stops driving (runs in progress are stopped; their rows stay as they are, and
        the next start takes them up)."""
        self._closing = True
        tasks = [live.task for live in self._live.values() if live.task is not None and not live.task.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=30)
        for live in self._live.values():  # stopped by us, cleanly: not an attempt of theirs
            for run in live.runs:
                if run.verdict == Verdict.RUNNING.value:
                    run.verdict = Verdict.QUEUED.value
                    run.attempts = max(0, run.attempts - 1)
                    run.failure_reason = "the server stopped while the run was running; queued again"
                    run.update_time = now()
                    self._db.put(RUNS, run_row(run))
        await self.run_engine.aclose()
        self.events.close()

    # ------------------------------------------------------------------ create, read

    def create(self, req: JobRequest) -> JobRecord:
        """Check, expand, persist (job and runs in one transaction), then schedule."""
        checked = plan(req, self._programs, self._catalog, self._backends, self._snapshots)
        owner, tenant = tenancy.stamp()
        job = JobRecord(
            id="job-" + secrets.token_hex(6), display_name=req.display_name,
            matrix={"programs": [f"programs/{p}" for p in checked.programs], "boards": list(checked.boards),
                    "backends": list(req.backends), "variants": [
                        {"name": v.name, "console_input": len(v.console_input), "snapshot": v.snapshot,
                         "memory_patches": len(v.memory_patches)} for v in req.variants]},
            labels=dict(req.labels), engine=self.run_engine.name, owner=owner, tenant=tenant,
            **plan_fields(checked))
        runs = [RunRecord(id=f"{job.id}/{i}", job=job.id, index=i, program=r.program, board=r.board,
                          backend=r.backend, variant=r.variant, tenant=tenant)
                for i, r in enumerate(checked.runs)]
        with self._db.transaction(JOBS, job.id) as db:
            db.table(JOBS).insert(_encoded(job_row(job)))
            db.table(RUNS).insert_all([_encoded(run_row(r)) for r in runs], batch_size=500)
        live = _Live(job, runs)
        self._live[job.id] = live
        log.info("job_created", job=job.id, runs=len(runs), engine=job.engine)
        self._drive_later(live)
        return job

    def get(self, name: str, field: str = "name") -> JobRecord:
        """The job a caller names: NotFound when there is none or the caller's tenant does
        not see it (the same answer)."""
        jid = resource_id(name, "jobs", field)
        live = self._live.get(jid)
        job = live.job if live is not None else None
        if job is None:
            row = self._db.get(JOBS, jid)
            job = from_row(JobRecord, row["data"]) if row is not None else None
        if job is None or not tenancy.visible(job.tenant):
            raise NotFound("job", jid)
        return job

    def counts(self, job: JobRecord) -> dict[str, int]:
        live = self._live.get(job.id)
        if live is not None:
            return counts_of(live.runs)
        return job.counts or counts_of(self.runs(job))

    def runs(self, job: JobRecord) -> builtins.list[RunRecord]:
        live = self._live.get(job.id)
        if live is not None:
            return builtins.list(live.runs)
        return [from_row(RunRecord, r["data"]) for r in self._db.rows(RUNS, "job = ?", [job.id], order_by="idx")]

    def list(self, page_size: int, page_token: str, filter_text: str) -> Page[JobRecord]:
        terms = parse_filter(filter_text, ["state", "labels.", tenancy.FILTER_KEY])
        scope = tenancy.list_scope(terms)
        if "state" in terms:
            terms["state"] = terms["state"].upper().removeprefix("JOB_STATE_")
        getters: FieldGetters[JobRecord] = {"state": lambda j: JobState(j.state).name, "labels.": lambda j: j.labels}
        where, params = scope.where()
        rows = self._db.rows(JOBS, where, params, order_by="create_time DESC, id")
        jobs = [self._fresh(from_row(JobRecord, r["data"])) for r in rows]
        items = [j for j in jobs if match_terms(terms, getters, j)]
        return paginate(items, page_size, page_token, scope.token_key(filter_text))

    def _fresh(self, job: JobRecord) -> JobRecord:
        live = self._live.get(job.id)
        return live.job if live is not None else job

    def list_runs(self, parent: str, page_size: int, page_token: str, filter_text: str) -> Page[RunRecord]:
        job = self.get(parent, "parent")
        terms = parse_filter(filter_text, ["verdict", "program", "board", "backend", "variant"])
        if "verdict" in terms:
            terms["verdict"] = terms["verdict"].upper().removeprefix("RUN_VERDICT_")
        if "program" in terms:
            terms["program"] = terms["program"].removeprefix("programs/")
        getters: FieldGetters[RunRecord] = {
            "verdict": lambda r: Verdict(r.verdict).name, "program": lambda r: r.program,
            "board": lambda r: r.board, "backend": lambda r: r.backend, "variant": lambda r: r.variant}
        items = [r for r in self.runs(job) if match_terms(terms, getters, r)]
        return paginate(items, page_size, page_token, f"{job.id}\x00{filter_text}")

    async def watch(self, name: str) -> AsyncIterator[tuple[JobRecord, RunRecord | None]]:
        """The job now, then the job and the run each time one changes; ends when the job
        ends (at once for one that has ended)."""
        job = self.get(name)
        sub = self.events.subscribe(lambda ev: ev.job == job.id)
        try:
            yield self.get(name), None
            if self.get(name).ended:
                return
            async for ev in sub:
                yield self.get(name), ev.run
                if ev.ended:
                    return
        finally:
            sub.close()

    def junit_xml(self, name: str) -> bytes:
        job = self.get(name)
        return junit.render(job, self.runs(job))

    # ------------------------------------------------------------------ cancel

    async def cancel(self, name: str) -> JobRecord:
        """Queued runs are CANCELLED; running ones are stopped where they run (CANCELLED
        too). A job that has ended is left as it is."""
        job = self.get(name)
        live = self._live.get(job.id)
        if live is None or job.ended:
            return job
        job.state = JobState.CANCELLED.value
        self._save_job(job)
        for run in live.runs:
            if run.verdict == Verdict.QUEUED.value:
                self._finish_run(live, run, RunResult(Verdict.CANCELLED, failure_reason="the job was cancelled"))
        await self.run_engine.cancel(job.id)
        task = live.task
        if task is not None and not task.done():
            await asyncio.wait({task}, timeout=30)
        for run in live.runs:  # whatever the engine did not hand back
            if not run.final:
                self._finish_run(live, run, RunResult(Verdict.CANCELLED, failure_reason="the job was cancelled"))
        await self._end(live)
        return job

    # ------------------------------------------------------------------ driving

    def _drive_later(self, live: _Live) -> None:
        # a context of its own: the job runs as the server's own work, not as the call that
        # created it (its records carry the job's owner and tenant)
        live.task = asyncio.get_running_loop().create_task(
            self._drive(live), name=f"job-{live.job.id}", context=contextvars.Context())

    async def _drive(self, live: _Live) -> None:
        job = live.job
        try:
            pending = [run_spec(job, r, r.attempts + 1) for r in live.runs if not r.final]
            retries = job.criteria_obj().retries
            while pending and not job.ended:
                again: builtins.list[RunSpec] = []
                results = self.run_engine.execute(pending, self._blobs, lambda s, node: self._started(live, s, node))
                try:
                    async for spec, result in results:
                        self._take(live, spec, result, retries, again)
                finally:
                    aclose = getattr(results, "aclose", None)
                    if aclose is not None:
                        await aclose()  # stops what still runs (a cancelled job, a closing server)
                pending = again
            if not job.ended:
                await self._end(live)
        except asyncio.CancelledError:
            if not self._closing and not job.ended:
                raise
        except Exception:
            log.exception("job_failed", job=job.id)
            for run in live.runs:
                if not run.final:
                    self._finish_run(live, run, RunResult(Verdict.ERRORED, failure_reason="the job's scheduler failed"))
            await self._end(live)

    def _take(self, live: _Live, spec: RunSpec, result: RunResult, retries: int, again: builtins.list[RunSpec]) -> None:
        """A run's result: final, or (ERRORED and retryable, retries left) queued again."""
        job = live.job
        run = live.runs[spec.index]
        if run.final:
            return
        if result.verdict is Verdict.ERRORED and result.retryable and spec.attempt <= retries and not job.ended:
            run.attempts = spec.attempt
            run.verdict = Verdict.QUEUED.value
            run.failure_reason = f"attempt {spec.attempt} errored: {result.failure_reason}; retrying"
            run.node = result.node
            self._save_run(live, run)
            again.append(run_spec(job, run, spec.attempt + 1))
            return
        self._finish_run(live, run, result, spec.attempt)

    def _started(self, live: _Live, spec: RunSpec, node: str) -> None:
        run = live.runs[spec.index]
        if run.final:
            return
        run.verdict = Verdict.RUNNING.value
        run.attempts = spec.attempt
        run.node = node
        run.start_time = now()
        self._save_run(live, run)

    def _finish_run(self, live: _Live, run: RunRecord, result: RunResult, attempt: int = 0) -> None:
        run.take(result)
        if attempt:
            run.attempts = attempt
        if result.coverage and live.job.criteria_obj().coverage:
            try:
                rec = self._coverage.save_collection(
                    run.program, [], Collection(blocks=coverage_blocks(result.coverage)),
                    owner=live.job.owner, tenant=live.job.tenant)
                run.coverage_report = rec.id
            except Exception as exc:  # the verdict stands without its coverage
                log.warning("run_coverage_not_stored", run=run.id, error=str(exc))
        self._save_run(live, run)

    def _save_run(self, live: _Live, run: RunRecord) -> None:
        run.update_time = now()
        self._db.put(RUNS, run_row(run))
        self.events.publish(JobEvent(live.job.id, run))

    def _save_job(self, job: JobRecord) -> None:
        job.update_time = now()
        self._db.put(JOBS, job_row(job))

    async def _end(self, live: _Live) -> None:
        job = live.job
        if job.state == JobState.RUNNING.value:
            job.state = JobState.DONE.value
        job.counts = counts_of(live.runs)
        job.end_time = now()
        if job.criteria_obj().coverage:
            job.coverage_report = self._merge_coverage(job, live.runs)
        self._save_job(job)
        self._live.pop(job.id, None)
        self.events.publish(JobEvent(job.id, None, ended=True))
        log.info("job_ended", job=job.id, state=JobState(job.state).name, **job.counts)

    def _merge_coverage(self, job: JobRecord, runs: builtins.list[RunRecord]) -> str:
        """The runs' own reports merged (per-address counts summed, as MergeCoverage does)
        into one report of the job's program."""
        merged = Collection()
        for run in runs:
            if not run.coverage_report:
                continue
            row = self._db.get("coverage_reports", run.coverage_report)
            if row is not None:
                merge_blocks(merged.blocks, blocks_from_list(row["data"]["blocks"]))
        program = next(iter(job.programs), "")
        if not program:
            return ""
        try:
            return self._coverage.save_collection(program, [], merged, owner=job.owner, tenant=job.tenant).id
        except Exception as exc:
            log.warning("job_coverage_not_stored", job=job.id, error=str(exc))
            return ""

    # ------------------------------------------------------------------ the cluster

    def nodes(self) -> builtins.list[Mapping[str, object]]:
        return self.run_engine.nodes()


def _encoded(row: Mapping[str, object]) -> dict[str, object]:
    out = dict(row)
    if not isinstance(out.get("data"), str):
        out["data"] = json.dumps(out["data"], sort_keys=True)
    return out
