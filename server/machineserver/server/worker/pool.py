"""The server's worker processes: how many, where a machine goes, what happens when one dies.

Emulation runs outside the server's process, so one busy firmware never stalls another
caller's RPC (a Python peripheral model takes the GIL of its own worker, not the server's)
and a native crash takes down one worker, not the service.

Grouping (measured; see scripts/bench and the README): a worker hosts many machines, and
the pool keeps ``size`` workers, one per core by default. More workers than cores buys
no throughput (each busy machine is CPU-bound) and costs ~30 MB of memory each; fewer
puts busy machines behind one GIL. A machine goes to the worker with the fewest machines
(up to ``max_machines`` each; then a new worker starts beyond ``size``). Workers start on
first use and are reused until the pool closes; a dead worker is replaced on demand.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Sequence

import structlog

from machineserver.server.drivers import base as drv
from machineserver.server.worker.link import WorkerLink, WorkerProcess
from machineserver.server.worker.zygote import ZYGOTE

log = structlog.get_logger("machineserver.worker")


__all__ = ["WorkerPool", "default_size"]


def default_size() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


class WorkerPool:
    def __init__(self, size: int = 0, *, max_machines: int = 64, backends: Sequence[str] | None = None) -> None:
        self.size = size or default_size()
        self.max_machines = max_machines
        self.backends = list(backends) if backends is not None else None
        self.links: list[WorkerLink] = []
        self._lock = asyncio.Lock()
        self._closed = False
        self._warming: asyncio.Task[None] | None = None

    def prewarm(self) -> None:
        """Start the workers now, in the background, so the first power-on does not wait
        for one (the pool owns the task; close() ends it)."""
        if self._warming is None and not self._closed:
            self._warming = asyncio.get_running_loop().create_task(self._warm(), name="worker-prewarm")

    async def _warm(self) -> None:
        async with self._lock:
            while not self._closed and len([link for link in self.links if link.alive]) < self.size:
                try:
                    self.links.append(await self._spawn())
                except drv.BackendFailed as exc:
                    log.warning("worker_prewarm_failed", error=str(exc))
                    return

    def pids(self) -> list[int]:
        return [link.pid for link in self.links if link.alive]

    async def place(self, near: WorkerLink | None = None) -> WorkerLink:
        """The worker for a new machine: ``near`` when it is alive and has room (machines
        that work together, e.g. a co-simulation's members); otherwise the least loaded
        live one with room, or a new one while there are fewer than ``size`` (or all are
        full)."""
        async with self._lock:
            if self._closed:
                raise drv.BackendFailed("the server is shutting down")
            if near is not None and near.alive and len(near.machines) < self.max_machines:
                return near
            self.links = [link for link in self.links if link.alive]
            open_links = [link for link in self.links if len(link.machines) < self.max_machines]
            if len(self.links) < self.size or not open_links:
                link = await self._spawn()
                self.links.append(link)
                return link
            return min(open_links, key=lambda link: len(link.machines))

    async def _spawn(self) -> WorkerLink:
        """A new worker, forked by the zygote (see :mod:`.zygote`)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            pid = await asyncio.to_thread(ZYGOTE.fork, theirs, self.backends)
        except OSError as exc:
            ours.close()
            raise drv.BackendFailed(f"cannot start a worker process: {exc}") from None
        finally:
            theirs.close()
        link = WorkerLink(WorkerProcess(pid))
        await asyncio.get_running_loop().create_unix_connection(lambda: link.protocol, sock=ours)
        log.info("worker_started", pid=pid)
        return link

    async def close(self) -> None:
        """Close every worker: each powers its machines off and exits."""
        self._closed = True
        if self._warming is not None:
            await asyncio.gather(self._warming, return_exceptions=True)
        async with self._lock:
            links, self.links = self.links, []
        await asyncio.gather(*(link.close() for link in links), return_exceptions=True)
