"""A CreateJob request checked and expanded: every program x board x backend x variant one
run. Every refusal is InvalidArgument naming the request's field (``matrix.programs[1]``,
``criteria.pass_regex``), or NotFound for a program, board or snapshot the caller's tenant
does not see (the same answer as a missing one).

A snapshot variant applies only to the boards and backends its snapshot was taken on: the
expansion leaves it out of the other combinations, and refuses it when it matches none.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from machineserver.server.core.backends import BackendRegistry
from machineserver.server.core.catalog import BoardCatalog
from machineserver.server.core.errors import InvalidArgument, MachineServerError
from machineserver.server.core.images import check_fits
from machineserver.server.core.jobs.model import (
    MAX_REGEX_BYTES,
    Criteria,
    MemoryPatch,
    ProgramRef,
    Resources,
    Variant,
)
from machineserver.server.core.patterns import ClientPattern
from machineserver.server.core.programs import ProgramStore
from machineserver.server.core.snapshots import SnapshotStore
from machineserver.server.drivers.base import Feature

MAX_RUNS = 10_000  # runs in one job
MAX_RETRIES = 5
MAX_HOST_TIMEOUT_S = 3600.0
DEFAULT_HOST_TIMEOUT_S = 60.0
MAX_PATCH_BYTES = 64 * 1024
MAX_INPUT_BYTES = 64 * 1024
MAX_NAME_BYTES = 64
MAX_DISPLAY_NAME_BYTES = 256
LABEL_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789-_./")
VARIANT_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.=+")


@dataclass(frozen=True)
class VariantRequest:
    name: str
    console_input: bytes = b""
    memory_patches: tuple[MemoryPatch, ...] = ()
    snapshot: str = ""  # "snapshots/{id}"


@dataclass(frozen=True)
class JobRequest:
    """What CreateJob asks (the API layer's translation of CreateJobRequest)."""

    programs: tuple[str, ...]
    boards: tuple[str, ...]
    backends: tuple[str, ...] = ()
    variants: tuple[VariantRequest, ...] = ()
    criteria: Criteria = field(default_factory=Criteria)
    host_timeout_given: bool = False
    resources: Resources = field(default_factory=Resources)
    display_name: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class PlannedRun:
    program: str  # program id
    board: str
    backend: str
    variant: str


@dataclass
class Plan:
    """A checked request: what the job record keeps to make every run's spec again (after
    a restart too), and its runs in order."""

    programs: dict[str, ProgramRef]  # program id -> its blob
    boards: dict[str, str]  # board name -> its YAML
    variants: dict[str, Variant]
    criteria: Criteria
    resources: Resources
    runs: list[PlannedRun]


def _check_regex(text: str, where: str) -> None:
    ClientPattern(text, where, MAX_REGEX_BYTES)


def check_criteria(req: JobRequest) -> Criteria:
    c = req.criteria
    _check_regex(c.pass_regex, "criteria.pass_regex")
    _check_regex(c.fail_regex, "criteria.fail_regex")
    if c.max_instructions < 0:
        raise InvalidArgument("criteria.max_instructions", "must not be negative")
    if c.max_virtual_ns < 0:
        raise InvalidArgument("criteria.max_virtual_time", "must not be negative")
    if c.host_timeout_s < 0 or c.host_timeout_s > MAX_HOST_TIMEOUT_S:
        raise InvalidArgument("criteria.host_timeout", f"between 0 and {MAX_HOST_TIMEOUT_S:g} s")
    if not (c.max_instructions or c.max_virtual_ns or req.host_timeout_given):
        raise InvalidArgument("criteria.max_instructions",
                              "give a budget: max_instructions, max_virtual_time or host_timeout")
    if c.retries < 0 or c.retries > MAX_RETRIES:
        raise InvalidArgument("criteria.retries", f"at most {MAX_RETRIES}")
    if c.expected_exit_code is not None and not -(1 << 31) <= c.expected_exit_code < (1 << 31):
        raise InvalidArgument("criteria.expected_exit_code", "must fit in 32 bits")
    host = c.host_timeout_s if req.host_timeout_given and c.host_timeout_s else DEFAULT_HOST_TIMEOUT_S
    return Criteria(c.pass_regex, c.fail_regex, c.expected_exit_code, c.max_instructions, c.max_virtual_ns,
                    host, c.coverage, c.retries)


def _check_common(req: JobRequest) -> None:
    if len(req.display_name.encode()) > MAX_DISPLAY_NAME_BYTES:
        raise InvalidArgument("display_name", f"at most {MAX_DISPLAY_NAME_BYTES} bytes")
    for key, value in req.labels.items():
        if not key or len(key) > 63 or not set(key) <= LABEL_CHARS or len(value) > 256:
            raise InvalidArgument(f"labels[{key}]", "label keys are 1-63 of a-z 0-9 - _ . /; values up to 256 chars")
    r = req.resources
    if r.cpus < 0 or r.gpus < 0 or r.memory_bytes < 0 or any(v < 0 for v in r.custom.values()):
        raise InvalidArgument("resources", "must not be negative")
    for key in r.custom:
        if not key or len(key) > 128:
            raise InvalidArgument(f"resources.custom[{key}]", "a resource name of 1-128 characters")
    if not req.programs:
        raise InvalidArgument("matrix.programs", "name at least one program (programs/ID)")
    if not req.boards:
        raise InvalidArgument("matrix.boards", "name at least one board template")
    for what, items in (("programs", req.programs), ("boards", req.boards), ("backends", req.backends)):
        seen: set[str] = set()
        for i, item in enumerate(items):
            if item in seen:
                raise InvalidArgument(f"matrix.{what}[{i}]", f"{item!r} is named twice")
            seen.add(item)


def plan(req: JobRequest, programs: ProgramStore, catalog: BoardCatalog, backends: BackendRegistry,
         snapshots: SnapshotStore) -> Plan:
    """Check ``req`` (as the current caller) and expand it."""
    _check_common(req)
    criteria = check_criteria(req)
    progs: dict[str, ProgramRef] = {}
    images = {}
    for i, name in enumerate(req.programs):
        where = f"matrix.programs[{i}]"
        rec = programs.get(name, where)
        parsed, _ = programs.load(rec)
        images[rec.id] = (parsed.image, where)
        progs[rec.id] = ProgramRef(rec.sha256, rec.format.lower(), rec.load_address, rec.id)
        if criteria.coverage and not rec.has_debug_info:
            raise InvalidArgument(where, f"criteria.coverage needs debug info: program {rec.id} has no DWARF "
                                         "line table (build it with -g)")
    if criteria.coverage and len(progs) > 1:
        raise InvalidArgument("criteria.coverage", "a job's coverage merges into one report of one program: "
                                                   "give one program, or one job per program")
    boards = {}
    specs = {}
    for i, name in enumerate(req.boards):
        where = f"matrix.boards[{i}]"
        rec_board, spec = catalog.get(name, where)
        boards[spec.name] = rec_board.config
        specs[spec.name] = spec
        for pid, (image, pwhere) in images.items():
            try:
                check_fits(image, spec, pwhere)
            except InvalidArgument as exc:
                raise InvalidArgument(pwhere, f"program {pid} on board {spec.name}: {exc.reason}") from None
    backend_names = list(req.backends) or [backends.default]
    for i, bname in enumerate(backend_names):
        where = f"matrix.backends[{i}]" if req.backends else "matrix.backends"
        try:
            backend = backends.get(bname, where)
        except InvalidArgument:
            raise
        except MachineServerError as exc:
            raise InvalidArgument(where, str(exc)) from None
        info = backends.info(bname)
        for board_name, spec in specs.items():
            why = backend.board_support(spec)
            if why:
                raise InvalidArgument(where, f"backend {bname} cannot run board {board_name}: {why}")
        if criteria.coverage:
            if Feature.COVERAGE not in info.features or "coverage" in info.refused_options:
                raise InvalidArgument("criteria.coverage", f"backend {bname} cannot collect coverage")
    variants: dict[str, Variant] = {}
    applies: dict[str, tuple[str, str] | None] = {}  # variant -> (board, backend) of its snapshot
    for i, v in enumerate(req.variants or (VariantRequest("default"),)):
        where = f"matrix.variants[{i}]"
        if not v.name or len(v.name.encode()) > MAX_NAME_BYTES or not set(v.name) <= VARIANT_CHARS:
            raise InvalidArgument(f"{where}.name", f"1-{MAX_NAME_BYTES} of a-z A-Z 0-9 - _ . = +")
        if v.name in variants:
            raise InvalidArgument(f"{where}.name", f"variant {v.name!r} is named twice")
        if len(v.console_input) > MAX_INPUT_BYTES:
            raise InvalidArgument(f"{where}.console_input", f"at most {MAX_INPUT_BYTES} bytes")
        for j, patch in enumerate(v.memory_patches):
            pwhere = f"{where}.memory_patches[{j}]"
            if not patch.data or len(patch.data) > MAX_PATCH_BYTES:
                raise InvalidArgument(f"{pwhere}.data", f"1 to {MAX_PATCH_BYTES} bytes")
            for spec in specs.values():
                if spec.region_at(patch.address, len(patch.data)) is None:
                    raise InvalidArgument(f"{pwhere}.address", f"0x{patch.address:x} (+{len(patch.data)}) lies "
                                                               f"outside the memory of board {spec.name}")
        snap_sha = snap_id = ""
        applies[v.name] = None
        if v.snapshot:
            snap = snapshots.get(v.snapshot, f"{where}.snapshot")
            if snap.board not in specs or snap.backend not in backend_names:
                raise InvalidArgument(f"{where}.snapshot", f"snapshot {snap.id} was taken on board {snap.board}, "
                                                           f"backend {snap.backend}: the matrix has no such "
                                                           "combination")
            info = backends.info(snap.backend)
            if Feature.SNAPSHOTS not in info.features:
                raise InvalidArgument(f"{where}.snapshot", f"backend {snap.backend} cannot restore snapshots")
            limit = info.board_limits.get(snap.board, {}).get(Feature.SNAPSHOTS)
            if limit:
                raise InvalidArgument(f"{where}.snapshot", f"backend {snap.backend} cannot restore snapshots "
                                                           f"of board {snap.board}: {limit}")
            snap_sha, snap_id = snap.sha256, snap.id
            applies[v.name] = (snap.board, snap.backend)
        variants[v.name] = Variant(v.name, v.console_input, tuple(v.memory_patches), snap_sha, snap_id)
    runs = [PlannedRun(pid, board, backend, name)
            for pid in progs for board in specs for backend in backend_names for name in variants
            if applies[name] is None or applies[name] == (board, backend)]
    if len(runs) > MAX_RUNS:
        raise InvalidArgument("matrix", f"{len(runs)} runs: at most {MAX_RUNS} in one job")
    res = req.resources
    resources = Resources(res.cpus or 1.0, res.memory_bytes, res.gpus, dict(res.custom))
    return Plan(progs, boards, variants, criteria, resources, runs)
