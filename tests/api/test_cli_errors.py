"""msctl's answer to everyday mistakes, as a person sees it: msctl run as a process
against a real server; each mistake ends in one line naming it (no traceback) and a
non-zero exit status, 130 for Ctrl-C (streams included)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers.firmware import firmware
from tests.helpers.server import ServerProcess
from tests.helpers.tools import VENV_BIN, sigint_default


def msctl(sp: ServerProcess, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, MSCTL_TARGET=sp.target)
    return subprocess.run([str(VENV_BIN / "msctl"), *args], capture_output=True, text=True, env=env,
                          input=stdin, timeout=60)


def said_once(r: subprocess.CompletedProcess[str], status: int, *words: str) -> str:
    """The one line of stderr that says what went wrong, after checking the exit status,
    that there is no traceback, and that the line names the mistake (``words``)."""
    assert r.returncode == status, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("msctl")]
    assert len(lines) == 1, r.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def test_a_missing_file_is_named(server_process: ServerProcess, tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.elf")
    said_once(msctl(server_process, "program", "upload", missing), 2, missing, "No such file")
    said_once(msctl(server_process, "session", "upload-program", "--file", missing), 2, missing, "No such file")
    said_once(msctl(server_process, "session", "create", "--board-config", missing), 2, missing)
    said_once(msctl(server_process, "debug", "write-memory", "s", "--address", "0", "--data", "@" + missing), 2,
              "--data", missing)
    said_once(msctl(server_process, "--tls-ca", missing, "caps"), 2, missing)


def test_bad_json_is_named_with_its_flag(server_process: ServerProcess) -> None:
    said_once(msctl(server_process, "debug", "set-breakpoint", "s", "--location", "{address: 1"), 2,
              "--location", "not valid JSON")
    said_once(msctl(server_process, "session", "get-session", "--request-json", "[1,"), 2,
              "--request-json", "not valid JSON")
    said_once(msctl(server_process, "debug", "set-breakpoint", "s", "--location", '{"address": "zz"}'), 2,
              "--location", "address")
    said_once(msctl(server_process, "debug", "attach", stdin="{oops\n"), 2, "stdin line 1", "not valid JSON")


def test_an_unknown_field_is_named_with_the_known_ones(server_process: ServerProcess) -> None:
    line = said_once(msctl(server_process, "debug", "set-breakpoint", "s", "--location", '{"adress": 256}'), 2,
                     "--location", "'adress'", "CodeLocation")
    assert "address" in line.split("its fields:")[1]
    said_once(msctl(server_process, "session", "get-session", "--request-json", '{"nmae": "sessions/x"}'), 2,
              "'nmae'")
    said_once(msctl(server_process, "debug", "attach", stdin='{"open": {"nam": "sessions/x"}}\n'), 2,
              "stdin line 1", "'open.nam'")
    # a right field still works: the check rejects only what the message lacks
    r = msctl(server_process, "--json", "session", "create-session", "--request-json",
              '{"boardTemplate": "lm3s6965evb", "session_id": "ok"}')
    assert r.returncode == 0, r.stderr


def test_a_board_typo_lists_the_known_boards(server_process: ServerProcess) -> None:
    for argv in (["session", "create-session", "--board-template", "lm3s6965"],
                 ["session", "create", "--board", "lm3s6965"]):
        r = msctl(server_process, *argv)
        said_once(r, 1, "NOT_FOUND", "'lm3s6965'")
        known = next(line for line in r.stderr.splitlines() if "known boards:" in line)
        assert {"lm3s6965evb", "mps2-an385"} <= set(known.split(":", 1)[1].replace(",", " ").split())
    # the backend typo the board typo copies
    r = msctl(server_process, "session", "create-session", "--board-template", "lm3s6965evb", "--backend", "unicron")
    assert r.returncode == 1 and "known: " in r.stderr and "unicorn" in r.stderr and "Traceback" not in r.stderr


def interrupted(sp: ServerProcess, *args: str, first_output: bool) -> subprocess.CompletedProcess[str]:
    """msctl ``args`` sent SIGINT (Ctrl-C) once it runs: after its first line of output
    (``first_output``) or once its stream is open; SIGINT's default disposition restored
    in the child, since a shell may start tests with it ignored."""
    env = dict(os.environ, MSCTL_TARGET=sp.target)
    proc = subprocess.Popen(sigint_default([str(VENV_BIN / "msctl"), *args]), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        if first_output:
            assert proc.stdout.readline(), "no output before Ctrl-C"
        else:
            deadline = time.monotonic() + 30
            while not server_has_stream(sp) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def server_has_stream(sp: ServerProcess) -> bool:
    """Whether the server has a client connected (its process has an established TCP
    connection on its port besides the listener)."""
    assert sp.proc is not None
    r = subprocess.run(["ss", "-Htn", "state", "established", f"( sport = :{sp.port} )"],
                       capture_output=True, text=True, timeout=10)
    return bool(r.stdout.strip())


def test_ctrl_c_ends_a_following_console_with_130(server_process: ServerProcess) -> None:
    # a session that prints and then sits idle: the console follows it and never ends alone
    r = msctl(server_process, "session", "create", "--board", "lm3s6965evb", "--id", "idle",
              "--program", str(firmware("lm3s6965evb", "hello")), "--power-on")
    assert r.returncode == 0, r.stderr
    r = interrupted(server_process, "console", "idle", first_output=False)
    line = said_once(r, 130, "interrupted")
    assert line == "msctl: interrupted"


@pytest.mark.parametrize(("argv", "prints_at_once"), [
    (["telemetry", "stream-host-status"], True), (["telemetry", "watch"], True), (["audit", "watch"], False),
])
def test_ctrl_c_ends_a_stream_with_130(server_process: ServerProcess, argv: list[str], prints_at_once: bool) -> None:
    said_once(interrupted(server_process, *argv, first_output=prints_at_once), 130, "interrupted")
