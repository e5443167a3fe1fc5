"""``msctl capsule ...``: failure capsules.

``show FILE`` reads a capsule archive here, with no server: what made it (trigger, reason,
test), where (board, backend and versions), the pc with its symbol, the registers, the
backtrace, the console tail, the last executed blocks, the coverage and telemetry it
carries, and the parts it lacks; ``--json`` prints all of it as one JSON object.
``open FILE`` imports the archive into the server and opens it as a new session halted at
the captured instant, then says how to debug it. ``list``, ``get``, ``export NAME -o
FILE``, ``create SESSION`` and ``delete NAME`` are the rest. A capsule is named
``capsules/ID`` or ``ID``; errors are one line and exit 1.

The archive (a zip) is documented in the README, "Failure capsules": manifest.json names
its parts (snapshot.bin, program.bin, registers.json, backtrace.json, console.txt,
trace.json, coverage.info, telemetry.json) and the ones it lacks with why.
"""

from __future__ import annotations

import argparse
import bisect
import hashlib
import io
import json
import os
import sys
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection
from google.protobuf import json_format
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from machineserver.cli import output
from machineserver.cli.render import print_table
from machineserver.sdk import Client
from machineserver.v1 import capsule_pb2 as pb
from machineserver.v1 import common_pb2

PREFIX = "capsules/"
FORMAT = "machineserver-capsule"
FORMAT_VERSION = 1
# what `show` reads at most: a capsule is under 1 MB; these bound a hostile or damaged file
MAX_ARCHIVE_BYTES = 256 * 2**20
MAX_MEMBERS = 256
MAX_PART_BYTES = 64 * 2**20
MAX_JSON_BYTES = 16 * 2**20
IMPORT_CHUNK = 1 * 2**20  # ImportCapsuleRequest.chunk's limit
# the parts `show` reads, and their member names when the manifest does not say
JSON_PARTS = ("registers", "backtrace", "trace", "telemetry")
TEXT_PARTS = ("console", "coverage")
DEFAULT_MEMBERS = {"snapshot": "snapshot.bin", "program": "program.bin", "registers": "registers.json",
                   "backtrace": "backtrace.json", "console": "console.txt", "trace": "trace.json",
                   "coverage": "coverage.info", "telemetry": "telemetry.json"}
TRIGGERS = {"explicit": pb.CAPSULE_TRIGGER_EXPLICIT, "test_failure": pb.CAPSULE_TRIGGER_TEST_FAILURE}


class CapsuleFileError(Exception):
    """A file that is not a capsule this msctl can read; the message says why."""


def capsule_name(text: str) -> str:
    return text if text.startswith(PREFIX) else PREFIX + text


def session_name(text: str) -> str:
    return text if text.startswith("sessions/") else "sessions/" + text


def _console() -> Console:
    """Rich output; not to a terminal: no colour, wide enough that lines stay whole."""
    probe = Console()
    return probe if probe.is_terminal else Console(width=max(probe.width, 240), no_color=True, highlight=False)


# ---------------------------------------------------------------------- reading an archive


@dataclass
class CapsuleArchive:
    """What a capsule file holds, each part parsed; a part it lacks or that cannot be read
    is in ``missing`` with why."""

    path: Path
    size_bytes: int
    sha256: str
    manifest: dict[str, Any]
    parts: dict[str, Any] = field(default_factory=dict)  # part -> parsed JSON or text
    program: bytes = b""
    snapshot_bytes: int = 0
    missing: dict[str, str] = field(default_factory=dict)
    # parts whose bytes differ from the manifest's sha256 (shown all the same)
    damaged: dict[str, str] = field(default_factory=dict)

    @property
    def capsule(self) -> dict[str, Any]:
        info = self.manifest.get("capsule")
        return info if isinstance(info, dict) else {}


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int) -> bytes:
    """A member's bytes, never more than ``limit`` decompressed (whatever its header says)."""
    if info.file_size > limit:
        raise CapsuleFileError(f"{info.filename}: {info.file_size} bytes, over the {limit} byte limit")
    try:
        with zf.open(info) as f:
            data = f.read(limit + 1)
    except (zipfile.BadZipFile, NotImplementedError, EOFError, RuntimeError, zlib.error) as exc:
        raise CapsuleFileError(f"{info.filename}: unreadable ({exc})") from None
    if len(data) > limit:
        raise CapsuleFileError(f"{info.filename}: over the {limit} byte limit (its header says {info.file_size})")
    return data


def _json_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> Any:
    try:
        return json.loads(_read_member(zf, info, MAX_JSON_BYTES))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CapsuleFileError(f"{info.filename}: not valid JSON ({exc})") from None


def _check_manifest(manifest: object) -> dict[str, Any]:
    if not isinstance(manifest, dict):
        raise CapsuleFileError("manifest.json: not a JSON object")
    if manifest.get("format") != FORMAT:
        raise CapsuleFileError(f"manifest.json: format is {manifest.get('format')!r}, not {FORMAT!r}")
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise CapsuleFileError(f"manifest.json: format_version {version!r} is not a number")
    if version > FORMAT_VERSION:
        raise CapsuleFileError(f"manifest.json: format_version {version} is newer than this msctl reads "
                               f"({FORMAT_VERSION}); update msctl")
    for key in ("capsule", "parts", "missing"):
        if not isinstance(manifest.get(key, {}), dict):
            raise CapsuleFileError(f"manifest.json: {key} is not a JSON object")
    return manifest


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_part(part: str, value: Any) -> str | None:
    """Why a parsed part does not have the documented shape, or None."""
    if part == "registers":
        if not isinstance(value, dict) or not all(isinstance(k, str) and _is_int(v) for k, v in value.items()):
            return "not an object of register name -> integer"
    elif part in ("backtrace", "trace"):
        key = "pc" if part == "backtrace" else "address"
        if not isinstance(value, list) or not all(isinstance(e, dict) and _is_int(e.get(key)) for e in value):
            return f"not a list of objects with an integer {key}"
    elif part == "telemetry" and not isinstance(value, dict):
        return "not a JSON object"
    return None


def read_archive(path: Path) -> CapsuleArchive:
    """The capsule at ``path``, read with every size bounded; CapsuleFileError when it is
    not a capsule (not a zip, no manifest, another format or a newer version)."""
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise CapsuleFileError(f"{path}: not a file")
        if size > MAX_ARCHIVE_BYTES:
            raise CapsuleFileError(f"{path}: {size} bytes, over the {MAX_ARCHIVE_BYTES} byte limit of a capsule")
        data = path.read_bytes()
    except OSError as exc:
        raise CapsuleFileError(f"{path}: {exc.strerror or exc}") from None
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise CapsuleFileError(f"{path}: not a capsule (not a zip archive)") from None
    try:
        with zf:
            return _read_zip(path, data, zf)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError) as exc:
        raise CapsuleFileError(f"{path}: damaged archive ({exc})") from None


def _parse_part(archive: CapsuleArchive, part: str, member: str, blob: bytes) -> None:
    if part == "snapshot":
        archive.snapshot_bytes = len(blob)
    elif part == "program":
        archive.program = blob
    elif part in JSON_PARTS:
        try:
            value = json.loads(blob)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise CapsuleFileError(f"{member}: not valid JSON ({exc})") from None
        problem = _check_part(part, value)
        if problem:
            raise CapsuleFileError(f"{member}: {problem}")
        archive.parts[part] = value
    else:
        archive.parts[part] = blob.decode("utf-8", "replace")


def _read_zip(path: Path, data: bytes, zf: zipfile.ZipFile) -> CapsuleArchive:
    infos = zf.infolist()
    if len(infos) > MAX_MEMBERS:
        raise CapsuleFileError(f"{path}: {len(infos)} members, over the limit of {MAX_MEMBERS}")
    members = {i.filename: i for i in infos if not i.is_dir()}
    if "manifest.json" not in members:
        raise CapsuleFileError(f"{path}: not a capsule (no manifest.json)")
    manifest = _check_manifest(_json_member(zf, members["manifest.json"]))
    archive = CapsuleArchive(path, len(data), hashlib.sha256(data).hexdigest(), manifest)
    archive.missing = {str(k): str(v) for k, v in manifest.get("missing", {}).items()}
    listed = {str(k): str(v) for k, v in manifest.get("parts", {}).items()}
    program_file = manifest.get("program", {}).get("file") if isinstance(manifest.get("program"), dict) else None
    if isinstance(program_file, str) and program_file:
        listed.setdefault("program", program_file)
    for part, member in listed.items():
        if member not in members and part not in archive.missing:
            archive.missing[part] = f"listed in the manifest as {member}, absent from the archive"
    raw_sums = manifest.get("sha256")
    sums: dict[str, Any] = raw_sums if isinstance(raw_sums, dict) else {}
    for part, default in DEFAULT_MEMBERS.items():
        info = members.get(listed.get(part, default))
        if info is None:
            continue
        try:
            blob = _read_member(zf, info, MAX_JSON_BYTES if part in JSON_PARTS else MAX_PART_BYTES)
        except CapsuleFileError as exc:
            archive.missing[part] = f"unreadable: {exc}"
            continue
        expected = sums.get(info.filename)
        if isinstance(expected, str) and hashlib.sha256(blob).hexdigest() != expected:
            archive.damaged[part] = f"{info.filename} does not match its sha256 in the manifest (tampered or damaged)"
        try:
            _parse_part(archive, part, info.filename, blob)
        except CapsuleFileError as exc:
            archive.missing[part] = f"unreadable: {exc}"
    return archive


# ---------------------------------------------------------------------- symbols


class Symbols:
    """Function symbols of an ELF program (none for BIN/HEX or a stripped ELF):
    address -> "function+0xoffset"."""

    def __init__(self, program: bytes) -> None:
        funcs: list[tuple[int, int, str]] = []
        if program.startswith(b"\x7fELF"):
            try:
                for section in ELFFile(io.BytesIO(program)).iter_sections():
                    if not isinstance(section, SymbolTableSection):
                        continue
                    for sym in section.iter_symbols():
                        if sym["st_info"]["type"] == "STT_FUNC" and sym.name and sym["st_shndx"] != "SHN_UNDEF":
                            funcs.append((int(sym["st_value"]) & ~1, int(sym["st_size"]), sym.name))
            except (ELFError, ValueError, KeyError, IndexError):
                funcs = []  # a damaged ELF: addresses stay bare
        funcs.sort()
        self._funcs = funcs
        self._starts = [f[0] for f in funcs]

    def __bool__(self) -> bool:
        return bool(self._funcs)

    def at(self, address: int) -> str:
        i = bisect.bisect_right(self._starts, address) - 1
        if i < 0:
            return ""
        start, size, name = self._funcs[i]
        if address >= start + max(size, 1):
            return ""
        return name if address == start else f"{name}+{address - start:#x}"


# ---------------------------------------------------------------------- summaries


def coverage_summary(lcov: str) -> dict[str, Any]:
    """Lines and functions hit per source file of an LCOV text (from its DA and FN/FNDA records)."""
    files: list[dict[str, Any]] = []
    current: dict[str, Any] | None = None
    lines: dict[int, int] = {}
    fns: set[str] = set()
    fns_hit: set[str] = set()
    for raw in lcov.splitlines():
        key, _, value = raw.strip().partition(":")
        if key == "SF":
            current, lines, fns, fns_hit = {"path": value}, {}, set(), set()
        elif current is None:
            continue
        elif key == "DA":
            parts = value.split(",")
            if len(parts) >= 2 and parts[0].isdigit() and parts[1].lstrip("-").isdigit():
                line = int(parts[0])
                lines[line] = max(lines.get(line, 0), int(parts[1]))
        elif key == "FN":
            fns.add(value.split(",")[-1])
        elif key == "FNDA":
            count, _, name = value.partition(",")
            if count.isdigit() and int(count) > 0:
                fns_hit.add(name)
        elif key == "end_of_record":
            current.update(lines_hit=sum(1 for c in lines.values() if c > 0), lines_total=len(lines),
                           functions_hit=len(fns_hit & fns), functions_total=len(fns))
            files.append(current)
            current = None
    hit, total = sum(f["lines_hit"] for f in files), sum(f["lines_total"] for f in files)
    return {"files": files, "lines_hit": hit, "lines_total": total,
            "line_percent": round(100.0 * hit / total, 1) if total else 0.0}


def _numbers(samples: list[Any], key: str) -> list[float]:
    return [float(s[key]) for s in samples if isinstance(s, dict) and isinstance(s.get(key), int | float)
            and not isinstance(s.get(key), bool)]


def _when(value: object) -> object:
    """A sample's time as RFC 3339 (UTC) when it is seconds since the epoch; else as given."""
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value < 2**33:
        spec = "milliseconds" if value % 1 else "seconds"
        return datetime.fromtimestamp(value, UTC).isoformat(timespec=spec).replace("+00:00", "Z")
    return value


def telemetry_summary(telemetry: dict[str, Any]) -> dict[str, Any]:
    """The host samples' count, time span, CPU (min/mean/max) and peak memory, and the
    session's metrics at the instant."""
    host = telemetry.get("host")
    samples = host if isinstance(host, list) else []
    out: dict[str, Any] = {"host_samples": len(samples)}
    times = [_when(s.get("time")) for s in samples if isinstance(s, dict) and s.get("time") is not None]
    if times:
        out["from"], out["to"] = times[0], times[-1]
    cpu = _numbers(samples, "cpu_percent")
    if cpu:
        out["cpu_percent"] = {"min": min(cpu), "mean": round(sum(cpu) / len(cpu), 1), "max": max(cpu)}
    memory = _numbers(samples, "memory_used_bytes")
    if memory:
        out["memory_used_bytes_max"] = int(max(memory))
    session = telemetry.get("session")
    out["session"] = session if isinstance(session, dict) else {}
    return out


def summary(archive: CapsuleArchive, trace_count: int = 0) -> dict[str, Any]:
    """Everything ``show`` says, as one JSON-ready object (trace: the last ``trace_count``
    blocks, all when 0)."""
    symbols = Symbols(archive.program)
    info = archive.capsule
    pc = info.get("pc")
    pc_symbol = symbols.at(pc) if isinstance(pc, int) and not isinstance(pc, bool) else ""
    backtrace = archive.parts.get("backtrace", [])
    if not pc_symbol and backtrace and backtrace[0].get("pc") == pc:
        pc_symbol = str(backtrace[0].get("function") or "")
    trace = [dict(e, symbol=e.get("symbol") or symbols.at(e["address"]))
             for e in archive.parts.get("trace", [])]
    out: dict[str, Any] = {
        "file": str(archive.path), "size_bytes": archive.size_bytes, "sha256": archive.sha256,
        "manifest": archive.manifest, "pc": pc, "pc_symbol": pc_symbol,
        "snapshot_bytes": archive.snapshot_bytes, "program_bytes": len(archive.program),
        "registers": archive.parts.get("registers", {}), "backtrace": backtrace,
        "console_tail": archive.parts.get("console", ""),
        "trace": trace[-trace_count:] if trace_count else trace,
        "missing": archive.missing, "damaged": archive.damaged,
    }
    if "coverage" in archive.parts:
        out["coverage"] = coverage_summary(archive.parts["coverage"])
    if "telemetry" in archive.parts:
        out["telemetry"] = telemetry_summary(archive.parts["telemetry"])
    return out


# ---------------------------------------------------------------------- show


def _hex(value: object) -> str:
    return f"{value:#010x}" if _is_int(value) else "-"


CONTROL = {c: f"\\x{c:02x}" for c in [*range(0x20), 0x7F] if c != 0x09}


def printable(text: str) -> str:
    """Text from an archive as it may go to a terminal: control characters (escape
    sequences a firmware printed, a crafted reason) written as \\xNN."""
    return text.translate(CONTROL)


def _say(out: Console, text: str, style: str | None = None) -> None:
    """One line of output; what came from the archive cannot reach the terminal as markup or escapes."""
    out.print(printable(text), style=style, markup=False, highlight=False)


def _kv(out: Console, rows: list[tuple[str, str]]) -> None:
    for key, value in rows:
        if value:
            _say(out, f"  {key:<10}{value}")


def _heading(out: Console, text: str) -> None:
    out.print()
    _say(out, text, "bold")


def render(s: dict[str, Any], out: Console, console_lines: int) -> None:
    m = s["manifest"]
    info = m.get("capsule", {})
    program = m.get("program") if isinstance(m.get("program"), dict) else {}
    _say(out, f"{info.get('name') or s['file']}  {str(info.get('trigger', '?')).upper()}  "
              f"{info.get('create_time', '')}", "bold")
    counters = []
    if _is_int(info.get("instructions")):
        counters.append(f"{info['instructions']} instructions")
    if _is_int(info.get("virtual_time_ns")):
        counters.append(f"{info['virtual_time_ns']} ns virtual time")
    _kv(out, [
        ("reason", str(info.get("reason") or "")),
        ("test", str(info.get("test_id") or "")),
        ("session", str(info.get("session") or "")),
        ("board", str(m.get("board") or "")),
        ("backend", f"{m.get('backend', '?')} ({m.get('backend_version', '?')}), snapshot format "
                    f"{m.get('snapshot_format', '?')}, snapshot {s['snapshot_bytes']} bytes"),
        ("server", str(m.get("server_version") or "")),
        ("program", f"{program.get('name', '')} {program.get('format', '')} sha256={program.get('sha256', '?')}"
                    if program else ""),
        ("pc", f"{_hex(s['pc'])}  {s['pc_symbol']}".rstrip()),
        ("counters", ", ".join(counters)),
        ("archive", f"{s['size_bytes']} bytes, sha256={s['sha256']}"),
    ])
    regs = s["registers"]
    if regs:
        _heading(out, "Registers")
        cells = [f"{name:>5} {_hex(value)}" for name, value in regs.items()]
        for i in range(0, len(cells), 4):
            _say(out, "  " + "   ".join(cells[i:i + 4]))
    if s["backtrace"]:
        _heading(out, "Backtrace")
        for i, frame in enumerate(s["backtrace"]):
            where = f"{frame.get('file')}:{frame.get('line')}" if frame.get("file") else ""
            _say(out, f"  #{frame.get('level', i)!s:<2} {_hex(frame.get('pc'))}  {frame.get('function') or '??'}"
                      f"  {where}".rstrip())
    text = s["console_tail"]
    if text:
        tail = text.splitlines()[-console_lines:]
        _heading(out, f"Console (last {len(tail)} lines)")
        for line in tail:
            _say(out, "  | " + line)
    if s["trace"]:
        _heading(out, f"Trace (last {len(s['trace'])} blocks, oldest first)")
        for block in s["trace"]:
            _say(out, f"  {_hex(block['address'])}  {block.get('symbol') or ''}".rstrip())
    _render_coverage_and_telemetry(s, out)
    if s["damaged"]:
        _heading(out, "Damaged")
        for part, why in sorted(s["damaged"].items()):
            _say(out, f"  {part}: {why}", "red")
    if s["missing"]:
        _heading(out, "Missing")
        for part, why in sorted(s["missing"].items()):
            _say(out, f"  {part}: {why}")


def _render_coverage_and_telemetry(s: dict[str, Any], out: Console) -> None:
    cov = s.get("coverage")
    if cov is not None:
        _heading(out, "Coverage")
        _say(out, f"  {cov['lines_hit']}/{cov['lines_total']} lines hit ({cov['line_percent']}%) "
                  f"in {len(cov['files'])} files")
        for f in cov["files"]:
            _say(out, f"    {f['path']}: {f['lines_hit']}/{f['lines_total']} lines, "
                      f"{f['functions_hit']}/{f['functions_total']} functions")
    tel = s.get("telemetry")
    if tel is not None:
        _heading(out, "Telemetry")
        line = f"  {tel['host_samples']} host samples"
        if "from" in tel:
            line += f" from {tel['from']} to {tel['to']}"
        if "cpu_percent" in tel:
            c = tel["cpu_percent"]
            line += f"; cpu {c['min']}-{c['max']}% (mean {c['mean']}%)"
        if "memory_used_bytes_max" in tel:
            line += f"; memory used up to {tel['memory_used_bytes_max'] / 2**20:.0f} MiB"
        _say(out, line)
        if tel["session"]:
            _say(out, "  session: " + ", ".join(f"{k}={v}" for k, v in tel["session"].items()))


def cmd_show(client: Client, args: argparse.Namespace) -> int:
    del client  # reads the file here; no server
    try:
        archive = read_archive(Path(args.file))
    except CapsuleFileError as exc:
        print(f"msctl: {exc}", file=sys.stderr)
        return 1
    s = summary(archive, 0 if args.json else args.trace)
    if args.json:
        print(json.dumps(s, indent=2))
    else:
        render(s, _console(), args.console_lines)
    return 0


# ---------------------------------------------------------------------- server verbs


def trigger_label(value: pb.CapsuleTrigger.ValueType) -> str:
    if value not in pb.CapsuleTrigger.values():
        return str(int(value))
    return pb.CapsuleTrigger.Name(value).removeprefix("CAPSULE_TRIGGER_")


def describe(c: pb.Capsule) -> None:
    out = _console()
    _say(out, f"{c.name}  {trigger_label(c.trigger)}  {c.create_time.ToDatetime():%Y-%m-%d %H:%M:%S} UTC", "bold")
    _kv(out, [("reason", c.reason), ("test", c.test_id), ("session", c.session), ("board", c.board),
              ("backend", f"{c.backend} ({c.backend_version})"), ("server", c.server_version),
              ("program", f"{c.program} sha256={c.firmware_sha256}"), ("pc", f"{c.pc:#010x}"),
              ("counters", f"{c.instructions} instructions, {c.virtual_time_ns} ns virtual time"),
              ("archive", f"{c.size_bytes} bytes, sha256={c.sha256}"), ("owner", f"{c.owner} ({c.tenant})")])
    for part, why in sorted(c.missing.items()):
        _say(out, f"  missing   {part}: {why}")


def cmd_list(client: Client, args: argparse.Namespace) -> int:
    resp = client.capsules.list_capsules(page_size=args.page_size, filter=args.filter or "")
    if output.machine_readable(args):
        output.emit(resp, args)
        return 0
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for header in ("NAME", "TRIGGER", "SESSION", "BOARD", "BACKEND", "PC", "BYTES", "CREATED", "REASON"):
        table.add_column(header, no_wrap=True)
    for c in resp.capsules:
        reason = c.reason if len(c.reason) <= 60 else c.reason[:57] + "..."
        cells = (c.name, trigger_label(c.trigger), c.session, c.board, c.backend, f"{c.pc:#010x}",
                 str(c.size_bytes), f"{c.create_time.ToDatetime():%Y-%m-%d %H:%M:%S}", reason)
        table.add_row(*(Text(printable(cell)) for cell in cells))
    print_table(table, _console())
    return 0


def cmd_get(client: Client, args: argparse.Namespace) -> int:
    resp = client.capsules.get_capsule(name=capsule_name(args.capsule))
    if output.machine_readable(args):
        output.emit(resp, args)
    else:
        describe(resp.capsule)
    return 0


def cmd_create(client: Client, args: argparse.Namespace) -> int:
    resp = client.capsules.create_capsule(name=session_name(args.session), trigger=TRIGGERS[args.trigger],
                                          reason=args.reason or "", test_id=args.test_id or "")
    if output.machine_readable(args):
        output.emit(resp, args)
    else:
        c = resp.capsule
        print(f"{c.name}  pc={c.pc:#010x}  {c.size_bytes} bytes")
    return 0


def cmd_delete(client: Client, args: argparse.Namespace) -> int:
    client.capsules.delete_capsule(name=capsule_name(args.capsule))
    if not args.json:
        print(f"deleted {capsule_name(args.capsule)}")
    return 0


def cmd_export(client: Client, args: argparse.Namespace) -> int:
    """The archive to -o; written to a temporary file beside it and renamed once its sha256
    matches the capsule's, so a failed export leaves no half file under the name."""
    target = Path(args.output)
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    capsule: pb.Capsule | None = None
    digest = hashlib.sha256()
    size = 0
    try:
        with partial.open("wb") as f:
            for msg in client.capsules.export_capsule(name=capsule_name(args.capsule)):
                if msg.HasField("capsule"):
                    capsule = msg.capsule
                elif msg.chunk:
                    f.write(msg.chunk)
                    digest.update(msg.chunk)
                    size += len(msg.chunk)
        if capsule is not None and capsule.sha256 and capsule.sha256 != digest.hexdigest():
            print(f"msctl: {args.output}: the archive received has sha256 {digest.hexdigest()}, the capsule's is "
                  f"{capsule.sha256}; not written", file=sys.stderr)
            return 1
        partial.replace(target)
    except OSError as exc:
        print(f"msctl: {args.output}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    finally:
        partial.unlink(missing_ok=True)
    print(f"wrote {args.output} ({size} bytes, sha256={digest.hexdigest()})")
    return 0


def _chunks(data: bytes) -> Iterator[pb.ImportCapsuleRequest]:
    for start in range(0, len(data), IMPORT_CHUNK):
        yield pb.ImportCapsuleRequest(chunk=data[start:start + IMPORT_CHUNK])


def cmd_open(client: Client, args: argparse.Namespace) -> int:
    """Import FILE (or take a stored capsules/ID), open it as a halted session, say how to
    debug it."""
    path = Path(args.file)
    if not path.exists() and args.file.startswith(PREFIX):
        capsule = client.capsules.get_capsule(name=args.file).capsule
    else:
        try:
            read_archive(path)  # a file that is not a capsule is refused here, in one line
            data = path.read_bytes()
        except CapsuleFileError as exc:
            print(f"msctl: {exc}", file=sys.stderr)
            return 1
        except OSError as exc:
            print(f"msctl: {path}: {exc.strerror or exc}", file=sys.stderr)
            return 1
        capsule = client.capsules.import_capsule(_chunks(data)).capsule
    session = client.capsules.open_capsule(name=capsule.name, session_id=args.session_id or "",
                                           display_name=args.display_name or "").session
    regs = client.debug.read_registers(name=session.name, names=["pc"]).registers
    pc = regs[0].value if regs else None
    if args.json:
        print(json.dumps({"capsule": json.loads(json_format.MessageToJson(capsule)),
                          "session": json.loads(json_format.MessageToJson(session)), "pc": pc}, indent=2))
        return 0
    short = session.name.removeprefix("sessions/")
    state = common_pb2.SessionState.Name(session.state).removeprefix("SESSION_STATE_")
    out = _console()
    _say(out, f"{capsule.name}  {trigger_label(capsule.trigger)}  {capsule.reason}")
    _kv(out, [("session", f"{session.name}  {state}  board={session.board} backend={session.backend}"),
              ("pc", f"{pc:#010x}" if pc is not None else "-"),
              ("captured", f"pc {capsule.pc:#010x}" + ("" if pc == capsule.pc else "  (differs from the session's)"))])
    out.print(f"\nDebug it:\n  msctl debug {short}\n  msctl debug start-gdb-server {short}     # -> a port, then\n"
              f"  gdb-multiarch FIRMWARE.elf -ex 'target remote 127.0.0.1:PORT'", markup=False, highlight=False)
    return 0


def add_verbs(csub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = csub.add_parser("show", help="summarise a capsule file (read here, no server)",
                        description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[2],
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", help="a capsule archive (.zip)")
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="all of it as one JSON object")
    p.add_argument("--trace", type=int, default=16, metavar="N", help="the last N trace blocks (default 16; 0: all)")
    p.add_argument("--console-lines", type=int, default=20, metavar="N", help="console tail lines (default 20)")
    p.set_defaults(handler=cmd_show)
    p = csub.add_parser("open", help="import a capsule file and open it as a session halted at its instant")
    p.add_argument("file", help="a capsule archive, or capsules/ID already stored")
    p.add_argument("--session-id", help="the new session's id (default: generated)")
    p.add_argument("--display-name")
    p.set_defaults(handler=cmd_open)
    p = csub.add_parser("list", help="capsules as a table, newest first")
    p.add_argument("--filter", help="session=sessions/x, trigger=fault (fault, assert, explicit, test_failure)")
    p.add_argument("--page-size", type=int, default=100)
    p.set_defaults(handler=cmd_list)
    p = csub.add_parser("get", help="one capsule: trigger, reason, board, backend, pc, size, missing parts")
    p.add_argument("capsule", help="capsules/ID or ID")
    p.set_defaults(handler=cmd_get)
    p = csub.add_parser("export", help="write a capsule's archive to a file")
    p.add_argument("capsule", help="capsules/ID or ID")
    p.add_argument("-o", "--output", required=True, help="the file to write")
    p.set_defaults(handler=cmd_export)
    p = csub.add_parser("create", help="capture a capsule of a powered-on session now")
    p.add_argument("session", help="sessions/ID or ID")
    p.add_argument("--reason", help="why (at most 4 KiB)")
    p.add_argument("--test-id", help="the test that failed, e.g. tests/test_x.py::test_boot")
    p.add_argument("--trigger", choices=sorted(TRIGGERS), default="explicit")
    p.set_defaults(handler=cmd_create)
    p = csub.add_parser("delete", help="delete a capsule")
    p.add_argument("capsule", help="capsules/ID or ID")
    p.set_defaults(handler=cmd_delete)

