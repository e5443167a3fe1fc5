"""Streaming commands take --count and --timeout (issue 17): every server-streaming RPC
command stops after N messages or S seconds, a normal end (exit 0), against a real server."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from machineserver.sdk import Client
from tests.helpers.firmware import firmware
from tests.helpers.server import ServerProcess
from tests.helpers.tools import VENV_BIN


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    sp = ServerProcess(Path(tmp_path_factory.mktemp("streams")) / "data").start()
    try:
        with Client.connect(sp.target, timeout=20) as client:
            client.sessions.create_session(board_template="lm3s6965evb", session_id="idle",
                                           program=client.upload_program(str(firmware("lm3s6965evb", "echo"))).program.name,
                                           power_on=True)
        yield sp
    finally:
        sp.stop()


def msctl(sp: ServerProcess, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, MSCTL_TARGET=sp.target)
    return subprocess.run([str(VENV_BIN / "msctl"), *args], capture_output=True, text=True, env=env, timeout=timeout)


def test_count_stops_a_stream_after_n_messages(server: ServerProcess) -> None:
    r = msctl(server, "telemetry", "stream-host-status", "--interval", "0.2s", "--count", "2", "--json")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 2
    assert all(json.loads(line)["status"]["time"] and json.loads(line)["status"]["memory"] for line in lines)  # zero cpu_percent is left out of JSON


def test_count_after_the_output_flag_and_yaml_documents(server: ServerProcess) -> None:
    r = msctl(server, "-o", "yaml", "telemetry", "stream-session-metrics", "idle", "--interval", "0.2s", "--count", "3")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("---") == 3 and r.stdout.count("session: sessions/idle") == 3


def test_timeout_ends_a_quiet_stream_normally(server: ServerProcess) -> None:
    started = time.monotonic()
    r = msctl(server, "telemetry", "stream-alerts", "--timeout", "1.5")
    assert r.returncode == 0, r.stderr
    assert time.monotonic() - started >= 1.5  # it waited for the stream, then ended
    assert r.stdout.strip() == "subscribed; 0 firing" and "Traceback" not in r.stderr  # the stream's confirmation only


def test_timeout_on_session_events_prints_what_came(server: ServerProcess) -> None:
    r = msctl(server, "--json", "session", "stream-session-events", "idle", "--timeout", "1")
    assert r.returncode == 0, r.stderr
    first = json.loads(r.stdout.splitlines()[0])
    assert "subscribed" in first  # the stream's confirmation came before the deadline


def test_count_zero_prints_nothing(server: ServerProcess) -> None:
    r = msctl(server, "telemetry", "stream-host-status", "--count", "0")
    assert r.returncode == 0 and r.stdout == ""


@pytest.mark.parametrize(("flag", "value", "why"), [
    ("--count", "-1", "must be at least 0"),
    ("--count", "two", "not a number"),
    ("--timeout", "0", "must be more than 0"),
    ("--timeout", "-3", "must be more than 0"),
])
def test_bad_count_or_timeout_is_one_usage_line(server: ServerProcess, flag: str, value: str, why: str) -> None:
    r = msctl(server, "telemetry", "stream-host-status", flag, value)
    assert r.returncode == 2
    assert why in r.stderr and flag in r.stderr and "Traceback" not in r.stderr
