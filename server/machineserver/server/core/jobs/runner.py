"""One run of a job, start to verdict, on a :class:`BackendRegistry`'s drivers directly (no
session record): the machine is made from the run's board YAML, powered on, given its
program (or the variant's snapshot), patched, fed its console input, run under its budget
and judged; it is always powered off after.

Verdicts (``Criteria`` decides):

* PASSED: the pass regex matched (when there is no expected exit code, the run stops
  there); or the firmware exited with the expected code (and the pass regex, when given,
  had matched); or, with neither a pass regex nor an expected exit code, it exited with 0.
* FAILED: the fail regex matched; the exit code differed (or it exited before the pass
  regex matched); the firmware faulted; the instruction or virtual-time budget ran out
  before a verdict ("budget reached"); the host-time guard fired ("host timeout"). A hung
  firmware is the firmware's failure, not the engine's: a host timeout is FAILED, never
  retried.
* ERRORED: the run could not be judged. ``retryable`` when the engine failed (a driver
  error, the emulator or its worker process died): the job retries those; not retryable
  when the run itself is bad (a board or program the backend refuses, a snapshot that does
  not restore).

Coverage comes back as ``RunResult.coverage``: for every executed block, each halfword
address it spans with the block's count (a halfword because every instruction of Thumb
and RISC-V (C) starts on one), so an instruction's count is that of its first halfword,
summed over the blocks holding it, exactly as ``drivers.base.Blocks`` defines it;
:func:`coverage_blocks` turns it back into blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping

import structlog

from machineserver.server.core.backends import BackendRegistry
from machineserver.server.core.boards import board_from_dict, parse_board_text
from machineserver.server.core.errors import MachineServerError
from machineserver.server.core.images import ImageFormat, check_fits, parse_image
from machineserver.server.core.jobs.model import (
    CONSOLE_TAIL_BYTES,
    MAX_REGEX_BYTES,
    BlobSource,
    Criteria,
    RunResult,
    RunSpec,
    Verdict,
)
from machineserver.server.core.patterns import ClientPattern, PatternTooSlow
from machineserver.server.drivers import base as drv
from machineserver.server.drivers.base import (
    Blocks,
    Machine,
    MachineOptions,
    MachineState,
    StopInfo,
    StopReason,
)

log = structlog.get_logger(__name__)

CONSOLE_KEEP_BYTES = 1 << 20  # what the regexes see: the console's last MiB
POLL_SECONDS = 0.005  # how often a running machine's counters are read (virtual-time budget)
STEP_CHUNK = 10**9  # the most instructions one driver step is asked for
STOP_SECONDS = 15.0  # how long stopping and powering off may take


class RunEvents:
    """The machine's events for one run (drivers call these from any thread)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.console = bytearray()
        self.stop: StopInfo | None = None
        self.failure = ""
        self.changed = asyncio.Event()

    def console_output(self, data: bytes) -> None:
        self._loop.call_soon_threadsafe(self._append, bytes(data))

    def stopped(self, info: StopInfo) -> None:
        self._loop.call_soon_threadsafe(self._stopped, info)

    def failed(self, reason: str) -> None:
        self._loop.call_soon_threadsafe(self._failed, reason)

    def reset_by_guest(self, detail: str) -> None:
        """A run's console is its bytes only (the verdict's regexes read them): no marks."""

    def _append(self, data: bytes) -> None:
        self.console += data
        if len(self.console) > CONSOLE_KEEP_BYTES:
            del self.console[:len(self.console) - CONSOLE_KEEP_BYTES]
        self.changed.set()

    def _stopped(self, info: StopInfo) -> None:
        if self.stop is None and info.reason is not StopReason.STEP:
            self.stop = info
        self.changed.set()

    def _failed(self, reason: str) -> None:
        self.failure = self.failure or reason or "the backend failed"
        self.changed.set()

    def text(self) -> str:
        return self.console.decode("utf-8", "replace")


class Judge:
    """The criteria, compiled; what the console and stops say."""

    def __init__(self, criteria: Criteria) -> None:
        self.criteria = criteria
        self.pass_re = ClientPattern(criteria.pass_regex, "criteria.pass_regex", MAX_REGEX_BYTES) \
            if criteria.pass_regex else None
        self.fail_re = ClientPattern(criteria.fail_regex, "criteria.fail_regex", MAX_REGEX_BYTES) \
            if criteria.fail_regex else None
        self.passed_seen = False

    def on_console(self, text: str) -> tuple[Verdict, str] | None:
        """A verdict the console gives now (None: keep running). A regex whose search runs
        too long (PatternTooSlow) makes the run ERRORED, not retried: the job is bad."""
        try:
            return self._on_console(text)
        except PatternTooSlow as exc:
            raise _Errored(str(exc), False) from None

    def _on_console(self, text: str) -> tuple[Verdict, str] | None:
        if self.fail_re is not None and (m := self.fail_re.search(text)):
            return Verdict.FAILED, f"fail regex matched: {m.group(0)[:200]!r}"
        if self.pass_re is not None and not self.passed_seen and self.pass_re.search(text):
            self.passed_seen = True
            if self.criteria.expected_exit_code is None:
                return Verdict.PASSED, ""
        return None

    def on_stop(self, info: StopInfo) -> tuple[Verdict, str]:
        if info.reason is StopReason.FAULT:
            where = f"fault at pc 0x{info.pc:08x}"
            return Verdict.FAILED, f"{where}: {info.message}" if info.message else where
        if info.reason is StopReason.EXIT:
            code = info.exit_code
            expected = self.criteria.expected_exit_code
            if self.pass_re is not None and not self.passed_seen:
                return Verdict.FAILED, f"exited with code {code} before the pass regex matched"
            if expected is not None:
                if code != expected:
                    return Verdict.FAILED, f"exited with code {code}, expected {expected}"
                return Verdict.PASSED, ""
            if self.pass_re is None and code != 0:
                return Verdict.FAILED, f"exited with code {code}"
            return Verdict.PASSED, ""
        return Verdict.FAILED, f"stopped: {info.reason.value} at pc 0x{info.pc:08x}"

    def on_budget(self, what: str) -> tuple[Verdict, str]:
        if self.passed_seen and self.criteria.expected_exit_code is None:
            return Verdict.PASSED, ""
        return Verdict.FAILED, f"budget reached: {what}"


def coverage_addresses(blocks: Mapping[int, tuple[int, int]]) -> dict[int, int]:
    """Blocks -> halfword address -> count (see the module's docstring)."""
    out: dict[int, int] = {}
    for start, (size, count) in blocks.items():
        for address in range(start, start + max(size, 2), 2):
            out[address] = out.get(address, 0) + count
    return out


def coverage_blocks(addresses: Mapping[int, int]) -> Blocks:
    """The inverse of :func:`coverage_addresses`: one 2-byte block per halfword."""
    return {int(a): (2, int(c)) for a, c in addresses.items()}


class _Errored(Exception):
    def __init__(self, reason: str, retryable: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable


async def execute_run(spec: RunSpec, backends: BackendRegistry, blobs: BlobSource, *,
                      node: str = "local") -> RunResult:
    """Run ``spec`` to its verdict. Never raises but CancelledError (after the machine is
    powered off)."""
    began = time.monotonic()
    loop = asyncio.get_running_loop()
    events = RunEvents(loop)
    machine: Machine | None = None
    state = _RunState()
    try:
        machine, board = _create(spec, backends, events)
        verdict, reason = await _drive(spec, machine, board, events, blobs, state)
        return await _result(spec, machine, events, state, verdict, reason, began, node)
    except _Errored as exc:
        return RunResult(Verdict.ERRORED, console_tail=bytes(events.console[-CONSOLE_TAIL_BYTES:]),
                         host_s=time.monotonic() - began, node=node, failure_reason=exc.reason,
                         retryable=exc.retryable, instructions=state.instructions, virtual_ns=state.virtual_ns)
    finally:
        if machine is not None:
            off = asyncio.ensure_future(machine.power_off())
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(off), STOP_SECONDS)


class _RunState:
    instructions = 0
    virtual_ns = 0
    exit_code: int | None = None


def _create(spec: RunSpec, backends: BackendRegistry, events: RunEvents) -> tuple[Machine, drv.BoardSpec]:
    try:
        board = board_from_dict(parse_board_text(spec.board_yaml, field="board"), field="board")
        backend = backends.get(spec.backend)
        why_not = backend.board_support(board)
        if why_not:
            raise _Errored(f"backend {spec.backend} cannot run board {board.name}: {why_not}", False)
        extra = {"coverage": "1"} if spec.criteria.coverage else {}
        machine = backend.create_machine(board, MachineOptions(extra=extra), events)
    except MachineServerError as exc:
        raise _Errored(str(exc), False) from None
    except drv.DriverError as exc:
        raise _Errored(f"{type(exc).__name__}: {exc}", isinstance(exc, drv.BackendFailed)) from None
    return machine, board


async def _prepare(spec: RunSpec, machine: Machine, board: drv.BoardSpec, blobs: BlobSource) -> None:
    """Power on, program or snapshot, memory patches, coverage."""
    await machine.power_on()
    variant = spec.variant
    if variant.snapshot_sha256:
        blob = blobs.read(variant.snapshot_sha256)
        try:
            await machine.capability(drv.Snapshots).restore_state(blob)
        except drv.BadRequest as exc:
            raise _Errored(f"snapshot {variant.snapshot_id or variant.snapshot_sha256[:12]} does not restore: "
                           f"{exc}", False) from None
    else:
        data = blobs.read(spec.program.sha256)
        try:
            parsed = parse_image(data, ImageFormat(spec.program.format.upper()), spec.program.load_address)
            check_fits(parsed.image, board, "program")
        except (MachineServerError, ValueError) as exc:
            raise _Errored(f"program {spec.program.program_id}: {exc}", False) from None
        await machine.load(parsed.image)
    for patch in variant.memory_patches:
        await machine.capability(drv.MemoryAccess).write_memory(patch.address, patch.data)
    if spec.criteria.coverage:
        await machine.capability(drv.Coverage).coverage_start()


async def _drive(spec: RunSpec, machine: Machine, board: drv.BoardSpec, events: RunEvents, blobs: BlobSource,
                 state: _RunState) -> tuple[Verdict, str]:
    try:
        await _prepare(spec, machine, board, blobs)
        return await _run(spec, machine, events, state)
    except drv.BackendFailed as exc:
        raise _Errored(f"the backend failed: {exc}", True) from None
    except (drv.BadImage, drv.BadRequest, drv.NotSupported) as exc:  # the run is bad: retrying will not help
        if machine.state is MachineState.FAILED or events.failure:
            raise _Errored(f"the backend failed: {events.failure or exc}", True) from None
        raise _Errored(f"{type(exc).__name__}: {exc}", False) from None
    except drv.DriverError as exc:  # WrongState and the like: the engine's trouble
        raise _Errored(f"{type(exc).__name__}: {events.failure or exc}", True) from None
    except (OSError, KeyError) as exc:  # a blob that went missing
        raise _Errored(f"cannot read the run's inputs: {exc}", False) from None


async def _run(spec: RunSpec, machine: Machine, events: RunEvents, state: _RunState) -> tuple[Verdict, str]:
    """Run until a verdict; the machine is left stopped (not RUNNING)."""
    judge = Judge(spec.criteria)
    crit = spec.criteria
    run_control = machine.capability(drv.RunControl)
    host_deadline = time.monotonic() + (crit.host_timeout_s or 3600.0)
    stepping: asyncio.Task[StopInfo] | None = None
    remaining = crit.max_instructions
    if remaining:
        stepping = asyncio.ensure_future(run_control.step(min(remaining, STEP_CHUNK)))
    else:
        await run_control.run()
    if spec.variant.console_input:
        await machine.capability(drv.ConsoleInput).console_input(spec.variant.console_input)
    seen = 0
    try:
        while True:
            if events.failure:
                raise _Errored(f"the backend failed: {events.failure}", True)
            if len(events.console) != seen or events.stop is not None:
                seen = len(events.console)
                said = judge.on_console(events.text())
                if said is not None:
                    return said
            stop = events.stop
            if stepping is not None and stepping.done():
                info = stepping.result()  # raises the driver's error
                if info.reason is StopReason.STEP:
                    remaining -= min(remaining, STEP_CHUNK)
                    if remaining <= 0:
                        await _settle_console(events)
                        said = judge.on_console(events.text())
                        return said if said is not None else judge.on_budget(
                            f"{crit.max_instructions} instructions")
                    stepping = asyncio.ensure_future(run_control.step(min(remaining, STEP_CHUNK)))
                    continue
                stop = info
            if stop is not None:
                state.exit_code = stop.exit_code if stop.reason is StopReason.EXIT else None
                await _settle_console(events)
                said = judge.on_console(events.text())
                return said if said is not None and said[0] is Verdict.FAILED else judge.on_stop(stop)
            if crit.max_virtual_ns:
                counters = await machine.current_counters()
                if counters.virtual_time_ns >= crit.max_virtual_ns:
                    return judge.on_budget(f"{crit.max_virtual_ns} ns of virtual time")
            if time.monotonic() >= host_deadline:
                return Verdict.FAILED, f"host timeout: no verdict after {crit.host_timeout_s:g} s of host time"
            events.changed.clear()
            waiters: set[asyncio.Future[object]] = {asyncio.ensure_future(events.changed.wait())}
            if stepping is not None:
                waiters.add(stepping)  # type: ignore[arg-type]
            timeout = POLL_SECONDS if crit.max_virtual_ns else max(0.0, host_deadline - time.monotonic())
            _, pending = await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            for w in pending:
                if w is not stepping:
                    w.cancel()
    finally:
        await _halt(machine, stepping)


async def _settle_console(events: RunEvents) -> None:
    """Let console bytes already handed to the loop (before the stop) land."""
    await asyncio.sleep(0)
    await asyncio.sleep(0)


async def _halt(machine: Machine, stepping: asyncio.Task[StopInfo] | None) -> None:
    """Stop the machine (a step in progress is cancelled: drivers leave it halted); not cut
    short by a cancellation of the run (that goes on after)."""
    async def stop() -> None:
        if stepping is not None and not stepping.done():
            stepping.cancel()
            with contextlib.suppress(BaseException):
                await stepping
        if machine.state is MachineState.RUNNING:
            with contextlib.suppress(drv.DriverError):
                await machine.capability(drv.RunControl).pause()

    task = asyncio.ensure_future(stop())
    cancelled = False
    deadline = time.monotonic() + STOP_SECONDS
    while not task.done() and time.monotonic() < deadline:
        try:
            await asyncio.wait({task}, timeout=max(0.0, deadline - time.monotonic()))
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError()


async def _result(spec: RunSpec, machine: Machine, events: RunEvents, state: _RunState, verdict: Verdict,
                  reason: str, began: float, node: str) -> RunResult:
    coverage: dict[int, int] = {}
    try:
        counters = await machine.current_counters()
        state.instructions, state.virtual_ns = counters.instructions, counters.virtual_time_ns
        if spec.criteria.coverage:
            part = machine.capability(drv.Coverage)
            with contextlib.suppress(drv.WrongState):
                await part.coverage_stop()
            coverage = coverage_addresses(await part.coverage_blocks())
    except drv.DriverError as exc:
        raise _Errored(f"the backend failed reading the run's results: {exc}", True) from None
    if events.failure:
        raise _Errored(f"the backend failed: {events.failure}", True)
    return RunResult(
        verdict, console_tail=bytes(events.console[-CONSOLE_TAIL_BYTES:]), exit_code=state.exit_code,
        instructions=state.instructions, virtual_ns=state.virtual_ns, host_s=time.monotonic() - began,
        node=node, failure_reason=reason, coverage=coverage)
