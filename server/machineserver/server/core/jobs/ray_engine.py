"""The Ray run engine: runs execute in Ray actors, on this machine or across a cluster.

Where Ray runs: embedded by default (a local Ray runtime started on the first job, with
``ray_num_cpus`` CPUs, no dashboard, quiet logs, shut down with the server), or an existing
cluster joined with ``ray_address`` (``ray start --head`` on one host, ``ray start
--address`` on the others; every node has this package installed).

What runs there: a :class:`RunHost` actor holds an engine of its own, the same one the
server uses for sessions: a BackendRegistry whose machines run in a worker process of a
one-worker WorkerPool (engine isolation, :mod:`machineserver.server.worker`). It runs one
run at a time through :func:`machineserver.server.core.jobs.runner.execute_run`. Hosts are
kept per resource shape and reused run after run, so a host pays its start (~1 s) once.

What fails, and how:

* the actor's process, its worker or its node dies mid-run (RayActorError, WorkerCrashedError,
  NodeDiedError, OwnerDiedError, ObjectLostError, or the emulator's worker process dying under
  the run): the run comes back ERRORED, ``retryable``, with the reason; the caller retries it.
* a host whose emulator died is never reused: it is killed (``ray.kill``, no restart) and a
  new one takes its place. Ray's own actor restart is not used: a restarted actor would carry
  on with a broken emulator (the lesson of Ray PR #60145).
* cancel: the job's in-flight hosts are killed (the run stops where it is: the actor's
  process takes its zygote and worker with it), queued runs of the job come back CANCELLED.

Blobs (programs, snapshots) are put in Ray's object store once (``ray.put``) and passed to
every run by reference: a job forking N runs from one snapshot ships its bytes once
(``blob_puts`` counts the puts).

Resources map to Ray's actor options: cpus -> num_cpus, memory_bytes -> memory, gpus ->
num_gpus, custom labels (``board-farm=stm32``) -> resources={label: amount}. A shape no node
can ever offer is refused at once (ERRORED, not retryable, naming what is missing).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import psutil
import ray
import ray.exceptions
import structlog

from machineserver.server.core.jobs.model import BlobSource, Resources, RunResult, RunSpec, Verdict

log = structlog.get_logger("machineserver.jobs.ray")

__all__ = ["RayEngine", "RunHost", "ray_options"]

HOST_START_TIMEOUT_S = 300.0  # a host waits this long for a node with room, then the run is retried
GUARD_SLACK_S = 30.0  # on top of a run's host-time guard: past it the host is presumed stuck
NODES_TTL_S = 1.0  # how long the cluster's node list is trusted for placement checks
BLOB_CACHE_BYTES = 512 << 20  # blob references kept between executes (oldest dropped first)
HOST_BLOB_BYTES = 256 << 20  # blob bytes a host keeps between its runs
EMBEDDED_START_ATTEMPTS = 3  # tries at starting the embedded runtime (Ray's own start can time out under load)

# Ray errors that mean the process, worker or node under a run went away: the run may succeed elsewhere
LOST = (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
        ray.exceptions.OwnerDiedError, ray.exceptions.ObjectLostError, ray.exceptions.LocalRayletDiedError,
        ray.exceptions.RaySystemError)

Shape = tuple[float, int, float, tuple[tuple[str, float], ...]]


def ray_options(resources: Resources) -> dict[str, Any]:
    """A run's resources as Ray actor options."""
    options: dict[str, Any] = {"num_cpus": resources.cpus}
    if resources.memory_bytes:
        options["memory"] = resources.memory_bytes
    if resources.gpus:
        options["num_gpus"] = resources.gpus
    if resources.custom:
        options["resources"] = {label: float(amount) for label, amount in resources.custom.items()}
    return options


def _shape(resources: Resources) -> Shape:
    return (resources.cpus, resources.memory_bytes, resources.gpus,
            tuple(sorted((k, float(v)) for k, v in resources.custom.items())))


def _demand(shape: Shape) -> dict[str, float]:
    cpus, memory, gpus, custom = shape
    demand = {"CPU": cpus, "memory": float(memory), "GPU": gpus, **dict(custom)}
    return {k: v for k, v in demand.items() if v > 0}


def _fits(total: Mapping[str, float], demand: Mapping[str, float]) -> int:
    """How many hosts of ``demand`` a node with ``total`` resources holds at once."""
    if not demand:
        return 64
    return min(math.floor(total.get(k, 0.0) / v + 1e-9) for k, v in demand.items())


def _ray_nodes() -> list[dict[str, Any]]:
    nodes: list[dict[str, Any]] = ray.nodes()  # type: ignore[no-untyped-call]
    return nodes


class _Blobs:
    def __init__(self, data: Mapping[str, bytes]) -> None:
        self._data = data

    def read(self, sha256: str) -> bytes:
        try:
            return self._data[sha256]
        except KeyError:
            raise KeyError(f"blob {sha256} was not shipped with the run") from None


# --------------------------------------------------------------------------- the actor


class RunHost:
    """A Ray actor's body: an engine (backends over a one-worker pool) that runs runs."""

    def __init__(self, default_backend: str, enabled_backends: list[str] | None) -> None:
        from machineserver.server.core.backends import BackendRegistry
        from machineserver.server.worker.pool import WorkerPool

        logging.getLogger().setLevel(logging.WARNING)
        self.pool = WorkerPool(size=1, backends=enabled_backends)
        self.backends = BackendRegistry.discover(default_backend, enabled_backends).isolated(self.pool)
        self.node_id = ray.get_runtime_context().get_node_id()
        self.runs = 0
        self._blobs: OrderedDict[str, bytes] = OrderedDict()

    async def hello(self) -> dict[str, Any]:
        return {"node_id": self.node_id, "pid": os.getpid()}

    def worker_pids(self) -> list[int]:
        """The emulator worker processes this host uses (tests kill them)."""
        return self.pool.pids()

    async def run(self, spec: RunSpec, blob_refs: dict[str, Any]) -> tuple[RunResult, str]:
        """The run's result, and why this host must not be reused ("" when it may)."""
        from machineserver.server.core.jobs.runner import execute_run
        from machineserver.server.drivers.base import BackendFailed

        self.runs += 1
        data: dict[str, bytes] = {}
        for sha, ref in blob_refs.items():
            data[sha] = await self._blob(sha, ref)
        started = time.monotonic()
        try:
            result = await execute_run(spec, self.backends, _Blobs(data))
        except BackendFailed as exc:
            result = RunResult(Verdict.ERRORED, failure_reason=f"the emulator failed: {exc}", retryable=True,
                               host_s=time.monotonic() - started)
        broken = self._broken()
        if broken and result.verdict is Verdict.ERRORED:
            reason = result.failure_reason or broken
            if broken not in reason:
                reason = f"{reason} ({broken})"
            result = replace(result, retryable=True, failure_reason=reason)
        return replace(result, node=self.node_id), broken

    async def _blob(self, sha: str, ref: Any) -> bytes:
        """A blob's bytes, fetched from the object store once per host (kept while they fit)."""
        data = self._blobs.get(sha)
        if data is None:
            data = bytes(await ref)
            self._blobs[sha] = data
            while sum(len(b) for b in self._blobs.values()) > HOST_BLOB_BYTES and len(self._blobs) > 1:
                self._blobs.popitem(last=False)
        self._blobs.move_to_end(sha)
        return data

    def _broken(self) -> str:
        """Why the emulator is unusable: a worker process of ours died."""
        for link in self.pool.links:
            if link.death:
                return link.death
        return ""

    async def close(self) -> None:
        await self.backends.aclose()
        await self.pool.close()


# --------------------------------------------------------------------------- the engine


@dataclass
class _Host:
    handle: Any  # ray.actor.ActorHandle
    shape: Shape
    node_id: str = ""
    pid: int = 0
    runs: int = 0


@dataclass
class _JobState:
    running: dict[str, _Host] = field(default_factory=dict)  # run key -> its host
    cancelled: bool = False


class RayEngine:
    """Runs on Ray (see the module's docstring). One per server."""

    name = "ray"

    def __init__(self, *, address: str = "", num_cpus: int = 0, default_backend: str = "unicorn",
                 backends: tuple[str, ...] | list[str] | None = None) -> None:
        self.address = address
        self.num_cpus = num_cpus
        self.default_backend = default_backend
        self.enabled_backends = list(backends) if backends is not None else None
        self.embedded = not address
        self.blob_puts = 0  # blobs put in the object store (each once while cached)
        self.hosts_started = 0
        self.hosts_killed = 0
        self._started = False
        self._owns_ray = False
        self._start_lock = asyncio.Lock()
        self._actor_class: Any = None
        self._idle: dict[Shape, list[_Host]] = {}
        self._count: dict[Shape, int] = {}  # hosts per shape, idle or busy or starting
        self._room = asyncio.Condition()
        self._jobs: dict[str, _JobState] = {}
        self._blob_refs: OrderedDict[str, tuple[Any, int]] = OrderedDict()  # sha -> (ref, size)
        self._notices: set[asyncio.Task[None]] = set()
        self._totals: list[dict[str, float]] = []
        self._totals_at = -math.inf
        self._closed = False

    # ------------------------------------------------------------------ the runtime

    async def start(self) -> None:
        """Start the embedded runtime or join the cluster (once; the first job does it)."""
        async with self._start_lock:
            if self._closed:
                raise RuntimeError("the Ray engine is closed")
            if not self._started:
                await asyncio.to_thread(self._init_ray)
                self._actor_class = ray.remote(RunHost)
                self._started = True

    def _init_ray(self) -> None:
        if ray.is_initialized():  # this process already drives Ray (a test, a bench): use it
            return
        common: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": False,
                                  "configure_logging": True, "include_dashboard": False}
        if self.embedded:
            # a runtime for this machine alone: its node on loopback (the host's name may not
            # resolve to an address here, e.g. in a network namespace). On a loaded machine
            # Ray's own wait for its GCS can time out: what it started is shut down and the
            # start tried again, a few times, before the runs are told it failed.
            for attempt in range(1, EMBEDDED_START_ATTEMPTS + 1):
                try:
                    ray.init(address="local", num_cpus=self.num_cpus or None, _node_ip_address="127.0.0.1",
                             **common)
                    break
                except Exception as exc:
                    with contextlib.suppress(Exception):
                        ray.shutdown()
                    _kill_orphaned_ray_processes()
                    if attempt == EMBEDDED_START_ATTEMPTS:
                        raise
                    log.warning("ray_start_retry", attempt=attempt, error=_first_line(exc))
                    time.sleep(attempt)
        else:
            ray.init(address=self.address, **common)
        self._owns_ray = True
        log.info("ray_started", embedded=self.embedded, address=self.cluster_address())

    @property
    def started(self) -> bool:
        return self._started

    def cluster_address(self) -> str:
        if not ray.is_initialized():
            return self.address
        with contextlib.suppress(Exception):
            return str(ray.get_runtime_context().gcs_address)
        return self.address

    def nodes(self) -> list[Mapping[str, object]]:
        """The cluster's nodes with their resources, what is free of them and their GPUs
        (empty until the engine has started)."""
        if not self._started or not ray.is_initialized():
            return []
        from ray._private import state

        try:
            listed = _ray_nodes()
            available = state.available_resources_per_node()  # type: ignore[no-untyped-call]
        except Exception as exc:  # the cluster is unreachable: no nodes to show, never a failed call
            log.warning("ray_nodes_unavailable", error=str(exc))
            return []
        out: list[Mapping[str, object]] = []
        for node in listed:
            total = {k: float(v) for k, v in node.get("Resources", {}).items() if not k.startswith("node:")}
            free = available.get(node["NodeID"], {}) if node.get("Alive") else {}
            out.append({
                "node_id": node["NodeID"],
                "address": node.get("NodeManagerAddress", ""),
                "alive": bool(node.get("Alive")),
                "resources": total,
                "available": {k: float(free.get(k, 0.0)) for k in total},
                "gpus": int(total.get("GPU", 0)),
                "is_head": "node:__internal_head__" in node.get("Resources", {}),
            })
        return out

    # ------------------------------------------------------------------ runs

    async def execute(self, specs: list[RunSpec], blobs: BlobSource,
                      on_start: Callable[[RunSpec, str], None] | None = None
                      ) -> AsyncIterator[tuple[RunSpec, RunResult]]:
        """Each run with its result, as they end. Closing the iteration stops the runs still
        going (their hosts are killed)."""
        if not specs:
            return
        try:
            await self.start()
        except Exception as exc:  # each run says why (the next job tries again)
            log.exception("ray_start_failed", address=self.address)
            reason = f"the Ray runtime could not {'start' if self.embedded else 'be joined'}: {_first_line(exc)}"
            for spec in specs:
                yield spec, RunResult(Verdict.ERRORED, failure_reason=reason, node="")
            return
        refs = await self._ship(specs, blobs)
        done: asyncio.Queue[tuple[RunSpec, RunResult]] = asyncio.Queue()
        tasks = [asyncio.create_task(self._one(spec, refs, on_start, done), name=f"ray-run-{spec.key}")
                 for spec in specs]
        try:
            for _ in specs:
                yield await done.get()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for spec in specs:
                state = self._jobs.get(spec.job_id)
                if state is not None and not state.running:
                    self._jobs.pop(spec.job_id, None)

    async def _ship(self, specs: list[RunSpec], blobs: BlobSource) -> dict[str, Any]:
        """Every blob the runs need, in the object store once."""
        needed = {s.program.sha256 for s in specs if s.program.sha256}
        needed |= {s.variant.snapshot_sha256 for s in specs if s.variant.snapshot_sha256}
        refs: dict[str, Any] = {}
        for sha in sorted(needed):
            cached = self._blob_refs.get(sha)
            if cached is None:
                data = await asyncio.to_thread(blobs.read, sha)
                ref = await asyncio.to_thread(ray.put, data)
                self.blob_puts += 1
                cached = (ref, len(data))
                self._blob_refs[sha] = cached
            self._blob_refs.move_to_end(sha)
            refs[sha] = cached[0]
        while len(self._blob_refs) > len(needed) and sum(n for _, n in self._blob_refs.values()) > BLOB_CACHE_BYTES:
            oldest = next(iter(self._blob_refs))
            if oldest in needed:
                break
            self._blob_refs.pop(oldest)
        return refs

    async def _one(self, spec: RunSpec, refs: Mapping[str, Any], on_start: Callable[[RunSpec, str], None] | None,
                   done: asyncio.Queue[tuple[RunSpec, RunResult]]) -> None:
        try:
            result = await self._run(spec, refs, on_start)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a defect of ours: the run says so rather than vanishing
            log.exception("ray_run_failed", run=spec.key)
            result = RunResult(Verdict.ERRORED, failure_reason=f"the Ray engine failed: {exc}", retryable=True)
        done.put_nowait((spec, result))

    async def _run(self, spec: RunSpec, refs: Mapping[str, Any],
                   on_start: Callable[[RunSpec, str], None] | None) -> RunResult:
        state = self._jobs.setdefault(spec.job_id, _JobState())
        if state.cancelled:
            return RunResult(Verdict.CANCELLED, failure_reason="the job was cancelled", node="")
        shape = _shape(spec.resources)
        missing = self._infeasible(shape)
        if missing:
            return RunResult(Verdict.ERRORED, failure_reason=missing, node="")
        try:
            host = await asyncio.wait_for(self._acquire(shape, state), HOST_START_TIMEOUT_S)
        except TimeoutError:
            return RunResult(Verdict.ERRORED, retryable=True,
                             failure_reason=f"no Ray node had room for the run within {HOST_START_TIMEOUT_S:.0f} s")
        except _HostLost as exc:
            return RunResult(Verdict.ERRORED, retryable=True, failure_reason=str(exc))
        if host is None:
            return RunResult(Verdict.CANCELLED, failure_reason="the job was cancelled", node="")
        state.running[spec.key] = host
        started = time.monotonic()
        try:
            if on_start is not None:
                on_start(spec, host.node_id)
            needed = {sha: refs[sha] for sha in (spec.program.sha256, spec.variant.snapshot_sha256) if sha}
            ref = host.handle.run.remote(spec, needed)
            guard = spec.criteria.host_timeout_s + GUARD_SLACK_S
            try:
                result, broken = await asyncio.wait_for(asyncio.wrap_future(ref.future()), guard)
            except asyncio.CancelledError:
                self._discard(host, "the run was stopped")
                raise
            except TimeoutError:
                self._discard(host, "stuck")
                return RunResult(Verdict.ERRORED, retryable=True, node=host.node_id, host_s=time.monotonic() - started,
                                 failure_reason=f"the Ray actor did not answer within {guard:.0f} s")
            except LOST as exc:
                self._discard(host, "lost")
                if state.cancelled:
                    return RunResult(Verdict.CANCELLED, node=host.node_id, failure_reason="the job was cancelled")
                return RunResult(Verdict.ERRORED, retryable=True, node=host.node_id,
                                 host_s=time.monotonic() - started,
                                 failure_reason=f"the Ray worker running it died ({type(exc).__name__}): "
                                                f"{_first_line(exc)}")
            except ray.exceptions.TaskCancelledError:
                self._discard(host, "cancelled")
                return RunResult(Verdict.CANCELLED, node=host.node_id, failure_reason="the job was cancelled")
            except ray.exceptions.RayTaskError as exc:
                self._discard(host, "raised")
                return RunResult(Verdict.ERRORED, node=host.node_id, host_s=time.monotonic() - started,
                                 failure_reason=f"the run raised: {_first_line(exc)}")
            if broken:
                self._discard(host, broken)  # an emulator that died is never reused
            else:
                host.runs += 1
                await self._release(host)
            return result if isinstance(result, RunResult) else RunResult(
                Verdict.ERRORED, failure_reason=f"the Ray actor answered {type(result).__name__}")
        finally:
            state.running.pop(spec.key, None)

    # ------------------------------------------------------------------ hosts

    def _alive_totals(self) -> list[dict[str, float]]:
        """Each live node's total resources (asked of Ray at most once a NODES_TTL_S)."""
        now = time.monotonic()
        if now - self._totals_at > NODES_TTL_S:
            self._totals = [{k: float(v) for k, v in node.get("Resources", {}).items()}
                            for node in _ray_nodes() if node.get("Alive")]
            self._totals_at = now
        return self._totals

    def _infeasible(self, shape: Shape) -> str:
        demand = _demand(shape)
        if any(_fits(total, demand) for total in self._alive_totals()):
            return ""
        asked = ", ".join(f"{k}={v:g}" for k, v in sorted(demand.items()))
        return f"no node of the Ray cluster offers the run's resources ({asked})"

    def _capacity(self, shape: Shape) -> int:
        demand = _demand(shape)
        return sum(_fits(total, demand) for total in self._alive_totals())

    async def _acquire(self, shape: Shape, state: _JobState) -> _Host | None:
        """An idle host of this shape, or a new one when there is room (None: the job was
        cancelled while waiting)."""
        async with self._room:
            while True:
                if state.cancelled or self._closed:
                    return None
                idle = self._idle.get(shape)
                if idle:
                    return idle.pop()
                if self._count.get(shape, 0) < max(1, self._capacity(shape)):
                    # idle hosts of other shapes hold resources this one may need
                    for other, hosts in self._idle.items():
                        while other != shape and hosts:
                            self._discard(hosts.pop(), "making room", notify=False)
                    self._count[shape] = self._count.get(shape, 0) + 1
                    break
                await self._room.wait()
        try:
            return await self._new_host(shape)
        except BaseException:
            async with self._room:
                self._count[shape] -= 1
                self._room.notify_all()
            raise

    async def _new_host(self, shape: Shape) -> _Host:
        cpus, memory, gpus, custom = shape
        options = ray_options(Resources(cpus=cpus, memory_bytes=memory, gpus=gpus, custom=dict(custom)))
        handle = self._actor_class.options(max_restarts=0, max_concurrency=4, **options).remote(
            self.default_backend, self.enabled_backends)
        host = _Host(handle, shape)
        try:
            hello = await asyncio.wrap_future(handle.hello.remote().future())
        except LOST as exc:
            with contextlib.suppress(Exception):
                ray.kill(handle, no_restart=True)
            raise _HostLost(f"a Ray actor for the run could not start: {_first_line(exc)}") from None
        except BaseException:
            with contextlib.suppress(Exception):
                ray.kill(handle, no_restart=True)
            raise
        host.node_id, host.pid = str(hello["node_id"]), int(hello["pid"])
        self.hosts_started += 1
        log.info("ray_host_started", node=host.node_id, pid=host.pid, shape=_demand(shape))
        return host

    async def _release(self, host: _Host) -> None:
        async with self._room:
            if self._closed:
                self._discard(host, "closing", notify=False)
            else:
                self._idle.setdefault(host.shape, []).append(host)
            self._room.notify_all()

    def _discard(self, host: _Host, why: str, *, notify: bool = True) -> None:
        """Kill a host for good (no restart): it is never reused."""
        with contextlib.suppress(Exception):
            ray.kill(host.handle, no_restart=True)
        self.hosts_killed += 1
        self._count[host.shape] = max(0, self._count.get(host.shape, 0) - 1)
        log.info("ray_host_killed", node=host.node_id, pid=host.pid, why=why)
        if notify:  # waiters for room look again (owned task: kept until it ran)
            task = asyncio.get_running_loop().create_task(self._notify())
            self._notices.add(task)
            task.add_done_callback(self._notices.discard)

    async def _notify(self) -> None:
        async with self._room:
            self._room.notify_all()

    async def worker_pids(self, job_id: str = "") -> dict[int, list[int]]:
        """Each live host's actor pid -> its emulator worker pids: the hosts running the
        job's runs, or every host (tests and benches kill them)."""
        if job_id:
            state = self._jobs.get(job_id)
            hosts = list(state.running.values()) if state is not None else []
        else:
            hosts = [h for hs in self._idle.values() for h in hs]
            hosts += [h for state in self._jobs.values() for h in state.running.values()]
        out: dict[int, list[int]] = {}
        for host in hosts:
            with contextlib.suppress(TimeoutError, *LOST):
                asked = asyncio.wrap_future(host.handle.worker_pids.remote().future())
                out[host.pid] = list(await asyncio.wait_for(asked, 5.0))
        return out

    # ------------------------------------------------------------------ cancel and close

    async def cancel(self, job_id: str) -> None:
        """No new run of the job starts; its running ones stop now (their hosts are killed)."""
        state = self._jobs.setdefault(job_id, _JobState())
        state.cancelled = True
        for host in list(state.running.values()):
            with contextlib.suppress(Exception):
                ray.kill(host.handle, no_restart=True)
        async with self._room:
            self._room.notify_all()

    async def aclose(self) -> None:
        """Kill every host; shut the runtime down when it is ours."""
        self._closed = True
        async with self._room:
            hosts = [h for hs in self._idle.values() for h in hs]
            self._idle.clear()
            self._room.notify_all()
        hosts += [h for state in self._jobs.values() for h in state.running.values()]
        for host in hosts:
            with contextlib.suppress(Exception):
                ray.kill(host.handle, no_restart=True)
        self._blob_refs.clear()
        if self._owns_ray and ray.is_initialized():
            await asyncio.to_thread(ray.shutdown)
        self._owns_ray = False
        self._started = False


class _HostLost(Exception):
    pass


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _kill_orphaned_ray_processes() -> None:
    """After a failed start of the embedded runtime: Ray's processes this process started
    (its GCS server, raylet and their helpers) that ``ray.shutdown()`` did not stop, because a
    start that failed midway leaves no node object to stop them. A hung GCS left behind made
    every later try wait out its 30 s again (three tries failed in a clean-clone CI run)."""
    ray_root = os.path.dirname(ray.__file__) + os.sep  # its binaries and scripts live there
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            cmdline = " ".join(child.cmdline())
            if ray_root in cmdline or cmdline.startswith("ray::"):
                child.kill()
