"""msctl against a real server process: friendly verbs, generic RPC commands, errors."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess

from machineserver.sdk import AsyncClient
from machineserver.v1 import common_pb2 as cpb
from tests.helpers.api import wait_state
from tests.helpers.firmware import firmware
from tests.helpers.server import ServerProcess
from tests.helpers.tools import VENV_BIN, require_tool


def msctl(sp: ServerProcess, *args: str, stdin: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, MSCTL_TARGET=sp.target)
    return subprocess.run([str(VENV_BIN / "msctl"), *args], capture_output=True, text=True, env=env,
                          input=stdin, timeout=timeout)


async def exited(sp: ServerProcess, session: str) -> None:
    async with await AsyncClient.connect(sp.target) as client:
        await wait_state(client, session, cpb.SESSION_STATE_EXITED)


def test_walkthrough_verbs(server_process: ServerProcess) -> None:
    caps = msctl(server_process, "caps")
    assert caps.returncode == 0 and "unicorn" in caps.stdout and "lm3s6965evb" in caps.stdout
    up = msctl(server_process, "--json", "program", "upload", str(firmware("lm3s6965evb", "hello")))
    program = json.loads(up.stdout)["program"]["name"]
    created = msctl(server_process, "--json", "session", "create", "--board", "lm3s6965evb", "--program", program,
                    "--run", "--id", "demo", "--label", "team=fw")
    assert created.returncode == 0, created.stderr
    assert json.loads(created.stdout)["session"]["name"] == "sessions/demo"
    asyncio.run(exited(server_process, "sessions/demo"))
    out = msctl(server_process, "console", "demo", "--no-follow").stdout
    assert out == "Hello from lm3s6965evb!\n"
    table = msctl(server_process, "session", "list")
    assert "sessions/demo" in table.stdout and "exited" in table.stdout
    # one step up the file upload path: create with a file uploads it
    created2 = msctl(server_process, "session", "create", "--board", "lm3s6965evb",
                     "--program", str(firmware("lm3s6965evb", "hello")))
    assert created2.returncode == 0 and "state=off" in created2.stdout
    assert "hello.elf" in msctl(server_process, "program", "list").stdout


def test_generic_rpc_commands(server_process: ServerProcess) -> None:
    r = msctl(server_process, "--json", "session", "create-session", "--board-template", "mps2-an385",
              "--session-id", "gen", "--labels", "a=b", "--power-on")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["session"]["labels"] == {"a": "b"}
    regs = msctl(server_process, "--json", "debug", "read-registers", "sessions/gen", "--names", "pc", "--names", "sp")
    assert [x["name"] for x in json.loads(regs.stdout)["registers"]] == ["pc", "sp"]
    bp = msctl(server_process, "--json", "debug", "set-breakpoint", "sessions/gen", "--location", '{"address": "256"}')
    assert json.loads(bp.stdout)["breakpoint"]["address"] == "256"
    wr = msctl(server_process, "--json", "debug", "write-memory", "gen", "--address", "0x20000000", "--data", "hex:0102")
    assert json.loads(wr.stdout)["bytes_written"] == 2
    rd = msctl(server_process, "--json", "debug", "read-memory", "gen", "--address", "0x20000000", "--size", "2")
    assert json.loads(rd.stdout)["data"] == "AQI="
    req = msctl(server_process, "--json", "session", "get-session", "--request-json", '{"name": "sessions/gen"}')
    assert json.loads(req.stdout)["session"]["board"] == "mps2-an385"
    up = msctl(server_process, "--json", "session", "upload-program", "--file", str(firmware("mps2-an385", "hello")),
               "--display-name", "h")
    assert json.loads(up.stdout)["program"]["format"] == "PROGRAM_FORMAT_ELF"
    events = msctl(server_process, "telemetry", "get-host-status")
    assert events.returncode == 0 and events.stdout.startswith("host ") and "\ncpu0 " in events.stdout


def test_errors_exit_nonzero_with_the_field(server_process: ServerProcess) -> None:
    r = msctl(server_process, "session", "get-session", "sessions/nope")
    assert r.returncode == 1 and "NOT_FOUND" in r.stderr and "Traceback" not in r.stderr
    r = msctl(server_process, "session", "create-session")
    assert r.returncode == 1 and "field board_template" in r.stderr
    r = msctl(server_process, "debug", "step", "--count", "notanumber")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    unreachable = subprocess.run([str(VENV_BIN / "msctl"), "--target", "127.0.0.1:1", "--timeout", "2", "caps"],
                                 capture_output=True, text=True, timeout=60)
    assert unreachable.returncode == 1 and "UNAVAILABLE" in unreachable.stderr


def test_attach_from_stdin_json_lines(server_process: ServerProcess) -> None:
    msctl(server_process, "session", "create", "--board", "lm3s6965evb", "--id", "att",
          "--program", str(firmware("lm3s6965evb", "hello")), "--power-on")
    lines = "\n".join([
        json.dumps({"open": {"name": "sessions/att", "control": True}}),
        json.dumps({"command": {"tag": 1, "set_breakpoint": {"location": {"symbol": "main"}}}}),
        json.dumps({"command": {"tag": 2, "continue": {}}}),
    ])
    r = msctl(server_process, "debug", "attach", "--json", stdin=lines + "\n", timeout=30)
    msgs = [json.loads(x) for x in r.stdout.splitlines()]
    assert msgs[0]["opened"]["role"] == "ATTACH_ROLE_CONTROLLER"
    assert {m["result"]["tag"] for m in msgs if "result" in m} >= {"1", "2"}


def test_interactive_debugger_from_a_pipe(server_process: ServerProcess) -> None:
    msctl(server_process, "session", "create", "--board", "lm3s6965evb", "--id", "dbg",
          "--program", str(firmware("lm3s6965evb", "coverage")), "--power-on")
    script = "\n".join([
        "break called_three_times", "c", "bt", "regs pc sp", "x $sp", "x 0x20000000 2", "next", "finish",
        "disas main 2", "info", "si 3", "delete 1", "c", "bogus", "quit",
    ]) + "\n"
    r = msctl(server_process, "debug", "dbg", stdin=script, timeout=60)
    out = r.stdout
    assert r.returncode == 0, r.stderr
    assert "attached to sessions/dbg as controller" in out
    assert "breakpoint 1 at 0x" in out and "[breakpoint]" in out
    assert "#0" in out and "#1" in out and "in main at" in out
    assert "pc 0x" in out and "0x20000000:" in out
    assert "<main>" in out
    assert "[exited with code 0]" in out
    assert "coverage done" in out  # console bytes interleaved
    assert "unknown command 'bogus'" in out


def test_coverage_verbs_write_a_report_lcov_reads(server_process: ServerProcess, tmp_path) -> None:  # type: ignore[no-untyped-def]
    lcov = require_tool("lcov", "reads the report msctl exports")
    msctl(server_process, "session", "create", "--board", "mps2-an385", "--id", "cov", "--coverage",
          "--program", str(firmware("mps2-an385", "coverage")), "--power-on")
    assert msctl(server_process, "coverage", "start-coverage", "cov").returncode == 0
    assert msctl(server_process, "debug", "continue", "cov", "--wait").returncode == 0
    summary = msctl(server_process, "coverage", "summary", "cov")
    assert summary.returncode == 0 and "src/coverage.c" in summary.stdout and "TOTAL" in summary.stdout
    out = tmp_path / "cov.info"
    r = msctl(server_process, "coverage", "export", "cov", "--format", "lcov", "--source-root",
              str(firmware("mps2-an385", "coverage").parents[3]), "-o", str(out))
    assert r.returncode == 0, r.stderr
    text = out.read_text()
    assert text.startswith("TN:") and "SF:" in text and "end_of_record" in text
    lc = subprocess.run([str(lcov), "--summary", str(out)], capture_output=True, text=True, timeout=60)
    assert lc.returncode == 0 and "lines" in lc.stdout + lc.stderr
    tarball = tmp_path / "cov.tar.gz"
    assert msctl(server_process, "coverage", "export", "cov", "--format", "html", "-o", str(tarball)).returncode == 0
    assert tarball.read_bytes()[:2] == b"\x1f\x8b"
