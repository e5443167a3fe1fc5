"""The Ray side of tests/jobs/test_ray.py, run as a child process inside a network namespace
of its own (``unshare -n`` with ``lo`` up): every Ray process it starts talks over loopback.

    python -m tests.jobs.ray_cluster TEMP_DIR SCENARIO[,SCENARIO...]
    python -m tests.jobs.ray_cluster TEMP_DIR embedded      (no cluster: the server's own runtime)

It starts a real two-node Ray cluster (``ray.cluster_utils.Cluster``: a head node with the
custom resource ``node-a`` and a second node with ``board-farm=stm32``, one CPU each), joins
it with a RayEngine (the ``ray_address`` path), runs the scenarios against real firmware on
the Unicorn backend, and prints one JSON object (scenario -> what it saw) as its last line of
stdout. The test asserts on it. Every Ray process is shut down before it exits, and it says
which ones it started (their pids) so the test can check they are gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import psutil
import ray
from ray.cluster_utils import Cluster

from machineserver.sdk import AsyncClient
from machineserver.server.app import start
from machineserver.server.config import ServerConfig
from machineserver.server.core.backends import BackendRegistry
from machineserver.server.core.boards import board_from_dict, parse_board_text, shipped_board_texts
from machineserver.server.core.images import ImageFormat, parse_image
from machineserver.server.core.jobs.model import (
    Criteria,
    ProgramRef,
    Resources,
    RunResult,
    RunSpec,
    Variant,
    Verdict,
)
from machineserver.server.core.jobs.ray_engine import RayEngine
from machineserver.server.core.jobs.runner import RunEvents
from machineserver.server.drivers import base as drv
from machineserver.v1 import job_pb2 as jpb
from tests.helpers.api import duration, upload
from tests.helpers.firmware import firmware

BOARD = "lm3s6965evb"
BOOT_RESULT = "result=091c8e7c"  # boot_heavy's checksum line


class Blobs:
    """Blob bytes by hash; counts the reads (the engine reads each once per put)."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.reads = 0

    def add(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        self.data[sha] = data
        return sha

    def read(self, sha256: str) -> bytes:
        self.reads += 1
        return self.data[sha256]


BLOBS = Blobs()
BOARD_YAML = shipped_board_texts()[BOARD]


def program(name: str) -> ProgramRef:
    sha = BLOBS.add(firmware(BOARD, name).read_bytes())
    return ProgramRef(sha, "elf", program_id=f"programs/{name}")


def spec(job: str, index: int, prog: str, criteria: Criteria, *, variant: Variant | None = None,
         resources: Resources | None = None) -> RunSpec:
    return RunSpec(job, index, 1, program(prog), BOARD, BOARD_YAML, "unicorn", variant or Variant(), criteria,
                   resources or Resources())


async def run_job(engine: RayEngine, specs: list[RunSpec],
                  on_start: Callable[[RunSpec, str], None] | None = None) -> list[dict[str, Any]]:
    """The job as a manager runs it: every run to a final verdict, an ERRORED retryable one
    again (attempt + 1) while its retries last. One row per attempt."""
    rows: list[dict[str, Any]] = []
    pending = list(specs)
    while pending:
        again: list[RunSpec] = []
        async for s, result in engine.execute(pending, BLOBS, on_start):
            rows.append(row(s, result))
            if result.verdict is Verdict.ERRORED and result.retryable and s.attempt <= s.criteria.retries:
                again.append(replace(s, attempt=s.attempt + 1))
        pending = again
    return rows


def row(s: RunSpec, result: RunResult) -> dict[str, Any]:
    return {"index": s.index, "attempt": s.attempt, "verdict": result.verdict.name, "node": result.node,
            "reason": result.failure_reason, "retryable": result.retryable,
            "console": result.console_tail.decode("utf-8", "replace")}


def last_attempts(rows: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    out: dict[int, dict[str, Any]] = {}
    for r in sorted(rows, key=lambda r: r["attempt"]):
        out[r["index"]] = r
    return out


# --------------------------------------------------------------------------- scenarios


async def fifty(engine: RayEngine, nodes: dict[str, str]) -> dict[str, Any]:
    """50 runs across both nodes: hello passes, every fifth (fault) fails."""
    specs = [spec("fifty", i, "fault" if i % 5 == 0 else "hello",
                  Criteria(pass_regex=r"Hello from", expected_exit_code=0, retries=1)) for i in range(50)]
    rows = await run_job(engine, specs)
    final = last_attempts(rows)
    return {"runs": len(final),
            "wrong": [r for i, r in final.items() if r["verdict"] != ("FAILED" if i % 5 == 0 else "PASSED")],
            "nodes": sorted({nodes.get(r["node"], r["node"]) for r in final.values()}),
            "fault_reason": final[0]["reason"]}


async def kill_worker(engine: RayEngine) -> dict[str, Any]:
    """Kill -9 the emulator worker of one running run, then the actor process of another:
    both come back ERRORED retryable with the reason, are retried, and the job ends with
    every verdict right; the hosts they ran on are gone (never reused)."""
    job = "kill"
    specs = [spec(job, i, "mmio", Criteria(pass_regex=r"mmio=0x656c62a1", expected_exit_code=0, retries=2))
             for i in range(12)]
    killed: dict[str, Any] = {}

    async def killer() -> None:
        while "actor" not in killed:
            await asyncio.sleep(0.5)  # into the run
            running = await engine.worker_pids(job)
            ready = {actor: workers for actor, workers in running.items() if workers and actor not in killed.values()}
            if not ready:
                continue
            actor, workers = next(iter(ready.items()))
            if "worker" not in killed:
                os.kill(workers[0], signal.SIGKILL)
                killed["worker"], killed["worker_actor"] = workers[0], actor
            else:
                os.kill(actor, signal.SIGKILL)
                killed["actor"] = actor

    task = asyncio.create_task(killer())
    try:
        rows = await run_job(engine, specs)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    final = last_attempts(rows)
    errored = [r for r in rows if r["verdict"] == "ERRORED"]
    return {"killed": killed, "errored": errored,
            "wrong": [r for r in final.values() if r["verdict"] != "PASSED"],
            "max_attempt": max(r["attempt"] for r in rows),
            "worker_actor_alive": psutil.pid_exists(killed.get("worker_actor", 0)) and _is_live(killed["worker_actor"]),
            "hosts_killed": engine.hosts_killed}


def _is_live(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


async def resources(engine: RayEngine, nodes: dict[str, str]) -> dict[str, Any]:
    """Custom labels steer runs to the node that offers them; a label nobody offers is refused."""
    crit = Criteria(pass_regex=r"Hello from", expected_exit_code=0)
    stm32 = [spec("res-stm32", i, "hello", crit, resources=Resources(custom={"board-farm=stm32": 1}))
             for i in range(6)]
    node_a = [spec("res-a", i, "hello", crit, resources=Resources(custom={"node-a": 1})) for i in range(6)]
    nowhere = [spec("res-none", 0, "hello", crit, resources=Resources(custom={"board-farm=esp32": 1})),
               spec("res-none", 1, "hello", crit, resources=Resources(gpus=1))]
    out: dict[str, Any] = {}
    for name, specs in (("stm32", stm32), ("node_a", node_a), ("nowhere", nowhere)):
        rows = await run_job(engine, specs)
        out[name] = {"nodes": sorted({nodes.get(r["node"], r["node"]) for r in rows}),
                     "verdicts": sorted({r["verdict"] for r in rows}), "reasons": [r["reason"] for r in rows],
                     "retryable": [r["retryable"] for r in rows]}
    return out


async def cancel(engine: RayEngine) -> dict[str, Any]:
    """Runs that wait forever (echo without 'q'): cancel stops the running ones and starts
    none of the rest; their hosts and emulators are gone."""
    job = "cancel"
    specs = [spec(job, i, "echo", Criteria(pass_regex="bye", host_timeout_s=120)) for i in range(6)]
    started: list[int] = []
    two_started = asyncio.Event()
    results: list[dict[str, Any]] = []

    def on_start(s: RunSpec, node: str) -> None:
        started.append(s.index)
        if len(started) >= 2:
            two_started.set()

    async def consume() -> None:
        async for s, result in engine.execute(specs, BLOBS, on_start):
            results.append(row(s, result))

    consuming = asyncio.create_task(consume())
    await asyncio.wait_for(two_started.wait(), 60)
    await asyncio.sleep(1.0)  # the runs are in the firmware's input loop now
    pids = await engine.worker_pids(job)
    t = time.monotonic()
    await engine.cancel(job)
    await asyncio.wait_for(consuming, 60)
    took = time.monotonic() - t
    await asyncio.sleep(1.0)
    gone = {str(a): not _is_live(a) and all(not _is_live(w) for w in ws) for a, ws in pids.items()}
    return {"started_before": len(started), "verdicts": sorted(r["verdict"] for r in results),
            "runs": len(results), "cancel_s": took, "processes_gone": gone}


async def snapshot_blob() -> bytes:
    """boot_heavy booted to "ready" (then paused): its state, taken in this process."""
    backends = BackendRegistry.discover("unicorn", ["unicorn"])
    board = board_from_dict(parse_board_text(BOARD_YAML))
    events = RunEvents(asyncio.get_running_loop())
    machine = backends.get("unicorn").create_machine(board, drv.MachineOptions(), events)
    await machine.power_on()
    image = parse_image(firmware(BOARD, "boot_heavy").read_bytes(), ImageFormat.ELF, 0)
    await machine.load(image.image)
    await machine.capability(drv.RunControl).run()
    async def ready() -> None:
        while b"ready\n" not in events.console:
            events.changed.clear()
            await events.changed.wait()

    await asyncio.wait_for(ready(), 30)
    await machine.capability(drv.RunControl).pause()
    blob = await machine.capability(drv.Snapshots).save_state()
    await machine.power_off()
    await backends.aclose()
    return blob


async def fork(engine: RayEngine) -> dict[str, Any]:
    """20 runs forked from one snapshot taken at boot_heavy's "ready": the snapshot (and the
    program) go into the object store once, every run starts from the snapshot's state (its
    console never prints "ready" again, and answers 'g' with the boot's checksum)."""
    snap = BLOBS.add(await snapshot_blob())
    puts, reads = engine.blob_puts, BLOBS.reads
    variant = Variant(name="forked", console_input=b"g", snapshot_sha256=snap, snapshot_id="snapshots/ready")
    specs = [spec("fork", i, "boot_heavy", Criteria(pass_regex=BOOT_RESULT, expected_exit_code=0), variant=variant)
             for i in range(20)]
    rows = await run_job(engine, specs)
    return {"puts": engine.blob_puts - puts, "reads": BLOBS.reads - reads,
            "verdicts": sorted({r["verdict"] for r in rows}), "runs": len(rows),
            "consoles": sorted({r["console"] for r in rows}), "reasons": sorted({r["reason"] for r in rows})}


# --------------------------------------------------------------------------- through the API


async def wait_job(client: AsyncClient, name: str, timeout: float = 240) -> jpb.Job:
    async def watch() -> jpb.Job:
        last = None
        async for msg in client.jobs.watch_job(name=name, timeout=timeout):
            last = msg.job
        assert last is not None
        return last

    return await asyncio.wait_for(watch(), timeout)


async def runs_of(client: AsyncClient, job: str) -> list[jpb.JobRun]:
    out: list[jpb.JobRun] = []
    token = ""
    while True:
        resp = await client.jobs.list_job_runs(parent=job, page_size=100, page_token=token)
        out.extend(resp.runs)
        token = resp.next_page_token
        if not token:
            return out


async def create(client: AsyncClient, programs: list[str], variants: int, crit: jpb.RunCriteria,
                 resources: jpb.RunResources | None = None) -> jpb.Job:
    matrix = jpb.JobMatrix(programs=programs, boards=[BOARD], backends=["unicorn"],
                           variants=[jpb.JobVariant(name=f"v{i}") for i in range(variants)])
    return (await client.jobs.create_job(jpb.CreateJobRequest(matrix=matrix, criteria=crit,
                                                               resources=resources))).job


async def api(temp_dir: str, address: str, nodes: dict[str, str]) -> dict[str, Any]:
    """A MachineServer with job_engine ray joined to the cluster (ray_address), driven through
    the SDK: a 50-run job on both nodes, a worker killed mid-job, custom labels, cancel, and
    the cluster in GetCapabilities and GetHostStatus."""
    out: dict[str, Any] = {}
    running = await start(ServerConfig(listen="127.0.0.1:0", data_dir=Path(temp_dir) / "server", log_level="warning",
                                       job_engine="ray", ray_address=address, backends=("unicorn",), workers=0))
    try:
        async with await AsyncClient.connect(f"127.0.0.1:{running.port}", timeout=60) as client:
            hello, fault, mmio, echo = [await upload(client, BOARD, p) for p in ("hello", "fault", "mmio", "echo")]
            crit = jpb.RunCriteria(pass_regex="Hello from", expected_exit_code=0, retries=1, host_timeout=duration(60))
            job = await create(client, [hello, fault], 25, crit)
            done = await wait_job(client, job.name)
            runs = await runs_of(client, job.name)
            out["fifty"] = {
                "engine": job.engine, "state": jpb.JobState.Name(done.state), "total": done.counts.total,
                "passed": done.counts.passed, "failed": done.counts.failed,
                "wrong": [r.name for r in runs if r.verdict != (jpb.RUN_VERDICT_PASSED if r.program == hello
                                                                else jpb.RUN_VERDICT_FAILED)],
                "nodes": sorted({nodes.get(r.node, r.node) for r in runs})}
            caps = await client.capabilities.get_capabilities()
            host = await client.telemetry.get_host_status()
            out["capabilities_cluster"] = {
                "engine": caps.cluster.engine, "address": caps.cluster.address,
                "nodes": sorted((nodes.get(n.node_id, n.node_id), n.alive, n.is_head, dict(n.resources))
                                for n in caps.cluster.nodes),
                "backends": len(caps.backends)}
            out["host_status_cluster"] = {
                "engine": host.cluster.engine,
                "nodes": sorted((nodes.get(n.node_id, n.node_id), n.alive, set(n.available) == set(n.resources))
                                for n in host.cluster.nodes)}

            # a run's emulator worker killed mid-job: the job completes, the retry visible
            run_engine = running.engine.jobs.run_engine
            assert isinstance(run_engine, RayEngine)
            crit = jpb.RunCriteria(pass_regex="mmio=0x656c62a1", expected_exit_code=0, retries=2,
                                   host_timeout=duration(60))
            job = await create(client, [mmio], 8, crit)
            job_id = job.name.rsplit("/", 1)[-1]
            killed = 0
            deadline = time.monotonic() + 60
            while not killed and time.monotonic() < deadline:
                await asyncio.sleep(0.5)
                for workers in (await run_engine.worker_pids(job_id)).values():
                    if workers:
                        os.kill(workers[0], signal.SIGKILL)
                        killed = workers[0]
                        break
            done = await wait_job(client, job.name)
            runs = await runs_of(client, job.name)
            out["kill_worker"] = {
                "killed": killed, "state": jpb.JobState.Name(done.state), "passed": done.counts.passed,
                "retries": done.counts.retries, "attempts": sorted(r.attempts for r in runs),
                "verdicts": sorted({jpb.RunVerdict.Name(r.verdict) for r in runs})}

            # custom labels through the API
            job = await create(client, [hello], 4, jpb.RunCriteria(pass_regex="Hello from", expected_exit_code=0,
                                                                 host_timeout=duration(60)),
                               jpb.RunResources(cpus=1, custom={"board-farm=stm32": 1}))
            await wait_job(client, job.name)
            runs = await runs_of(client, job.name)
            out["labels"] = {"nodes": sorted({nodes.get(r.node, r.node) for r in runs}),
                             "verdicts": sorted({jpb.RunVerdict.Name(r.verdict) for r in runs})}

            # cancel: runs that wait forever
            job = await create(client, [echo], 4, jpb.RunCriteria(pass_regex="bye", host_timeout=duration(120)))
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                got = (await client.jobs.get_job(name=job.name)).job
                if got.counts.running >= 2:
                    break
                await asyncio.sleep(0.2)
            await asyncio.sleep(1.0)
            pids = await run_engine.worker_pids(job_id=job.name.rsplit("/", 1)[-1])
            t = time.monotonic()
            await client.jobs.cancel_job(name=job.name)
            done = await wait_job(client, job.name, 60)
            took = time.monotonic() - t
            runs = await runs_of(client, job.name)
            await asyncio.sleep(1.0)
            out["cancel"] = {"state": jpb.JobState.Name(done.state), "cancel_s": took, "pids": len(pids),
                             "verdicts": sorted({jpb.RunVerdict.Name(r.verdict) for r in runs}),
                             "processes_gone": all(not _is_live(a) and all(not _is_live(w) for w in ws)
                                                   for a, ws in pids.items())}
    finally:
        await running.stop(1.0)
    out["ray_initialized_after_stop"] = ray.is_initialized()
    return out


async def embedded(temp_dir: str) -> dict[str, Any]:
    """The default job engine (ray, no address): the server starts a local Ray runtime of
    its own on the first job (ray_num_cpus 2) and shuts it down when it stops (every
    process gone)."""
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    running = await start(ServerConfig(listen="127.0.0.1:0", data_dir=Path(temp_dir) / "embedded", log_level="warning",
                                       ray_num_cpus=2, backends=("unicorn",), workers=0))
    try:
        async with await AsyncClient.connect(f"127.0.0.1:{running.port}", timeout=60) as client:
            idle = (await client.capabilities.get_capabilities()).cluster
            hello = await upload(client, BOARD, "hello")
            job = await create(client, [hello], 6, jpb.RunCriteria(pass_regex="Hello from", expected_exit_code=0,
                                                                   host_timeout=duration(60)))
            done = await wait_job(client, job.name)
            runs = await runs_of(client, job.name)
            cluster = (await client.capabilities.get_capabilities()).cluster
            spawned = {p.pid for p in me.children(recursive=True)} - before
    finally:
        await running.stop(1.0)
    procs = []
    for pid in spawned:
        with contextlib.suppress(psutil.Error):
            procs.append(psutil.Process(pid))
    await asyncio.to_thread(psutil.wait_procs, procs, 15)
    return {"reasons": sorted({r.failure_reason for r in runs}),"nodes_before_first_job": len(idle.nodes), "engine": idle.engine,
            "state": jpb.JobState.Name(done.state), "passed": done.counts.passed,
            "nodes": [(n.is_head, n.resources["CPU"]) for n in cluster.nodes], "spawned": len(spawned),
            "left": [pid for pid in spawned if _is_live(pid)], "ray_initialized_after_stop": ray.is_initialized()}


SCENARIOS = {"fifty", "kill_worker", "resources", "cancel", "fork", "api", "embedded"}


def ray_pids(temp_dir: str) -> list[int]:
    """Every process of this cluster (its command line names our temp dir)."""
    out = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        with contextlib.suppress(psutil.Error):
            if any(temp_dir in part for part in p.info["cmdline"] or ()):
                out.append(p.info["pid"])
    return out


async def main(temp_dir: str, wanted: list[str]) -> dict[str, Any]:
    if wanted == ["embedded"]:  # a process of its own: no cluster here, as in a real server
        return {"embedded": await embedded(temp_dir), "cluster_pids": [], "ray_initialized_after": ray.is_initialized()}
    out: dict[str, Any] = {}
    t = time.monotonic()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "resources": {"node-a": 100}, "include_dashboard": False, "temp_dir": temp_dir})
    engine: RayEngine | None = None
    try:
        cluster.add_node(num_cpus=1, resources={"board-farm=stm32": 100})
        cluster.wait_for_nodes()
        engine = RayEngine(address=cluster.address, default_backend="unicorn", backends=["unicorn"])
        await engine.start()
        out["cluster_start_s"] = time.monotonic() - t
        listed = engine.nodes()
        nodes = {str(n["node_id"]): ("stm32" if "board-farm=stm32" in n["resources"] else "a")  # type: ignore[operator]
                 for n in listed}
        out["nodes"] = [dict(n) for n in listed]
        out["cluster_pids"] = ray_pids(temp_dir)
        for name in wanted:
            t = time.monotonic()
            if name == "fifty":
                out[name] = await fifty(engine, nodes)
            elif name == "kill_worker":
                out[name] = await kill_worker(engine)
            elif name == "resources":
                out[name] = await resources(engine, nodes)
            elif name == "cancel":
                out[name] = await cancel(engine)
            elif name == "fork":
                out[name] = await fork(engine)
            if name in out:
                out[name]["took_s"] = time.monotonic() - t
        out["cluster_pids"] = sorted(set(out["cluster_pids"]) | set(ray_pids(temp_dir)))
        await engine.aclose()  # the server's engine joins the cluster on its own
        engine = None
        if "api" in wanted:
            t = time.monotonic()
            out["api"] = await api(temp_dir, cluster.address, nodes)
            out["api"]["took_s"] = time.monotonic() - t
            out["cluster_pids"] = sorted(set(out["cluster_pids"]) | set(ray_pids(temp_dir)))
    finally:
        if engine is not None:
            await engine.aclose()
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()
    out["ray_initialized_after"] = ray.is_initialized()
    return out


if __name__ == "__main__":
    result = asyncio.run(main(sys.argv[1], [s for s in sys.argv[2].split(",") if s in SCENARIOS]))
    print(json.dumps(result, default=str))
    sys.stdout.flush()
    Path(sys.argv[1], "result.json").write_text(json.dumps(result, default=str))
