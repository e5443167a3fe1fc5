"""msctl capsule, as a subprocess. ``show`` reads an archive here with no server (the
target points nowhere): one built here by the README's layout with a real firmware ELF,
so every field shown is checked against what was written, plus damaged and foreign files
answered in one line. Against a real server process (tests/helpers/server.py): a capsule
captured at a breakpoint, exported, shown (the server's own archive), then opened as a
new session that is HALTED at the same pc with the same registers."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.firmware import elf_address, elf_function, firmware
from tests.helpers.server import ServerProcess
from tests.helpers.tools import VENV_BIN

BOARD = "lm3s6965evb"
NOWHERE = "127.0.0.1:9"  # the discard port: nothing serves gRPC there


def msctl(*args: str, target: str = NOWHERE, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, MSCTL_TARGET=target)
    return subprocess.run([str(VENV_BIN / "msctl"), *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """The stderr of a refused command: exit status 1, one line, no traceback (msctl adds
    a "  field F: why" line per field the server named, as for every command)."""
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines and lines[0].startswith("msctl: "), result.stderr
    assert all(line.startswith("  field ") for line in lines[1:]), result.stderr
    return lines[0]


# ---------------------------------------------------------------------- an archive by the layout


LCOV = """TN:
SF:src/fault.c
FN:22,HardFault_Handler
FN:28,main
FNDA:0,HardFault_Handler
FNDA:1,main
DA:22,0
DA:24,0
DA:30,1
DA:31,1
DA:32,1
end_of_record
SF:common/fw.c
DA:5,3
DA:6,0
end_of_record
"""


def layout_archive(path: Path, elf: Path, *, parts: dict[str, bytes] | None = None,
                   manifest: dict[str, Any] | None = None) -> dict[str, Any]:
    """A capsule written by the documented layout around ``elf`` (pc inside main, the
    trace's blocks in HardFault_Handler and main, left for msctl to symbolise); returns
    what it wrote."""
    main, handler = elf_address(elf, "main"), elf_address(elf, "HardFault_Handler")
    registers = {f"r{i}": 0x1000 * i + i for i in range(13)} | {"sp": 0x20001FF0, "lr": handler | 1,
                                                                 "pc": main + 6, "xpsr": 0x61000000}
    content: dict[str, Any] = {
        "registers": registers,
        "backtrace": [{"level": 0, "pc": main + 6, "function": "main", "file": "src/fault.c", "line": 31},
                      {"level": 1, "pc": 0x1234, "function": "Reset_Handler", "file": "common/start.c",
                       "line": 12}],
        "trace": [{"address": handler, "symbol": ""}, {"address": main + 4, "symbol": ""}],
        "telemetry": {"host": [{"time": 1796032800.0, "cpu_percent": 12.0, "memory_used_bytes": 2**30},
                               {"time": "2026-11-30T10:00:01Z", "cpu_percent": 40.0,
                                "memory_used_bytes": 3 * 2**30}],
                      "session": {"instructions": 4321, "faults": 1}},
    }
    files: dict[str, bytes] = {
        "snapshot.bin": bytes(range(256)) * 8,
        "program.bin": elf.read_bytes(),
        "registers.json": json.dumps(content["registers"]).encode(),
        "backtrace.json": json.dumps(content["backtrace"]).encode(),
        "console.txt": b"boot\n" + b"".join(b"line %d\n" % i for i in range(30)) + b"about to fault\n",
        "trace.json": json.dumps(content["trace"]).encode(),
        "coverage.info": LCOV.encode(),
        "telemetry.json": json.dumps(content["telemetry"]).encode(),
    }
    sums_of = dict(files)  # parts given by the caller are as damaged as they look: sums of the originals
    files.update(parts or {})
    names = {"snapshot": "snapshot.bin", "registers": "registers.json", "backtrace": "backtrace.json",
             "console": "console.txt", "trace": "trace.json", "coverage": "coverage.info",
             "telemetry": "telemetry.json"}
    doc: dict[str, Any] = {
        "format": "machineserver-capsule", "format_version": 1,
        "capsule": {"name": "capsules/c0ffee", "session": "sessions/s1", "trigger": "fault",
                    "reason": "HardFault: UsageFault (UNALIGNED)", "test_id": "tests/test_fw.py::test_boot[unicorn]",
                    "create_time": "2026-11-30T10:00:01Z", "pc": main + 6, "instructions": 4321,
                    "virtual_time_ns": 98765},
        "server_version": "0.1.0", "backend": "unicorn", "backend_version": "unicorn 2.1.4",
        "snapshot_format": "unicorn-state-1", "board": BOARD, "board_yaml": "name: lm3s6965evb\n",
        "session_options": {"coverage": True},
        "program": {"name": "programs/p1", "sha256": "ab" * 32, "format": "elf", "load_address": 0,
                    "file": "program.bin"},
        "parts": {part: member for part, member in names.items() if member in files},
        "missing": {"gdb": "not captured here"},
        "sha256": {member: hashlib.sha256(data).hexdigest() for member, data in sums_of.items()},
    }
    doc.update(manifest or {})
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("manifest.json", json.dumps(doc))
        for member, data in files.items():
            zf.writestr(member, data)
    return {"main": main, "handler": handler, "manifest": doc, **content}


@pytest.fixture
def elf() -> Path:
    return firmware(BOARD, "fault")


def test_show_reads_every_part_without_a_server(tmp_path: Path, elf: Path) -> None:
    wrote = layout_archive(tmp_path / "c.zip", elf)
    result = msctl("capsule", "show", str(tmp_path / "c.zip"))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    main = wrote["main"]
    assert main + 6 in elf_function(elf, "main")  # the layout's pc lies inside main
    assert "capsules/c0ffee  FAULT" in out
    assert "HardFault: UsageFault (UNALIGNED)" in out and "tests/test_fw.py::test_boot[unicorn]" in out
    assert f"{BOARD}" in out and "unicorn (unicorn 2.1.4)" in out and "unicorn-state-1" in out
    # the pc symbolised from the program's own symbol table
    assert f"pc        {main + 6:#010x}  main+0x6" in out
    for name, value in wrote["registers"].items():
        assert f"{name:>5} {value:#010x}" in out
    assert f"#0  {main + 6:#010x}  main  src/fault.c:31" in out
    assert "#1  0x00001234  Reset_Handler  common/start.c:12" in out
    # the console's last 20 lines only, by default
    assert "| about to fault" in out and "| line 29" in out and "| line 10" not in out and "| boot" not in out
    # trace blocks symbolised here (the archive left them bare), oldest first
    assert out.index(f"{wrote['handler']:#010x}  HardFault_Handler") < out.index(f"{main + 4:#010x}  main+0x4")
    assert "4/7 lines hit (57.1%) in 2 files" in out
    assert "src/fault.c: 3/5 lines, 1/2 functions" in out
    assert "2 host samples from 2026-11-30T10:00:00Z to 2026-11-30T10:00:01Z; cpu 12.0-40.0% (mean 26.0%)" in out
    assert "memory used up to 3072 MiB" in out and "instructions=4321" in out
    assert "gdb: not captured here" in out


def test_show_json_is_the_whole_capsule(tmp_path: Path, elf: Path) -> None:
    wrote = layout_archive(tmp_path / "c.zip", elf)
    result = msctl("capsule", "show", str(tmp_path / "c.zip"), "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["manifest"] == wrote["manifest"]
    assert doc["pc"] == wrote["main"] + 6 and doc["pc_symbol"] == "main+0x6"
    assert doc["registers"] == wrote["registers"]
    assert doc["backtrace"] == wrote["backtrace"]
    assert [(b["address"], b["symbol"]) for b in doc["trace"]] == [(wrote["handler"], "HardFault_Handler"),
                                                                    (wrote["main"] + 4, "main+0x4")]
    assert doc["console_tail"].endswith("line 29\nabout to fault\n") and doc["console_tail"].startswith("boot\n")
    assert doc["coverage"]["lines_hit"] == 4 and doc["coverage"]["lines_total"] == 7
    assert doc["telemetry"]["cpu_percent"] == {"min": 12.0, "mean": 26.0, "max": 40.0}
    assert doc["telemetry"]["session"] == {"instructions": 4321, "faults": 1}
    assert doc["snapshot_bytes"] == 2048 and doc["program_bytes"] == elf.stat().st_size
    assert doc["missing"] == {"gdb": "not captured here"} and doc["damaged"] == {}
    # the global flag works the same
    again = msctl("--json", "capsule", "show", str(tmp_path / "c.zip"))
    assert json.loads(again.stdout) == doc


def test_show_lists_absent_and_damaged_parts_and_shows_the_rest(tmp_path: Path, elf: Path) -> None:
    layout_archive(tmp_path / "c.zip", elf, parts={"registers.json": b'{"pc": "not a number"}'},
                   manifest={"parts": {"snapshot": "snapshot.bin", "registers": "registers.json",
                                       "trace": "trace.json", "coverage": "elsewhere.info"}})
    result = msctl("capsule", "show", str(tmp_path / "c.zip"), "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["missing"]["coverage"] == "listed in the manifest as elsewhere.info, absent from the archive"
    assert doc["missing"]["registers"].startswith("unreadable: registers.json: not an object of register name")
    assert "coverage" not in doc and doc["registers"] == {}
    assert len(doc["trace"]) == 2  # what could be read is still shown


def test_show_flags_a_part_that_does_not_match_its_sha256_and_still_shows_it(tmp_path: Path, elf: Path) -> None:
    layout_archive(tmp_path / "c.zip", elf, parts={"console.txt": b"edited afterwards\n"})
    result = msctl("capsule", "show", str(tmp_path / "c.zip"))
    assert result.returncode == 0, result.stderr
    assert "Damaged\n  console: console.txt does not match its sha256 in the manifest (tampered or damaged)" \
        in result.stdout
    assert "| edited afterwards" in result.stdout
    doc = json.loads(msctl("capsule", "show", str(tmp_path / "c.zip"), "--json").stdout)
    assert list(doc["damaged"]) == ["console"]


def test_show_bounds_what_it_decompresses(tmp_path: Path, elf: Path) -> None:
    """A member that inflates past the limit (a zip bomb's shape: 17 MiB from ~17 KiB) is
    not read into memory: it is reported as unreadable."""
    layout_archive(tmp_path / "c.zip", elf, parts={"telemetry.json": b" " * (17 * 2**20)})
    assert (tmp_path / "c.zip").stat().st_size < 200_000
    result = msctl("capsule", "show", str(tmp_path / "c.zip"), "--json")
    assert result.returncode == 0, result.stderr
    assert "over the 16777216 byte limit" in json.loads(result.stdout)["missing"]["telemetry"]


def test_show_without_an_elf_leaves_addresses_bare(tmp_path: Path, elf: Path) -> None:
    wrote = layout_archive(tmp_path / "c.zip", elf, parts={"program.bin": firmware(BOARD, "fault", "bin").read_bytes()})
    doc = json.loads(msctl("capsule", "show", str(tmp_path / "c.zip"), "--json").stdout)
    # the backtrace's own function names the pc; the trace stays as the archive has it
    assert doc["pc_symbol"] == "main" and doc["pc"] == wrote["main"] + 6
    assert [b["symbol"] for b in doc["trace"]] == ["", ""]


def test_show_writes_control_characters_from_the_archive_as_escapes(tmp_path: Path, elf: Path) -> None:
    """A firmware's escape sequences (or a crafted reason) are not sent to the terminal."""
    layout_archive(tmp_path / "c.zip", elf, parts={"console.txt": b"ok\n\x1b[2Jcleared [bold]x[/bold]\n"},
                   manifest={"capsule": {"name": "capsules/x", "trigger": "fault", "reason": "bad\x07bell"}})
    out = msctl("capsule", "show", str(tmp_path / "c.zip")).stdout
    assert "\x1b" not in out and "\x07" not in out
    assert "| \\x1b[2Jcleared [bold]x[/bold]" in out and "reason    bad\\x07bell" in out


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


@pytest.mark.parametrize(("make", "expected"), [
    (lambda d: d / "absent.zip", "No such file or directory"),
    (lambda d: (d / "text.zip").write_text("hello") and d / "text.zip", "not a capsule (not a zip archive)"),
    (lambda d: _zip(d / "x.zip", {"readme.txt": b"hi"}), "not a capsule (no manifest.json)"),
    (lambda d: _zip(d / "x.zip", {"manifest.json": b"{nope"}), "manifest.json: not valid JSON"),
    (lambda d: _zip(d / "x.zip", {"manifest.json": b"[1]"}), "manifest.json: not a JSON object"),
    (lambda d: _zip(d / "x.zip", {"manifest.json": json.dumps({"format": "renode-snapshot",
                                                                "format_version": 1}).encode()}),
     "format is 'renode-snapshot', not 'machineserver-capsule'"),
    (lambda d: _zip(d / "x.zip", {"manifest.json": json.dumps({"format": "machineserver-capsule",
                                                                "format_version": 7}).encode()}),
     "format_version 7 is newer than this msctl reads (1)"),
    (lambda d: _zip(d / "x.zip", {"manifest.json": json.dumps({"format": "machineserver-capsule",
                                                                "format_version": 1, "parts": []}).encode()}),
     "manifest.json: parts is not a JSON object"),
], ids=["absent", "not-zip", "no-manifest", "bad-json", "not-object", "foreign-format", "newer-version",
        "bad-parts"])
def test_show_refuses_what_is_not_a_capsule_in_one_line(tmp_path: Path, make: Any, expected: str) -> None:
    path = make(tmp_path)
    for args in (("capsule", "show", str(path)), ("capsule", "show", str(path), "--json")):
        assert expected in one_line_error(msctl(*args))


def test_a_truncated_archive_is_refused_in_one_line(tmp_path: Path, elf: Path) -> None:
    layout_archive(tmp_path / "c.zip", elf)
    data = (tmp_path / "c.zip").read_bytes()
    (tmp_path / "cut.zip").write_bytes(data[: len(data) // 2])
    line = one_line_error(msctl("capsule", "show", str(tmp_path / "cut.zip")))
    assert "cut.zip" in line


# ---------------------------------------------------------------------- against a server


@pytest.fixture
def server_process(tmp_path: Path) -> Iterator[ServerProcess]:
    sp = ServerProcess(tmp_path / "data", "--job-engine", "local").start()
    try:
        yield sp
    finally:
        sp.stop()


def _ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, (result.stdout, result.stderr)
    return result.stdout


def _registers(session: str, target: str) -> dict[str, int]:
    out = _ok(msctl("--json", "debug", "read-registers", session, target=target))
    return {r["name"]: int(r.get("value", 0)) for r in json.loads(out)["registers"]}


def capture_at_main(sp: ServerProcess, folder: Path, backend: str,
                    board: str = BOARD) -> tuple[str, Path, dict[str, int], int]:
    """A session of hello stopped at main, captured by ``msctl capsule create`` and
    exported: (capsule name, archive, the session's registers, main's address)."""
    elf = firmware(board, "hello")
    target = sp.target
    _ok(msctl("session", "create", "--board", board, "--backend", backend, "--program", str(elf), "--id", "s1",
              "--power-on", target=target))
    _ok(msctl("debug", "set-breakpoint", "s1", "--location", '{"symbol": "main"}', target=target))
    _ok(msctl("debug", "continue", "s1", "--wait", target=target))
    regs = _registers("s1", target)
    main = elf_address(elf, "main")
    assert regs["pc"] == main
    created = _ok(msctl("capsule", "create", "s1", "--reason", "checked by hand", target=target))
    name = created.split()[0]
    assert name.startswith("capsules/") and f"pc={main:#010x}" in created
    archive = folder / "capsule.zip"
    exported = _ok(msctl("capsule", "export", name, "-o", str(archive), target=target))
    assert f"{archive.stat().st_size} bytes" in exported
    return name, archive, regs, main


def rewrite(src: Path, dst: Path, *, manifest: dict[str, Any] | None = None,
            members: dict[str, bytes] | None = None, resum: bool = True) -> Path:
    """A copy of an archive with manifest fields and members replaced; the manifest's
    sha256 of a replaced member updated (resum) or left as it was (a tampered copy)."""
    with zipfile.ZipFile(src) as zf:
        files = {info.filename: zf.read(info) for info in zf.infolist()}
    doc = json.loads(files.pop("manifest.json"))
    doc.update(manifest or {})
    for member, data in (members or {}).items():
        files[member] = data
        if resum:
            doc["sha256"][member] = hashlib.sha256(data).hexdigest()
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("manifest.json", json.dumps(doc))
        for member, data in files.items():
            zf.writestr(member, data)
    return dst


# QEMU 7.2 cannot restore an lm3s6965evb snapshot (PLATFORM.md): QEMU on mps2-an385
@pytest.mark.parametrize(("backend", "board"), [("unicorn", BOARD), ("qemu", "mps2-an385")])
def test_capture_export_show_open_gives_a_halted_session_at_the_same_pc(
        tmp_path: Path, server_process: ServerProcess, backend: str, board: str) -> None:
    target = server_process.target
    name, archive, regs, main = capture_at_main(server_process, tmp_path, backend, board)
    listed = _ok(msctl("capsule", "list", target=target))
    assert name in listed and "EXPLICIT" in listed and "checked by hand" in listed
    got = _ok(msctl("capsule", "get", name, target=target))
    assert "checked by hand" in got and f"{main:#010x}" in got and backend in got
    assert archive.stat().st_size < 1_000_000

    # the server's own archive, read here with no server
    doc = json.loads(_ok(msctl("capsule", "show", str(archive), "--json")))
    assert doc["pc"] == main and doc["pc_symbol"] == "main" and doc["damaged"] == {}
    assert doc["manifest"]["capsule"]["trigger"] == "explicit" and doc["manifest"]["backend"] == backend
    assert doc["manifest"]["capsule"]["reason"] == "checked by hand"
    assert doc["registers"]["pc"] == main
    common = set(doc["registers"]) & set(regs)
    assert {"r0", "sp", "lr", "pc"} <= common
    assert {k: doc["registers"][k] for k in common} == {k: regs[k] for k in common}
    shown = _ok(msctl("capsule", "show", str(archive)))
    assert f"pc        {main:#010x}  main" in shown and "EXPLICIT" in shown

    opened = _ok(msctl("capsule", "open", str(archive), "--session-id", "reopened", target=target))
    assert "sessions/reopened  HALTED" in opened and f"pc        {main:#010x}" in opened
    assert "differs" not in opened and "msctl debug reopened" in opened
    session = json.loads(_ok(msctl("--json", "session", "get-session", "reopened", target=target)))["session"]
    assert session["state"] == "SESSION_STATE_HALTED" and session["backend"] == backend
    assert _registers("reopened", target) == regs
    # a capsule already stored opens by name, no file (and --json says the same as JSON)
    again = json.loads(_ok(msctl("--json", "capsule", "open", name, "--session-id", "reopened2", target=target)))
    assert again["session"]["name"] == "sessions/reopened2" and again["session"]["state"] == "SESSION_STATE_HALTED"
    assert again["pc"] == main and again["capsule"]["name"] == name

    assert f"deleted {name}" in _ok(msctl("capsule", "delete", name, target=target))
    assert "NOT_FOUND" in one_line_error(msctl("capsule", "get", name, target=target))


def test_server_verbs_refuse_in_one_line(tmp_path: Path, server_process: ServerProcess) -> None:
    target = server_process.target
    assert "NOT_FOUND" in one_line_error(msctl("capsule", "get", "nope", target=target))
    assert "NOT_FOUND" in one_line_error(msctl("capsule", "export", "nope", "-o", str(tmp_path / "o.zip"),
                                               target=target))
    assert not (tmp_path / "o.zip").exists() and not list(tmp_path.glob(".o.zip*"))
    assert "NOT_FOUND" in one_line_error(msctl("capsule", "create", "nope", target=target))
    # a file that is not a capsule never reaches the server
    (tmp_path / "junk.zip").write_bytes(b"junk")
    assert "not a zip archive" in one_line_error(msctl("capsule", "open", str(tmp_path / "junk.zip"),
                                                       target=target))
    name, archive, _, _ = capture_at_main(server_process, tmp_path, "unicorn")
    line = one_line_error(msctl("capsule", "export", name, "-o", str(tmp_path / "no" / "such" / "c.zip"),
                                target=target))
    assert "No such file or directory" in line
    # a tampered member: the server refuses it, naming the member
    tampered = rewrite(archive, tmp_path / "tampered.zip", members={"console.txt": b"not what was captured\n"},
                       resum=False)
    line = one_line_error(msctl("capsule", "open", str(tampered), target=target))
    assert "INVALID_ARGUMENT" in line and "console.txt" in line and "sha256" in line
    # a snapshot written by a Unicorn driver format this server does not have: refused with both versions
    with zipfile.ZipFile(archive) as zf:
        snapshot = bytearray(zf.read("snapshot.bin"))
    assert snapshot.startswith(b"MSUCSNAP")
    snapshot[8:10] = (999).to_bytes(2, "little")
    foreign = rewrite(archive, tmp_path / "foreign.zip", members={"snapshot.bin": bytes(snapshot)},
                      manifest={"snapshot_format": "unicorn-snapshot/999", "backend_version": "unicorn 9.9.9"})
    line = one_line_error(msctl("capsule", "open", str(foreign), target=target))
    assert "FAILED_PRECONDITION" in line and "unicorn-snapshot/999" in line, line


def test_a_fault_capsule_shows_and_reopens_at_the_fault(tmp_path: Path, server_process: ServerProcess) -> None:
    """fault on mps2-an385 with its HardFault vector unmapped stops FAULTED in main; the
    session's CapsulePolicy captures it (coverage on: a real trace tail)."""
    target = server_process.target
    board = "mps2-an385"
    elf = firmware(board, "fault")
    program = _ok(msctl("program", "upload", str(elf), target=target)).split()[0]
    options = json.dumps({"capsules": {"on_fault": True}, "coverage": True})
    _ok(msctl("session", "create-session", "--board-template", board, "--backend", "unicorn", "--program", program,
              "--power-on", "--session-id", "f1", "--options", options, target=target))
    _ok(msctl("debug", "write-memory", "f1", "--address", "0x0C", "--data", "hex:010000f0", target=target))
    _ok(msctl("session", "run-session", "f1", target=target))
    deadline = time.monotonic() + 60
    while not (found := json.loads(_ok(msctl("--json", "capsule", "list", "--filter", "trigger=fault",
                                             target=target))).get("capsules")):
        assert time.monotonic() < deadline, "no fault capsule"
        time.sleep(0.2)
    (capsule,) = found
    assert capsule["session"] == "sessions/f1"
    pc = int(capsule["pc"])
    faulted = _registers("f1", target)
    assert faulted["pc"] == pc
    _ok(msctl("capsule", "export", capsule["name"], "-o", str(tmp_path / "f.zip"), target=target))

    shown = _ok(msctl("capsule", "show", str(tmp_path / "f.zip")))
    main = elf_function(elf, "main")
    assert pc in main
    assert f"pc        {pc:#010x}  main+{pc - main.start:#x}" in shown and "  FAULT  " in shown
    assert f"reason    fault at pc {pc:#010x}" in shown
    assert f"#0  {pc:#010x}  main  src/fault.c:" in shown
    assert "| about to fault" in shown
    doc = json.loads(_ok(msctl("capsule", "show", str(tmp_path / "f.zip"), "--json")))
    assert doc["registers"] == faulted and doc["damaged"] == {}
    assert doc["trace"] and doc["trace"][-1]["address"] in main and doc["trace"][-1]["symbol"].startswith("main")
    assert doc["telemetry"]["host_samples"] >= 1 and str(doc["telemetry"]["from"]).endswith("Z")

    opened = _ok(msctl("capsule", "open", str(tmp_path / "f.zip"), "--session-id", "f2", target=target))
    assert "sessions/f2  HALTED" in opened and f"pc        {pc:#010x}" in opened and "differs" not in opened
    assert _registers("f2", target) == faulted
