"""The backend conformance suite's helpers: which backends and boards it runs on, the
registers every backend must have, and ``Conf``, one backend seen through the SDK.
(Whether a backend can run here, and the QEMU children a test leaves behind, are in
tests/helpers/backends.py.) For ``gdbremote``, ``Conf.session`` starts a QEMU serving its
gdbstub for each session (tests/helpers/remote_targets.py) and names it in
``options.remote``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from machineserver.sdk import AsyncClient
from machineserver.v1 import common_pb2 as cpb
from tests.helpers import api
from tests.helpers.backends import require_backend
from tests.helpers.firmware import elf_symbol
from tests.helpers.remote_targets import RemoteQemu, RemoteTargets

BACKENDS = ("unicorn", "qemu", "gdbremote")
# the boards every behaviour runs on: two Cortex-M3 and one RV32
BOARDS = ("lm3s6965evb", "mps2-an385", "sifive_e")
# the registers both backends must have (and agree on in the differential test)
CORE_REGISTERS = {
    "arm-cortex-m": [*(f"r{i}" for i in range(13)), "sp", "lr", "pc"],
    "riscv32": [*(f"x{i}" for i in range(32)), "pc"],
}


@dataclass
class Conf:
    """One backend seen through the SDK: sessions, consoles, states."""

    client: AsyncClient
    backend: str
    # gdbremote: where each session's QEMU comes from, and which session has which
    targets: RemoteTargets | None = None

    def __post_init__(self) -> None:
        self.remotes: dict[str, RemoteQemu] = {}

    async def upload(self, board: str, program: str) -> str:
        return await api.upload(self.client, board, program)

    async def session(self, board: str, program: str | None = None, **kw: Any) -> str:
        require_backend("qemu" if self.backend == "gdbremote" else self.backend, board)
        prog = await self.upload(board, program) if program else ""
        qemu = None
        if self.backend == "gdbremote":
            assert self.targets is not None, "a gdbremote Conf needs its RemoteTargets"
            qemu = await self.targets.start(board)
            kw["options"] = {**kw.get("options", {}), **qemu.options()}
        s = (await self.client.sessions.create_session(
            board_template=board, program=prog, backend=self.backend, **kw)).session
        assert s.backend == self.backend
        if qemu is not None:
            self.remotes[str(s.name)] = qemu
        return str(s.name)

    async def halted_at(self, board: str, program: str, symbol: str = "main") -> str:
        """A powered-on session stopped at a breakpoint on `symbol` (breakpoint cleared)."""
        name = await self.session(board, program, power_on=True)
        bp = (await self.client.debug.set_breakpoint(name=name, location={"symbol": symbol})).breakpoint
        stop = (await self.client.debug.continue_(name=name, wait=True)).stop
        assert stop.reason == cpb.STOP_REASON_BREAKPOINT, stop
        assert stop.pc == elf_symbol(board, program, symbol)
        await self.client.debug.clear_breakpoint(name=name, id=bp.id)
        return name

    async def state(self, name: str) -> object:
        return (await self.client.sessions.get_session(name=name)).session

    async def wait_state(self, name: str, state: int, timeout: float = 20) -> object:
        return await api.wait_state(self.client, name, state, timeout, label=self.backend)

    async def console_until(self, name: str, needle: bytes, timeout: float = 20) -> bytes:
        try:
            return await api.console_until(self.client, name, needle, timeout)
        except AssertionError as exc:
            raise AssertionError(f"{self.backend}: {exc}") from None

    async def console(self, name: str, offset: int = 0) -> bytes:
        """Everything the console holds from offset (no following)."""
        return await api.console_text(self.client, name, offset)

    async def console_size(self, name: str) -> int:
        return int((await self.client.telemetry.get_session_metrics(name=name)).metrics.console_bytes)

    async def run_to_exit(self, name: str) -> object:
        """Continue until the firmware exits; the session afterwards."""
        resp = await self.client.debug.continue_(name=name, wait=True)
        assert resp.stop.reason == cpb.STOP_REASON_EXIT, resp.stop
        return await self.wait_state(name, cpb.SESSION_STATE_EXITED)

    async def registers(self, name: str, names: list[str] | None = None) -> dict[str, int]:
        regs = (await self.client.debug.read_registers(name=name, names=names or [])).registers
        return {r.name: r.value for r in regs}
