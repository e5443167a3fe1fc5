"""A QEMU machine: one ``qemu-system-*`` child process per powered-on machine.

How it works (all measured on QEMU 7.2, see PLATFORM.md and the tests):

* **Process**: started halted (``-S``) with ``-nodefaults -nographic -monitor none``,
  semihosting on (``target=native``, its console output on a second chardev that is
  forwarded like the UART), and ``-icount shift=N,sleep=off`` when the options ask for
  deterministic time. See :mod:`.instance` for the sockets.
* **Loading**: the image's segments are written over the gdbstub (``M`` packets; QEMU's
  debug writes go into flash/ROM too), then a QMP ``system_reset``: the Cortex-M core
  reads SP and PC from the vector table exactly as at power-up, peripherals are reset.
  On RISC-V the PC is then set to the image's entry (QEMU's reset PC is the MROM stub).
  No restart, no temp files; ``reset()`` keeps memory (flash) contents.
* **Run control**: through the gdbstub only (``c``, ``s``, ^C), never QMP stop/cont,
  because QEMU's gdbstub sends a stop reply for *every* VM stop, which would desync the
  protocol. A background task waits for the stop reply of a ``run()``.
* **Ends**: a semihosting exit makes QEMU send ``W<code>`` and exit: StopInfo(EXIT),
  state EXITED. A guest lockup makes QEMU abort with "qemu: fatal: Lockup ...": StopInfo
  (FAULT), state FAULTED. Any other death: ``events.failed(reason)`` with the exit status
  and QEMU's last stderr lines, state FAILED. The process is always reaped. ``reset()``
  or ``load()`` after an exit/fault/failure starts a fresh QEMU (and reloads the last
  image for reset).
* **Snapshots**: QMP ``migrate`` to ``exec:cat > file`` on the stopped VM; the blob is
  that file's bytes behind a small header. Restore starts a new QEMU with ``-incoming
  "exec:cat file"`` and re-inserts breakpoints/watchpoints.
* **Coverage**: only for machines created with ``MachineOptions.extra["coverage"] == "1"``
  (the plugin costs ~+25 % run time; other machines never load it): every QEMU this
  machine starts gets ``-plugin msblocks.so,out=<machine coverage dir>/blocks-N.bin``
  (see :mod:`.coverage`), a table of translated blocks with inline execution counters
  that we read at any time, running or not. A restart (reset/load after an exit,
  snapshot restore) starts a new table; the old one is folded into the machine's
  totals, so coverage spans restarts. Counting starts at power-on;
  ``coverage_start``/``coverage_reset`` take a baseline, ``coverage_stop`` freezes the
  result.
* **Counters**: with icount, instructions = QEMU's icount (QMP ``query-replay``) and
  virtual time = icount << shift; without icount, instructions are not counted (0) and
  virtual time is the wall time spent running (QEMU's virtual clock runs at host speed).
  Values are refreshed at every stop (``counters()`` is synchronous).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from qemu.qmp import EventListener

from machineserver.server.drivers.base import (
    Arch,
    BackendFailed,
    BadImage,
    BadRequest,
    BoardSpec,
    Breakpoints,
    ConsoleInput,
    Counters,
    Coverage,
    HostFootprint,
    Machine,
    MachineEvents,
    MachineOptions,
    MachineState,
    MemoryAccess,
    NotSupported,
    ProgramImage,
    RegisterAccess,
    RunControl,
    Snapshots,
    StopInfo,
    StopReason,
    WatchKind,
    Watchpoints,
    WrongState,
)
from machineserver.server.drivers.qemu import coverage as cov
from machineserver.server.drivers.qemu.instance import QemuInstance, _short_tmpdir
from machineserver.server.drivers.qemu.regs import RegisterMap, fetch_register_map
from machineserver.server.drivers.qemu.rsp import (
    RspClosed,
    RspError,
    RspTimeout,
    StopReply,
)

BINARIES = {Arch.ARM_CORTEX_M: "qemu-system-arm", Arch.RISCV32: "qemu-system-riscv32"}
# QEMU machines whose snapshot restore is broken in the QEMU versions we know of
SNAPSHOT_BROKEN = {
    "lm3s6965evb": "QEMU 7.2 aborts restoring any lm3s6965evb snapshot "
    "(assertion in hw/sd/sd.c sd_ocr_powerup)",
}
SNAPSHOT_MAGIC = b"MSQEMU1\n"
STEP_TIMEOUT = 5.0
SIGTRAP = 5
_WATCH_Z = {WatchKind.WRITE: 2, WatchKind.READ: 3, WatchKind.ACCESS: 4}
_FATAL = re.compile(r"qemu: fatal: (.*)|Lockup: (.*)")
_PC_DUMP = re.compile(r"\b(?:R15|pc)\s*[=:]\s*([0-9a-fA-F]{8})\b")


def icount_shift(board: BoardSpec, options: MachineOptions) -> int:
    """ns per instruction = 2**shift; from options.extra["icount_shift"] or the board clock."""
    text = options.extra.get("icount_shift", "")
    if text:
        try:
            return max(0, min(10, int(text)))
        except ValueError:
            raise BadRequest("icount_shift must be an integer 0..10", field="icount_shift") from None
    mhz = board.cpu_mhz or 1.0
    return max(0, min(10, round(math.log2(1000.0 / mhz))))


class QemuMachine(
    Machine,
    RunControl,
    RegisterAccess,
    MemoryAccess,
    Breakpoints,
    Watchpoints,
    ConsoleInput,
    Snapshots,
    Coverage,
    HostFootprint,
):
    capabilities = (RunControl, RegisterAccess, MemoryAccess, Breakpoints, Watchpoints, ConsoleInput,
                    Snapshots, Coverage, HostFootprint)

    def __init__(
        self,
        board: BoardSpec,
        options: MachineOptions,
        events: MachineEvents,
        *,
        binary: str | None = None,
    ) -> None:
        super().__init__()
        self.provide(self)
        machine = board.backend_machines.get("qemu")
        if not machine:
            raise BadRequest(f"board {board.name} names no QEMU machine", field="board")
        self.board = board
        self.options = options
        self.events = events
        self.qemu_machine = machine
        self.binary = binary or BINARIES[board.arch]
        self._shift = icount_shift(board, options) if options.icount else None
        self._state = MachineState.OFF
        self._inst: QemuInstance | None = None
        self._regmap: RegisterMap | None = None
        self._image: ProgramImage | None = None
        self._breakpoints: dict[int, bool] = {}  # address -> hardware
        self._watchpoints: set[tuple[int, int, WatchKind]] = set()
        self._op = asyncio.Lock()  # one control operation at a time
        self._run_task: asyncio.Task[None] | None = None
        self._pause_future: asyncio.Future[StopInfo] | None = None
        self._sync_op = False  # a step/pause is waiting for the stop: no events for it
        self._exit_seen: StopReply | None = None
        self._end_info: StopInfo | None = None
        self._death: tuple[QemuInstance | None, StopInfo | str] | None = None
        self._last_pc = 0
        self._instructions = 0
        self._virtual_ns = 0
        self._run_started: float | None = None
        # coverage (only with options.extra["coverage"] == "1")
        self._coverage = options.extra.get("coverage") == "1"
        self._cov_dir: str | None = None  # this machine's tables, until power_off
        self._cov_file: str | None = None  # the running QEMU's table
        self._cov_gen = 0
        self._cov_past: cov.Blocks = {}  # totals of the tables of earlier QEMUs
        self._cov_past_full = False
        self._cov_baseline: cov.Blocks = {}  # totals at coverage_start/reset
        self._cov_frozen: cov.Blocks | None = None  # the result at coverage_stop

    # ================================================================== state
    @property
    def state(self) -> MachineState:
        return self._state

    def _require(self, *states: MachineState) -> None:
        if self._state not in states:
            raise WrongState(
                f"the machine is {self._state.value}; this needs it "
                + " or ".join(s.value for s in states),
                state=self._state.value,
                required="|".join(s.value for s in states),
            )

    def _rsp(self):
        inst = self._inst
        if inst is None or inst.rsp is None or not inst.alive:
            raise BackendFailed("QEMU is not running")
        return inst.rsp

    # ================================================================== lifecycle
    def _args(self, incoming: str | None = None, plugin: list[str] | None = None) -> list[str]:
        args = ["-M", self.qemu_machine]
        if self._shift is not None:
            args += ["-icount", f"shift={self._shift},sleep=off"]
        if plugin:
            args += plugin
        if incoming:
            args += ["-incoming", incoming]
        return args

    async def _start(self, incoming_blob: bytes | None = None) -> None:
        """Start a fresh QEMU (halted), replacing any old one."""
        await self._kill_instance()
        self._exit_seen = None
        self._end_info = None
        plugin = await self._next_coverage_table() if self._coverage else None
        workdir = _short_tmpdir()
        incoming = None
        if incoming_blob is not None:
            path = os.path.join(workdir, "incoming.bin")
            await asyncio.to_thread(Path(path).write_bytes, incoming_blob)
            incoming = f"exec:cat {path}"
        inst = QemuInstance(
            self.binary,
            self._args(incoming, plugin),
            on_console=self._console,
            on_exit=self._on_process_exit,
            workdir=workdir,
        )
        await inst.start(connect_gdb=incoming is None)
        self._inst = inst
        try:
            if incoming is not None:
                await self._wait_incoming(inst)
                await inst.connect_gdb()
            assert inst.rsp is not None
            self._regmap = await fetch_register_map(self.board.arch, inst.rsp.read_xfer)
            for addr, hw in self._breakpoints.items():
                await self._insert_bp(addr, hw)
            for addr, size, kind in self._watchpoints:
                await inst.rsp.insert_point(_WATCH_Z[kind], addr, size)
        except BaseException:
            await self._kill_instance()
            raise
        self._state = MachineState.HALTED

    async def _next_coverage_table(self) -> list[str]:
        """Fold the last QEMU's table (it is dead now) into the totals; the plugin
        arguments for the next QEMU, with a table of its own."""
        status = await asyncio.to_thread(cov.plugin_status)
        if status.path is None:
            raise NotSupported(f"coverage is unavailable on this server: {status.reason}")
        if self._cov_file is not None:
            table = await asyncio.to_thread(cov.read_table, self._cov_file)
            cov.merge(self._cov_past, table.blocks)
            self._cov_past_full |= table.full
            with contextlib.suppress(OSError):
                os.unlink(self._cov_file)
            self._cov_file = None
        if self._cov_dir is None:
            base = tempfile.gettempdir()
            self._cov_dir = tempfile.mkdtemp(prefix="ms-cov-", dir=base if "," not in base
                                             else "/tmp")
        self._cov_gen += 1
        self._cov_file = os.path.join(self._cov_dir, f"blocks-{self._cov_gen}.bin")
        try:
            return cov.plugin_args(status.path, self._cov_file)
        except ValueError as exc:
            raise NotSupported(f"coverage is unavailable on this server: {exc}") from None

    async def _wait_incoming(self, inst: QemuInstance) -> None:
        deadline = time.monotonic() + 10.0
        while True:
            status = await inst.qmp_call("query-status")
            assert isinstance(status, dict)
            if status.get("status") != "inmigrate":
                # QEMU restores the run state saved with the stream (debug, paused, ...)
                if status.get("status") in ("internal-error", "io-error", "shutdown",
                                            "guest-panicked", "restore-vm"):
                    raise BackendFailed(f"restore failed: QEMU is {status.get('status')}")
                return
            if time.monotonic() > deadline:
                raise BackendFailed("restore did not finish in 10 s")
            await asyncio.sleep(0.002)

    async def _kill_instance(self) -> None:
        task, self._run_task = self._run_task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        inst, self._inst = self._inst, None
        if inst is not None:
            await inst.stop()

    def host_process_ids(self) -> list[int]:
        """The QEMU process while it runs (for session metrics)."""
        inst = self._inst
        proc = inst.proc if inst is not None else None
        return [proc.pid] if proc is not None and proc.returncode is None else []

    async def power_on(self) -> None:
        async with self._op:
            self._require(MachineState.OFF, MachineState.FAILED)
            self._image = None
            self._instructions = 0
            self._virtual_ns = 0
            await self._start()
            self._last_pc = await self._read_pc()

    async def power_off(self) -> None:
        if self._state is MachineState.OFF and self._inst is None:
            return
        # no lock wait on a running op: pause futures are cancelled by the kill
        await self._kill_instance()
        self._breakpoints.clear()
        self._watchpoints.clear()
        self._image = None
        self._state = MachineState.OFF
        if self._cov_dir is not None:
            shutil.rmtree(self._cov_dir, ignore_errors=True)
        self._cov_dir = self._cov_file = None
        self._cov_past, self._cov_past_full = {}, False
        self._cov_baseline, self._cov_frozen = {}, None

    async def reset(self) -> None:
        async with self._op:
            self._require(MachineState.HALTED, MachineState.RUNNING, MachineState.EXITED,
                          MachineState.FAULTED, MachineState.FAILED)
            if self._needs_restart():
                await self._start()
                if self._image is not None:
                    await self._write_image(self._image)
            else:
                await self._halt_quietly()
            await self._system_reset()

    async def load(self, image: ProgramImage) -> None:
        async with self._op:
            self._require(MachineState.HALTED, MachineState.RUNNING, MachineState.EXITED,
                          MachineState.FAULTED)
            if image.arch is not None and image.arch != self.board.arch:
                raise BadImage(f"the program is for {image.arch}, the board is {self.board.arch}")
            if self._needs_restart():
                await self._start()
            else:
                await self._halt_quietly()
            await self._write_image(image)
            self._image = image
            await self._system_reset()

    async def _write_image(self, image: ProgramImage) -> None:
        rsp = self._rsp()
        for seg in image.segments:
            try:
                await rsp.write_memory(seg.address, seg.data)
            except RspError as exc:
                raise BadImage(
                    f"cannot write {len(seg.data)} bytes at 0x{seg.address:08x}: {exc}"
                ) from None

    async def _system_reset(self) -> None:
        inst = self._inst
        assert inst is not None and inst.qmp is not None
        listener = EventListener(("RESET",))
        with inst.qmp.listen(listener):
            await inst.qmp_call("system_reset")
            try:
                await asyncio.wait_for(listener.get(), 5.0)
            except TimeoutError:
                raise BackendFailed("QEMU did not reset in 5 s") from None
        entry = self._image.entry if self._image is not None else None
        if entry is not None:
            if self.board.arch is Arch.RISCV32:
                await self._write_reg("pc", entry)
            elif await self._read_pc() == 0:
                # no reset vector in the image (a raw blob): start at its entry point
                await self._write_reg("pc", entry & ~1)
        self._last_pc = await self._read_pc()
        await self._refresh_counters()
        self._state = MachineState.HALTED

    def _needs_restart(self) -> bool:
        # after an exit/fault QEMU is gone (or about to be: W comes before the exit)
        return (
            self._inst is None
            or not self._inst.alive
            or self._state in (MachineState.EXITED, MachineState.FAULTED, MachineState.FAILED)
        )

    async def _halt_quietly(self) -> None:
        """Stop a running machine without reporting the stop (reset/load/restore)."""
        if self._state is MachineState.RUNNING:
            await self._interrupt_and_wait()

    def counters(self) -> Counters:
        virtual = self._virtual_ns
        if self._shift is None and self._run_started is not None:
            virtual += int((time.monotonic() - self._run_started) * 1e9)
        # with -icount QEMU counts instructions; without, there is no count and the
        # virtual time is the host time spent running
        return Counters(instructions=self._instructions, virtual_time_ns=virtual, exact=self._shift is not None)

    async def _refresh_counters(self) -> None:
        if self._shift is None or self._inst is None or not self._inst.alive:
            return
        with contextlib.suppress(BackendFailed):
            info = await self._inst.qmp_call("query-replay")
            if isinstance(info, dict):
                self._instructions = int(info.get("icount", 0))
                self._virtual_ns = self._instructions << self._shift

    def _mark_running(self) -> None:
        self._state = MachineState.RUNNING
        self._run_started = time.monotonic()

    def _mark_stopped(self) -> None:
        if self._run_started is not None and self._shift is None:
            self._virtual_ns += int((time.monotonic() - self._run_started) * 1e9)
        self._run_started = None

    # ================================================================== process events
    def _console(self, data: bytes) -> None:
        self.events.console_output(data)

    def _on_process_exit(self, returncode: int, stderr: str) -> None:
        """QEMU ended on its own (not through power_off or a restart)."""
        self._mark_stopped()
        if self._exit_seen is not None:
            return  # semihosting exit: already handled from the W packet
        if self._sync_op or (self._run_task is not None and not self._run_task.done()):
            return  # the step/pause/run waiter sees the connection drop and reports it
        self._report_death()

    def _classify_death(self) -> StopInfo | str:
        inst = self._inst
        stderr = "\n".join(inst.stderr_tail) if inst is not None else ""
        rc = inst.returncode if inst is not None else None
        fatal = _FATAL.search(stderr)
        if fatal:
            msg = (fatal.group(1) or fatal.group(2) or "").strip()
            pcs = _PC_DUMP.findall(stderr)
            pc = int(pcs[-1], 16) if pcs else self._last_pc
            return StopInfo(StopReason.FAULT, pc=pc, message=msg or "guest fault")
        return "QEMU ended unexpectedly: " + (
            inst.describe_exit() if inst is not None else f"status {rc}"
        )

    def _report_death(self, *, quiet: bool = False) -> StopInfo | str:
        """Apply what a dead QEMU means (FAULTED or FAILED), report it unless ``quiet``
        (a step/pause returns it instead), and free the rest of the instance."""
        inst = self._inst
        if self._death is not None and self._death[0] is inst:
            return self._death[1]  # already reported (the waiter and the exit watch race)
        result = self._classify_death()
        self._death = (inst, result)
        if isinstance(result, StopInfo):
            self._end_info = result
            self._state = MachineState.FAULTED
            if not quiet:
                self.events.stopped(result)
        else:
            self._end_info = None
            self._state = MachineState.FAILED
            self.events.failed(result)
        if inst is not None:
            asyncio.get_running_loop().create_task(inst.stop())
        return result

    async def _deliver_death(self, inst: QemuInstance, fut: asyncio.Future[StopInfo] | None, *,
                             mark_stopped: bool) -> None:
        """QEMU is gone: a pause in progress gets the result of its death; otherwise,
        once the process has exited, the death is reported as an event."""
        if fut is not None and not fut.done():
            try:
                fut.set_result(await self._dead_result())
            except BackendFailed as exc:
                fut.set_exception(exc)
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(inst.exited.wait(), 3.0)
        if mark_stopped:
            self._mark_stopped()
        self._report_death()

    async def _dead_result(self) -> StopInfo:
        """After the gdbstub connection dropped during a step/pause: what happened."""
        inst = self._inst
        if inst is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(inst.exited.wait(), 3.0)
        if self._state in (MachineState.EXITED, MachineState.FAULTED) and self._end_info:
            return self._end_info
        result = self._report_death(quiet=True)
        if isinstance(result, StopInfo):
            return result
        raise BackendFailed(result)

    def _stop_from_reply(self, reply: StopReply, pc: int, *, default: StopReason) -> StopInfo:
        if reply.exited:
            if reply.kind == "W":
                return StopInfo(StopReason.EXIT, pc=pc, exit_code=reply.signal)
            return StopInfo(StopReason.FAULT, pc=pc, message=f"killed by signal {reply.signal}")
        watch = reply.watch
        if watch is not None:
            access, address = watch
            return StopInfo(
                StopReason.WATCHPOINT, pc=pc, watch_address=address,
                watch_access="read" if access == "read" else "write" if access == "write"
                else "access",
            )
        if reply.signal != SIGTRAP:
            return StopInfo(StopReason.HALT, pc=pc, message=f"stopped with signal {reply.signal}")
        if pc in self._breakpoints and default is not StopReason.STEP:
            return StopInfo(StopReason.BREAKPOINT, pc=pc)
        return StopInfo(default, pc=pc)

    async def _finish_stop(self, reply: StopReply, default: StopReason) -> StopInfo:
        """Turn a stop reply into StopInfo and the machine's new state."""
        self._mark_stopped()
        if reply.exited:
            self._exit_seen = reply
            info = self._stop_from_reply(reply, self._last_pc, default=default)
            self._end_info = info
            self._state = (
                MachineState.EXITED if info.reason is StopReason.EXIT else MachineState.FAULTED
            )
            if self._inst is not None:
                asyncio.get_running_loop().create_task(self._reap_after_exit(self._inst))
            return info
        if reply.watch is not None and self._watchpoints:
            # QEMU 7.2 reports a watchpoint *before* the access (pc at the accessing
            # instruction; continuing or stepping re-triggers it): do what gdb does for
            # "non-steppable" watchpoints: step it with the watchpoints out, put them back.
            # The stop then reads like a data breakpoint: after the access, new value.
            after = await self._step_without_watchpoints()
            if after.exited:
                return await self._finish_stop(after, default)
        pc = await self._read_pc()
        self._last_pc = pc
        info = self._stop_from_reply(reply, pc, default=default)
        if info.reason is StopReason.WATCHPOINT and info.watch_address is not None:
            info = await self._with_watch_value(info)
        self._state = MachineState.HALTED
        await self._refresh_counters()
        return info

    async def _step_without_watchpoints(self) -> StopReply:
        rsp = self._rsp()
        for addr, size, kind in self._watchpoints:
            await rsp.remove_point(_WATCH_Z[kind], addr, size)
        try:
            return await rsp.step(STEP_TIMEOUT)
        finally:
            if not rsp.closed:
                for addr, size, kind in self._watchpoints:
                    with contextlib.suppress(RspError):
                        await rsp.insert_point(_WATCH_Z[kind], addr, size)

    async def _reap_after_exit(self, inst: QemuInstance) -> None:
        """QEMU exits right after the W packet: wait for it and free its resources."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(inst.exited.wait(), 3.0)
        if self._inst is inst:
            await inst.stop()

    async def _with_watch_value(self, info: StopInfo) -> StopInfo:
        assert info.watch_address is not None
        size = 4
        for addr, sz, _ in self._watchpoints:
            if addr == info.watch_address:
                size = min(sz, 8)
                break
        try:
            data = await self._rsp().read_memory(info.watch_address, size)
        except RspError:
            return info
        return StopInfo(
            info.reason, info.pc, watch_address=info.watch_address,
            watch_value=int.from_bytes(data, "little"), watch_access=info.watch_access,
        )

    # ================================================================== run control
    async def run(self) -> None:
        async with self._op:
            self._require(MachineState.HALTED)
            await self._run_locked()

    async def _run_locked(self) -> None:
        """Resume a halted machine (the caller holds ``_op``)."""
        rsp = self._rsp()
        pc = await self._read_pc()
        if pc in self._breakpoints:
            # QEMU re-hits a breakpoint at the current pc on continue: step off it first
            self._sync_op = True
            try:
                reply = await rsp.step(STEP_TIMEOUT)
            except RspClosed:
                info = await self._dead_result()
                self._sync_op = False
                self.events.stopped(info)
                return
            finally:
                self._sync_op = False
            if reply.exited or reply.watch is not None:
                info = await self._finish_stop(reply, StopReason.STEP)
                self.events.stopped(info)
                return
        self._pause_future = None
        await rsp.send_continue(b"c")
        self._mark_running()
        self._run_task = asyncio.create_task(self._wait_run_stop())

    async def _wait_run_stop(self) -> None:
        inst = self._inst
        if inst is None or inst.rsp is None:
            return
        try:
            reply = await inst.rsp.wait_stop(None)
        except RspClosed:
            # the process died: a pause in progress collects it, else it is an event
            await self._deliver_death(inst, self._pause_future, mark_stopped=True)
            return
        fut = self._pause_future
        try:
            info = await self._finish_stop(reply, StopReason.HALT)
        except RspClosed:
            info = None
        except (RspError, BackendFailed) as exc:
            if fut is not None and not fut.done():
                fut.set_exception(BackendFailed(str(exc)))
            return
        if info is None:  # died right after stopping
            await self._deliver_death(inst, fut, mark_stopped=False)
            return
        if fut is not None and not fut.done():
            fut.set_result(info)
        else:
            self.events.stopped(info)

    async def _interrupt_and_wait(self) -> StopInfo:
        rsp = self._rsp()
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[StopInfo] = loop.create_future()
        self._pause_future = fut
        self._sync_op = True
        try:
            rsp.interrupt()
            try:
                return await asyncio.wait_for(asyncio.shield(fut), 5.0)
            except TimeoutError:
                raise BackendFailed("QEMU did not stop within 5 s of ^C") from None
        finally:
            self._sync_op = False
            self._pause_future = None

    async def pause(self) -> StopInfo:
        async with self._op:
            if self._state is MachineState.HALTED:
                return StopInfo(StopReason.HALT, pc=await self._read_pc())
            self._require(MachineState.RUNNING)
            return await self._interrupt_and_wait()

    async def step(self, count: int = 1) -> StopInfo:
        if count < 1:
            raise BadRequest("count must be at least 1", field="count")
        async with self._op:
            self._require(MachineState.HALTED)
            rsp = self._rsp()
            info = StopInfo(StopReason.STEP, pc=self._last_pc)
            self._sync_op = True
            try:
                for i in range(count):
                    try:
                        reply = await rsp.step(STEP_TIMEOUT)
                    except RspClosed:
                        return await self._dead_result()
                    except RspTimeout:
                        # e.g. a wfi with interrupts masked while single-stepping
                        rsp.interrupt()
                        reply = await rsp.wait_stop(5.0)
                        info = await self._finish_stop(reply, StopReason.HALT)
                        return StopInfo(StopReason.HALT, info.pc,
                                        message="the instruction did not complete (wfi?)")
                    self._mark_stopped()
                    if reply.exited or reply.watch is not None or reply.signal != SIGTRAP:
                        return await self._finish_stop(reply, StopReason.STEP)
                    if i == count - 1 or self._breakpoints:
                        pc = await self._read_pc()
                        self._last_pc = pc
                        if pc in self._breakpoints and i < count - 1:
                            info = StopInfo(StopReason.BREAKPOINT, pc=pc)
                            break
                        info = StopInfo(StopReason.STEP, pc=pc)
                    if i == count - 1:
                        break
            finally:
                self._sync_op = False
            self._state = MachineState.HALTED
            await self._refresh_counters()
            return info

    # ================================================================== registers
    def register_names(self) -> Sequence[str]:
        if self._regmap is not None:
            return self._regmap.names()
        if self.board.arch is Arch.ARM_CORTEX_M:
            return [*(f"r{i}" for i in range(13)), "sp", "lr", "pc", "xpsr"]
        return [*(f"x{i}" for i in range(32)), "pc"]

    def _halted_regs(self) -> RegisterMap:
        self._require(MachineState.HALTED)
        assert self._regmap is not None
        return self._regmap

    async def _read_pc(self) -> int:
        assert self._regmap is not None
        reg = self._regmap.resolve("pc")
        assert reg is not None
        return int.from_bytes(await self._rsp().read_register(reg.number), "little")

    async def _write_reg(self, name: str, value: int) -> None:
        assert self._regmap is not None
        reg = self._regmap.resolve(name)
        assert reg is not None
        await self._rsp().write_register(reg.number, (value & ((1 << (8 * reg.size)) - 1))
                                         .to_bytes(reg.size, "little"))

    async def read_registers(self, names: Sequence[str] | None = None) -> dict[str, int]:
        async with self._op:
            return await self._read_registers(names)

    async def _read_registers(self, names: Sequence[str] | None) -> dict[str, int]:
        regmap = self._halted_regs()
        rsp = self._rsp()
        if names is None:
            wanted = regmap.names()
        else:
            wanted = []
            for n in names:
                reg = regmap.resolve(n)
                if reg is None:
                    raise BadRequest(f"unknown register {n!r} on {self.board.name}", field="name")
                wanted.append(n)
        out: dict[str, int] = {}
        g: dict[str, int] | None = None
        if any((r := regmap.resolve(n)) is not None and r.in_g for n in wanted):
            g = regmap.decode_g(await rsp.read_all_registers())
        for n in wanted:
            reg = regmap.resolve(n)
            assert reg is not None
            if g is not None and reg.name in g:
                out[n] = g[reg.name]
            else:
                out[n] = int.from_bytes(await rsp.read_register(reg.number), "little")
        return out

    async def write_register(self, name: str, value: int) -> None:
        async with self._op:
            regmap = self._halted_regs()
            reg = regmap.resolve(name)
            if reg is None:
                raise BadRequest(f"unknown register {name!r} on {self.board.name}", field="name")
            if not 0 <= value < 1 << (8 * reg.size):
                raise BadRequest(f"value 0x{value:x} does not fit {name}", field="value")
            if reg.name == "pc" and self.board.arch is Arch.ARM_CORTEX_M:
                value &= ~1
            try:
                await self._write_reg(reg.name, value)
            except RspError as exc:
                raise BadRequest(f"cannot write {name}: {exc}", field="name") from None
            if reg.name == "pc":
                self._last_pc = value

    # ================================================================== memory
    async def read_memory(self, address: int, size: int) -> bytes:
        async with self._op:
            return await self._read_memory(address, size)

    async def _read_memory(self, address: int, size: int) -> bytes:
        self._require(MachineState.HALTED)
        _check_range(address, size)
        if size == 0:
            return b""
        try:
            return await self._rsp().read_memory(address, size)
        except RspClosed:
            raise BackendFailed("QEMU is not running") from None
        except RspError as exc:
            bad = _bad_address(exc, address)
            raise BadRequest(
                f"address 0x{bad:08x} is not mapped on {self.board.name}", field="address"
            ) from None

    async def write_memory(self, address: int, data: bytes) -> None:
        async with self._op:
            self._require(MachineState.HALTED)
            _check_range(address, len(data))
            if not data:
                return
            rsp = self._rsp()
            if self.board.region_at(address, len(data)) is None:
                # QEMU's gdbstub silently drops writes to unmapped addresses: probe by
                # reading first (outside the board's known memory only)
                try:
                    await rsp.read_memory(address, len(data))
                except RspClosed:
                    raise BackendFailed("QEMU is not running") from None
                except RspError as exc:
                    bad = _bad_address(exc, address)
                    raise BadRequest(
                        f"address 0x{bad:08x} is not mapped on {self.board.name}",
                        field="address",
                    ) from None
            try:
                await rsp.write_memory(address, data)
            except RspError as exc:
                raise BadRequest(
                    f"cannot write at 0x{address:08x}: {exc}", field="address"
                ) from None

    # ================================================================== breakpoints
    @contextlib.asynccontextmanager
    async def _points_editable(self):  # type: ignore[no-untyped-def]
        """Breakpoints and watchpoints can be edited while the machine runs, as on the
        Unicorn backend: QEMU's gdbstub takes packets only while the VM is stopped (in
        all-stop mode), so a running machine is interrupted quietly, edited, and resumed;
        a real stop that raced the interrupt is reported instead of resumed over."""
        resume = False
        if self._state is MachineState.RUNNING and self._inst is not None and self._inst.alive:
            info = await self._interrupt_and_wait()
            if info.reason is StopReason.HALT and self._state is MachineState.HALTED:
                resume = True
            else:
                self.events.stopped(info)
        try:
            yield
        finally:
            if resume and self._state is MachineState.HALTED:
                await self._run_locked()

    async def _insert_bp(self, address: int, hardware: bool) -> None:
        rsp = self._rsp()
        kind = 2
        if self.board.arch is Arch.RISCV32:
            kind = 4
            with contextlib.suppress(RspError):
                low = await rsp.read_memory(address, 2)
                if low[0] & 3 != 3:
                    kind = 2  # compressed (RVC) instruction
        await rsp.insert_point(1 if hardware else 0, address, kind)

    async def set_breakpoint(self, address: int, *, hardware: bool = False) -> None:
        async with self._op:
            self._require_on()
            _check_range(address, 1)
            address &= ~1 if self.board.arch is Arch.ARM_CORTEX_M else ~0
            if address in self._breakpoints:
                return
            async with self._points_editable():
                if self._inst is not None and self._inst.alive:
                    try:
                        await self._insert_bp(address, hardware)
                    except RspError as exc:
                        raise BadRequest(
                            f"cannot set a breakpoint at 0x{address:08x}: {exc}", field="address"
                        ) from None
                self._breakpoints[address] = hardware

    async def clear_breakpoint(self, address: int) -> None:
        async with self._op:
            self._require_on()
            address &= ~1 if self.board.arch is Arch.ARM_CORTEX_M else ~0
            if address not in self._breakpoints:
                return
            async with self._points_editable():
                hw = self._breakpoints.pop(address, None)
                if hw is None or self._inst is None or not self._inst.alive:
                    return
                with contextlib.suppress(RspError):
                    await self._rsp().remove_point(1 if hw else 0, address, 2)

    def _require_on(self) -> None:
        # breakpoints can be edited while halted or running (or after the program ended)
        self._require(MachineState.HALTED, MachineState.RUNNING, MachineState.EXITED,
                      MachineState.FAULTED)

    async def set_watchpoint(self, address: int, size: int, kind: WatchKind) -> None:
        async with self._op:
            self._require_on()
            _check_range(address, size)
            if size not in (1, 2, 4, 8):
                raise BadRequest("watchpoint size must be 1, 2, 4 or 8", field="size")
            key = (address, size, kind)
            if key in self._watchpoints:
                return
            async with self._points_editable():
                if self._inst is not None and self._inst.alive:
                    try:
                        await self._rsp().insert_point(_WATCH_Z[kind], address, size)
                    except RspError as exc:
                        raise BadRequest(
                            f"cannot set a watchpoint at 0x{address:08x}: {exc}", field="address"
                        ) from None
                self._watchpoints.add(key)

    async def clear_watchpoint(self, address: int, size: int, kind: WatchKind) -> None:
        async with self._op:
            self._require_on()
            key = (address, size, kind)
            if key not in self._watchpoints:
                return
            async with self._points_editable():
                self._watchpoints.discard(key)
                if self._inst is not None and self._inst.alive:
                    with contextlib.suppress(RspError):
                        await self._rsp().remove_point(_WATCH_Z[kind], address, size)

    # ================================================================== console
    async def console_input(self, data: bytes) -> None:
        self._require(MachineState.HALTED, MachineState.RUNNING)
        if self._inst is None or not self._inst.alive:
            raise BackendFailed("QEMU is not running")
        try:
            await self._inst.console_write(data)
        except (OSError, TimeoutError) as exc:
            raise BackendFailed(f"console write failed: {exc}") from None

    # ================================================================== snapshots
    def _check_snapshots(self) -> None:
        reason = SNAPSHOT_BROKEN.get(self.qemu_machine)
        if reason:
            raise NotSupported(f"snapshots are not supported on {self.board.name}: {reason}")

    async def save_state(self) -> bytes:
        async with self._op:
            self._check_snapshots()
            self._require(MachineState.HALTED)
            inst = self._inst
            assert inst is not None
            path = os.path.join(inst.dir, "snapshot.bin")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            await inst.qmp_call("migrate", {"uri": f"exec:cat > {path}"})
            deadline = time.monotonic() + 30.0
            while True:
                info = await inst.qmp_call("query-migrate")
                status = info.get("status") if isinstance(info, dict) else None
                if status == "completed":
                    break
                if status in ("failed", "cancelled"):
                    err = info.get("error-desc", "") if isinstance(info, dict) else ""
                    raise BackendFailed(f"snapshot failed: {status} {err}".strip())
                if time.monotonic() > deadline:
                    raise BackendFailed("snapshot did not finish in 30 s")
                await asyncio.sleep(0.002)
            stream = _patch_runstate(await asyncio.to_thread(Path(path).read_bytes))
            os.unlink(path)
            header = json.dumps({
                "machine": self.qemu_machine,
                "board": self.board.name,
                "icount_shift": self._shift,
                "pc": self._last_pc,
                "instructions": self._instructions,
                "virtual_ns": self._virtual_ns,
            }).encode()
            return SNAPSHOT_MAGIC + len(header).to_bytes(4, "little") + header + stream

    async def restore_state(self, blob: bytes) -> None:
        async with self._op:
            self._check_snapshots()
            if not blob.startswith(SNAPSHOT_MAGIC) or len(blob) < len(SNAPSHOT_MAGIC) + 4:
                raise BadRequest("not a QEMU snapshot of this backend", field="snapshot")
            off = len(SNAPSHOT_MAGIC)
            hlen = int.from_bytes(blob[off : off + 4], "little")
            try:
                header = json.loads(blob[off + 4 : off + 4 + hlen])
            except ValueError:
                raise BadRequest("corrupt snapshot header", field="snapshot") from None
            if header.get("machine") != self.qemu_machine:
                raise BadRequest(
                    f"the snapshot is of a {header.get('machine')} machine, "
                    f"this one is {self.qemu_machine}", field="snapshot",
                )
            if header.get("icount_shift") != self._shift:
                raise BadRequest("the snapshot was taken with other icount settings",
                                 field="snapshot")
            await self._start(incoming_blob=blob[off + 4 + hlen :])
            self._instructions = int(header.get("instructions", 0))
            self._virtual_ns = int(header.get("virtual_ns", 0))
            self._last_pc = await self._read_pc()
            await self._refresh_counters()


    # ================================================================== coverage
    def _require_coverage(self) -> None:
        if not self._coverage:
            raise NotSupported(
                "coverage was not enabled for this machine: QEMU loads the block-counting "
                'plugin only for machines created with MachineOptions.extra["coverage"]="1"'
            )

    async def _coverage_totals(self) -> cov.Blocks:
        totals = dict(self._cov_past)
        if self._cov_file is not None:
            table = await asyncio.to_thread(cov.read_table, self._cov_file)
            cov.merge(totals, table.blocks)
        return totals

    @property
    def coverage_overflowed(self) -> bool:
        """Whether a table filled up (blocks translated after that are not counted)."""
        if self._cov_past_full:
            return True
        return self._cov_file is not None and cov.read_table(self._cov_file).full

    @property
    def method(self) -> str:
        return "tcg-plugin"

    async def coverage_start(self) -> None:
        self._require_coverage()
        self._cov_baseline = await self._coverage_totals()
        self._cov_frozen = None

    async def coverage_stop(self) -> None:
        self._require_coverage()
        if self._cov_frozen is None:
            self._cov_frozen = cov.delta(await self._coverage_totals(), self._cov_baseline)

    async def coverage_reset(self) -> None:
        self._require_coverage()
        self._cov_baseline = await self._coverage_totals()
        if self._cov_frozen is not None:
            self._cov_frozen = {}

    async def coverage_blocks(self) -> dict[int, tuple[int, int]]:
        self._require_coverage()
        if self._cov_frozen is not None:
            return dict(self._cov_frozen)
        return cov.delta(await self._coverage_totals(), self._cov_baseline)


# section name, instance id, version, then the state's length and its 100-byte buffer
_GLOBALSTATE_DEBUG = re.compile(rb"(\x0bglobalstate.{8})\x00\x00\x00\x06debug\x00", re.DOTALL)


def _patch_runstate(stream: bytes) -> bytes:
    """The migration stream carries the source's run state; a VM stopped by the gdbstub
    is in "debug", and QEMU 7.2 aborts loading that ("invalid runstate transition:
    'inmigrate' -> 'debug'"). Rewrite it to "paused" (same length: the field is a
    100-byte NUL-padded buffer behind its length)."""
    return _GLOBALSTATE_DEBUG.sub(lambda m: m.group(1) + b"\x00\x00\x00\x07paused", stream,
                                  count=1)


def _check_range(address: int, size: int) -> None:
    if address < 0 or address >= 1 << 32:
        raise BadRequest(f"address 0x{address:x} is outside the 32-bit space", field="address")
    if size < 0 or address + size > 1 << 32:
        raise BadRequest("the range runs past the 32-bit address space", field="size")


def _bad_address(exc: RspError, default: int) -> int:
    m = re.search(r"at 0x([0-9a-f]+)", str(exc))
    return int(m.group(1), 16) if m else default
