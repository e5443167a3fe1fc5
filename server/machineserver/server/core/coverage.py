"""Coverage reports: collection in sessions through the driver's ``Coverage`` capability,
stored reports (records in the database), merges, and the per-file results of a session
or a report.

The coverage code is three modules: :mod:`.coverage_analysis` (what the ELF says: lines,
functions, instructions, branch sites), :mod:`.coverage_mapping` (executed blocks and
edges -> per-file results; how counts are defined and when they are not exact) and this
one. :mod:`.coverage_export` writes results as LCOV, HTML, Cobertura XML and JSON.

What is stored is what the driver reported: blocks (``drivers.base.Blocks``: per-address
counts are the sums over the blocks holding an address) and edges when the backend has
them. A merge adds per-address counts (``drivers.base.merge_blocks`` keeps them exact when
two sources split the same code into different blocks) and edge counts; the edges are
dropped when one source has none (a QEMU session: then branches are derived from counts).
"""

from __future__ import annotations

import asyncio
import builtins
import io
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field

import structlog
from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from machineserver.server.core import sources, tenancy
from machineserver.server.core.coverage_analysis import ProgramAnalysis
from machineserver.server.core.coverage_mapping import Counts, CoverageResult, compute
from machineserver.server.core.errors import FailedPrecondition, InvalidArgument, NotFound
from machineserver.server.core.identity import DEFAULT_TENANT
from machineserver.server.core.listing import Page, match_terms, paginate, parse_filter
from machineserver.server.core.models import from_row, now, record_row
from machineserver.server.core.programs import ProgramStore
from machineserver.server.core.sessions import LiveSession, SessionManager, driver_errors
from machineserver.server.drivers.base import (
    Arch,
    Blocks,
    DriverError,
    Edges,
    Feature,
    Machine,
    MachineState,
    RegisterAccess,
    merge_blocks,
    merge_edges,
)
from machineserver.server.drivers.base import Coverage as CoverageCapability
from machineserver.server.store.blobs import BlobStore
from machineserver.server.store.db import Database

log = structlog.get_logger(__name__)

TABLE = "coverage_reports"
COLLECTION = "coverageReports"


@dataclass
class CoverageReportRecord:
    id: str
    program: str  # program id
    sessions: list[str] = field(default_factory=list)  # session ids
    blocks: list[list[int]] = field(default_factory=list)  # [start, size, count]
    edges: list[list[int]] | None = None  # [from, to, count] when the driver had them
    # where each machine stood halted when its blocks were read (not executed yet)
    halted_at: list[int] = field(default_factory=list)
    totals: dict[str, float] = field(default_factory=dict)  # Counts as a dict
    owner: str = ""
    tenant: str = DEFAULT_TENANT
    create_time: float = field(default_factory=now)
    update_time: float = field(default_factory=now)

    @property
    def name(self) -> str:
        return f"{COLLECTION}/{self.id}"


def blocks_to_list(blocks: Blocks) -> list[list[int]]:
    return [[start, size, count] for start, (size, count) in sorted(blocks.items())]


def blocks_from_list(rows: Iterable[Iterable[int]]) -> Blocks:
    """Stored rows as blocks (rows of one start are added, as ``merge_blocks`` does)."""
    out: Blocks = {}
    for start, size, count in rows:
        merge_blocks(out, {int(start): (int(size), int(count))})
    return out


# --------------------------------------------------------------------------- the manager


@dataclass
class Collection:
    """What was collected: blocks, edges (None: the backend has none) and the addresses
    the machines stood halted at (see ``coverage_mapping.compute``)."""

    blocks: Blocks = field(default_factory=dict)
    edges: Edges | None = None
    halted_at: list[int] = field(default_factory=list)


@dataclass
class SessionCoverage:
    """Coverage state of one live session."""

    collecting: bool = False
    program: str = ""  # program id when collection started
    last: Collection | None = None  # what the last StopCoverage stored


@dataclass
class Source:
    """What a session or a stored report collected, and whose it is."""

    name: str
    program: str
    sessions: list[str]
    collection: Collection


class CoverageManager:
    def __init__(self, db: Database, blobs: BlobStore, sessions: SessionManager, programs: ProgramStore) -> None:
        self._db = db
        self._blobs = blobs
        self._sessions = sessions
        self._programs = programs
        self._state: dict[str, SessionCoverage] = {}
        self._analyses: dict[tuple[str, str], ProgramAnalysis] = {}
        # folders of the server's disk whose files an HTML export may show (config
        # coverage_source_roots); nothing outside them is ever read
        self.source_roots: tuple[str, ...] = ()
        sessions.power_on_hooks.append(self._on_power_on)
        sessions.delete_hooks.append(self._on_delete)

    # ------------------------------------------------------------------ session hooks

    async def _on_power_on(self, live: LiveSession) -> None:
        """A fresh machine: what an earlier one collected is gone; keep collecting."""
        st = self._state.get(live.id)
        if st is None or not st.collecting or live.machine is None:
            return
        try:
            with driver_errors(live):
                await live.machine.capability(CoverageCapability).coverage_start()
        except Exception as exc:  # the session still powers on, just without coverage
            log.warning("coverage_restart_failed", session_id=live.id, error=str(exc))
            st.collecting = False

    def _on_delete(self, live: LiveSession) -> None:
        self._state.pop(live.id, None)

    # ------------------------------------------------------------------ collection

    def _analysis_for(self, program_id: str, arch: Arch | None, field_name: str = "name") -> ProgramAnalysis:
        prog = self._programs.by_id(program_id, field_name)  # a session's or report's own program
        key = (prog.id, arch.value if arch else "")
        hit = self._analyses.get(key)
        if hit is not None:
            return hit
        _, symbols = self._programs.load(prog)
        if symbols is None or not symbols.has_lines:
            raise FailedPrecondition(
                f"program {prog.id} has no DWARF line table; build it with -g for coverage"
            )
        analysis = ProgramAnalysis(self._blobs.get(prog.sha256), symbols, arch)
        self._analyses[key] = analysis
        return analysis

    async def start(self, live: LiveSession) -> None:
        live.feature(Feature.COVERAGE)
        if not live.record.program:
            raise FailedPrecondition(f"session {live.id} has no program loaded; load an ELF with debug info")
        self._analysis_for(live.record.program, live.board.arch)
        async with live.lock:
            machine = live.require_machine("start coverage")
            with driver_errors(live):
                await machine.capability(CoverageCapability).coverage_start()
        st = self._state.setdefault(live.id, SessionCoverage())
        st.collecting = True
        st.program = live.record.program

    def _started(self, live: LiveSession, action: str) -> SessionCoverage:
        st = self._state.get(live.id)
        if st is None or not st.collecting:
            raise FailedPrecondition(
                f"cannot {action}: coverage was not started in session {live.id}",
                state="not collecting", required="collecting",
            )
        return st

    async def _collect(self, live: LiveSession) -> Collection:
        machine = live.require_machine("read coverage")
        with driver_errors(live):
            part = machine.capability(CoverageCapability)
            blocks: Blocks = dict(await part.coverage_blocks())
            edges = await part.coverage_edges()
        return Collection(blocks, None if edges is None else dict(edges), await self._halted_at(machine))

    @staticmethod
    async def _halted_at(machine: Machine) -> list[int]:
        """Where a stopped machine stands: the instruction there has not run, but the
        transfer to it has happened. Nothing while it runs (or if it started meanwhile)."""
        if machine.state not in (MachineState.HALTED, MachineState.EXITED, MachineState.FAULTED):
            return []
        if not machine.has(RegisterAccess):
            return []
        try:
            pc = (await machine.capability(RegisterAccess).read_registers(["pc"]))["pc"]
        except DriverError:
            return []
        return [pc & ~1]

    async def stop(self, live: LiveSession) -> CoverageReportRecord:
        st = self._started(live, "stop coverage")
        async with live.lock:
            machine = live.require_machine("stop coverage")
            with driver_errors(live):
                await machine.capability(CoverageCapability).coverage_stop()
            collected = await self._collect(live)
        st.collecting = False
        st.last = collected
        program = st.program or live.record.program
        return self._store(program, [live.id], collected, live.board.arch)

    async def reset(self, live: LiveSession) -> None:
        st = self._state.get(live.id)
        if st is None:
            raise FailedPrecondition(
                f"cannot reset coverage: coverage was never started in session {live.id}",
                state="never started", required="started",
            )
        if live.machine is not None and live.state is not MachineState.OFF:
            async with live.lock:
                machine = live.require_machine("reset coverage")
                with driver_errors(live):
                    await machine.capability(CoverageCapability).coverage_reset()
        if st.last is not None:
            st.last = Collection()

    # ------------------------------------------------------------------ reports

    def save_collection(self, program: str, sessions: list[str], collected: Collection, *, owner: str,
                        tenant: str) -> CoverageReportRecord:
        """A report of blocks collected elsewhere (a job's runs, a job's merge: ``sessions``
        names them), owned as given (the job's owner, not whoever is calling)."""
        return self._store(program, sessions, collected, self._arch_of(program), owned=(owner, tenant))

    def _store(
        self, program: str, sessions: list[str], collected: Collection, arch: Arch | None,
        owned: tuple[str, str] | None = None,
    ) -> CoverageReportRecord:
        edges = collected.edges
        files = compute(self._analysis_for(program, arch), collected.blocks, edges, collected.halted_at)
        totals = Counts()
        for f in files:
            totals = totals + f.counts
        owner, tenant = owned or tenancy.stamp()
        rec = CoverageReportRecord(
            id="cov-" + secrets.token_hex(6),
            program=program,
            sessions=sessions,
            blocks=blocks_to_list(collected.blocks),
            edges=None if edges is None else [[a, b, c] for (a, b), c in sorted(edges.items())],
            halted_at=sorted(collected.halted_at),
            totals=totals.to_dict(),
            owner=owner,
            tenant=tenant,
        )
        self._db.put(TABLE, record_row(rec, program=program))
        log.info("coverage_report_stored", report=rec.id, program=program, blocks=len(collected.blocks))
        return rec

    def get(self, name: str, field_name: str = "name") -> CoverageReportRecord:
        """The report a caller names: NotFound when there is none or the caller's tenant
        does not see it (the same answer)."""
        return tenancy.fetch_visible(self._db, TABLE, CoverageReportRecord, name, COLLECTION, "coverage report", field_name)

    def list(self, page_size: int, page_token: str, filter_text: str) -> Page[CoverageReportRecord]:
        terms = parse_filter(filter_text, ["program", "session", tenancy.FILTER_KEY])
        scope = tenancy.list_scope(terms)
        if "program" in terms:
            terms["program"] = terms["program"].removeprefix("programs/")
        if "session" in terms:
            terms["session"] = terms["session"].removeprefix("sessions/")
        getters = {
            "program": lambda r: r.program,
            "session": lambda r: terms["session"] if terms.get("session") in r.sessions else "",
        }
        where, params = scope.where()
        rows = self._db.rows(TABLE, where, params, order_by="create_time DESC, id")
        items = [r for r in (from_row(CoverageReportRecord, x["data"]) for x in rows) if match_terms(terms, getters, r)]
        return paginate(items, page_size, page_token, scope.token_key(filter_text))

    async def source(self, name: str, field_name: str = "name") -> tuple[Source, Arch | None]:
        """Blocks named by "sessions/{id}" (live, or its last stopped collection) or by
        "coverageReports/{id}"."""
        if name.startswith("sessions/"):
            live = self._sessions.get(name, field_name)
            st = self._state.get(live.id)
            if st is None:
                raise FailedPrecondition(f"no coverage collected in session {live.id}; start coverage first")
            if st.collecting and live.machine is not None and live.state is not MachineState.OFF:
                collected = await self._collect(live)
            elif st.last is not None:
                collected = st.last
            else:
                raise FailedPrecondition(
                    f"no coverage collected in session {live.id}: its machine was powered off"
                )
            return Source(name, st.program or live.record.program, [live.id], collected), live.board.arch
        if name.startswith(COLLECTION + "/") or "/" not in name:
            rec = self.get(name, field_name)
            edges = None if rec.edges is None else merge_edges({}, {(a, b): c for a, b, c in rec.edges})
            collected = Collection(blocks_from_list(rec.blocks), edges, list(rec.halted_at))
            return Source(rec.name, rec.program, list(rec.sessions), collected), self._arch_of(rec.program)
        raise InvalidArgument(field_name, f"{name!r} is neither sessions/ID nor {COLLECTION}/ID")

    def _arch_of(self, program_id: str) -> Arch | None:
        """The architecture of a stored report's program (for its branch sites): from the
        ELF header."""
        prog = self._programs.by_id(program_id, "program")
        try:
            machine = ELFFile(io.BytesIO(self._blobs.get(prog.sha256))).header["e_machine"]
        except (ELFError, ValueError, KeyError):
            return None
        return {"EM_ARM": Arch.ARM_CORTEX_M, "EM_RISCV": Arch.RISCV32}.get(machine)

    async def result(self, name: str, field_name: str = "name") -> CoverageResult:
        src, arch = await self.source(name, field_name)
        if not src.program:
            raise FailedPrecondition(f"{name}: no program to map the coverage onto")
        got = src.collection
        files = compute(self._analysis_for(src.program, arch, field_name), got.blocks, got.edges, got.halted_at)
        return CoverageResult(src.program, src.sessions, files, name=src.name)

    async def merge(self, names: builtins.list[str]) -> CoverageReportRecord:
        if not names:
            raise InvalidArgument("names", "name at least one session or coverage report")
        sources: builtins.list[Source] = []
        arch: Arch | None = None
        for i, name in enumerate(names):
            src, a = await self.source(name, f"names[{i}]")
            sources.append(src)
            arch = arch or a
        first = sources[0]
        sha = self._programs.by_id(first.program, "names").sha256
        for src in sources[1:]:
            if src.program != first.program and self._programs.by_id(src.program, "names").sha256 != sha:
                raise FailedPrecondition(
                    f"{src.name} covers program {src.program}, {first.name} covers {first.program}; "
                    "only reports of the same program merge"
                )
        merged = Collection(edges={})
        sessions: builtins.list[str] = []
        for src in sources:
            got = src.collection
            merge_blocks(merged.blocks, got.blocks)
            merged.edges = None if got.edges is None or merged.edges is None else merge_edges(merged.edges, got.edges)
            merged.halted_at.extend(got.halted_at)
            sessions.extend(s for s in src.sessions if s not in sessions)
        return self._store(first.program, sessions, merged, arch)

    # ------------------------------------------------------------------ export sources

    async def html_sources(self, result: CoverageResult, bundle_bytes: bytes = b"",
                           field_name: str = "sources") -> dict[str, bytes | None]:
        """Source text for an HTML export, per path of ``result``: from ``bundle_bytes``
        (the export request's bundle) when given, else from the bundle uploaded with the
        program; a path neither holds is read only from inside a configured source root.
        None: not provided. InvalidArgument(``field_name``) for a bad bundle."""
        bundle = await self._bundle(result.program, bundle_bytes, field_name)
        roots = self.source_roots

        def find() -> dict[str, bytes | None]:
            out: dict[str, bytes | None] = {}
            for f in result.files:
                text = bundle.text_for(f.path)
                if text is None and roots:
                    text = sources.read_under_roots(f.path, roots)
                out[f.path] = text
            return out

        return await asyncio.to_thread(find)

    async def _bundle(self, program_id: str, bundle_bytes: bytes, field_name: str) -> sources.SourceBundle:
        if bundle_bytes:
            return await asyncio.to_thread(sources.read_bundle, bundle_bytes, sources.DEFAULT_LIMITS, field_name)
        try:
            prog = self._programs.by_id(program_id, "program")  # the report's or session's own
        except NotFound:
            return sources.SourceBundle()
        if not prog.sources_sha256 or not self._blobs.exists(prog.sources_sha256):
            return sources.SourceBundle()
        data = await asyncio.to_thread(self._blobs.get, prog.sources_sha256)
        return await asyncio.to_thread(sources.read_bundle, data, sources.DEFAULT_LIMITS, "program sources")
