"""Starting one QEMU, ready for a machine: the process started halted (``-S``) with our
plugin and its instruction gate, QMP, the console and the gdbstub connected, the gdbstub
tuned and the register map known.

:class:`LaunchSpec` is everything that shapes such a QEMU apart from what one machine
adds (its coverage table, a migration stream to restore): two QEMUs started from equal
specs are interchangeable, which is what lets a warm spare (:mod:`.spares`) stand in for
a QEMU started on demand. :func:`launch` starts one; the caller owns what it returns.

Where the time goes (QEMU 7.2, mps2-an385, this kind of machine): QEMU's own start-up
(about 20 ms at best, several times that on a loaded host) dominates; every connection
waits for it, so they are made concurrently (:meth:`.instance.QemuInstance.start`), and
the gdbstub's set-up requests (single steps like running, the register map) ride on the
gdbstub connection while QMP's handshake goes on.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from machineserver.server.drivers.base import Arch, BackendFailed, NotSupported
from machineserver.server.drivers.qemu.gate import InstructionGate
from machineserver.server.drivers.qemu.gdbstub import refusals_ignored
from machineserver.server.drivers.qemu.instance import QemuInstance, _short_tmpdir
from machineserver.server.drivers.qemu.plugin import plugin_args, plugin_status
from machineserver.server.rsp import RspClient, RspError
from machineserver.server.rsp.targetdesc import RegisterMap, fetch_register_map

# what the gdbstub handshake claims as the client's register architecture
XML_REGISTERS: dict[Arch, str | None] = {Arch.ARM_CORTEX_M: "arm", Arch.RISCV32: None}
# QEMU's gdbstub masks interrupts and stops timers while single-stepping by default
# (sstep flags NOIRQ|NOTIMER): with ENABLE alone a step runs like normal execution
SSTEP_LIKE_RUNNING = b"Qqemu.sstep=0x1"


@dataclass(frozen=True)
class LaunchSpec:
    """What shapes a QEMU: its binary, machine, architecture, icount shift (None: no
    icount) and extra command-line arguments (embedding and tests only)."""

    binary: str
    machine: str
    arch: Arch
    icount_shift: int | None = None
    extra_args: tuple[str, ...] = ()


@dataclass
class Launched:
    """A started QEMU: the instance, its instruction gate (None without the plugin) and
    the register map its gdbstub described."""

    instance: QemuInstance
    gate: InstructionGate | None
    regmap: RegisterMap

    async def discard(self) -> None:
        """End it (nothing of it is left)."""
        if self.gate is not None:
            self.gate.close()
        await self.instance.stop(kill=True)


async def launch(spec: LaunchSpec, *, on_console: Callable[[bytes], None],
                 on_exit: Callable[[int, str], None], coverage: Mapping[str, str] | None = None,
                 incoming: bytes | None = None) -> Launched:
    """Start a QEMU of ``spec``, halted. ``coverage``: the plugin's coverage options;
    ``incoming``: a migration stream to restore (the gdbstub is connected once QEMU has
    loaded it). BackendFailed when QEMU does not start; NotSupported when coverage is
    asked for and the plugin cannot be given to this QEMU. Nothing is left behind when it
    fails or is cancelled."""
    workdir = _short_tmpdir()
    try:
        args = ["-M", spec.machine]
        if spec.icount_shift is not None:
            args += ["-icount", f"shift={spec.icount_shift},sleep=off"]
        gate = None
        status = await asyncio.to_thread(plugin_status)
        if status.path is not None:
            gate = InstructionGate(workdir, always=spec.icount_shift is not None)
            try:
                args += plugin_args(status.path, {**gate.plugin_options(), **(coverage or {})})
            except ValueError as exc:  # a path QEMU's option syntax cannot carry
                if coverage:
                    raise NotSupported(f"coverage is unavailable here: {exc}") from None
                gate = None
        if incoming is not None:
            path = os.path.join(workdir, "incoming.bin")
            await asyncio.to_thread(Path(path).write_bytes, incoming)
            args += ["-incoming", f"exec:cat {path}"]
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    inst = QemuInstance(spec.binary, [*args, *spec.extra_args], on_console=on_console,
                        on_exit=on_exit, workdir=workdir, xml_registers=XML_REGISTERS[spec.arch])
    found: list[RegisterMap] = []

    async def set_up(stub: RspClient) -> None:
        with refusals_ignored():  # an older stub: steps mask interrupts
            await stub.request_ok(SSTEP_LIKE_RUNNING)
        # read from every QEMU, never cached: QEMU 7.2's gdbstub refuses p/P (single
        # registers) on a connection that has not read target.xml
        found.append(await fetch_register_map(spec.arch, stub.read_xfer))

    # frees the directory, and ends QEMU, if it fails or is cancelled
    await inst.start(connect_gdb=incoming is None, on_gdb=set_up)
    try:
        if incoming is not None:
            await _wait_incoming(inst)
            await inst.connect_gdb(set_up)
        if gate is not None:
            gate.attach()
    except BaseException as exc:
        if gate is not None:
            gate.close()
        await asyncio.shield(inst.stop(kill=True))
        if isinstance(exc, RspError | OSError | TimeoutError):
            raise BackendFailed(f"QEMU did not start: {exc}") from None
        raise
    return Launched(inst, gate, found[-1])


async def _wait_incoming(inst: QemuInstance) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10.0
    while True:
        status = await inst.qmp_call("query-status")
        assert isinstance(status, dict)
        if status.get("status") != "inmigrate":
            # QEMU restores the run state saved with the stream (debug, paused, ...)
            if status.get("status") in ("internal-error", "io-error", "shutdown",
                                        "guest-panicked", "restore-vm"):
                raise BackendFailed(f"restore failed: QEMU is {status.get('status')}")
            return
        if loop.time() > deadline:
            raise BackendFailed("restore did not finish in 10 s")
        await asyncio.sleep(0.002)
