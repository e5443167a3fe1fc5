"""The Unicorn backend factory (entry point ``machineserver.drivers: unicorn``)."""

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
    features_of,
)

try:
    from machineserver.server.drivers.unicorn.machine import UnicornMachine

    _IMPORT_ERROR = ""
except ImportError as _exc:  # unicorn missing: probe() says so
    UnicornMachine = None  # type: ignore[assignment,misc]
    _IMPORT_ERROR = str(_exc)


RISCV_BOARDS = ("sifive_e",)


class UnicornBackend(Backend):
    name = "unicorn"
    description = ("In-process CPU emulator (Unicorn 2) with Python peripheral models: "
                   "Cortex-M3/M4 and RV32 boards")

    machine_class = UnicornMachine

    def probe(self) -> BackendInfo:
        try:
            from unicorn.unicorn import __version__ as unicorn_version
        except Exception as exc:
            return BackendInfo(name=self.name, description=self.description, available=False,
                               unavailable_reason=f"cannot import unicorn: {exc}")
        if UnicornMachine is None:
            return BackendInfo(name=self.name, description=self.description, available=False,
                               unavailable_reason=f"cannot load the driver: {_IMPORT_ERROR}")
        from machineserver.server.drivers.unicorn.counter import counter_offset
        from machineserver.server.drivers.unicorn.lockstep import RISCV_REASON

        exact = counter_offset() is not None
        return BackendInfo(
            name=self.name, description=self.description, available=True,
            version=str(unicorn_version), features=features_of(self.machine_class),
            # the shipped RISC-V boards (any RISC-V board's machine says the same)
            board_limits={name: {Feature.LOCKSTEP: RISCV_REASON} for name in RISCV_BOARDS},
            details={
                "instruction_count": "exact in counted slices" if exact else "estimated",
                "arches": "arm-cortex-m (cortex-m3, cortex-m4), riscv32 (rv32imac)",
                "memory_while_running": "yes: between run slices (at most ~1 ms of waiting)",
            },
        )

    def board_support(self, board: BoardSpec) -> str | None:
        from machineserver.server.drivers.unicorn import cortexm, riscv
        from machineserver.server.drivers.unicorn.peripherals import UART_MODELS

        if board.arch == Arch.ARM_CORTEX_M:
            if board.cpu not in cortexm.CPUS:
                return (f"cpu {board.cpu!r} is not supported by the unicorn backend "
                        f"(supported: {', '.join(sorted(cortexm.CPUS))})")
            known = set(UART_MODELS) | cortexm.SCS_MODELS
        elif board.arch == Arch.RISCV32:
            if board.cpu not in riscv.CPUS:
                return (f"cpu {board.cpu!r} is not supported by the unicorn backend "
                        f"(supported: {', '.join(sorted(riscv.CPUS))})")
            known = set(UART_MODELS) | riscv.CLINT_MODELS
        else:
            return f"arch {board.arch} is not supported by the unicorn backend"
        for p in board.peripherals:
            if p.model not in known:
                return (f"peripheral {p.name!r}: model {p.model!r} is not modelled "
                        "by the unicorn backend")
        for r in board.memory:
            if r.base % 0x1000:
                return f"memory region {r.name!r} at 0x{r.base:x} is not 4 KiB aligned"
        return None

    def create_machine(self, board: BoardSpec, options: MachineOptions,
                       events: MachineEvents) -> Machine:
        return UnicornMachine(board, options, events)

    def check_snapshot(self, blob: bytes, board: BoardSpec) -> None:
        from machineserver.server.drivers.unicorn.snapshot_format_check import check_blob  # needs unicorn

        check_blob(blob, board)
