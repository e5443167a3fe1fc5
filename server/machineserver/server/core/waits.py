"""Waits with a budget on one session: ExpectConsole (until the console output matches a
pattern) and Continue with a budget (until the machine stops).

A :class:`Budget` is instructions, virtual time or host time, plus a host-time guard on
top of the first two. How each is measured:

* Host time: the wall meter. The machine runs as it is.
* Instructions and virtual time: the machine's own counters (``current_counters``), counted
  exactly by driving the machine: the wait steps it itself (``RunControl.step``, which every
  backend runs as a continue with a count), in chunks of what is left, and reads the
  counters after each chunk. Polling a running machine's counters instead would overshoot by
  whatever the host happened to run between two polls (on Unicorn about a million
  instructions per 5 ms poll, more on an idle host, less on a loaded one: the flakiness a
  virtual budget exists to remove), and QEMU's counters only move at its stops. So:

  - Continue drives the machine from HALTED (a RUNNING one is paused first) and leaves it
    halted where the budget ran out (outcome BUDGET_EXHAUSTED);
  - ExpectConsole on a RUNNING session pauses it, drives it, and lets it run again when the
    wait ends, whatever the outcome, unless it stopped by itself meanwhile (exit, fault,
    breakpoint, or a Halt from another caller: then it stays stopped, outcome STOPPED). The
    session's record says HALTED while the wait drives it.

  Virtual-time chunks are estimated from the board's clock (at most half of what is left,
  so the counters are read often enough as the budget nears its end); instruction chunks
  are what is left (at most 10^9), and what a chunk executed is read from the counters
  (Unicorn ends a step of a machine asleep in WFI early; QEMU without icount counts no
  instructions: there the step's count is taken). A co-simulation member cannot be
  stepped on its own: a wait on one watches its counters every 5 ms while it runs (less
  exact). ExpectConsole is a viewer's call (api/auth.py): with a counted budget it steps
  the machine through the same session lock and step quota as Step, and leaves it running.
* The host guard ends a counted wait whose machine stopped advancing (a WFI with nothing to
  wake it): outcome HOST_GUARD, the machine halted (Continue) or running again (Expect).
* The call's own deadline ends the wait as before: DEADLINE_EXCEEDED, after the machine was
  halted (Continue) or left running (ExpectConsole). A caller that goes away (cancelled)
  ends the wait the same way.

Console matching: the console's bytes from ``offset`` on, decoded as UTF-8 with invalid
bytes replaced by U+FFFD, searched with Python ``re`` after every new output; offsets in the
answer are byte offsets of the console (as StreamConsole counts them). Bytes the retained
log dropped before the wait read them are skipped (the search restarts after the gap).
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import enum
import time
from dataclasses import dataclass
from typing import Any

import structlog

from machineserver.server.core.console import ConsoleChunk, ConsoleLog
from machineserver.server.core.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    MachineServerError,
)
from machineserver.server.core.patterns import ClientPattern, PatternTooSlow
from machineserver.server.core.sessions import (
    OPERATION_STOP_SECONDS,
    LiveSession,
    SessionManager,
    finish_uninterrupted,
)
from machineserver.server.drivers import base as drv
from machineserver.server.drivers.base import Counters, MachineState, StopInfo, StopReason

log = structlog.get_logger(__name__)

MAX_PATTERN_BYTES = 4096
MAX_INSTRUCTIONS = 10**12
MAX_VIRTUAL_NS = 10**13
MAX_HOST_SECONDS = 3600.0
DEFAULT_HOST_SECONDS = 10.0  # an unset budget
DEFAULT_GUARD_SECONDS = 60.0
TAIL_BYTES = 4096  # console_tail
# the text one search sees at most (characters): a chatty console is searched in a window that
# keeps its last half after each trim, so every search stays bounded (a match longer than
# half the window can be missed)
SEARCH_WINDOW_CHARS = 2 << 20
STEP_CHUNK = 10**9  # the most instructions one step is asked for (SessionManager.step's limit)
MIN_VIRTUAL_CHUNK = 1024  # instructions: the smallest chunk of a virtual-time budget
POLL_SECONDS = 0.005  # a co-simulation member's counters, while it runs
SETTLE_QUIET_SECONDS = 0.02  # after a stop: console output still arriving (QEMU's chardev)
SETTLE_MAX_SECONDS = 0.25
# U+DC80..U+DCFF are what "surrogateescape" makes of undecodable bytes (one char per byte,
# so char positions map back to byte offsets); the pattern sees U+FFFD there instead
_REPLACE_ESCAPES = {0xDC80 + i: 0xFFFD for i in range(128)}


class WaitOutcome(enum.Enum):
    MATCHED = "matched"  # the console matched; Continue: the machine stopped by itself
    BUDGET_EXHAUSTED = "budget_exhausted"
    HOST_GUARD = "host_guard"
    STOPPED = "stopped"  # ExpectConsole: the machine stopped before the console matched


class BudgetKind(enum.Enum):
    INSTRUCTIONS = "instructions"
    VIRTUAL_TIME = "virtual_time_ns"
    HOST_TIME = "host_time"


@dataclass(frozen=True)
class Budget:
    kind: BudgetKind = BudgetKind.HOST_TIME
    limit: float = DEFAULT_HOST_SECONDS  # instructions, virtual ns or host seconds
    guard_s: float = DEFAULT_GUARD_SECONDS

    @property
    def counted(self) -> bool:
        return self.kind is not BudgetKind.HOST_TIME

    def describe(self) -> str:
        if self.kind is BudgetKind.INSTRUCTIONS:
            return f"{int(self.limit)} instructions"
        if self.kind is BudgetKind.VIRTUAL_TIME:
            return f"{int(self.limit)} ns of virtual time"
        return f"{self.limit:g} s of host time"


def make_budget(*, instructions: int | None = None, virtual_ns: int | None = None,
                host_s: float | None = None, guard_s: float | None = None, field: str = "budget") -> Budget:
    """A checked budget (at most one limit given; none: the default host time).
    INVALID_ARGUMENT names the field (``budget.instructions``...)."""
    guard = DEFAULT_GUARD_SECONDS
    if guard_s is not None:
        if not 0 < guard_s <= MAX_HOST_SECONDS:
            raise InvalidArgument(f"{field}.host_guard", "must be more than 0 and at most 1 hour")
        guard = guard_s
    given = [g for g in (instructions, virtual_ns, host_s) if g is not None]
    if len(given) > 1:
        raise InvalidArgument(field, "give one of instructions, virtual_time_ns and host_time")
    if instructions is not None:
        if not 1 <= instructions <= MAX_INSTRUCTIONS:
            raise InvalidArgument(f"{field}.instructions", "must be between 1 and 10^12")
        return Budget(BudgetKind.INSTRUCTIONS, instructions, guard)
    if virtual_ns is not None:
        if not 1 <= virtual_ns <= MAX_VIRTUAL_NS:
            raise InvalidArgument(f"{field}.virtual_time_ns", "must be between 1 and 10^13 (about 2.8 hours)")
        return Budget(BudgetKind.VIRTUAL_TIME, virtual_ns, guard)
    if host_s is not None:
        if not 0 < host_s <= MAX_HOST_SECONDS:
            raise InvalidArgument(f"{field}.host_time", "must be more than 0 and at most 1 hour")
        return Budget(BudgetKind.HOST_TIME, host_s, guard)
    return Budget(guard_s=guard)


def compile_pattern(pattern: str, field: str = "pattern") -> ClientPattern:
    if not pattern:
        raise InvalidArgument(field, "must not be empty")
    return ClientPattern(pattern, field, MAX_PATTERN_BYTES)


@dataclass(frozen=True)
class Usage:
    """What a wait used, on the machine's counters and the host meter."""

    instructions: int = 0
    virtual_ns: int = 0
    host_s: float = 0.0


@dataclass(frozen=True)
class ConsoleMatch:
    text: str
    start: int  # byte offsets of the console
    end: int
    groups: tuple[str, ...]


@dataclass(frozen=True)
class ExpectResult:
    outcome: WaitOutcome
    match: ConsoleMatch | None
    end_offset: int
    console_tail: str
    stop: StopInfo | None
    state: MachineState
    used: Usage


@dataclass(frozen=True)
class ContinueResult:
    outcome: WaitOutcome
    stop: StopInfo | None
    state: MachineState
    used: Usage


class ConsoleMatcher:
    """The console from an offset, decoded incrementally, searched with a pattern."""

    def __init__(self, regex: ClientPattern, console: ConsoleLog, offset: int) -> None:
        if offset > console.end:
            raise InvalidArgument("offset", f"{offset} is past the end of the console ({console.end})")
        self._regex = regex
        self._console = console
        self._next = console.read(offset, 0).offset  # the next byte to decode (dropped bytes skipped)
        self._searched = False  # searched once: later searches only when the text grew
        self._restart(self._next)

    def _restart(self, offset: int) -> None:
        self._base = offset  # byte offset of _text[0]
        self._decoder = codecs.getincrementaldecoder("utf-8")("surrogateescape")
        self._text = ""  # surrogate-escaped: len(encode) gives byte offsets back
        self._search = ""  # what the pattern sees: escapes shown as U+FFFD

    def _add(self, chunk: ConsoleChunk) -> None:
        if chunk.offset != self._next:  # the retained log dropped bytes we had not read
            self._restart(chunk.offset)
        piece = self._decoder.decode(chunk.data)
        self._text += piece
        self._search += piece.translate(_REPLACE_ESCAPES)
        self._next = chunk.offset + len(chunk.data)
        if len(self._search) > SEARCH_WINDOW_CHARS:  # keep each search bounded: drop the oldest text
            cut = len(self._search) - SEARCH_WINDOW_CHARS // 2
            self._base += len(self._text[:cut].encode("utf-8", "surrogateescape"))
            self._text, self._search = self._text[cut:], self._search[cut:]

    def search(self) -> ConsoleMatch | None:
        """Read what the console has gained, and search everything since the offset."""
        grew = False
        while self._next < self._console.end:
            chunk = self._console.read(self._next)
            if not chunk.data:
                break
            self._add(chunk)
            grew = True
        if not grew and self._searched:
            return None
        self._searched = True
        try:
            m = self._regex.search(self._search)
        except PatternTooSlow as exc:
            raise InvalidArgument(exc.field, str(exc).split(": ", 1)[1]) from None
        if m is None:
            return None
        return ConsoleMatch(
            text=m.group(0), start=self._byte_offset(m.start()), end=self._byte_offset(m.end()),
            groups=tuple(g if g is not None else "" for g in m.groups()))

    def _byte_offset(self, index: int) -> int:
        return self._base + len(self._text[:index].encode("utf-8", "surrogateescape"))


def console_tail(console: ConsoleLog) -> str:
    return console.read(max(0, console.end - TAIL_BYTES), TAIL_BYTES).data.decode("utf-8", "replace")


async def settle_console(console: ConsoleLog) -> None:
    """After a stop: let console output the machine wrote before it land (a few loop
    turns; then while more keeps arriving, bounded)."""
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    deadline = time.monotonic() + SETTLE_MAX_SECONDS
    end = -1
    while console.end != end and time.monotonic() < deadline:
        end = console.end
        await asyncio.sleep(SETTLE_QUIET_SECONDS)


class _Meter:
    """What a wait has used so far, and its host-time limits: the budget's (host time, or
    the guard of a counted budget) and the call's deadline, whichever comes first."""

    def __init__(self, budget: Budget, time_left: float | None) -> None:
        # instructions the wait stepped itself, by the counters; by the steps' counts where
        # the counters count none (QEMU without icount). Not the steps' counts everywhere: a
        # step of a sleeping machine (WFI, nothing to wake it) may end early as a STEP
        self.stepped = 0
        self.baseline = Counters(0, 0)  # the counters when the wait began to count
        self.began = time.monotonic()
        self.limit_at = self.began + (budget.guard_s if budget.counted else budget.limit)
        self.deadline_at = self.began + time_left if time_left is not None else None
        self.budget = budget

    def left(self) -> float:
        end = self.limit_at if self.deadline_at is None else min(self.limit_at, self.deadline_at)
        return max(0.0, end - time.monotonic())

    def expired(self) -> WaitOutcome | None:
        """What ended the wait, when its time is up: the budget, the guard, or the call's
        deadline (raised)."""
        now = time.monotonic()
        if self.deadline_at is not None and now >= self.deadline_at and self.deadline_at <= self.limit_at:
            raise _CallDeadline()
        if now >= self.limit_at:
            return WaitOutcome.HOST_GUARD if self.budget.counted else WaitOutcome.BUDGET_EXHAUSTED
        return None


class _CallDeadline(Exception):
    """The call's own deadline came first."""


@dataclass
class _Ending:
    outcome: WaitOutcome
    stop: StopInfo | None = None
    match: ConsoleMatch | None = None
    used: Usage | None = None  # measured at the end when None


class Waits:
    """ExpectConsole and Continue with a budget, on the session manager's run control."""

    def __init__(self, sessions: SessionManager) -> None:
        self.m = sessions

    # ------------------------------------------------------------------ ExpectConsole

    async def expect_console(self, live: LiveSession, pattern: str, offset: int, budget: Budget,
                             time_left: float | None = None) -> ExpectResult:
        regex = compile_pattern(pattern)
        matcher = ConsoleMatcher(regex, live.console, offset)
        meter = _Meter(budget, time_left)
        meter.baseline = await _counters(live)
        try:
            ending = await self._expect(live, matcher, budget, meter)
        except _CallDeadline:
            raise DeadlineExceeded(f"the console of session {live.id} did not match before the call's "
                                   "deadline") from None
        used = ending.used or await _usage(live, meter)
        return ExpectResult(ending.outcome, ending.match, live.console.end, console_tail(live.console),
                            ending.stop, live.state, used)

    async def _expect(self, live: LiveSession, matcher: ConsoleMatcher, budget: Budget, meter: _Meter) -> _Ending:
        if (found := matcher.search()) is not None:
            return _Ending(WaitOutcome.MATCHED, match=found)
        if live.state is not MachineState.RUNNING:
            return _Ending(WaitOutcome.STOPPED, live.last_stop)
        if not budget.counted or live.membership is not None:
            return await self._watch(live, budget, meter, matcher, halt_at_end=False)
        try:
            stop = await self.m.pause(live, "paused: a console wait with a counted budget drives it")
        except FailedPrecondition:
            if live.state in (MachineState.HALTED, MachineState.RUNNING):
                raise
            return _Ending(WaitOutcome.STOPPED, live.last_stop)  # powered off meanwhile
        state: MachineState = live.state  # read afresh after the await
        if state is not MachineState.HALTED or stop is None or stop.reason is not StopReason.HALT:
            await settle_console(live.console)  # it stopped by itself first
            found = matcher.search()
            return _Ending(WaitOutcome.MATCHED, match=found) if found else _Ending(WaitOutcome.STOPPED, live.last_stop)
        ending: _Ending | None = None
        try:
            ending = await self._drive(live, budget, meter, matcher)
            ending.used = await _usage(live, meter)  # before it runs on
            if ending.outcome is not WaitOutcome.STOPPED:
                ending.stop = None  # it runs on: no stop to report
            return ending
        finally:
            if ending is None or ending.outcome is not WaitOutcome.STOPPED:
                await self._resume(live)

    async def _resume(self, live: LiveSession) -> None:
        """Let the machine run again after a wait drove it (not cut short by the caller
        going away: the machine was running before the wait)."""
        if live.state is not MachineState.HALTED or not self.m.contains(live):
            return
        stop = live.last_stop
        if stop is not None and stop.reason not in (StopReason.HALT, StopReason.STEP):
            return  # it stopped by itself as the wait ended (a breakpoint its last step reached)
        run = asyncio.ensure_future(self.m.run(live))
        cancelled = await finish_uninterrupted(run, OPERATION_STOP_SECONDS)
        if run.done() and not run.cancelled() and (exc := run.exception()) is not None:
            log.warning("expect_resume_failed", session_id=live.id, error=str(exc))
        if cancelled:
            raise asyncio.CancelledError()

    # ------------------------------------------------------------------ Continue

    async def continue_(self, live: LiveSession, budget: Budget, time_left: float | None = None) -> ContinueResult:
        """Run until the machine stops or the budget runs out (then it is halted where it
        is). DEADLINE_EXCEEDED when the call's deadline comes first (halted too)."""
        meter = _Meter(budget, time_left)
        meter.baseline = await _counters(live)
        try:
            ending = await self._continue(live, budget, meter)
        except _CallDeadline:
            await self.m.ops.halt_for_gone_caller(live, "halted: the continue's deadline passed")
            raise DeadlineExceeded(f"session {live.id} did not stop in time; it was halted") from None
        except asyncio.CancelledError:
            await self.m.ops.halt_for_gone_caller(live, "halted: the continue's caller went away")
            raise
        used = await _usage(live, meter)
        return ContinueResult(ending.outcome, ending.stop, live.state, used)

    async def _continue(self, live: LiveSession, budget: Budget, meter: _Meter) -> _Ending:
        if not budget.counted or live.membership is not None:
            await self.m.run(live)
            return await self._watch(live, budget, meter, None, halt_at_end=True)
        if live.state is MachineState.RUNNING:
            stop = await self.m.pause(live, "paused: a continue with a counted budget drives it")
            state: MachineState = live.state  # read afresh after the await
            if state is not MachineState.HALTED or stop is None or stop.reason is not StopReason.HALT:
                return _Ending(WaitOutcome.MATCHED, live.last_stop)
        live.require_halted("continue")
        return await self._drive(live, budget, meter, None)

    # ------------------------------------------------------------------ the two ways to wait

    async def _drive(self, live: LiveSession, budget: Budget, meter: _Meter,
                     matcher: ConsoleMatcher | None) -> _Ending:
        """Step the (halted) machine chunk by chunk until the budget is used, it stops by
        itself, or the console matches; it is left halted. The budget counts from here
        (a machine that was running was paused just before)."""
        meter.baseline = baseline = await _counters(live)
        while True:
            counters = await _counters(live)
            if budget.kind is BudgetKind.INSTRUCTIONS:
                left = int(budget.limit) - meter.stepped
            else:
                left = _left(budget, baseline, counters)
            if left <= 0:
                return await self._exhausted(live, budget, matcher)
            if budget.kind is BudgetKind.INSTRUCTIONS:
                chunk = min(left, STEP_CHUNK)
            else:
                estimate = int(left * max(live.board.cpu_mhz, 1.0) / 1000)
                chunk = min(max(MIN_VIRTUAL_CHUNK, estimate // 2), STEP_CHUNK)
            step = asyncio.ensure_future(self.m.step(live, chunk))
            try:
                stop_or_match = await self._step_or_match(step, matcher, meter, live)
            finally:
                if not step.done():
                    step.cancel()
                    await finish_uninterrupted(step, OPERATION_STOP_SECONDS)
                    with contextlib.suppress(BaseException):
                        step.result()
            if isinstance(stop_or_match, ConsoleMatch):
                return _Ending(WaitOutcome.MATCHED, match=stop_or_match)
            if isinstance(stop_or_match, WaitOutcome):  # the guard
                return _Ending(stop_or_match, await _halt_stop(live, f"halted: the host guard of {budget.guard_s:g} s fired"))
            if stop_or_match is None:
                return _Ending(WaitOutcome.STOPPED, live.last_stop)
            stop = stop_or_match
            if stop.reason is StopReason.STEP:
                after = await _counters(live)
                if after.instructions or counters.instructions:
                    meter.stepped += max(0, after.instructions - counters.instructions)
                else:  # a backend that counts no instructions (QEMU without icount): the step's count
                    meter.stepped += chunk
            else:
                await settle_console(live.console)
                if matcher is not None and (found := matcher.search()) is not None:
                    return _Ending(WaitOutcome.MATCHED, stop, found)
                return _Ending(WaitOutcome.STOPPED if matcher is not None else WaitOutcome.MATCHED, stop)

    async def _step_or_match(self, step: asyncio.Future[StopInfo], matcher: ConsoleMatcher | None,
                             meter: _Meter, live: LiveSession) -> StopInfo | ConsoleMatch | WaitOutcome | None:
        """What ended the step: its stop, the console's match, the host limit, or None
        (the machine went away under it)."""
        while True:
            if matcher is not None and (found := matcher.search()) is not None:
                return found
            if step.done():
                try:
                    return step.result()
                except MachineServerError:
                    # taken from under the wait (powered off, deleted, the backend failed):
                    # a continue fails as Step does; an expect ends STOPPED, once what took
                    # it (holding the session lock) is done
                    if matcher is None:
                        raise
                    await _after_lock_holder(live)
                    return None
            if (ended := meter.expired()) is not None:
                return ended
            waiters: set[asyncio.Future[Any]] = {step}
            grew = asyncio.ensure_future(_console_grows(live.console)) if matcher is not None else None
            if grew is not None:
                waiters.add(grew)
            try:
                await asyncio.wait(waiters, timeout=meter.left(), return_when=asyncio.FIRST_COMPLETED)
            finally:
                if grew is not None:
                    grew.cancel()

    async def _exhausted(self, live: LiveSession, budget: Budget, matcher: ConsoleMatcher | None) -> _Ending:
        if matcher is not None:
            await settle_console(live.console)  # what it wrote within the budget counts
            if (found := matcher.search()) is not None:
                return _Ending(WaitOutcome.MATCHED, match=found)
        return _Ending(WaitOutcome.BUDGET_EXHAUSTED,
                       await _halt_stop(live, f"halted: the budget of {budget.describe()} ran out"))

    async def _watch(self, live: LiveSession, budget: Budget, meter: _Meter,
                     matcher: ConsoleMatcher | None, *, halt_at_end: bool) -> _Ending:
        """Wait while the machine runs by itself (a host-time budget, or a co-simulation
        member); with ``halt_at_end`` (Continue) a budget that runs out halts it."""
        events = self.m.events.subscribe(lambda ev: ev.session == live.id)
        try:
            while True:
                if matcher is not None and (found := matcher.search()) is not None:
                    return _Ending(WaitOutcome.MATCHED, match=found)
                if live.state is not MachineState.RUNNING:
                    await settle_console(live.console)
                    if matcher is not None and (found := matcher.search()) is not None:
                        return _Ending(WaitOutcome.MATCHED, live.last_stop, found)
                    return _Ending(WaitOutcome.STOPPED if matcher is not None else WaitOutcome.MATCHED, live.last_stop)
                ended = meter.expired()
                if ended is None and budget.counted:
                    if _left(budget, meter.baseline, await _counters(live)) <= 0:
                        ended = WaitOutcome.BUDGET_EXHAUSTED
                if ended is not None:
                    stop = None
                    if halt_at_end:
                        reason = (f"halted: the host guard of {budget.guard_s:g} s fired" if ended is WaitOutcome.HOST_GUARD
                                  else f"halted: the budget of {budget.describe()} ran out")
                        stop = await self.m.pause(live, reason)
                        if stop is not None and stop.reason is not StopReason.HALT:
                            return _Ending(WaitOutcome.MATCHED, stop)  # it stopped by itself first
                    return _Ending(ended, stop)
                waiters = {asyncio.ensure_future(events.get())}
                if matcher is not None:
                    waiters.add(asyncio.ensure_future(_console_grows(live.console)))
                timeout = min(POLL_SECONDS, meter.left()) if budget.counted else meter.left()
                try:
                    await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for w in waiters:
                        w.cancel()
        finally:
            events.close()


async def _after_lock_holder(live: LiveSession) -> None:
    """Let a call that preempted the wait's step (a power-off, a delete) take the session
    lock and finish, so the state read next is the one it leaves (bounded)."""
    await asyncio.sleep(0)
    await asyncio.sleep(0)

    async def through() -> None:
        async with live.lock:
            pass

    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(through(), OPERATION_STOP_SECONDS)


async def _console_grows(console: ConsoleLog) -> None:
    """Until the console has output past its current end (or is closed)."""
    async for _ in console.follow(console.end, follow=True):
        return


async def _counters(live: LiveSession) -> Counters:
    machine = live.machine
    if machine is None:
        return Counters(0, 0)
    try:
        return await machine.current_counters()
    except drv.DriverError as exc:
        raise FailedPrecondition(f"cannot read the counters of session {live.id}: {exc}",
                                 state=live.state.value) from None


def _left(budget: Budget, baseline: Counters, now: Counters) -> int:
    if budget.kind is BudgetKind.INSTRUCTIONS:
        return int(budget.limit) - (now.instructions - baseline.instructions)
    return int(budget.limit) - (now.virtual_time_ns - baseline.virtual_time_ns)


async def _halt_stop(live: LiveSession, message: str) -> StopInfo:
    """The halt a driven wait leaves the machine in, at its pc."""
    pc = live.last_stop.pc if live.last_stop is not None else 0
    machine = live.machine
    if machine is not None and live.state is MachineState.HALTED:
        with contextlib.suppress(drv.DriverError):
            pc = (await machine.capability(drv.RegisterAccess).read_registers(["pc"]))["pc"]
    return StopInfo(StopReason.HALT, pc=pc, message=message)


async def _usage(live: LiveSession, meter: _Meter) -> Usage:
    baseline = meter.baseline
    with contextlib.suppress(MachineServerError):
        now = await _counters(live)
        return Usage(max(meter.stepped, now.instructions - baseline.instructions),
                     max(0, now.virtual_time_ns - baseline.virtual_time_ns), time.monotonic() - meter.began)
    return Usage(host_s=time.monotonic() - meter.began)
