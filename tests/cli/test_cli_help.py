"""msctl's help from the proto comments, enum choices, JSON flags' fields, the shortcuts
of JSON flags (``--location main``), ``msctl debug --help``, and shell completion through
argcomplete (commands, and session names from a real server; nothing when it is down)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from machineserver.cli import main as cli_main
from machineserver.cli import rpc
from machineserver.sdk.client import service_descriptors
from machineserver.v1 import coverage_pb2, proto_comments, telemetry_pb2
from tests.helpers.firmware import firmware
from tests.helpers.server import ServerProcess
from tests.helpers.tools import VENV_BIN

ROOT = Path(__file__).resolve().parents[2]

MSCTL = str(VENV_BIN / "msctl")


def msctl(target: str, *args: str, env: dict[str, str] | None = None,
          timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([MSCTL, *args], capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, MSCTL_TARGET=target, **(env or {})))


def command_parser(*path: str) -> argparse.ArgumentParser:
    parser = cli_main.build_parser()
    for word in path:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[word]
    return parser


def flag_help(parser: argparse.ArgumentParser, flag: str) -> str:
    return " ".join((parser._option_string_actions[flag].help or "").split()).replace("%%", "%")


# ---------------------------------------------------------------------- help text


def test_generated_comments_module_has_the_proto_comments() -> None:
    comments = proto_comments.COMMENTS
    assert comments["machineserver.v1.CodeLocation.symbol"] == 'A function or variable name, e.g. "main".'
    assert comments["machineserver.v1.SetBreakpointRequest.size"] == \
        "Watchpoints: bytes watched (1, 2, 4 or 8; default 4)."
    assert comments["machineserver.v1.DebugService"].startswith("Debugging a session: breakpoints and watchpoints")
    assert comments["machineserver.v1.DebugService.SetBreakpoint"].startswith("Sets a breakpoint or watchpoint")


def test_check_gen_catches_drift_of_the_comments_module(tmp_path: Path) -> None:
    """scripts/check-gen, on a copy of the generator and its output: passes as committed,
    fails when proto_comments.py was edited by hand or a proto comment changed."""
    copy = tmp_path / "repo"
    for part in ("scripts/gen-protos", "scripts/check-gen", "scripts/lib/gen_comments.py", "scripts/lib/gen_sdk.py",
                 "sdk/machineserver/sdk/_services.py"):
        (copy / part).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / part, copy / part)
    shutil.copytree(ROOT / "protos", copy / "protos")
    shutil.copytree(ROOT / "sdk/machineserver/v1", copy / "sdk/machineserver/v1",
                    ignore=shutil.ignore_patterns("__pycache__"))
    env = dict(os.environ, PYTHON=str(VENV_BIN / "python"))

    def check_gen() -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(copy / "scripts/check-gen")], capture_output=True, text=True, env=env, timeout=300)

    assert check_gen().returncode == 0
    comments = copy / "sdk/machineserver/v1/proto_comments.py"
    comments.write_text(comments.read_text().replace("Where a breakpoint goes", "Where it goes"))
    drift = check_gen()
    assert drift.returncode == 1 and "proto_comments.py" in drift.stderr
    assert check_gen().returncode == 0  # check-gen regenerated it
    proto = copy / "protos/machineserver/v1/debug.proto"
    proto.write_text(proto.read_text().replace("// A function or variable name", "// A function name"))
    drift = check_gen()
    assert drift.returncode == 1 and "'A function name, e.g. \"main\".'" in drift.stderr


def test_every_commented_request_field_gives_its_flag_help() -> None:
    """Every RPC command's flags: the help starts with the field comment's first sentence."""
    checked = 0
    parser = cli_main.build_parser()
    groups = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for svc in service_descriptors():
        commands = next(a for a in groups[rpc.GROUPS[svc.name]]._actions
                        if isinstance(a, argparse._SubParsersAction)).choices
        for method in svc.methods:
            if method.client_streaming and "metadata" not in method.input_type.fields_by_name:
                continue  # requests come as JSON lines on stdin
            desc = method.input_type
            if method.client_streaming:
                desc = desc.fields_by_name["metadata"].message_type
            command = commands[rpc.kebab(method.name)]
            for field in desc.fields:
                first = rpc.comment(field.full_name, sentences=1)
                if not first or len(first) > rpc.HELP_LIMIT:
                    continue
                helped = flag_help(command, "--" + field.name.replace("_", "-"))
                assert helped.startswith(first), (method.name, field.name, helped)
                checked += 1
    assert checked > 60  # 80 when written


def test_flag_help_examples() -> None:
    bp = command_parser("debug", "set-breakpoint")
    assert flag_help(bp, "--size").startswith("Watchpoints: bytes watched (1, 2, 4 or 8; default 4).")
    key = command_parser("access", "create-api-key")
    assert flag_help(key, "--ttl").startswith("How long the key is valid; unset: forever.")
    assert "Duration: e.g. 1.5s, 200ms" in flag_help(key, "--ttl")
    create = command_parser("session", "create-session")
    assert flag_help(create, "--board-template").startswith('Exactly one of board_template ("lm3s6965evb"')


def test_enum_flag_lists_its_choices_and_rejects_others(server_process: ServerProcess) -> None:
    export = command_parser("coverage", "export-coverage")
    assert "one of lcov, html, cobertura, json" in flag_help(export, "--format")
    shown = msctl(server_process.target, "coverage", "export-coverage", "--help").stdout
    assert "--format {lcov,html,cobertura,json}" in shown
    bad = msctl(server_process.target, "coverage", "export-coverage", "sessions/x", "--format", "pdf")
    assert bad.returncode == 2
    assert "argument --format: 'pdf' is not one of: lcov, html, cobertura, json" in bad.stderr
    assert "Traceback" not in bad.stderr
    # short names, full names and numbers, any case
    method = coverage_pb2.DESCRIPTOR.services_by_name["CoverageService"].methods_by_name["ExportCoverage"]
    for text in ("LCOV", "lcov", "coverage_format_lcov", "1"):
        args = cli_main.build_parser().parse_args(["coverage", "export-coverage", "sessions/x", "--format", text])
        assert rpc.build_request(method.input_type, args).format == coverage_pb2.COVERAGE_FORMAT_LCOV  # type: ignore[attr-defined]


def test_json_flag_lists_the_message_fields() -> None:
    bp = command_parser("debug", "set-breakpoint")
    helped = flag_help(bp, "--location")
    assert "CodeLocation {address: uint64, symbol: string, file_line: string}" in helped
    assert "main (symbol), hello.c:12 (file_line), 0x800 (address)" in helped
    assert bp._option_string_actions["--location"].metavar == "JSON|SHORTCUT"
    create = command_parser("session", "create-session")
    assert "ResourceLimits {" in flag_help(create, "--limits")
    assert "labels: map<string, string>" in flag_help(create, "--request-json")


def test_commands_and_groups_are_described_by_their_comments() -> None:
    shown = " ".join(command_parser("debug", "set-breakpoint").format_help().split())
    assert "DebugService.SetBreakpoint: Sets a breakpoint or watchpoint at an address" in shown
    listing = " ".join(command_parser("debug").format_help().split())
    assert "Debugging a session: breakpoints and watchpoints" in listing
    assert "read-registers Reads registers: all when names is empty." in listing
    top = " ".join(cli_main.build_parser().format_help().split())
    assert "debug Debugging a session: breakpoints and watchpoints" in top


def test_debug_help_mentions_the_interactive_form(server_process: ServerProcess) -> None:
    shown = msctl(server_process.target, "debug", "--help")
    assert shown.returncode == 0
    assert "msctl debug SESSION" in shown.stdout and "interactive debugger" in shown.stdout
    assert "break|b LOC" in shown.stdout and "continue|c" in shown.stdout  # what the prompt offers


# ---------------------------------------------------------------------- shortcuts


def test_shortcut_parsers() -> None:
    assert rpc.parse_location("main").symbol == "main"
    assert rpc.parse_location("hello.c:12").file_line == "hello.c:12"
    assert rpc.parse_location("0x800").address == 0x800
    assert rpc.parse_location("2048").address == 2048
    with pytest.raises(rpc.UsageError):
        rpc.parse_location(" ")
    assert rpc.parse_duration("1.5s").ToNanoseconds() == 1_500_000_000
    assert rpc.parse_duration("200ms").ToNanoseconds() == 200_000_000
    assert rpc.parse_duration("2m").seconds == 120 and rpc.parse_duration("3").seconds == 3
    with pytest.raises(rpc.UsageError, match="not a duration"):
        rpc.parse_duration("soon")
    assert rpc.parse_timestamp("2026-01-31T12:00:00Z").seconds == 1_769_860_800
    assert rpc.parse_timestamp("2026-01-31T14:00:00+02:00").seconds == 1_769_860_800
    with pytest.raises(rpc.UsageError, match="ISO 8601"):
        rpc.parse_timestamp("yesterday")


def test_duration_flag_takes_the_shortcut_and_json() -> None:
    method = telemetry_pb2.DESCRIPTOR.services_by_name["TelemetryService"].methods_by_name["StreamHostStatus"]
    for text in ("250ms", '"0.25s"'):
        args = cli_main.build_parser().parse_args(["telemetry", "stream-host-status", "--interval", text])
        assert rpc.build_request(method.input_type, args).interval.ToNanoseconds() == 250_000_000  # type: ignore[attr-defined]


def test_location_shortcuts_reach_the_server(server_process: ServerProcess) -> None:
    target = server_process.target
    created = msctl(target, "--json", "session", "create", "--board", "lm3s6965evb", "--id", "bp",
                    "--program", str(firmware("lm3s6965evb", "hello")), "--power-on")
    assert created.returncode == 0, created.stderr

    def set_bp(location: str) -> dict[str, object]:
        """Set it, read it back from the server's list, clear it (one breakpoint per
        address: the server answers a second at the same address with the first)."""
        r = msctl(target, "--json", "debug", "set-breakpoint", "sessions/bp", "--location", location)
        assert r.returncode == 0, r.stderr
        bp: dict[str, object] = json.loads(r.stdout)["breakpoint"]
        listed = json.loads(msctl(target, "--json", "debug", "list-breakpoints", "sessions/bp").stdout)
        assert listed["breakpoints"] == [bp]
        cleared = msctl(target, "debug", "clear-breakpoint", "sessions/bp", "--id", str(bp["id"]))
        assert cleared.returncode == 0, cleared.stderr
        return bp

    by_symbol = set_bp("main")
    assert by_symbol["location"] == {"symbol": "main"}
    main_address = int(str(by_symbol["address"]))
    by_line = set_bp("hello.c:6")
    assert by_line["location"] == {"file_line": "hello.c:6"}
    assert by_line["source"]["line"] == 6  # type: ignore[index]
    by_address = set_bp(hex(main_address))
    assert by_address["location"] == {"address": str(main_address)}
    assert int(str(by_address["address"])) == main_address
    assert set_bp(str(main_address))["location"] == {"address": str(main_address)}
    # JSON still works, and a bad shortcut is one line
    assert set_bp('{"symbol": "main"}')["location"] == {"symbol": "main"}
    missing = msctl(target, "debug", "set-breakpoint", "sessions/bp", "--location", "no_such_symbol")
    assert missing.returncode == 1 and "Traceback" not in missing.stderr


# ---------------------------------------------------------------------- completion


def complete(target: str, line: str, tmp_path: Path, **env: str) -> tuple[list[str], subprocess.CompletedProcess[str]]:
    """What argcomplete answers the shell for ``line`` (the cursor at its end)."""
    out = tmp_path / "completions.txt"
    out.unlink(missing_ok=True)
    r = msctl(target, env={"_ARGCOMPLETE": "1", "COMP_LINE": line, "COMP_POINT": str(len(line)),
                           "_ARGCOMPLETE_IFS": "\n", "_ARGCOMPLETE_STDOUT_FILENAME": str(out), **env},
              timeout=60)
    text = out.read_text() if out.exists() else ""
    # options are offered too (argcomplete's default); these tests look at the rest
    return [w.strip() for w in text.split("\n") if w.strip() and not w.startswith("-")], r


def test_completion_of_commands_and_session_names(server_process: ServerProcess, tmp_path: Path) -> None:
    target = server_process.target
    words, r = complete(target, "msctl deb", tmp_path)
    assert r.returncode == 0 and words == ["debug"], r.stderr
    words, _ = complete(target, "msctl debug set-b", tmp_path)
    assert words == ["set-breakpoint"]
    for session in ("alpha", "beta"):
        created = msctl(target, "session", "create", "--board", "lm3s6965evb", "--id", session)
        assert created.returncode == 0, created.stderr
    words, _ = complete(target, "msctl console ", tmp_path)
    assert sorted(words) == ["alpha", "beta"]
    words, _ = complete(target, "msctl console sessions/a", tmp_path)
    assert words == ["sessions/alpha"]
    words, _ = complete(target, "msctl debug ", tmp_path)  # commands, and sessions for `msctl debug SESSION`
    assert {"alpha", "beta", "set-breakpoint", "read-registers"} <= set(words)
    words, _ = complete(target, "msctl debug read-registers ", tmp_path)
    assert sorted(words) == ["alpha", "beta"]
    words, _ = complete(target, "msctl session power-on-session b", tmp_path)
    assert words == ["beta"]
    words, _ = complete(target, "msctl coverage start-coverage --name ", tmp_path)
    assert sorted(words) == ["alpha", "beta"]
    for verb in ("export", "summary"):  # the friendly coverage verbs too
        words, _ = complete(target, f"msctl coverage {verb} a", tmp_path)
        assert words == ["alpha"], verb
    # the target comes from the command line too
    words, _ = complete("127.0.0.1:1", f"msctl --target {target} console al", tmp_path)
    assert words == ["alpha"]


def test_completion_with_the_server_down_is_empty(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    words, r = complete(f"127.0.0.1:{port}", "msctl console ", tmp_path)
    assert r.returncode == 0 and words == []
    assert "Traceback" not in r.stderr
    words, r = complete(f"127.0.0.1:{port}", "msctl debug ", tmp_path)
    assert r.returncode == 0 and "set-breakpoint" in words and "Traceback" not in r.stderr
