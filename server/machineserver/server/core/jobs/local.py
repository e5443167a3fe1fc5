"""The local run engine: a job's runs on the server's own backends (in its worker processes
when the server has workers), at most ``concurrency`` at once."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator, Callable, Mapping

import psutil
import structlog

from machineserver.server.core.backends import BackendRegistry
from machineserver.server.core.jobs.model import BlobSource, RunResult, RunSpec, Verdict
from machineserver.server.core.jobs.runner import execute_run

log = structlog.get_logger(__name__)

NODE = "local"


def default_concurrency() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


class LocalEngine:
    """Runs on this host. ``cancel(job_id)`` cancels the job's runs, queued or running:
    each comes back CANCELLED once its machine is powered off."""

    name = "local"

    def __init__(self, backends: BackendRegistry, concurrency: int = 0) -> None:
        self.backends = backends
        self.concurrency = concurrency or default_concurrency()
        self._room = asyncio.Semaphore(self.concurrency)
        self._tasks: dict[str, set[asyncio.Task[RunResult]]] = {}  # job id -> its runs' tasks
        self.running = 0

    async def _one(self, spec: RunSpec, blobs: BlobSource,
                   on_start: Callable[[RunSpec, str], None] | None) -> RunResult:
        async with self._room:
            if on_start is not None:
                on_start(spec, NODE)
            self.running += 1
            try:
                return await execute_run(spec, self.backends, blobs, node=NODE)
            finally:
                self.running -= 1

    async def execute(self, specs: list[RunSpec], blobs: BlobSource,
                      on_start: Callable[[RunSpec, str], None] | None = None
                      ) -> AsyncIterator[tuple[RunSpec, RunResult]]:
        done: asyncio.Queue[tuple[RunSpec, asyncio.Task[RunResult]]] = asyncio.Queue()
        tasks: list[asyncio.Task[RunResult]] = []
        for spec in specs:
            task = asyncio.ensure_future(self._one(spec, blobs, on_start))
            self._tasks.setdefault(spec.job_id, set()).add(task)
            task.add_done_callback(lambda t, s=spec: done.put_nowait((s, t)))  # type: ignore[misc]
            tasks.append(task)
        try:
            for _ in range(len(tasks)):
                spec, task = await done.get()
                self._forget(spec.job_id, task)
                yield spec, _outcome(task)
        finally:
            for task in tasks:
                if not task.done():
                    task.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=30)
            for spec, task in zip(specs, tasks, strict=True):
                self._forget(spec.job_id, task)

    def _forget(self, job_id: str, task: asyncio.Task[RunResult]) -> None:
        held = self._tasks.get(job_id)
        if held is not None:
            held.discard(task)
            if not held:
                del self._tasks[job_id]

    async def cancel(self, job_id: str) -> None:
        tasks = list(self._tasks.get(job_id, ()))
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=30)

    def nodes(self) -> list[Mapping[str, object]]:
        cpus = float(default_concurrency())
        memory = psutil.virtual_memory()
        return [{
            "node_id": NODE,
            "address": socket.gethostname(),
            "alive": True,
            "resources": {"CPU": cpus, "memory": float(memory.total)},
            "available": {"CPU": float(max(0, self.concurrency - self.running)), "memory": float(memory.available)},
            "gpus": 0,
            "is_head": True,
        }]

    async def aclose(self) -> None:
        tasks = [t for held in self._tasks.values() for t in held]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=30)
        self._tasks.clear()


def _outcome(task: asyncio.Task[RunResult]) -> RunResult:
    if task.cancelled():
        return RunResult(Verdict.CANCELLED, node=NODE, failure_reason="cancelled")
    exc = task.exception()
    if exc is not None:  # execute_run raises nothing else: a bug of ours, kept retryable
        log.error("run_crashed", exc_info=exc)
        return RunResult(Verdict.ERRORED, node=NODE, failure_reason=f"the run crashed: {exc!r}", retryable=True)
    return task.result()
