"""Warm spares: QEMUs started ahead of need, halted (``-S``) with everything connected, and
handed to the next machine that starts a QEMU of the same :class:`.launch.LaunchSpec`.

Starting a QEMU is most of what powering a machine on costs (QEMU's own start-up, ~20 ms
at best and several times that on a busy host); a spare takes that off the session's
path. A spare is exactly what :func:`.launch.launch` makes for a machine: a QEMU that has
never run, at its reset state, with the plugin's instruction gate, the gdbstub tuned and
the register map read; the machine then loads its program over the gdbstub and resets,
as it does on a QEMU it started itself (nothing is restarted).

Policy (one :class:`SparePool` per backend, i.e. per worker process):

* **On demand**: a spec gets a spare once machines have started ``demand`` QEMUs of it
  within ``window_s`` seconds (a board in use, not one tried once), and keeps one while
  they take it. At most one spare and one being started per spec.
* **Only plain QEMUs**: machines with a coverage table, extra command-line arguments or a
  snapshot to restore start their own (their QEMU differs from a spare's).
* **Idle**: a spare nobody takes within ``idle_s`` seconds is stopped (~36 MB resident
  each, about 13 MB of it its own: see ``scripts/bench --only qemu_scale``).
* **Lifetime**: every spare is owned by a task; :meth:`SparePool.aclose` (the backend's
  ``aclose``) stops them all, and so does the end of the event loop (``asyncio.run``
  cancels the tasks, which stop their spares), so none outlives the process that
  started it (and each QEMU dies with its parent anyway).
* **Off**: ``MS_QEMU_SPARES=0`` in the server's environment (see
  :meth:`.backend.QemuBackend.__init__`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

from machineserver.server.drivers.base import DriverError
from machineserver.server.drivers.qemu.launch import Launched, LaunchSpec, launch
from machineserver.server.rsp import RspError

log = logging.getLogger(__name__)

IDLE_S = 60.0
DEMAND = 3
WINDOW_S = 60.0
PROBE_S = 2.0  # a spare that does not answer a register read in this long is not handed out


@dataclass(eq=False)
class _Spare:
    spec: LaunchSpec
    launched: Launched
    keeper: asyncio.Task[None] | None = None
    taken: bool = False
    dead: bool = False


@dataclass
class SpareStats:
    """What the pool did, for tests and the backend's details."""

    started: int = 0  # spares started
    taken: int = 0  # handed to a machine
    expired: int = 0  # stopped unused (idle, dead, closed)
    failed: int = 0  # spares that did not start


class SparePool:
    def __init__(self, *, per_spec: int = 1, demand: int = DEMAND, window_s: float = WINDOW_S,
                 idle_s: float = IDLE_S) -> None:
        self.per_spec = max(0, min(1, per_spec))  # one spare per spec is what this keeps
        self.demand = max(1, demand)
        self.window_s = window_s
        self.idle_s = idle_s
        self.stats = SpareStats()
        self._ready: dict[LaunchSpec, _Spare] = {}
        self._filling: dict[LaunchSpec, asyncio.Task[None]] = {}
        self._starts: dict[LaunchSpec, collections.deque[float]] = {}  # the last ``demand``
        self._discarding: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    @property
    def enabled(self) -> bool:
        return self.per_spec > 0 and not self._closed

    def ready(self, spec: LaunchSpec) -> bool:
        """Whether a spare of ``spec`` is ready now."""
        spare = self._ready.get(spec)
        return spare is not None and self._usable(spare)

    def process_ids(self) -> list[int]:
        """The ready spares' QEMU processes."""
        out = []
        for spare in self._ready.values():
            proc = spare.launched.instance.proc
            if proc is not None and proc.returncode is None:
                out.append(proc.pid)
        return out

    # ------------------------------------------------------------------ machines' side
    async def take(self, spec: LaunchSpec, *, on_console: Callable[[bytes], None],
                   on_exit: Callable[[int, str], None]) -> Launched | None:
        """A ready spare of ``spec``, now the caller's (its callbacks are the caller's from
        here on), or None. A spare must answer its gdbstub first (one register read): one
        that died or froze unnoticed is stopped instead of handed out. Counts as a start of
        ``spec`` for the demand either way."""
        if not self.enabled:
            return None
        self._bind()
        self._note_start(spec)
        spare = self._ready.pop(spec, None)
        self._want(spec)
        if spare is None:
            return None
        spare.taken = True  # claimed: its keeper ends without stopping it
        if spare.keeper is not None:
            spare.keeper.cancel()
        if not (self._usable(spare) and await self._answers(spare)):
            spare.dead = True
            task = asyncio.get_running_loop().create_task(self._discard(spare))
            self._discarding.add(task)  # not awaited here: the caller starts its own QEMU
            task.add_done_callback(self._discarding.discard)
            return None
        inst = spare.launched.instance
        inst.on_console, inst.on_exit = on_console, on_exit
        self.stats.taken += 1
        return spare.launched

    @staticmethod
    async def _answers(spare: _Spare) -> bool:
        launched = spare.launched
        rsp, pc = launched.instance.rsp, launched.regmap.resolve("pc")
        if rsp is None or pc is None:
            return False
        try:
            await rsp.request(b"p%x" % pc.number, timeout=PROBE_S)
        except (RspError, OSError):
            return False
        return True

    @staticmethod
    def _usable(spare: _Spare) -> bool:
        inst = spare.launched.instance
        return (not spare.dead and inst.alive and inst.qmp is not None and inst.rsp is not None
                and not inst.rsp.closed)

    def _note_start(self, spec: LaunchSpec) -> None:
        loop = asyncio.get_running_loop()
        starts = self._starts.setdefault(spec, collections.deque(maxlen=self.demand))
        starts.append(loop.time())

    def _in_demand(self, spec: LaunchSpec) -> bool:
        starts = self._starts.get(spec)
        if not starts or len(starts) < self.demand:
            return False
        return asyncio.get_running_loop().time() - starts[0] <= self.window_s

    # ------------------------------------------------------------------ filling
    def _want(self, spec: LaunchSpec) -> None:
        if (not self.enabled or spec in self._ready or spec in self._filling
                or not self._in_demand(spec)):
            return
        task = asyncio.get_running_loop().create_task(self._fill(spec), name=f"qemu-spare-{spec.machine}")
        self._filling[spec] = task

        def filled(done: asyncio.Task[None]) -> None:
            if self._filling.get(spec) is done:
                del self._filling[spec]

        task.add_done_callback(filled)

    async def _fill(self, spec: LaunchSpec) -> None:
        holder: list[_Spare] = []

        def on_exit(returncode: int, stderr: str) -> None:  # a spare that died idle
            if holder:
                self._died(holder[0])

        try:
            launched = await launch(spec, on_console=_drop, on_exit=on_exit)
        except DriverError as exc:
            self.stats.failed += 1
            log.warning("a spare QEMU for %s did not start: %s", spec.machine, exc)
            return
        spare = _Spare(spec, launched)
        holder.append(spare)
        self.stats.started += 1
        if not self.enabled or spec in self._ready:
            await self._discard(spare)
            return
        self._ready[spec] = spare
        spare.keeper = asyncio.get_running_loop().create_task(self._keep(spare),
                                                              name=f"qemu-spare-keeper-{spec.machine}")

    async def _keep(self, spare: _Spare) -> None:
        """Own a ready spare: stop it when it has idled too long, or when this task is
        cancelled without the spare being taken (the pool closing, the loop ending)."""
        try:
            await asyncio.sleep(self.idle_s)
        finally:
            if not spare.taken:
                if self._ready.get(spare.spec) is spare:
                    del self._ready[spare.spec]
                await asyncio.shield(self._discard(spare))

    def _died(self, spare: _Spare) -> None:
        spare.dead = True
        if self._ready.get(spare.spec) is spare:
            del self._ready[spare.spec]
            if spare.keeper is not None:
                spare.keeper.cancel()  # the keeper stops (reaps) it

    async def _discard(self, spare: _Spare) -> None:
        self.stats.expired += 1
        with contextlib.suppress(Exception):
            await spare.launched.discard()

    # ------------------------------------------------------------------ lifetime
    def _bind(self) -> None:
        """Spares belong to one event loop: on another one (a new loop in the same process)
        the old loop's are forgotten (their tasks ended with it)."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._loop = loop
            self._ready.clear()
            self._filling.clear()

    async def aclose(self) -> None:
        """Stop every spare, and any being started; none is made after this."""
        self._closed = True
        if self._loop is not asyncio.get_running_loop():
            return
        filling = list(self._filling.values())
        for task in filling:
            task.cancel()
        await asyncio.gather(*filling, return_exceptions=True)
        keepers = [s.keeper for s in self._ready.values() if s.keeper is not None]
        for task in keepers:
            task.cancel()
        await asyncio.gather(*keepers, *self._discarding, return_exceptions=True)
        self._ready.clear()


def _drop(data: bytes) -> None:
    """A spare's console: a halted QEMU writes nothing; nothing is kept."""
