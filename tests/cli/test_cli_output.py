"""msctl's human output (the default) against a real server: registers in hex, memory as
a hexdump, disassembly as a listing, lists as tables, sessions without their board YAML,
empty answers as one line; ``-o yaml`` and ``--json`` anywhere on the line."""

from __future__ import annotations

import json
import os
import re
import subprocess

import yaml

from machineserver.sdk import Client
from tests.helpers.firmware import firmware
from tests.helpers.server import ServerProcess
from tests.helpers.tools import VENV_BIN


def msctl(sp: ServerProcess, *args: str) -> str:
    """msctl's stdout through a pipe (as scripts read it); a failure fails the test."""
    env = dict(os.environ, MSCTL_TARGET=sp.target)
    r = subprocess.run([str(VENV_BIN / "msctl"), *args], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, f"msctl {' '.join(args)}: {r.returncode} {r.stderr}"
    return r.stdout


def powered_on(sp: ServerProcess, session_id: str) -> str:
    """A halted lm3s6965evb session with the hello firmware (which has symbols)."""
    out = msctl(sp, "session", "create", "--board", "lm3s6965evb", "--id", session_id, "--power-on",
                "--program", str(firmware("lm3s6965evb", "hello")))
    assert out.startswith(f"sessions/{session_id}  state=halted  board=lm3s6965evb"), out
    return f"sessions/{session_id}"


def test_debug_answers_for_people(server_process: ServerProcess) -> None:
    name = powered_on(server_process, "dbg")
    with Client.connect(server_process.target) as client:
        regs = {r.name: r.value for r in client.debug.read_registers(name=name).registers}
        sdk_bytes = client.debug.read_memory(name=name, address=0x0, size=40).data
    # registers: NAME / HEX / DEC, values as the SDK reads them
    lines = msctl(server_process, "debug", "read-registers", name).splitlines()
    assert lines[0].split() == ["NAME", "HEX", "DEC"]
    rows = {cells[0]: cells[1:] for cells in (line.split() for line in lines[1:])}
    assert rows["pc"] == [f"0x{regs['pc']:08x}", str(regs["pc"])]
    assert rows["sp"] == [f"0x{regs['sp']:08x}", str(regs["sp"])] and rows["sp"][0] != "0x00000000"
    # memory: a hexdump whose bytes are the SDK's
    dump = msctl(server_process, "debug", "read-memory", name, "--address", "0", "--size", "40").splitlines()
    assert [line[:10] for line in dump] == ["0x00000000", "0x00000010", "0x00000020"]
    shown = bytes.fromhex("".join(line[12:60] for line in dump))
    assert shown == sdk_bytes
    ascii_col = "".join(line.split("|")[1] for line in dump)
    assert ascii_col == "".join(chr(b) if 0x20 <= b < 0x7F else "." for b in sdk_bytes)
    # disassembly: a listing with symbols
    listing = msctl(server_process, "debug", "disassemble", name, "--location", '{"symbol": "main"}',
                    "--count", "3").splitlines()
    assert len(listing) == 3
    assert re.fullmatch(r"0x[0-9a-f]{8} <main>:  \w+.*", listing[0]), listing
    assert re.fullmatch(r"0x[0-9a-f]{8} <main\+\d+>:  \w+.*", listing[1]), listing
    # an empty answer: one line saying what happened
    bare = name.removeprefix("sessions/")  # a bare ID is said as the resource name
    assert msctl(server_process, "coverage", "start-coverage", bare) == f"coverage started on {name}\n"


def test_sessions_without_board_yaml(server_process: ServerProcess) -> None:
    assert msctl(server_process, "session", "list") == "no sessions\n"
    name = powered_on(server_process, "lst")
    with Client.connect(server_process.target) as client:
        board_config = client.sessions.get_session(name=name).session.board_config
    marker = next(line for line in board_config.splitlines() if line.strip())  # a line of the board YAML
    table = msctl(server_process, "session", "list").splitlines()
    assert table[0].split() == ["NAME", "STATE", "BOARD", "BACKEND", "PROGRAM", "REASON"]
    assert len(table) == 2 and table[1].split()[:4] == [name, "halted", "lm3s6965evb", "unicorn"]
    generic = msctl(server_process, "session", "list-sessions")
    assert generic.splitlines()[1].split()[:2] == [name, "halted"] and marker not in generic
    reset = msctl(server_process, "session", "reset-session", name)
    assert reset.startswith(f"{name}  state=halted") and marker not in reset and len(reset.splitlines()) <= 4
    assert msctl(server_process, "session", "delete-session", name) == f"{name} deleted\n"


def test_formats_anywhere(server_process: ServerProcess) -> None:
    name = powered_on(server_process, "fmt")
    as_json = json.loads(msctl(server_process, "debug", "read-registers", name, "--names", "pc", "--json"))
    assert as_json == json.loads(msctl(server_process, "--json", "debug", "read-registers", name, "--names", "pc"))
    as_yaml = yaml.safe_load(msctl(server_process, "debug", "read-registers", name, "--names", "pc", "-o", "yaml"))
    assert as_yaml == as_json and as_json["registers"][0]["name"] == "pc"
    session_yaml = yaml.safe_load(msctl(server_process, "-o", "yaml", "session", "list"))
    assert session_yaml == json.loads(msctl(server_process, "session", "list", "--json"))
    assert session_yaml["sessions"][0]["name"] == name


def test_boards_table(server_process: ServerProcess) -> None:
    with Client.connect(server_process.target) as client:
        templates = client.capabilities.list_board_templates(page_size=1000).board_templates
    lines = msctl(server_process, "boards").splitlines()
    assert lines[0].split() == ["NAME", "ARCH", "CPU", "MHZ", "MEMORY", "BACKENDS"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert set(rows) == {t.name.removeprefix("boardTemplates/") for t in templates}
    lm3s = rows["lm3s6965evb"]
    assert lm3s.split()[1:4] == ["arm-cortex-m", "cortex-m3", "12"]
    assert "ram 64.0 KiB@0x20000000" in lm3s and "unicorn" in lm3s and "qemu" in lm3s
    assert "config" not in lm3s.lower()


def test_metrics_say_when_counts_are_not_exact() -> None:
    """The issue: an estimate left anywhere is labelled as one in the CLI."""
    from machineserver.cli.render import metrics_line
    from machineserver.v1 import telemetry_pb2

    exact = metrics_line(telemetry_pb2.SessionMetrics(session="sessions/a", instructions=1200, mips=3.5,
                                                      counts_exact=True))
    assert "instructions 1,200" in exact and "estimated" not in exact and "not counted" not in exact
    estimate = metrics_line(telemetry_pb2.SessionMetrics(session="sessions/a", instructions=1200, mips=3.5))
    assert "instructions 1,200 (estimated)" in estimate and "3.50 MIPS (estimated)" in estimate
    nothing = metrics_line(telemetry_pb2.SessionMetrics(session="sessions/a"))
    assert "instructions 0 (not counted)" in nothing
