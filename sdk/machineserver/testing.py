"""Firmware tests in Python: a simulated board you drive from a test, and timeouts counted in
the machine's own time.

    from machineserver.testing import Machine, Virtual
    m = Machine(client, board="mps2-an385")
    m.load("build/fw.elf")
    m.console.expect(r"ready", timeout=Virtual(ms=50))

The pytest plugin (``machineserver.pytest_plugin``) hands tests a :class:`Machine` as the
``machine`` fixture; this module works without pytest too (any :class:`Client`).

Timeouts: :class:`Virtual` (virtual time: ms, us, ns) and :class:`Instructions` are counted on
the simulated machine, so a loaded CI host cannot make them fire early; :class:`Host` (or a
plain number of seconds) is wall-clock time. A machine-time timeout carries a host-time guard
(``guard=`` seconds; the server's default, 60 s, when unset) so a machine that stops
advancing cannot hang the test.

Failures raise :class:`ExpectTimeout` / :class:`MachineStopped`, both ``AssertionError``
subclasses (pytest shows them as test failures, with the console tail in the message).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias

from google.protobuf.duration_pb2 import Duration

from machineserver.sdk import errors
from machineserver.sdk.client import Client
from machineserver.v1 import capsule_pb2, common_pb2, debug_pb2, session_pb2

__all__ = [
    "ExpectTimeout",
    "Host",
    "Instructions",
    "Machine",
    "MachineStopped",
    "Match",
    "Timeout",
    "Virtual",
]

DEFAULT_GUARD_S = 60.0  # the server's default host guard on a machine-time budget
DEADLINE_MARGIN_S = 10.0  # the gRPC deadline is the budget's host bound plus this
EXPLICIT = capsule_pb2.CAPSULE_TRIGGER_EXPLICIT


# ---------------------------------------------------------------------- timeouts


@dataclass(frozen=True)
class Virtual:
    """A timeout in the machine's virtual time: ``Virtual(ms=50)``, ``Virtual(us=200)``,
    ``Virtual(ns=...)`` (they add up). ``guard``: host seconds after which the wait gives up
    anyway (HOST_GUARD), default the server's 60 s."""

    ms: float = 0
    us: float = 0
    ns: int = 0
    guard: float | None = None

    @property
    def total_ns(self) -> int:
        return int(self.ms * 1_000_000 + self.us * 1_000 + self.ns)

    def __str__(self) -> str:
        return f"Virtual({self.total_ns / 1e6:g} ms)"


@dataclass(frozen=True)
class Instructions:
    """A timeout in instructions the machine executes: ``Instructions(1_000_000)``."""

    n: int
    guard: float | None = None

    def __str__(self) -> str:
        return f"Instructions({self.n:,})"


@dataclass(frozen=True)
class Host:
    """A wall-clock timeout: ``Host(s=10)``."""

    s: float

    def __str__(self) -> str:
        return f"Host({self.s:g} s)"


Timeout: TypeAlias = Virtual | Instructions | Host | float | int
DEFAULT_TIMEOUT = Host(s=10)


def _duration(seconds: float) -> Duration:
    d = Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d


def budget_of(timeout: Timeout) -> common_pb2.Budget:
    """The API's Budget for a timeout."""
    if isinstance(timeout, bool):
        raise TypeError("a timeout is Virtual(...), Instructions(n), Host(s=...) or seconds, not a bool")
    if isinstance(timeout, int | float):
        timeout = Host(s=float(timeout))
    if isinstance(timeout, Host):
        if timeout.s <= 0:
            raise ValueError(f"a host timeout must be positive, not {timeout.s}")
        return common_pb2.Budget(host_time=_duration(timeout.s))
    guard = _duration(timeout.guard) if timeout.guard is not None else None
    if isinstance(timeout, Virtual):
        if timeout.total_ns <= 0:
            raise ValueError(f"a virtual timeout must be positive, not {timeout}")
        return common_pb2.Budget(virtual_time_ns=timeout.total_ns, host_guard=guard)
    if isinstance(timeout, Instructions):
        if timeout.n <= 0:
            raise ValueError(f"an instruction timeout must be positive, not {timeout.n}")
        return common_pb2.Budget(instructions=timeout.n, host_guard=guard)
    raise TypeError(f"not a timeout: {timeout!r} (Virtual(...), Instructions(n), Host(s=...) or seconds)")


def deadline_of(timeout: Timeout) -> float:
    """The gRPC deadline of a call that waits with this timeout: its host-time bound plus a
    margin (the server ends the wait itself; the deadline only guards a lost server)."""
    if isinstance(timeout, int | float):
        return float(timeout) + DEADLINE_MARGIN_S
    if isinstance(timeout, Host):
        return timeout.s + DEADLINE_MARGIN_S
    return (timeout.guard if timeout.guard is not None else DEFAULT_GUARD_S) + DEADLINE_MARGIN_S


# ---------------------------------------------------------------------- failures

_OUTCOMES = {
    common_pb2.WAIT_OUTCOME_BUDGET_EXHAUSTED: "the timeout ran out",
    common_pb2.WAIT_OUTCOME_HOST_GUARD: "the host-time guard fired (the machine stopped advancing?)",
    common_pb2.WAIT_OUTCOME_STOPPED: "the machine stopped first",
}


def describe_stop(stop: common_pb2.StopEvent, state: common_pb2.SessionState.ValueType = common_pb2.SESSION_STATE_UNSPECIFIED) -> str:
    """A stop in words: "exited with code 3", "faulted at pc 0x1234 (hardfault)"..."""
    where = f"pc 0x{stop.pc:x}"
    if stop.location.function:
        where += f" in {stop.location.function}"
        if stop.location.file:
            where += f" ({stop.location.file}:{stop.location.line})"
    reason = stop.reason
    if reason == common_pb2.STOP_REASON_EXIT:
        return f"exited with code {stop.exit_code if stop.HasField('exit_code') else '?'}"
    text = {
        common_pb2.STOP_REASON_FAULT: "faulted",
        common_pb2.STOP_REASON_BREAKPOINT: "hit a breakpoint",
        common_pb2.STOP_REASON_WATCHPOINT: "hit a watchpoint",
        common_pb2.STOP_REASON_HALT: "was halted",
        common_pb2.STOP_REASON_STEP: "stepped",
    }.get(reason)
    if text is None:
        return f"is {common_pb2.SessionState.Name(state)}" if state else "stopped"
    return f"{text} at {where}" + (f": {stop.message}" if stop.message else "")


def _tail(text: str, limit: int = 2048) -> str:
    return text if len(text) <= limit else "..." + text[-limit:]


class ExpectTimeout(AssertionError):
    """``console.expect`` did not match: the message has the pattern, why the wait ended and
    the console's tail; ``.response`` is the server's ExpectConsoleResponse."""

    def __init__(self, pattern: str, timeout: Timeout, response: session_pb2.ExpectConsoleResponse) -> None:
        self.pattern = pattern
        self.response = response
        why = _OUTCOMES.get(response.outcome, common_pb2.WaitOutcome.Name(response.outcome))
        if response.outcome == common_pb2.WAIT_OUTCOME_STOPPED:
            why += f": it {describe_stop(response.stop, response.state)}"
        used = f"{response.instructions:,} instructions, {response.virtual_time_ns / 1e6:.3f} ms virtual"
        tail = response.console_tail
        super().__init__(
            f"console never matched {pattern!r} within {timeout}: {why} ({used})\n"
            f"--- console tail ({len(tail)} chars) ---\n{_tail(tail)}\n--- end of console ---")


class MachineStopped(AssertionError):
    """The machine did not do what a wait expected (``run_until``, ``wait_exit``)."""

    def __init__(self, message: str, stop: common_pb2.StopEvent | None = None) -> None:
        super().__init__(message)
        self.stop = stop


@dataclass(frozen=True)
class Match:
    """What ``console.expect`` matched: ``.text`` (also ``.group(0)``), ``.group(n)``,
    ``.groups()``, the console offsets ``.start`` / ``.end``."""

    text: str
    start: int
    end: int
    _groups: tuple[str, ...] = field(default=())

    def group(self, n: int = 0) -> str:
        return self.text if n == 0 else self._groups[n - 1]

    def groups(self) -> tuple[str, ...]:
        return self._groups


# ---------------------------------------------------------------------- parts


class Console:
    """The machine's UART: ``expect`` (pexpect-like: each match moves the position past it),
    ``send``, ``text``."""

    def __init__(self, machine: Machine) -> None:
        self._machine = machine
        self.position = 0  # console offset the next expect searches from

    def expect(self, pattern: str | re.Pattern[str], timeout: Timeout = DEFAULT_TIMEOUT) -> Match:
        pat = pattern.pattern if isinstance(pattern, re.Pattern) else pattern
        m = self._machine
        resp = m.client.sessions.expect_console(
            name=m.name, pattern=pat, offset=self.position, budget=budget_of(timeout),
            timeout=deadline_of(timeout))
        if resp.outcome != common_pb2.WAIT_OUTCOME_MATCHED:
            raise ExpectTimeout(pat, timeout, resp)
        self.position = resp.match_end
        return Match(resp.match, resp.match_start, resp.match_end, tuple(resp.groups))

    def send(self, text: str | bytes) -> None:
        data = text.encode() if isinstance(text, str) else text
        self._machine.client.sessions.write_console(name=self._machine.name, data=data)

    @property
    def data(self) -> bytes:
        """Every retained console byte since power on."""
        chunks = self._machine.client.sessions.stream_console(name=self._machine.name, offset=0, follow=False)
        return b"".join(c.data for c in chunks)

    @property
    def text(self) -> str:
        return self.data.decode(errors="replace")


class Registers:
    """``machine.registers["r0"]`` reads, ``machine.registers["r0"] = 1`` writes."""

    def __init__(self, machine: Machine) -> None:
        self._machine = machine

    def __getitem__(self, name: str) -> int:
        regs = self._machine.client.debug.read_registers(name=self._machine.name, names=[name]).registers
        if not regs:
            raise KeyError(name)
        return regs[0].value

    def __setitem__(self, name: str, value: int) -> None:
        self._machine.client.debug.write_register(name=self._machine.name, register=name, value=value)

    def all(self) -> dict[str, int]:
        return {r.name: r.value for r in self._machine.client.debug.read_registers(name=self._machine.name).registers}


class Programs:
    """Programs uploaded through one client, by content: a file is uploaded once per server."""

    def __init__(self, client: Client) -> None:
        self._client = client
        self._by_sha: dict[str, str] = {}

    def upload(self, path: Path) -> str:
        data = path.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        if sha not in self._by_sha:
            self._by_sha[sha] = self._client.upload_program(data, display_name=path.name).program.name
        return self._by_sha[sha]


@dataclass
class MachineSpec:
    """What a machine is made of: board, backend ("": the server's default), session options."""

    board: str
    backend: str = ""
    program: Path | None = None
    run: bool = True  # start the program loaded on first use (False: halted at its entry)
    icount: bool = False
    coverage: bool = False
    on_fault: bool = False
    assert_symbols: tuple[str, ...] = ()

    def options(self) -> session_pb2.SessionOptions:
        return session_pb2.SessionOptions(
            icount=self.icount, coverage=self.coverage,
            capsules=session_pb2.CapsulePolicy(on_fault=self.on_fault, assert_symbols=list(self.assert_symbols)))


def _location(where: str | int) -> debug_pb2.CodeLocation:
    if isinstance(where, int):
        return debug_pb2.CodeLocation(address=where)
    file, sep, line = where.rpartition(":")
    if sep and file and line.isdigit():
        return debug_pb2.CodeLocation(file_line=where)
    return debug_pb2.CodeLocation(symbol=where)


def sanitise(text: str, limit: int = 120) -> str:
    """A file-name-safe form of a test id or name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:limit] or "machine"


# ---------------------------------------------------------------------- the machine


class Machine:
    """A simulated board behind a session, created on first use (``load`` or any access).

    ``spawn``: what calling the machine does (``machine(board=...)`` makes another one, as
    the pytest fixture allows); ``capsule_dir``: where :meth:`capsule` writes archives."""

    def __init__(self, client: Client, spec: MachineSpec, *, programs: Programs | None = None,
                 capsule_dir: Path | None = None, spawn: Callable[..., Machine] | None = None,
                 display_name: str = "") -> None:
        self.client = client
        self.spec = spec
        self.capsule_dir = capsule_dir or Path(".ms-capsules")
        self.console = Console(self)
        self.registers = Registers(self)
        self.coverage_started = False
        self._programs = programs or Programs(client)
        self._spawn = spawn
        self._display_name = display_name
        self._name = ""
        self._symbols: dict[str, tuple[int, int]] = {}

    def __call__(self, **spec: Any) -> Machine:
        """Another machine (``board=``, ``backend=``, ``program=``, session options)."""
        if self._spawn is None:
            raise TypeError("this machine was not made by a factory: construct another Machine")
        return self._spawn(**spec)

    def __repr__(self) -> str:
        return f"<Machine {self._name or '(not created)'} board={self.spec.board} backend={self.backend or 'default'}>"

    # --------------------------------------------------------------- identity

    @property
    def created(self) -> bool:
        return bool(self._name)

    @property
    def name(self) -> str:
        """The session's name ("sessions/..."); creating the session (and loading the
        program a marker gave) on first use."""
        if not self._name:
            if self.spec.program is not None:
                self.load(self.spec.program, run=self.spec.run)
            else:
                self._create(None, power_on=True)
        return self._name

    @property
    def board(self) -> str:
        return self.spec.board

    @property
    def backend(self) -> str:
        return self.spec.backend

    @property
    def session(self) -> session_pb2.Session:
        return self.client.sessions.get_session(name=self.name).session

    @property
    def instructions(self) -> int:
        """Instructions executed since power on (exact with icount, else the backend's count)."""
        return self.client.telemetry.get_session_metrics(name=self.name).metrics.instructions

    def _create(self, program: str | None, *, power_on: bool) -> None:
        resp = self.client.sessions.create_session(
            board_template=self.spec.board, backend=self.spec.backend, options=self.spec.options(),
            program=program or "", power_on=power_on, display_name=self._display_name[:256])
        self._name = resp.session.name
        if not self.spec.backend:  # the server's default: record which one it was
            self.spec.backend = resp.session.backend

    # --------------------------------------------------------------- life

    def load(self, path: str | Path, *, run: bool = True) -> None:
        """Upload (once per server), power on, load and (``run``) start the program."""
        program = self._programs.upload(Path(path))
        if not self._name:
            self._create(program, power_on=True)
        else:
            self.client.sessions.load_program(name=self._name, program=program)
            if self.session.state == common_pb2.SESSION_STATE_OFF:
                self.client.sessions.power_on_session(name=self._name)
        if self.spec.coverage and not self.coverage_started:
            try:
                self.client.coverage.start_coverage(name=self._name)
                self.coverage_started = True
            except (errors.FailedPrecondition, errors.Unimplemented):
                pass  # no debug info, or a backend without coverage: nothing to merge for it
        if run:
            self.client.sessions.run_session(name=self._name)

    def halt(self) -> common_pb2.StopEvent:
        return self.client.debug.halt(name=self.name).stop

    def resume(self) -> None:
        self.client.debug.continue_(name=self.name, wait=False)

    def reset(self, *, run: bool = True) -> None:
        self.client.sessions.reset_session(name=self.name, run_after_reset=run)

    def wait_exit(self, timeout: Timeout = DEFAULT_TIMEOUT) -> int:
        """Let the machine run until it exits; its exit code. MachineStopped if it stops
        otherwise (fault, breakpoint) or the timeout runs out. A halt at one of the capsule
        policy's assert symbols (``assert_symbols``) is passed: the server took its capsule."""
        ended = self._exit_code()
        if ended is not None:
            return ended
        passes = len(self.spec.assert_symbols)
        while True:
            try:
                resp = self.client.debug.continue_(name=self.name, wait=True, budget=budget_of(timeout),
                                                   timeout=deadline_of(timeout))
            except errors.FailedPrecondition:
                ended = self._exit_code()  # it ended between the look and the continue
                if ended is None:
                    raise
                return ended
            # the server's own halts at the capsule policy's assert symbols (it captured one
            # there) are not what an exit waits for: on past them
            if passes and resp.stop.reason == common_pb2.STOP_REASON_BREAKPOINT and (
                    resp.stop.location.function in self.spec.assert_symbols):
                passes -= 1
                continue
            break
        if resp.stop.reason == common_pb2.STOP_REASON_EXIT and resp.outcome in (
                common_pb2.WAIT_OUTCOME_UNSPECIFIED, common_pb2.WAIT_OUTCOME_MATCHED):
            return resp.stop.exit_code
        why = _OUTCOMES.get(resp.outcome, "") if resp.outcome != common_pb2.WAIT_OUTCOME_MATCHED else ""
        raise MachineStopped(
            f"{self.name} did not exit within {timeout}: " + (f"{why}; it " if why else "it ")
            + describe_stop(resp.stop, resp.state) + f"\n--- console tail ---\n{_tail(self.console.text)}",
            resp.stop)

    def _exit_code(self) -> int | None:
        """The exit code of an exited machine; None while it can still run; MachineStopped
        for a faulted one."""
        s = self.session
        if s.state == common_pb2.SESSION_STATE_EXITED:
            if not s.HasField("exit_code"):
                raise MachineStopped(f"{self.name} exited, but the server does not know its exit code", s.last_stop)
            return s.exit_code
        if s.state == common_pb2.SESSION_STATE_FAULTED:
            raise MachineStopped(f"{self.name} {describe_stop(s.last_stop, s.state)} instead of exiting",
                                 s.last_stop)
        return None

    def run_until(self, where: str | int, timeout: Timeout = DEFAULT_TIMEOUT) -> common_pb2.StopEvent:
        """Run to a symbol ("main"), a source line ("main.c:42") or an address; the stop.
        A temporary breakpoint, cleared after."""
        bp = self.client.debug.set_breakpoint(name=self.name, location=_location(where)).breakpoint
        try:
            resp = self.client.debug.continue_(name=self.name, wait=True, budget=budget_of(timeout),
                                               timeout=deadline_of(timeout))
        finally:
            try:
                self.client.debug.clear_breakpoint(name=self.name, id=bp.id)
            except errors.MachineServerError:
                pass  # the session ended under us: the breakpoint went with it
        if resp.stop.reason == common_pb2.STOP_REASON_BREAKPOINT and resp.stop.pc == bp.address:
            return resp.stop
        why = _OUTCOMES.get(resp.outcome, "") if resp.outcome != common_pb2.WAIT_OUTCOME_MATCHED else ""
        raise MachineStopped(
            f"{self.name} did not reach {where!r} (0x{bp.address:x}) within {timeout}: "
            + (f"{why}; it " if why else "it ") + describe_stop(resp.stop, resp.state), resp.stop)

    # --------------------------------------------------------------- memory and symbols

    @property
    def pc(self) -> int:
        return self.registers["pc"]

    def symbol(self, name: str) -> int:
        """The address of a function or variable of the loaded program."""
        return self._symbol(name)[0]

    def _symbol(self, name: str) -> tuple[int, int]:
        if name not in self._symbols:
            r = self.client.debug.resolve_symbol(name=self.name, symbol=name)
            self._symbols[name] = (r.address, r.size)
        return self._symbols[name]

    def read(self, what: str | int, size: int | None = None) -> bytes:
        """Memory at a symbol (its size unless ``size``) or an address (``size`` required)."""
        if isinstance(what, str):
            address, sym_size = self._symbol(what)
            size = size if size is not None else sym_size
        else:
            address = what
        if not size:
            raise ValueError(f"read({what!r}): give a size (the symbol's size is unknown)")
        return self.client.debug.read_memory(name=self.name, address=address, size=size).data

    def read_u32(self, what: str | int) -> int:
        return int.from_bytes(self.read(what, 4), "little")

    def write(self, what: str | int, data: bytes) -> None:
        address = self._symbol(what)[0] if isinstance(what, str) else what
        self.client.debug.write_memory(name=self.name, address=address, data=data)

    # --------------------------------------------------------------- capsules and the end

    def capsule(self, reason: str = "", *, test_id: str = "",
                trigger: capsule_pb2.CapsuleTrigger.ValueType = EXPLICIT, path: Path | None = None) -> Path:
        """Capture a failure capsule now and export it; the archive's path (by default
        ``capsule_dir/<session>.capsule``)."""
        c = self.client.capsules.create_capsule(name=self.name, trigger=trigger, reason=reason[:4096],
                                                test_id=test_id[:1024]).capsule
        return self.export_capsule(c.name, path or self.capsule_dir / f"{sanitise(c.name)}.capsule")

    def export_capsule(self, capsule: str, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".part")
        with open(tmp, "wb") as out:
            for msg in self.client.capsules.export_capsule(name=capsule):
                if msg.WhichOneof("content") == "chunk":
                    out.write(msg.chunk)
        tmp.replace(path)
        return path

    def server_capsules(self) -> Iterator[capsule_pb2.Capsule]:
        """Capsules the server captured of this session by itself (fault, assert)."""
        if not self._name:
            return
        token = ""
        while True:
            resp = self.client.capsules.list_capsules(filter=f"session={self._name}", page_token=token)
            for c in resp.capsules:
                if c.trigger in (capsule_pb2.CAPSULE_TRIGGER_FAULT, capsule_pb2.CAPSULE_TRIGGER_ASSERT):
                    yield c
            token = resp.next_page_token
            if not token:
                return

    def stop_coverage(self) -> tuple[str, str] | None:
        """Stop collecting; (stored report name, program) or None without coverage."""
        if not (self._name and self.coverage_started):
            return None
        self.coverage_started = False
        report = self.client.coverage.stop_coverage(name=self._name).report
        return report.name, report.program

    def close(self) -> None:
        """Delete the session (idempotent)."""
        if self._name:
            name, self._name = self._name, ""
            try:
                self.client.sessions.delete_session(name=name)
            except errors.NotFound:
                pass
