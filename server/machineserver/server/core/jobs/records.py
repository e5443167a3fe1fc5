"""A job's and its runs' stored records (tables ``jobs`` and ``job_runs``, migration 5), and
their specs rebuilt from them."""

from __future__ import annotations

import base64
import enum
from dataclasses import asdict, dataclass, field
from typing import Any

from machineserver.server.core.identity import DEFAULT_TENANT
from machineserver.server.core.jobs.matrix import Plan
from machineserver.server.core.jobs.model import (
    Criteria,
    MemoryPatch,
    ProgramRef,
    Resources,
    RunResult,
    RunSpec,
    Variant,
    Verdict,
)
from machineserver.server.core.models import now

JOBS = "jobs"
RUNS = "job_runs"
COLLECTION = "jobs"


class JobState(enum.IntEnum):
    """The numbers are the proto's JobState."""

    RUNNING = 1
    DONE = 2
    CANCELLED = 3


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text)


@dataclass
class JobRecord:
    id: str
    display_name: str = ""
    # what the caller asked, for GetJob: programs ("programs/x"), boards, backends, variants
    matrix: dict[str, Any] = field(default_factory=dict)
    criteria: dict[str, Any] = field(default_factory=dict)
    resources: dict[str, Any] = field(default_factory=dict)
    # what each run's spec is made of (see Plan): program id -> [sha256, format, load address],
    # board -> YAML, variant -> its changes
    programs: dict[str, list[Any]] = field(default_factory=dict)
    boards: dict[str, str] = field(default_factory=dict)
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    state: int = JobState.RUNNING.value
    engine: str = "local"
    coverage_report: str = ""
    total: int = 0
    counts: dict[str, int] = field(default_factory=dict)  # kept once the job ends
    owner: str = ""
    tenant: str = DEFAULT_TENANT
    create_time: float = field(default_factory=now)
    update_time: float = field(default_factory=now)
    end_time: float | None = None

    @property
    def name(self) -> str:
        return f"{COLLECTION}/{self.id}"

    @property
    def ended(self) -> bool:
        return self.state != JobState.RUNNING.value

    def criteria_obj(self) -> Criteria:
        return Criteria(**self.criteria)

    def resources_obj(self) -> Resources:
        return Resources(**self.resources)

    def variant_obj(self, name: str) -> Variant:
        v = self.variants[name]
        return Variant(name, _unb64(v["console_input"]),
                       tuple(MemoryPatch(int(a), _unb64(d)) for a, d in v["memory_patches"]),
                       v["snapshot_sha256"], v["snapshot_id"])


def plan_fields(plan: Plan) -> dict[str, Any]:
    """The JobRecord fields that keep ``plan``."""
    return {
        "criteria": asdict(plan.criteria),
        "resources": {**asdict(plan.resources), "custom": dict(plan.resources.custom)},
        "programs": {pid: [p.sha256, p.format, p.load_address] for pid, p in plan.programs.items()},
        "boards": dict(plan.boards),
        "variants": {name: {"console_input": _b64(v.console_input),
                            "memory_patches": [[p.address, _b64(p.data)] for p in v.memory_patches],
                            "snapshot_sha256": v.snapshot_sha256, "snapshot_id": v.snapshot_id}
                     for name, v in plan.variants.items()},
        "total": len(plan.runs),
    }


@dataclass
class RunRecord:
    id: str  # "{job}/{index}"
    job: str
    index: int
    program: str  # program id
    board: str
    backend: str
    variant: str
    verdict: int = Verdict.QUEUED.value
    console_tail: str = ""  # base64
    exit_code: int | None = None
    instructions: int = 0
    virtual_ns: int = 0
    host_s: float = 0.0
    node: str = ""
    failure_reason: str = ""
    attempts: int = 0
    coverage_report: str = ""  # report id
    start_time: float | None = None
    end_time: float | None = None
    tenant: str = DEFAULT_TENANT
    create_time: float = field(default_factory=now)
    update_time: float = field(default_factory=now)

    @property
    def name(self) -> str:
        return f"{COLLECTION}/{self.job}/runs/{self.index}"

    @property
    def final(self) -> bool:
        return Verdict(self.verdict).final

    @property
    def console(self) -> bytes:
        return _unb64(self.console_tail)

    def take(self, result: RunResult) -> None:
        """The run's final result."""
        self.verdict = result.verdict.value
        self.console_tail = _b64(result.console_tail)
        self.exit_code = result.exit_code
        self.instructions = result.instructions
        self.virtual_ns = result.virtual_ns
        self.host_s = result.host_s
        self.node = result.node or self.node
        self.failure_reason = result.failure_reason
        self.end_time = now()
        self.update_time = self.end_time


def run_spec(job: JobRecord, run: RunRecord, attempt: int) -> RunSpec:
    sha, fmt, load_address = job.programs[run.program]
    return RunSpec(job_id=job.id, index=run.index, attempt=attempt,
                   program=ProgramRef(sha, fmt, int(load_address), run.program), board=run.board,
                   board_yaml=job.boards[run.board], backend=run.backend, variant=job.variant_obj(run.variant),
                   criteria=job.criteria_obj(), resources=job.resources_obj())


def run_row(run: RunRecord) -> dict[str, Any]:
    return {"id": run.id, "job": run.job, "idx": run.index, "verdict": run.verdict, "tenant": run.tenant,
            "create_time": run.create_time, "update_time": run.update_time, "data": asdict(run)}


def job_row(job: JobRecord) -> dict[str, Any]:
    return {"id": job.id, "owner": job.owner, "tenant": job.tenant, "state": job.state,
            "create_time": job.create_time, "update_time": job.update_time, "data": asdict(job)}


def counts_of(runs: list[RunRecord]) -> dict[str, int]:
    out = {"total": len(runs), "queued": 0, "running": 0, "passed": 0, "failed": 0, "errored": 0,
           "cancelled": 0, "retries": 0}
    for r in runs:
        out[Verdict(r.verdict).name.lower()] += 1
        out["retries"] += max(0, r.attempts - 1)
    return out
