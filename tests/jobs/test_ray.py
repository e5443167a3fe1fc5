"""The Ray engine on a real two-node Ray cluster, started by the test on this machine.

Ray's processes talk over the host's interface address even when told 127.0.0.1, so the
cluster runs inside a network namespace the test makes (``unshare -n``, then ``ip link set
lo up``): everything stays on loopback. tests/jobs/ray_cluster.py is the child that starts
the cluster (a head node with the custom resource ``node-a``, a second with
``board-farm=stm32``), joins it with a RayEngine (``ray_address``) and runs real firmware
through it; it prints what it saw as JSON. Every Ray process it started must be gone after.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.helpers.firmware import ensure_firmware

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("ip") is None,
                                reason="needs root, unshare and ip (a network namespace for the cluster)")


def leftovers(temp_dir: str) -> list[str]:
    out = []
    for p in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            if p.info["status"] != psutil.STATUS_ZOMBIE and any(temp_dir in part for part in p.info["cmdline"] or ()):
                out.append(f"{p.info['pid']}: {' '.join(p.info['cmdline'])[:200]}")
        except psutil.Error:
            continue
    return out


def cluster_run(scenarios: str, timeout: float = 400) -> dict[str, Any]:
    """Run the child in its own network namespace; its JSON, after checking that every Ray
    process it started is gone."""
    if ensure_firmware("lm3s6965evb") is None:
        pytest.skip("firmware for lm3s6965evb cannot be built here (arm-none-eabi-gcc missing)")
    temp_dir = tempfile.mkdtemp(prefix="msray-", dir="/tmp")  # short: Ray's socket paths must fit
    command = f"ip link set lo up && exec {sys.executable} -m tests.jobs.ray_cluster {temp_dir} {scenarios}"
    child = subprocess.Popen(["unshare", "-n", "sh", "-c", command], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        out, err = child.communicate()
        pytest.fail(f"the Ray cluster child ran past {timeout} s: {err.decode(errors='replace')[-3000:]}")
    try:
        assert child.returncode == 0, err.decode(errors="replace")[-5000:]
        result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
        assert result["cluster_pids"] or scenarios == "embedded", "the child saw no Ray process of its cluster"
        deadline = time.monotonic() + 15
        while leftovers(temp_dir) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert leftovers(temp_dir) == [], "Ray processes outlived the cluster"
        assert not [pid for pid in result["cluster_pids"] if psutil.pid_exists(pid)
                    and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
                    and any(temp_dir in part for part in psutil.Process(pid).cmdline())]
        assert result["ray_initialized_after"] is False
        return result
    finally:
        for pid_line in leftovers(temp_dir):  # never leave a cluster behind, even on failure
            try:
                os.kill(int(pid_line.split(":")[0]), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster() -> Iterator[dict[str, Any]]:
    """One cluster for the whole module (it takes seconds to start): every scenario's result."""
    yield cluster_run("fifty,resources,fork,kill_worker,cancel,api")


def test_nodes_listed_with_resources(cluster: dict[str, Any]) -> None:
    nodes = cluster["nodes"]
    assert len(nodes) == 2 and all(n["alive"] for n in nodes)
    assert sorted(n["is_head"] for n in nodes) == [False, True]
    head = next(n for n in nodes if n["is_head"])
    other = next(n for n in nodes if not n["is_head"])
    assert head["resources"]["node-a"] == 100 and head["resources"]["CPU"] == 1
    assert other["resources"]["board-farm=stm32"] == 100 and "node-a" not in other["resources"]
    assert all(n["address"] == "127.0.0.1" and n["gpus"] == 0 for n in nodes)
    assert set(other["available"]) == set(other["resources"])


def test_fifty_runs_across_two_nodes(cluster: dict[str, Any]) -> None:
    fifty = cluster["fifty"]
    assert fifty["runs"] == 50
    assert fifty["wrong"] == []  # hello PASSED, every fifth (fault) FAILED
    assert fifty["nodes"] == ["a", "stm32"]  # runs went to both nodes
    assert "exited with code 3" in fifty["fault_reason"]


def test_custom_labels_steer_runs(cluster: dict[str, Any]) -> None:
    res = cluster["resources"]
    assert res["stm32"] == {"nodes": ["stm32"], "verdicts": ["PASSED"], "reasons": [""] * 6, "retryable": [False] * 6}
    assert res["node_a"]["nodes"] == ["a"] and res["node_a"]["verdicts"] == ["PASSED"]
    nowhere = res["nowhere"]
    assert nowhere["verdicts"] == ["ERRORED"] and nowhere["retryable"] == [False, False]
    assert "board-farm=esp32=1" in nowhere["reasons"][0] and "GPU=1" in nowhere["reasons"][1]


def test_forked_runs_ship_the_snapshot_once(cluster: dict[str, Any]) -> None:
    fork = cluster["fork"]
    assert fork["runs"] == 20 and fork["verdicts"] == ["PASSED"], fork["reasons"]
    assert fork["puts"] == 2 and fork["reads"] == 2  # the program and the snapshot, once each for 20 runs
    # every run started from the snapshot's state: "ready" was printed before it was taken
    assert fork["consoles"] == ["result=091c8e7c\n"]


def test_killed_worker_and_actor_are_retried_and_never_reused(cluster: dict[str, Any]) -> None:
    kill = cluster["kill_worker"]
    assert kill["wrong"] == []  # every run ended PASSED
    assert "worker" in kill["killed"] and "actor" in kill["killed"], kill
    reasons = [e["reason"] for e in kill["errored"]]
    assert all(e["retryable"] and e["attempt"] == 1 for e in kill["errored"])
    assert any(f"worker process {kill['killed']['worker']} was killed by SIGKILL" in r for r in reasons), reasons
    assert any("Ray worker running it died" in r for r in reasons), reasons
    assert kill["max_attempt"] == 2  # the retries are visible
    assert kill["worker_actor_alive"] is False  # the host whose emulator died was killed, not reused
    assert kill["hosts_killed"] >= 2


def test_cancel_reaches_running_work(cluster: dict[str, Any]) -> None:
    cancel = cluster["cancel"]
    assert cancel["started_before"] >= 2
    assert cancel["runs"] == 6 and cancel["verdicts"] == ["CANCELLED"] * 6
    assert cancel["processes_gone"] and all(cancel["processes_gone"].values())  # hosts and emulators stopped
    assert cancel["cancel_s"] < 60


# --------------------------------------------------------------------------- through the API


def test_api_fifty_run_job_on_ray(cluster: dict[str, Any]) -> None:
    """A MachineServer with job_engine ray and ray_address of the cluster, over gRPC."""
    fifty = cluster["api"]["fifty"]
    assert fifty["engine"] == "ray" and fifty["state"] == "JOB_STATE_DONE"
    assert (fifty["total"], fifty["passed"], fifty["failed"], fifty["wrong"]) == (50, 25, 25, [])
    assert fifty["nodes"] == ["a", "stm32"]  # JobRun.node: both nodes ran runs


def test_api_cluster_in_capabilities_and_host_status(cluster: dict[str, Any]) -> None:
    caps = cluster["api"]["capabilities_cluster"]
    assert caps["engine"] == "ray" and caps["address"].startswith("127.0.0.1:") and caps["backends"] == 1
    (a, a_alive, a_head, a_res), (b, b_alive, b_head, b_res) = caps["nodes"]
    assert (a, a_alive, a_head, b, b_alive, b_head) == ("a", True, True, "stm32", True, False)
    assert a_res["node-a"] == 100 and b_res["board-farm=stm32"] == 100 and a_res["CPU"] == b_res["CPU"] == 1
    assert cluster["api"]["host_status_cluster"] == {"engine": "ray", "nodes": [["a", True, True],
                                                                               ["stm32", True, True]]}


def test_api_killed_worker_retried_visibly(cluster: dict[str, Any]) -> None:
    kill = cluster["api"]["kill_worker"]
    assert kill["killed"] and kill["state"] == "JOB_STATE_DONE"
    assert kill["passed"] == 8 and kill["verdicts"] == ["RUN_VERDICT_PASSED"]
    assert kill["retries"] >= 1 and max(kill["attempts"]) == 2


def test_api_labels_and_cancel(cluster: dict[str, Any]) -> None:
    api = cluster["api"]
    assert api["labels"] == {"nodes": ["stm32"], "verdicts": ["RUN_VERDICT_PASSED"]}
    cancel = api["cancel"]
    assert cancel["state"] == "JOB_STATE_CANCELLED" and cancel["verdicts"] == ["RUN_VERDICT_CANCELLED"]
    assert cancel["pids"] >= 1 and cancel["processes_gone"] is True
    assert api["ray_initialized_after_stop"] is False  # the server's engine shut its Ray connection


def test_embedded_runtime_started_on_first_job_and_stopped_with_the_server() -> None:
    """job_engine ray without an address, in a process with no other Ray: the server starts
    its own runtime on the first job and every process of it is gone once it stops."""
    emb = cluster_run("embedded")["embedded"]
    assert emb["engine"] == "ray" and emb["nodes_before_first_job"] == 0  # nothing started before a job
    assert emb["state"] == "JOB_STATE_DONE" and emb["passed"] == 6, emb["reasons"]
    assert emb["nodes"] == [[True, 2.0]]  # one local node with ray_num_cpus
    assert emb["spawned"] > 0 and emb["left"] == []  # every Ray process it started is gone
    assert emb["ray_initialized_after_stop"] is False
