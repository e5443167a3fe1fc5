"""The ``gdbremote`` backend: any GDB remote target as a session (see :mod:`.machine`)."""

from __future__ import annotations

from machineserver.server.drivers.base import (
    Arch,
    Backend,
    BackendInfo,
    BoardSpec,
    Feature,
    Machine,
    MachineEvents,
    MachineOptions,
)
from machineserver.server.drivers.gdbremote.machine import NO_COVERAGE, GdbRemoteMachine
from machineserver.server.drivers.gdbremote.snapshots import parse_snapshot

TESTED_WITH = ("QEMU 7.2 gdbstubs (qemu-system-arm and qemu-system-riscv32 -gdb: the conformance suite) "
               "and MachineServer's own GDB bridge (a session of another server), here; not tested "
               "here: OpenOCD, pyOCD, J-Link GDB server, Renode, SkyEye (none can be installed on this "
               "machine)")


class GdbRemoteBackend(Backend):
    name = "gdbremote"
    description = ("any GDB remote serial protocol target (OpenOCD, pyOCD, J-Link, Renode, SkyEye, "
                   "a QEMU started elsewhere) named by the session's options.remote")
    machine_class = GdbRemoteMachine
    remote_target = True  # the core requires the session's target and checks it against its allow-list

    def probe(self) -> BackendInfo:
        features = frozenset({Feature.RUN_CONTROL, Feature.REGISTERS, Feature.MEMORY, Feature.BREAKPOINTS,
                              Feature.WATCHPOINTS, Feature.CONSOLE_INPUT, Feature.SNAPSHOTS})
        return BackendInfo(
            name=self.name, description=self.description, available=True, version="rsp",
            features=features,
            details={"tested_with": TESTED_WITH,
                     "snapshots": "soft: registers and RAM, no peripheral state",
                     "coverage": f"unavailable: {NO_COVERAGE}",
                     "per_session": "what a session's target really has is probed at power-on and "
                                    "shown in its details; a feature it lacks answers UNIMPLEMENTED"},
            unsupported={Feature.COVERAGE: NO_COVERAGE,
                         Feature.LOCKSTEP: "a GDB remote target has no exact virtual clock to hold at a "
                                           "barrier, nor a checkpoint to roll back to"},
            refused_options={"icount": "a GDB remote target counts no instructions (only single steps "
                                       "are counted, and not exactly)",
                             "coverage": NO_COVERAGE},
            partial={Feature.SNAPSHOTS: "soft: registers and the board's RAM through the GDB protocol; "
                                        "no peripheral state (it is neither saved nor restored)"})

    def board_support(self, board: BoardSpec) -> str | None:
        if board.arch not in (Arch.ARM_CORTEX_M, Arch.RISCV32):
            return f"gdbremote drives arm-cortex-m and riscv32 targets, not {board.arch}"
        return None

    def create_machine(self, board: BoardSpec, options: MachineOptions, events: MachineEvents) -> Machine:
        return GdbRemoteMachine(board, options, events)

    def check_snapshot(self, blob: bytes, board: BoardSpec) -> None:
        parse_snapshot(blob, board)
