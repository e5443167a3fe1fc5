"""msctl cosim and msctl job against mistakes in their YAML files and against Ctrl-C, as a
person sees them: msctl run as a process against a real server; a file mistake is one
line naming the file (and the line or key) with exit status 2, Ctrl-C is one line saying
"msctl: interrupted" with 130; never a traceback."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from machineserver.sdk import Client
from machineserver.v1 import cosim_pb2, job_pb2
from tests.helpers.firmware import firmware
from tests.helpers.server import ServerProcess
from tests.helpers.tools import VENV_BIN, sigint_default

COSIM_BOARD = "mps2-an385"
JOB_BOARD = "lm3s6965evb"
TOPOLOGY = f"""\
name: two-pongs
quantum_instructions: 10000
nodes:
  - {{name: a, board: {COSIM_BOARD}, program: cosim_pong.elf}}
  - {{name: b, board: {COSIM_BOARD}, program: cosim_pong.elf}}
links:
  - shared_memory: {{size: 0x1000, mappings: {{a: 0x20200000, b: 0x20280000}}}}
"""
# echo waits for input for ever: the job runs until cancelled
SUITE = f"""\
programs: [echo.elf]
boards: [{JOB_BOARD}]
criteria: {{pass_regex: bye, host_timeout: 120s}}
"""


@pytest.fixture
def server_process(tmp_path: Path) -> Iterator[ServerProcess]:
    """A server whose jobs run on its own workers (not embedded Ray: msctl is the subject)."""
    sp = ServerProcess(tmp_path / "data", "--job-engine", "local").start()
    try:
        yield sp
    finally:
        sp.stop()


def msctl(sp: ServerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, MSCTL_TARGET=sp.target)
    return subprocess.run([str(VENV_BIN / "msctl"), *args], capture_output=True, text=True, env=env, timeout=120)


def said_once(r: subprocess.CompletedProcess[str], status: int, *words: str) -> str:
    """The one line of stderr saying what went wrong, after checking the exit status, that
    there is no traceback, and that the line holds each of ``words``."""
    assert r.returncode == status, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr + r.stdout, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("msctl")]  # progress lines aside
    assert len(lines) == 1 and lines[0].startswith("msctl: "), r.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def topology(folder: Path, text: str = TOPOLOGY) -> Path:
    (folder / "cosim_pong.elf").write_bytes(firmware(COSIM_BOARD, "cosim_pong").read_bytes())
    path = folder / "topo.yaml"
    path.write_text(text)
    return path


def suite(folder: Path, text: str = SUITE) -> Path:
    (folder / "echo.elf").write_bytes(firmware(JOB_BOARD, "echo").read_bytes())
    path = folder / "suite.yaml"
    path.write_text(text)
    return path


# the same mistakes in both files: (how to spoil the file, what the line must say)
def _not_utf8(path: Path) -> None:
    path.write_bytes(b"nodes:\n  - \xff\xfe\n")


FILE_MISTAKES: list[tuple[str, Callable[[Path], None], tuple[str, ...]]] = [
    ("missing", lambda p: p.unlink(), ("cannot read: No such file or directory",)),
    ("a folder", lambda p: (p.unlink(), p.mkdir()), ("cannot read: Is a directory",)),
    ("empty", lambda p: p.write_text(""), ("the file is empty",)),
    ("not UTF-8", _not_utf8, ("not UTF-8 text (byte 0xff at offset 11)",)),
    ("bad YAML", lambda p: p.write_text(p.read_text() + "extra: [unclosed\n"), ("bad YAML: line ", ", column ")),
    ("a list, not a mapping", lambda p: p.write_text("- just\n- a list\n"), ("wants a mapping", "got list")),
]


@pytest.mark.parametrize(("spoil", "expected"), [(m[1], m[2]) for m in FILE_MISTAKES], ids=[m[0] for m in FILE_MISTAKES])
def test_a_bad_topology_file_is_one_line_and_2(server_process: ServerProcess, tmp_path: Path,
                                              spoil: Callable[[Path], None], expected: tuple[str, ...]) -> None:
    path = topology(tmp_path)
    spoil(path)
    said_once(msctl(server_process, "cosim", "create", "-f", str(path)), 2, str(path), *expected)


@pytest.mark.parametrize(("spoil", "expected"), [(m[1], m[2]) for m in FILE_MISTAKES], ids=[m[0] for m in FILE_MISTAKES])
def test_a_bad_suite_file_is_one_line_and_2(server_process: ServerProcess, tmp_path: Path,
                                           spoil: Callable[[Path], None], expected: tuple[str, ...]) -> None:
    path = suite(tmp_path)
    spoil(path)
    said_once(msctl(server_process, "job", "run", str(path)), 2, str(path), *expected)


@pytest.mark.parametrize(("old", "new", "expected"), [
    ("quantum_instructions: 10000", "quantum_instruction: 10000", ("unknown key 'quantum_instruction'", "known: ")),
    ("quantum_instructions: 10000", "quantum_instructions: lots", ("quantum_instructions: wants a number, got 'lots'",)),
    ("program: cosim_pong.elf}\n", "program: cosim_pong.elf, options: {icount: maybe}}\n",
     ("nodes[0].options.icount: wants true or false, got 'maybe'",)),
    ("  - {name: a,", "  - {nmae: a,", ("nodes[0]: unknown key 'nmae'",)),
    ("size: 0x1000", "size: [1]", ("links[0].shared_memory.size: wants a number",)),
])
def test_a_wrong_key_or_type_in_a_topology_is_named(server_process: ServerProcess, tmp_path: Path, old: str,
                                                    new: str, expected: tuple[str, ...]) -> None:
    assert old in TOPOLOGY
    path = topology(tmp_path, TOPOLOGY.replace(old, new))
    said_once(msctl(server_process, "cosim", "create", "-f", str(path)), 2, "topo.yaml: ", *expected)
    # nothing was made from it
    with Client.connect(server_process.target, timeout=30) as client:
        assert not client.sessions.list_sessions().sessions


@pytest.mark.parametrize(("old", "new", "expected"), [
    ("criteria:", "critera:", ("suite: unknown key 'critera'", "known: ")),
    ("host_timeout: 120s", "host_timeout: [1]", ("criteria.host_timeout: wants a duration",)),
    ("pass_regex: bye", "pass_regex: {a: 1}", ("criteria.pass_regex: wants text",)),
    (f"boards: [{JOB_BOARD}]", "boards: {a: 1}", ("boards: wants a list of names, got dict",)),
])
def test_a_wrong_key_or_type_in_a_suite_is_named(server_process: ServerProcess, tmp_path: Path, old: str,
                                                 new: str, expected: tuple[str, ...]) -> None:
    assert old in SUITE
    path = suite(tmp_path, SUITE.replace(old, new))
    said_once(msctl(server_process, "job", "run", str(path)), 2, "suite.yaml: ", *expected)


# ---------------------------------------------------------------------- Ctrl-C


def interrupt_when(sp: ServerProcess, args: list[str], ready: Callable[[], bool],
                   first_line: bool = False, said: str | None = None) -> subprocess.CompletedProcess[str]:
    """msctl ``args`` sent SIGINT (Ctrl-C) once ``ready()`` holds (polled, with a
    deadline) and, with ``first_line``, once it printed a line (with ``said``, once a line
    of its stderr held that text: the lines up to it are not in the result); SIGINT's
    default disposition restored in the child, since a shell may start tests with it ignored."""
    env = dict(os.environ, MSCTL_TARGET=sp.target)
    proc = subprocess.Popen(sigint_default([str(VENV_BIN / "msctl"), *args]), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 60
        if first_line:
            assert proc.stdout is not None and proc.stdout.readline(), "no output before Ctrl-C"
        heard: list[str] = []
        while said is not None:
            assert proc.stderr is not None
            line = proc.stderr.readline()
            assert line, f"msctl ended ({proc.wait()}) before it said {said!r}: {heard}, {proc.communicate()}"
            heard.append(line)
            if said in line:
                break
        while not ready():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "never ready for Ctrl-C"
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def cosim_state(client: Client) -> int:
    found = client.cosim.list_co_simulations().cosimulations
    return found[0].state if found else cosim_pb2.CO_SIM_STATE_UNSPECIFIED


def test_ctrl_c_during_cosim_run_pauses_it_and_exits_130(server_process: ServerProcess, tmp_path: Path) -> None:
    assert msctl(server_process, "cosim", "create", "-f", str(topology(tmp_path))).returncode == 0
    with Client.connect(server_process.target, timeout=30) as client:
        r = interrupt_when(server_process, ["cosim", "run", "two-pongs"],
                           lambda: cosim_state(client) == cosim_pb2.CO_SIM_STATE_RUNNING)
        line = said_once(r, 130, "msctl: interrupted")
        assert "paused it: cosimulations/" in line and " PAUSED at " in line, line
        assert cosim_state(client) == cosim_pb2.CO_SIM_STATE_PAUSED


def test_ctrl_c_during_cosim_console_exits_130(server_process: ServerProcess, tmp_path: Path) -> None:
    assert msctl(server_process, "cosim", "create", "-f", str(topology(tmp_path))).returncode == 0
    assert msctl(server_process, "cosim", "run", "two-pongs", "--no-follow").returncode == 0
    with Client.connect(server_process.target, timeout=30) as client:
        r = interrupt_when(server_process, ["cosim", "console", "two-pongs"],
                           lambda: cosim_state(client) == cosim_pb2.CO_SIM_STATE_RUNNING, first_line=True)
        assert said_once(r, 130) == "msctl: interrupted"
        client.cosim.pause_co_simulation(name=client.cosim.list_co_simulations().cosimulations[0].name)


def running_jobs(client: Client) -> list[str]:
    return [j.name for j in client.jobs.list_jobs().jobs if j.state == job_pb2.JOB_STATE_RUNNING]


def test_ctrl_c_during_job_run_exits_130_and_says_how_to_follow(server_process: ServerProcess,
                                                                 tmp_path: Path) -> None:
    """(``job watch``'s Ctrl-C is in tests/cli/test_tmux.py: on a terminal its progress bar
    shows when it follows)"""
    path = suite(tmp_path)
    with Client.connect(server_process.target, timeout=30) as client:
        # once msctl has the job's name (its "jobs/ID: N runs" line): before that, a Ctrl-C
        # during CreateJob leaves it nothing to name
        r = interrupt_when(server_process, ["job", "run", str(path)], lambda: bool(running_jobs(client)),
                           said="jobs/")
        line = said_once(r, 130, "msctl: interrupted")
        (name,) = running_jobs(client)  # left running, as the line says
        assert f"msctl job cancel {name}" in line and f"msctl job watch {name}" in line, line
        client.jobs.cancel_job(name=name)
