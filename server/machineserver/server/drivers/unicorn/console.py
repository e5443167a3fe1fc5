"""Console input on Unicorn: bytes go into the RX FIFO of the board's console UART (the
peripheral the board names as console, else its first UART), between two slices."""

from __future__ import annotations

from machineserver.server.drivers.base import BadRequest, ConsoleInput, MachineState
from machineserver.server.drivers.unicorn.context import BoardInstance, MachineContext


class UnicornConsoleInput(ConsoleInput):
    def __init__(self, ctx: MachineContext) -> None:
        self._ctx = ctx

    async def console_input(self, data: bytes) -> None:
        ctx = self._ctx
        ctx.require(MachineState.HALTED, MachineState.RUNNING, MachineState.EXITED, MachineState.FAULTED)
        data = bytes(data)

        def feed(inst: BoardInstance) -> None:
            uart = inst.console_uart(ctx.board.console)
            if uart is None:
                raise BadRequest(f"board {ctx.board.name} has no console UART", field="data")
            uart.feed(data)  # may raise the UART's interrupt line: under the lock

        await ctx.locked("feed console input", feed)
        ctx.wake.set()  # a run loop idle in WFI polls the UART again
