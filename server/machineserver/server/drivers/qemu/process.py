"""One machine's QEMU process across restarts: starting it (a warm spare from
:mod:`.spares`, or one started now by :mod:`.launch`), ending it, and what its death
means.

Deaths, each classified, reaped and reported exactly once per process:

* **the program's end**, seen as a stop reply before the process exits (``W``: QEMU
  performed a semihosting exit itself; see :mod:`.semihosting` for how most exits are
  caught before that): :meth:`QemuProcess.ended`, state EXITED (unless QEMU says a
  signal ended it: then it is a failure);
* **a guest lockup**: QEMU aborts with "qemu: fatal: Lockup ...": StopInfo(FAULT), state
  FAULTED;
* **anything else** (killed, crashed): ``events.failed(reason)`` with the exit status and
  the stderr lines that explain it, state FAILED;
* **stuck**: the gdbstub or QMP does not answer in time (e.g. QEMU was SIGSTOPped), or
  answers what it should not: the process is killed at once (a FAILED machine never
  keeps a stopped QEMU alive) and reported as a failure: :meth:`QemuProcess.fail`.

A death seen while an operation waits on QEMU (a step, a run, a pause) is that
operation's to deliver (:meth:`QemuProcess.death_result`): a step returns the FAULT
instead of it also being an event. Otherwise the exit watch reports it.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from machineserver.server.drivers.base import (
    BackendFailed,
    DriverError,
    MachineState,
    StopInfo,
    StopReason,
    WrongState,
)
from machineserver.server.drivers.qemu.gate import InstructionGate
from machineserver.server.drivers.qemu.instance import QemuInstance
from machineserver.server.drivers.qemu.launch import LaunchSpec, launch
from machineserver.server.rsp import RspClient

if TYPE_CHECKING:
    from machineserver.server.drivers.qemu.spares import SparePool
    from machineserver.server.drivers.qemu.target import QemuTarget

EXIT_WAIT = 3.0  # how long a dropped connection may wait for the process to end
_FATAL = re.compile(r"qemu: fatal: (.*)|Lockup: (.*)")
_SIGNALLED = re.compile(r"^qemu-system-[\w-]+: terminating on signal \d+")
_PC_DUMP = re.compile(r"\b(?:R15|pc)\s*[=:]\s*([0-9a-fA-F]{8})\b")


class QemuProcess:
    """The QEMU of one machine. ``instance`` is the running one (None when there is
    none); ``gate`` its instruction gate (None without the plugin)."""

    def __init__(self, target: QemuTarget, extra_args: Sequence[str] = (),
                 spares: SparePool | None = None) -> None:
        self.target = target
        self.extra_args = tuple(extra_args)
        self.spares = spares
        self.instance: QemuInstance | None = None
        self.gate: InstructionGate | None = None
        self._waiters = 0  # operations waiting on QEMU: its death is theirs to deliver
        self._reported: QemuInstance | None = None  # the instance whose end was reported
        self._outcome: StopInfo | str = ""
        self._reaping: set[asyncio.Task[None]] = set()

    @property
    def alive(self) -> bool:
        inst = self.instance
        return inst is not None and inst.alive and inst.rsp is not None

    def pids(self) -> list[int]:
        proc = self.instance.proc if self.instance is not None else None
        return [proc.pid] if proc is not None and proc.returncode is None else []

    def stub(self) -> RspClient:
        inst = self.instance
        if inst is None or inst.rsp is None or not inst.alive:
            raise BackendFailed("QEMU is not running")
        return inst.rsp

    @contextlib.contextmanager
    def waiting(self) -> Iterator[None]:
        """Around an operation that will see QEMU's death itself and deliver it."""
        self._waiters += 1
        try:
            yield
        finally:
            self._waiters -= 1

    # ------------------------------------------------------------------ start / stop
    @property
    def spec(self) -> LaunchSpec:
        """What this machine's QEMUs are started from."""
        target = self.target
        return LaunchSpec(target.binary, target.qemu_machine, target.arch, target.clock.shift,
                          self.extra_args)

    async def start(self, *, coverage: dict[str, str] | None = None,
                    incoming: bytes | None = None) -> None:
        """Start a fresh QEMU (halted), replacing any old one: a warm spare when the pool
        has one (see :mod:`.spares`; not for a coverage table, extra arguments or a
        restore), else one started now. ``coverage``: the plugin's coverage options;
        ``incoming``: a migration stream to restore."""
        await self.stop()
        target = self.target
        spec = self.spec
        launched = None
        if self.spares is not None and not coverage and incoming is None and not spec.extra_args:
            launched = await self.spares.take(spec, on_console=target.console_output,
                                              on_exit=self._on_exit)
        if launched is None:
            launched = await launch(spec, on_console=target.console_output,
                                    on_exit=self._on_exit, coverage=coverage, incoming=incoming)
        self.instance, self.gate = launched.instance, launched.gate
        target.regmap = launched.regmap

    async def stop(self, *, kill: bool = False) -> None:
        """End the current QEMU, if any, without reporting anything; and wait for the
        reaping of ended ones (nothing of theirs outlives this)."""
        inst, self.instance = self.instance, None
        gate, self.gate = self.gate, None
        if gate is not None:
            gate.close()
        if inst is not None:
            await inst.stop(kill=kill)
        if self._reaping:
            await asyncio.gather(*self._reaping, return_exceptions=True)

    # ------------------------------------------------------------------ monitor
    async def qmp(self, command: str, args: dict[str, object] | None = None) -> object:
        """A QMP command. QEMU not answering, or refusing, fails the machine."""
        inst = self.instance
        if inst is None or not inst.alive:
            raise await self.connection_lost()
        try:
            return await inst.qmp_call(command, args)
        except BackendFailed as exc:
            if not inst.alive:
                raise await self.connection_lost() from None
            raise await self.fail(str(exc)) from None

    async def hmp(self, command: str) -> str:
        """An HMP command's output (QEMU reports HMP errors as output: check it)."""
        return str(await self.qmp("human-monitor-command", {"command-line": command}))

    # ------------------------------------------------------------------ deaths
    def _on_exit(self, returncode: int, stderr: str) -> None:
        """QEMU ended on its own (not through stop())."""
        self.target.clock.stopped()
        inst = self.instance
        if inst is None or self._reported is inst or self._waiters:
            return  # reported already, or a waiting operation delivers it
        self._report(inst, quiet=False)

    def _classify(self, inst: QemuInstance) -> StopInfo | str:
        stderr = "\n".join(inst.stderr_tail)
        fatal = _FATAL.search(stderr)
        if fatal:
            msg = (fatal.group(1) or fatal.group(2) or "").strip()
            pcs = _PC_DUMP.findall(stderr)
            pc = int(pcs[-1], 16) if pcs else self.target.last_pc
            return StopInfo(StopReason.FAULT, pc=pc, message=msg or "guest fault")
        return "QEMU ended unexpectedly: " + inst.describe_exit()

    def _report(self, inst: QemuInstance, *, quiet: bool) -> StopInfo | str:
        """Apply and report (once) what the end of ``inst`` means; ``quiet``: a stop is
        returned to a waiter instead of sent as an event."""
        if self._reported is inst:
            return self._outcome
        outcome = self._classify(inst)
        self._reported, self._outcome = inst, outcome
        target = self.target
        if isinstance(outcome, StopInfo):
            target.end, target.state = outcome, MachineState.FAULTED
            if not quiet:
                target.report_stop(outcome)
        else:
            target.end, target.state = None, MachineState.FAILED
            target.events.failed(outcome)
        self._reap(inst)
        return outcome

    def _reap(self, inst: QemuInstance) -> None:
        async def reap() -> None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(inst.exited.wait(), EXIT_WAIT)
            await inst.stop(kill=True)
            if self.instance is inst:
                self.instance = None
                if self.gate is not None:
                    self.gate.close()
                    self.gate = None

        task = asyncio.get_running_loop().create_task(reap())
        self._reaping.add(task)
        task.add_done_callback(self._reaping.discard)

    async def ended(self, info: StopInfo) -> StopInfo:
        """A ``W``/``X`` stop reply: QEMU is ending. Usually the program ended it (an exit
        QEMU performed itself): EXIT or FAULT, the outcome of this process, returned to
        the caller to deliver. But QEMU also says ``W00`` when a signal ends it
        ("terminating on signal N"): that is a failure (reported, and raised)."""
        inst = self.instance
        if inst is None:
            return self._past_outcome()
        with self.waiting(), contextlib.suppress(TimeoutError):
            await asyncio.wait_for(inst.exited.wait(), EXIT_WAIT)
        if self.instance is not inst:
            return self._past_outcome()
        if any(_SIGNALLED.search(line) for line in inst.stderr_tail):
            outcome = self._report(inst, quiet=True)
            if isinstance(outcome, StopInfo):
                return outcome
            raise BackendFailed(outcome)
        self.target.end = info
        self.target.state = MachineState.EXITED if info.reason is StopReason.EXIT else MachineState.FAULTED
        self._reported, self._outcome = inst, info
        self._reap(inst)
        return info

    async def death_result(self) -> StopInfo:
        """For an operation that saw the gdbstub connection drop: wait for the process
        to end and return what its end was (EXIT or FAULT, not sent as an event: the
        caller delivers it), or raise BackendFailed (reported as a failure)."""
        inst = self.instance
        if inst is None:
            return self._past_outcome()
        with self.waiting(), contextlib.suppress(TimeoutError):
            await asyncio.wait_for(inst.exited.wait(), EXIT_WAIT)
        if self.instance is not inst:  # powered off or restarted meanwhile
            return self._past_outcome()
        if not inst.exited.is_set():
            raise await self.fail("QEMU closed its gdbstub connection but did not end")
        outcome = self._report(inst, quiet=True)
        if isinstance(outcome, StopInfo):
            return outcome
        raise BackendFailed(outcome)

    def _past_outcome(self) -> StopInfo:
        state = self.target.state
        if state is MachineState.OFF:
            raise WrongState("the machine was powered off", state="off", required="halted")
        if isinstance(self._outcome, StopInfo) and state in (MachineState.EXITED, MachineState.FAULTED):
            return self._outcome
        raise BackendFailed(self._outcome or "QEMU is not running")

    async def connection_lost(self) -> DriverError:
        """The error for a call that found QEMU gone; its end is reported (once), as a
        stop event when it was the program's end: the call has no stop to return."""
        first = self.instance is not None and self._reported is not self.instance
        with self.waiting():
            try:
                info = await self.death_result()
            except DriverError as exc:
                return exc
        if first:
            self.target.report_stop(info)
        return WrongState(f"the program ended ({info.message or info.reason.value}) and QEMU with "
                          "it; reset or load to start again", state=self.target.state.value,
                          required="halted")

    async def fail(self, reason: str) -> BackendFailed:
        """QEMU cannot go on (stuck, or misbehaving): kill it at once, FAILED, reported
        once. Returns the error to raise."""
        inst = self.instance
        if inst is not None and self._reported is not inst:
            self._reported, self._outcome = inst, reason
            self.target.end, self.target.state = None, MachineState.FAILED
            self.target.events.failed(reason)
            await self.stop(kill=True)
        elif inst is not None:
            await self.stop(kill=True)
        return BackendFailed(reason)
