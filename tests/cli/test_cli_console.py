"""``msctl console SESSION`` as a script uses it: msctl run as a process against a real
server, real firmware; following ends when the session exits, faults or fails, with a
status that says which (cli/machineserver/cli/console.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from tests.helpers.firmware import firmware
from tests.helpers.server import ServerProcess
from tests.helpers.tools import VENV_BIN, sigint_default

EXIT_FAULTED = 139
EXIT_TIMEOUT = 124


def msctl(sp: ServerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, MSCTL_TARGET=sp.target)
    return subprocess.run([str(VENV_BIN / "msctl"), *args], capture_output=True, text=True, env=env, timeout=90)


def ok(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    return r.stdout


def create(sp: ServerProcess, sid: str, program: str, *flags: str, board: str = "lm3s6965evb",
           backend: str = "unicorn") -> None:
    ok(msctl(sp, "session", "create", "--board", board, "--backend", backend, "--id", sid,
             "--program", str(firmware(board, program)), *flags))


def state(sp: ServerProcess, sid: str) -> dict[str, object]:
    session: dict[str, object] = json.loads(ok(msctl(sp, "--json", "session", "get-session", sid)))["session"]
    return session


@pytest.mark.parametrize("backend", ["unicorn", "qemu"])
def test_console_follows_hello_to_its_exit_with_0(server_process: ServerProcess, backend: str) -> None:
    # started before the firmware runs: the command follows it to its exit
    create(server_process, "h", "hello", "--power-on", backend=backend)
    env = dict(os.environ, MSCTL_TARGET=server_process.target)
    proc = subprocess.Popen([str(VENV_BIN / "msctl"), "console", "h"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        ok(msctl(server_process, "session", "run-session", "h"))
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    # every byte (the first power-on, at offset 0, is not shown: every console starts with one)
    assert out == "Hello from lm3s6965evb!\n"


def test_an_exited_session_prints_its_console_and_code_at_once(server_process: ServerProcess) -> None:
    create(server_process, "h", "hello", "--run")
    deadline = time.monotonic() + 60
    while state(server_process, "h")["state"] != "SESSION_STATE_EXITED":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    r = msctl(server_process, "console", "h", "--raw")
    assert (r.returncode, r.stdout) == (0, "Hello from lm3s6965evb!\n"), r.stderr
    # as JSON lines: the console's messages, then the session as it ended
    docs = [json.loads(line) for line in ok(msctl(server_process, "console", "h", "--json")).splitlines()]
    assert docs[-1]["state"] == "SESSION_STATE_EXITED" and docs[-1]["exit_code"] == 0
    assert any(m.get("kind") == "CONSOLE_MARK_KIND_POWER_ON" for d in docs[:-1] for m in d.get("marks", []))


def test_a_non_zero_exit_is_the_status(server_process: ServerProcess) -> None:
    # fault on lm3s6965evb: its HardFault handler prints and exits 3 through semihosting
    create(server_process, "f", "fault", "--run")
    r = msctl(server_process, "console", "f", "--raw")
    assert (r.returncode, r.stdout) == (3, "about to fault\nhardfault\n"), r.stderr


def test_a_fault_has_its_own_status(server_process: ServerProcess) -> None:
    # fault on mps2-an385 with its HardFault vector pointing at unmapped memory: FAULTED
    create(server_process, "f", "fault", "--power-on", board="mps2-an385")
    ok(msctl(server_process, "debug", "write-memory", "f", "--address", "0x0C", "--data", "hex:010000f0"))
    ok(msctl(server_process, "session", "run-session", "f"))
    r = msctl(server_process, "console", "f", "--raw")
    assert r.returncode == EXIT_FAULTED, (r.stdout, r.stderr)
    assert r.stdout == "about to fault\n" and "faulted" in r.stderr


def test_timeout_on_a_firmware_that_never_exits_is_124(server_process: ServerProcess) -> None:
    create(server_process, "e", "echo", "--run")  # says "echo ready" and waits for input
    r = msctl(server_process, "console", "e", "--timeout", "1.5", "--raw")
    assert r.returncode == EXIT_TIMEOUT, (r.stdout, r.stderr)
    assert r.stdout == "echo ready\n" and "still RUNNING after 1.5 s" in r.stderr
    # --no-follow: what is there, 0
    r = msctl(server_process, "console", "e", "--no-follow", "--raw")
    assert (r.returncode, r.stdout) == (0, "echo ready\n")


def test_a_reset_is_a_line_of_its_own_and_raw_omits_it(server_process: ServerProcess) -> None:
    create(server_process, "h", "hello", "--run")
    assert ok(msctl(server_process, "console", "h", "--raw")) == "Hello from lm3s6965evb!\n"
    ok(msctl(server_process, "session", "reset-session", "h", "--run-after-reset"))
    out = ok(msctl(server_process, "console", "h"))
    lines = out.splitlines()
    assert lines[0] == "Hello from lm3s6965evb!", out
    assert lines[1].startswith("--- reset ") and lines[1].endswith(" (ResetSession) ---"), out
    assert lines[2:] == ["Hello from lm3s6965evb!"], out
    # a later power-on is shown, on a fresh line
    ok(msctl(server_process, "session", "power-off-session", "h"))
    ok(msctl(server_process, "session", "power-on-session", "h"))
    assert ok(msctl(server_process, "console", "h", "--no-follow")).splitlines()[3].startswith("--- power-on ")
    assert ok(msctl(server_process, "console", "h", "--no-follow", "--raw")) == "Hello from lm3s6965evb!\n" * 2


def test_ctrl_c_while_following_is_130(server_process: ServerProcess) -> None:
    create(server_process, "e", "echo", "--run")
    env = dict(os.environ, MSCTL_TARGET=server_process.target)
    proc = subprocess.Popen(sigint_default([str(VENV_BIN / "msctl"), "console", "e", "--raw"]),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "echo ready\n"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert err.strip() == "msctl: interrupted" and "Traceback" not in err


def test_deleting_the_session_ends_the_follow_with_125(server_process: ServerProcess) -> None:
    create(server_process, "d", "echo", "--run")  # says "echo ready" and waits: it would not end alone
    env = dict(os.environ, MSCTL_TARGET=server_process.target)
    proc = subprocess.Popen([str(VENV_BIN / "msctl"), "console", "d", "--raw"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "echo ready\n"  # following (state watched, console open)
        ok(msctl(server_process, "session", "delete-session", "d"))
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 125, (out, err)
    assert "deleted" in err and "Traceback" not in err
