"""The capsule archive: one zip (deflated), written at capture and read back, bounded, at
import. Pure: bytes in, bytes out; nothing here touches the store or a machine.

Layout (format "machineserver-capsule", format_version 1)::

    manifest.json   what, when, where: the capsule (name, session, trigger, reason, test_id,
                    create_time RFC 3339, pc, instructions, virtual_time_ns), server_version,
                    backend, backend_version, snapshot_format, board, board_yaml,
                    session_options, program {name, sha256, format, load_address, file},
                    parts {part: member}, missing {part: why}, sha256 {member: hex}
    snapshot.bin    the backend's save_state blob
    program.bin     the program as uploaded (the ELF: symbols for the debugger)
    registers.json  {"r0": 0, ..., "pc": 123}
    backtrace.json  [{"level", "pc", "function", "file", "line"}]
    console.txt     the console's last 16 KiB at the instant
    trace.json      [{"address", "symbol": "func+off"}], oldest first, the last 256 blocks
    coverage.info   LCOV of what was collected since coverage (re)started
    telemetry.json  {"host": [samples], "session": {metrics at the instant}}

Reading never trusts a size it has not checked: the archive's size, the member count, each
member's declared size against its own limit before a byte is inflated, and the inflated
bytes again (a member that inflates past what it declared is refused).
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

FORMAT = "machineserver-capsule"
FORMAT_VERSION = 1

MANIFEST = "manifest.json"
# part name -> member name, in the order they are written
MEMBERS: dict[str, str] = {
    "snapshot": "snapshot.bin",
    "program": "program.bin",
    "registers": "registers.json",
    "backtrace": "backtrace.json",
    "console": "console.txt",
    "trace": "trace.json",
    "coverage": "coverage.info",
    "telemetry": "telemetry.json",
}
CONSOLE_TAIL = 16 * 1024
TRACE_BLOCKS = 256
# the most each member may inflate to (the snapshot and program by the server's limits)
MEMBER_LIMITS: dict[str, int] = {
    MANIFEST: 1 << 20,
    "registers.json": 64 * 1024,
    "backtrace.json": 256 * 1024,
    "console.txt": CONSOLE_TAIL + 1024,
    "trace.json": 256 * 1024,
    "coverage.info": 8 << 20,
    "telemetry.json": 256 * 1024,
}
MAX_MEMBERS = len(MEMBERS) + 1


class ArchiveError(ValueError):
    """Not a capsule, or a malformed one: the message says what is wrong."""


class NewerFormat(ArchiveError):
    """A capsule written in a format version this server does not read."""


@dataclass
class Capsule:
    """A capsule's contents: the manifest and its members' bytes (by member name)."""

    manifest: dict[str, Any]
    members: dict[str, bytes] = field(default_factory=dict)

    def part(self, name: str) -> bytes | None:
        member = self.manifest.get("parts", {}).get(name)
        return self.members.get(member) if isinstance(member, str) else None


def write(manifest: Mapping[str, Any], parts: Mapping[str, bytes]) -> bytes:
    """The archive of ``parts`` (part name -> bytes; names from :data:`MEMBERS`); the
    manifest gets ``parts`` and each member's ``sha256``."""
    doc = dict(manifest)
    doc["parts"] = {name: MEMBERS[name] for name in MEMBERS if name in parts}
    doc["sha256"] = {MEMBERS[name]: hashlib.sha256(data).hexdigest() for name, data in parts.items()}
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as zf:
        zf.writestr(MANIFEST, json.dumps(doc, indent=1, sort_keys=True))
        for name, member in MEMBERS.items():
            if name in parts:
                zf.writestr(member, parts[name])
    return out.getvalue()


def read(data: bytes, max_member_bytes: int) -> Capsule:
    """The capsule in ``data``, checked: a zip of known members only, each within its
    limit (the snapshot and program within ``max_member_bytes``), a manifest of this
    format, every member matching the manifest's sha256. ArchiveError saying why
    (NewerFormat for a format version this server does not read)."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise ArchiveError(f"not a capsule archive (a zip): {exc}") from None
    with zf:
        infos = zf.infolist()
        if len(infos) > MAX_MEMBERS:
            raise ArchiveError(f"{len(infos)} members; a capsule has at most {MAX_MEMBERS}")
        known = {MANIFEST, *MEMBERS.values()}
        by_name: dict[str, zipfile.ZipInfo] = {}
        for info in infos:
            if info.filename not in known:
                raise ArchiveError(f"unexpected member {info.filename[:80]!r}")
            if info.filename in by_name:
                raise ArchiveError(f"member {info.filename} appears twice")
            if info.flag_bits & 0x1:
                raise ArchiveError(f"member {info.filename} is encrypted")
            limit = MEMBER_LIMITS.get(info.filename, max_member_bytes)
            if info.file_size > limit:
                raise ArchiveError(f"member {info.filename} is {info.file_size} bytes; at most {limit}")
            by_name[info.filename] = info
        if MANIFEST not in by_name:
            raise ArchiveError("no manifest.json: not a capsule")
        manifest = _manifest(_member(zf, by_name[MANIFEST], MEMBER_LIMITS[MANIFEST]))
        sums = manifest["sha256"]
        members: dict[str, bytes] = {}
        for name, member in manifest["parts"].items():
            if member not in by_name:
                raise ArchiveError(f"the manifest lists {member} ({name}) but the archive lacks it")
            blob = _member(zf, by_name[member], MEMBER_LIMITS.get(member, max_member_bytes))
            if hashlib.sha256(blob).hexdigest() != sums.get(member):
                raise ArchiveError(f"{member} does not match its sha256 in the manifest (tampered or damaged)")
            members[member] = blob
    return Capsule(manifest, members)


def _member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int) -> bytes:
    """A member's bytes, inflated no further than ``limit`` + 1 whatever its header says."""
    try:
        with zf.open(info) as f:
            blob = f.read(limit + 1)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, ValueError, OSError, EOFError) as exc:
        raise ArchiveError(f"member {info.filename} is unreadable: {exc}") from None
    except Exception as exc:  # zlib.error and the like from a damaged stream
        raise ArchiveError(f"member {info.filename} is unreadable: {exc.__class__.__name__}") from None
    if len(blob) > limit or len(blob) != info.file_size:
        raise ArchiveError(f"member {info.filename} inflates to more than it declares")
    return blob


_STR_FIELDS = ("server_version", "backend", "backend_version", "snapshot_format", "board", "board_yaml")
_CAPSULE_STR = ("name", "session", "trigger", "reason", "test_id", "create_time")
_CAPSULE_INT = ("pc", "instructions", "virtual_time_ns")
TRIGGERS = ("fault", "assert", "explicit", "test_failure")


def _manifest(raw: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):
        raise ArchiveError("manifest.json is not JSON") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ArchiveError(f"manifest.json is not a {FORMAT} manifest")
    version = doc.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise ArchiveError("manifest.json: format_version is not a number")
    if version != FORMAT_VERSION:
        raise NewerFormat(f"capsule format version {version}; this server reads version {FORMAT_VERSION}")
    for key in _STR_FIELDS:
        _typed(doc, key, str)
    cap = _typed(doc, "capsule", dict)
    for key in _CAPSULE_STR:
        _typed(cap, key, str, f"capsule.{key}")
    for key in _CAPSULE_INT:
        value = _typed(cap, key, int, f"capsule.{key}")
        if not 0 <= value < 1 << 64:
            raise ArchiveError(f"manifest.json: capsule.{key} is out of range")
    if cap["trigger"] not in TRIGGERS:
        raise ArchiveError(f"manifest.json: capsule.trigger {cap['trigger'][:32]!r} is not one of {', '.join(TRIGGERS)}")
    program = _typed(doc, "program", dict)
    for key in ("name", "sha256", "format", "file"):
        _typed(program, key, str, f"program.{key}")
    _typed(program, "load_address", int, "program.load_address")
    _typed(doc, "session_options", dict)
    for key in ("parts", "missing", "sha256"):
        table = _typed(doc, key, dict)
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in table.items()):
            raise ArchiveError(f"manifest.json: {key} must map names to strings")
    for name, member in doc["parts"].items():
        if MEMBERS.get(name) != member:
            raise ArchiveError(f"manifest.json: part {name[:32]!r} is not {MEMBERS.get(name, 'a known part')}")
    return doc


_KINDS = {str: "a string", int: "an integer", dict: "an object"}


def _typed(doc: Mapping[str, Any], key: str, kind: type, label: str = "") -> Any:
    value = doc.get(key)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ArchiveError(f"manifest.json: {label or key} is missing or not {_KINDS.get(kind, kind.__name__)}")
    return value
