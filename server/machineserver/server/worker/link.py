"""One worker process seen from the server: requests out, answers, events and status in.

A request is a future keyed by its id. If the task awaiting it is cancelled (its RPC was
cancelled or ran out of time), the worker is told to cancel the call, and the request
waits for the worker's answer (the driver stopping and leaving the machine halted) before
the cancellation goes on: the machine's state is settled when the caller moves on.

When the worker dies (the socket ends: a native crash, a kill, the OOM killer), every
request in flight fails with BackendFailed naming the death, and every machine it hosted
turns FAILED with that reason; the pool starts a new worker for the machines to come.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
from typing import TYPE_CHECKING, Any

import structlog

from machineserver.server.drivers import base as drv
from machineserver.server.worker import wire
from machineserver.server.worker.zygote import ZYGOTE

if TYPE_CHECKING:
    from machineserver.server.worker.remote import RemoteMachine

log = structlog.get_logger("machineserver.worker")

CANCEL_WAIT = 15.0  # how long a cancelled call may take to stop in the worker


def describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "closed its connection"
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with status {returncode}"


class WorkerProcess:
    """A worker's process, forked by the zygote (which reaps it and says how it ended)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    @property
    def returncode(self) -> int | None:
        return ZYGOTE.exits.get(self.pid)

    async def wait(self, timeout: float | None = None) -> int | None:
        return await asyncio.to_thread(ZYGOTE.wait_exit, self.pid, timeout)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)


class WorkerLink:
    def __init__(self, process: WorkerProcess) -> None:
        self.process = process
        self.pid = process.pid
        self.protocol = wire.FrameProtocol(self._dispatch, self._lost)
        self.machines: dict[str, RemoteMachine] = {}
        self._pending: dict[int, tuple[asyncio.Future[Any], RemoteMachine]] = {}
        self._ids = itertools.count(1)
        self.death = ""  # why the worker is gone, once it is
        self._ending: asyncio.Task[None] | None = None

    @property
    def alive(self) -> bool:
        return not self.death

    # ------------------------------------------------------------------ requests

    async def request(self, kind: str, machine: RemoteMachine, *payload: object, cancellable: bool = False) -> Any:
        """Send one request and await its answer. If the awaiting task is cancelled, a
        ``cancellable`` call (a long step) is cancelled in the worker too; any other call
        is short and is let finish. Either way the answer is awaited (bounded) before the
        cancellation goes on, so the machine's state is settled."""
        if self.death:
            raise drv.BackendFailed(self.death)
        rid = next(self._ids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[rid] = (fut, machine)
        self._send((kind, rid, machine.mid, *payload))
        try:
            return await fut  # (not shielded: a shield costs a loop turn per call)
        except asyncio.CancelledError:
            if cancellable and fut.done() and not fut.cancelled() and fut.exception() is None and (
                    kept := drv.kept_stop(fut.result())) is not None:
                return kept  # answered before the cancellation reached us: a stop of its own, kept
            if fut.cancelled() and not self.death:
                # the answer is still owed: wait for it on a future of its own
                answer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
                self._pending[rid] = (answer, machine)
                if cancellable:
                    self._send(("cancel", rid))
                await self._settle(answer)
                if cancellable and answer.done() and not answer.cancelled() and answer.exception() is None and (
                        kept := drv.kept_stop(answer.result())) is not None:
                    return kept  # the driver's step had stopped by itself first (base.kept_stop)
            raise
        finally:
            self._pending.pop(rid, None)

    @staticmethod
    async def _settle(fut: asyncio.Future[Any]) -> None:
        """Wait (bounded) for a cancelled call's answer: the driver stopping, its machine
        halted. Further cancellations of the waiter do not cut this short: whoever
        cancelled must find the machine settled when the cancellation reaches them."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CANCEL_WAIT
        while not fut.done() and loop.time() < deadline:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait({fut}, timeout=deadline - loop.time())
        if fut.done() and not fut.cancelled():
            fut.exception()  # retrieved: the caller gets its CancelledError, not this

    def _send(self, message: tuple[Any, ...]) -> None:
        try:
            self.protocol.send(message)
        except (OSError, RuntimeError) as exc:
            raise drv.BackendFailed(f"worker process {self.pid} is unreachable: {exc}") from None

    # ------------------------------------------------------------------ answers and events

    def _lost(self, problem: str) -> None:
        """The connection ended: find out how the worker did (owned task, awaited at close)."""
        if self._ending is None:
            self._ending = asyncio.get_running_loop().create_task(self._end(problem), name=f"worker-{self.pid}-end")

    async def _end(self, problem: str) -> None:
        returncode = await self.process.wait(2.0)
        self._died(f"worker process {self.pid} {describe_exit(returncode)}{' ' + problem if problem else ''}")

    def _dispatch(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind in ("ok", "err"):
            _, rid, value, status = message
            entry = self._pending.get(rid)
            if entry is None or entry[0].done():
                return
            fut, machine = entry
            if status is not None:
                machine.on_status(status)
            if kind == "ok":
                fut.set_result(value)
            else:
                fut.set_exception(wire.decode_error(value))
        elif kind == "event":
            _, mid, event, payload, status = message
            target = self.machines.get(mid)
            if target is not None:
                target.on_event(event, payload, status)
        elif kind == "status":
            for mid, status in message[1]:
                hosted = self.machines.get(mid)
                if hosted is not None:
                    hosted.on_status(status)

    def _died(self, reason: str) -> None:
        if self.death:
            return
        self.death = reason
        log.error("worker_died", pid=self.pid, reason=reason, machines=len(self.machines))
        for fut, _ in self._pending.values():
            if not fut.done():
                fut.set_exception(drv.BackendFailed(reason))
        for machine in list(self.machines.values()):
            machine.on_worker_death(reason)
        self.machines.clear()

    # ------------------------------------------------------------------ the end

    async def close(self, grace: float = 5.0) -> None:
        """Close the connection (the worker powers its machines off and exits); kill it
        after ``grace`` seconds."""
        if not self.death:
            self.death = f"worker process {self.pid} was shut down"
        if self.protocol.transport is not None:
            self.protocol.transport.close()
        if await self.process.wait(grace) is None:
            self.process.kill()
            await self.process.wait()
        if self._ending is not None:
            await asyncio.gather(self._ending, return_exceptions=True)
