"""A backend whose machines run in worker processes: the driver's own Backend answers
the cheap questions here (probe, which boards it runs), and its machines are made, run
and debugged in a worker of the pool (:class:`~.remote.RemoteMachine`)."""

from __future__ import annotations

from dataclasses import replace

from machineserver.server.drivers import base as drv
from machineserver.server.worker.pool import WorkerPool
from machineserver.server.worker.remote import RemoteMachine


class IsolatedBackend(drv.Backend):
    def __init__(self, inner: drv.Backend, pool: WorkerPool) -> None:
        self.inner = inner
        self.pool = pool
        self.name = inner.name
        self.description = inner.description
        self.machine_class = inner.machine_class
        self.remote_target = inner.remote_target

    def probe(self) -> drv.BackendInfo:
        info = self.inner.probe()
        details = dict(info.details)
        details["isolation"] = (f"machines run in worker processes ({self.pool.size} by default, "
                                f"up to {self.pool.max_machines} machines each)")
        return replace(info, details=details)

    def board_support(self, board: drv.BoardSpec) -> str | None:
        return self.inner.board_support(board)

    def create_machine(self, board: drv.BoardSpec, options: drv.MachineOptions,
                       events: drv.MachineEvents) -> drv.Machine:
        return RemoteMachine(self.pool, self.name, board, options, events, self.machine_class.capabilities)

    def check_snapshot(self, blob: bytes, board: drv.BoardSpec) -> None:
        self.inner.check_snapshot(blob, board)

    async def memory_footprint(self, board: drv.BoardSpec) -> drv.MemoryFootprint | None:
        return await self.inner.memory_footprint(board)

    async def aclose(self) -> None:
        await self.inner.aclose()
