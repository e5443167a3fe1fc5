"""Coverage results in the formats CI tools read: LCOV tracefiles (lcov, genhtml),
HTML (genhtml's report when lcov is installed, else a plain one of ours) as .tar.gz,
Cobertura XML (GitLab, Jenkins) and JSON."""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import html
import io
import json
import os
import posixpath
import shutil
import tarfile
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from xml.etree import ElementTree as ET

from machineserver.server.core.coverage_mapping import CoverageResult, FileResult, percent_text
from machineserver.server.core.errors import Unavailable

GENHTML_TIMEOUT_S = 120.0

APPROXIMATIONS = """\
How executed code maps to source (MachineServer coverage):
- Counts are execution counts. The emulator reports executed blocks (start, size,
  count); an address's count is the sum of the counts of the blocks holding it: how
  often the instruction there ran. A program that runs the same way on the unicorn and
  qemu backends gets the same counts on both (one that waits for interrupts may not run
  the same way). A machine halted at an instruction (a breakpoint, the semihosting trap
  of the program's exit) has not executed it.
- A line's count is the largest count of the addresses the DWARF line table gives it
  (e.g. a for loop's condition: 11 for 10 iterations); hit when any of them ran.
- A function is hit when its entry address ran; its count is that address's count.
- Branches are the conditional branch instructions (capstone); "-" = the branch never
  ran. unicorn: "taken" and "not taken" are counted transfers, exact. qemu: derived from
  execution counts and the control flow (not taken = count of the fall-through when
  nothing else goes there; taken = count of the target minus what falls into it, when
  this branch is the only jump there; the other = the branch's count minus that): exact
  for if/else, loops and &&/|| chains. When neither successor is reached only that way
  (a target other jumps share and a fall-through that is a jump target too, a target
  right after a call, a function with a jump table), each is the count of the blocks
  starting at it, capped at the branch's count: entries from elsewhere count too.
- Not exact on qemu: a block left in its middle (a watchpoint hit, a guest fault that a
  handler deals with, an MMIO access under icount) counts as run whole and its rest runs
  again, so the instructions from that point to the block's end count once more each
  time. Read while the machine runs, counts are a moment's.
- A backend that records first hits only reports counts of 1.
- Percentages of nothing (0 of 0: a file without functions or branches) read 100 in
  numbers (JSON, summaries, Cobertura rate 1) and "-" in text, as genhtml shows them.
"""


class ExportFormat(enum.StrEnum):
    LCOV = "lcov"
    HTML = "html"
    COBERTURA = "cobertura"
    JSON = "json"


CONTENT_TYPES = {
    ExportFormat.LCOV: "text/plain",
    ExportFormat.HTML: "application/gzip",
    ExportFormat.COBERTURA: "application/xml",
    ExportFormat.JSON: "application/json",
}


def source_path(path: str, source_root: str) -> str:
    if not source_root or os.path.isabs(path):
        return path
    return os.path.join(source_root, path)


# --------------------------------------------------------------------------- LCOV


def lcov(result: CoverageResult, source_root: str = "", test_name: str = "") -> str:
    out: list[str] = []
    tn = "".join(c if c.isalnum() or c == "_" else "_" for c in (test_name or result.program))
    for f in result.files:
        out.append(f"TN:{tn}")
        out.append(f"SF:{source_path(f.path, source_root)}")
        functions = sorted(f.functions, key=lambda fn: (fn.line, fn.name))
        for fn in functions:
            out.append(f"FN:{fn.line},{fn.name}")
        for fn in functions:
            out.append(f"FNDA:{fn.count},{fn.name}")
        out.append(f"FNF:{len(functions)}")
        out.append(f"FNH:{sum(1 for fn in functions if fn.hit)}")
        block_of: dict[int, int] = {}
        for b in sorted(f.branches, key=lambda b: (b.line, b.address)):
            block = block_of.setdefault(b.line, 0)
            block_of[b.line] = block + 1
            for i, taken in enumerate((b.taken, b.not_taken)):
                out.append(f"BRDA:{b.line},{block},{i},{'-' if taken is None else taken}")
        counts = f.counts
        out.append(f"BRF:{counts.branches_total}")
        out.append(f"BRH:{counts.branches_hit}")
        for line, count in sorted(f.lines.items()):
            out.append(f"DA:{line},{count}")
        out.append(f"LF:{counts.lines_total}")
        out.append(f"LH:{counts.lines_hit}")
        out.append("end_of_record")
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- JSON


def to_json(result: CoverageResult, source_root: str = "") -> str:
    def file_obj(f: FileResult) -> dict[str, object]:
        return {
            "path": source_path(f.path, source_root),
            "counts": f.counts.to_dict(),
            "functions": [
                {"name": fn.name, "line": fn.line, "address": fn.address, "count": fn.count, "hit": fn.hit}
                for fn in sorted(f.functions, key=lambda fn: fn.line)
            ],
            "lines": [{"line": line, "count": count, "hit": count > 0} for line, count in sorted(f.lines.items())],
            "branches": [
                {"line": b.line, "address": b.address, "target": b.target, "fallthrough": b.fallthrough,
                 "executed": b.taken is not None, "taken": b.taken, "not_taken": b.not_taken}
                for b in sorted(f.branches, key=lambda b: b.address)
            ],
        }

    doc = {
        "format": "machineserver-coverage/1",
        "report": result.name,
        "program": f"programs/{result.program}",
        "sessions": [f"sessions/{s}" for s in result.sessions],
        "totals": result.totals.to_dict(),
        "files": [file_obj(f) for f in result.files],
    }
    return json.dumps(doc, indent=1) + "\n"


# --------------------------------------------------------------------------- Cobertura


def _rate(hit: int, total: int) -> str:
    return f"{hit / total:.4f}" if total else "1"


def cobertura(result: CoverageResult, source_root: str = "") -> str:
    totals = result.totals
    root = ET.Element("coverage", {
        "line-rate": _rate(totals.lines_hit, totals.lines_total),
        "branch-rate": _rate(totals.branches_hit, totals.branches_total),
        "lines-covered": str(totals.lines_hit),
        "lines-valid": str(totals.lines_total),
        "branches-covered": str(totals.branches_hit),
        "branches-valid": str(totals.branches_total),
        "complexity": "0",
        "version": "machineserver",
        "timestamp": str(int(time.time() * 1000)),
    })
    sources = ET.SubElement(root, "sources")
    ET.SubElement(sources, "source").text = source_root or "."
    packages = ET.SubElement(root, "packages")
    by_dir: dict[str, list[FileResult]] = {}
    for f in result.files:
        by_dir.setdefault(posixpath.dirname(f.path) or ".", []).append(f)
    for directory, files in sorted(by_dir.items()):
        pc = sum((f.counts for f in files[1:]), files[0].counts)
        package = ET.SubElement(packages, "package", {
            "name": directory.strip("/").replace("/", ".") or ".",
            "line-rate": _rate(pc.lines_hit, pc.lines_total),
            "branch-rate": _rate(pc.branches_hit, pc.branches_total),
            "complexity": "0",
        })
        classes = ET.SubElement(package, "classes")
        for f in files:
            c = f.counts
            cls = ET.SubElement(classes, "class", {
                "name": posixpath.basename(f.path),
                "filename": f.path,
                "line-rate": _rate(c.lines_hit, c.lines_total),
                "branch-rate": _rate(c.branches_hit, c.branches_total),
                "complexity": "0",
            })
            methods = ET.SubElement(cls, "methods")
            for fn in sorted(f.functions, key=lambda fn: fn.line):
                m = ET.SubElement(methods, "method", {
                    "name": fn.name, "signature": "", "line-rate": "1" if fn.hit else "0",
                    "branch-rate": "1", "complexity": "0",
                })
                ml = ET.SubElement(m, "lines")
                ET.SubElement(ml, "line", {"number": str(fn.line), "hits": str(fn.count), "branch": "false"})
            lines = ET.SubElement(cls, "lines")
            branches_by_line: dict[int, list[int]] = {}
            for b in f.branches:
                hit_total = branches_by_line.setdefault(b.line, [0, 0])
                hit_total[0] += b.outcomes_hit
                hit_total[1] += 2
            for line, count in sorted(f.lines.items()):
                attrs = {"number": str(line), "hits": str(count), "branch": "false"}
                if line in branches_by_line:
                    hit, total = branches_by_line[line]
                    attrs["branch"] = "true"
                    attrs["condition-coverage"] = f"{round(100 * hit / total)}% ({hit}/{total})"
                ET.SubElement(lines, "line", attrs)
    ET.indent(root)
    body = ET.tostring(root, encoding="unicode")
    return (
        '<?xml version="1.0" ?>\n'
        '<!DOCTYPE coverage SYSTEM "http://cobertura.sourceforge.net/xml/coverage-04.dtd">\n'
        + body + "\n"
    )


# --------------------------------------------------------------------------- HTML
#
# Source text comes only from ``sources`` (path as the line table names it -> bytes, or
# None: not provided), which the caller takes from a client's source bundle or a
# configured source root (core.sources). Nothing here reads a path a program or a client
# names: genhtml reads copies written under our own temporary folder.

NOT_PROVIDED = "source not provided"
NOT_PROVIDED_HELP = (
    "source not provided: upload the program with its sources (UploadProgramRequest."
    "sources_chunk, msctl program upload --sources) or give them with the export "
    "(ExportCoverageRequest.sources, msctl coverage export --sources)"
)
Sources = Mapping[str, bytes | None]


def _tar_dir(directory: Path, extra: dict[str, str]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, text in extra.items():
            data = text.encode()
            info = tarfile.TarInfo(f"coverage-html/{name}")
            info.size = len(data)
            info.mtime = int(time.time())
            tar.addfile(info, io.BytesIO(data))
        for path in sorted(directory.rglob("*")):
            if path.is_file() and not path.is_symlink():
                tar.add(path, arcname=f"coverage-html/{path.relative_to(directory)}", recursive=False)
    return buf.getvalue()


def _safe_relative(path: str, index: int, taken: set[str]) -> str:
    """A relative path under our temporary folder for a line-table path: components kept
    where they are plain names ("..", empty and over-long ones replaced), unique."""
    parts = []
    for part in path.replace("\\", "/").split("/"):
        if part in ("", "."):
            continue
        parts.append("__up__" if part == ".." else part[:120])
    rel = "/".join(parts) or f"file{index}"
    if rel in taken:
        rel = f"dup{index}/{rel}"
    taken.add(rel)
    return rel


def _placeholder(f: FileResult) -> str:
    """What a page shows for a file whose source was not provided: the message on every
    line (genhtml needs the lines its counts are on)."""
    last = max([*f.lines, *(fn.line for fn in f.functions), *(b.line for b in f.branches), 1])
    return "\n".join(f"/* {NOT_PROVIDED} */" for _ in range(last)) + "\n"


def _decode(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


def _file_page(f: FileResult, source: bytes | None) -> str:
    c = f.counts
    branches: dict[int, list[str]] = {}
    for b in sorted(f.branches, key=lambda b: b.address):
        taken = "-" if b.taken is None else str(b.taken)
        not_taken = "-" if b.not_taken is None else str(b.not_taken)
        branches.setdefault(b.line, []).append(f"[{taken}/{not_taken}]")
    head = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(f.path)}</title></head><body>"
        f"<h1>{html.escape(f.path)}</h1>"
        f"<p>Lines {c.lines_hit}/{c.lines_total} ({percent_text(c.lines_hit, c.lines_total)}), functions "
        f"{c.functions_hit}/{c.functions_total}, branches {c.branches_hit}/{c.branches_total}. "
        "<a href='../index.html'>index</a></p>"
    )
    rows = []
    if source is None:
        head += f"<p class='missing'><b>{html.escape(NOT_PROVIDED_HELP)}</b></p>"
        head += "<table border='1'><tr><th>Line</th><th>Count</th><th>Branches</th></tr>"
        for line, count in sorted(f.lines.items()):
            rows.append(f"<tr><td>{line}</td><td>{count}</td><td>{' '.join(branches.get(line, []))}</td></tr>")
    else:
        head += "<table border='0'><tr><th>Line</th><th>Count</th><th>Branches</th><th>Source</th></tr>"
        for n, text in enumerate(_decode(source).splitlines(), start=1):
            hits = f.lines.get(n)
            rows.append(
                f"<tr><td>{n}</td><td>{'' if hits is None else hits}</td>"
                f"<td>{' '.join(branches.get(n, []))}</td><td><pre>{html.escape(text)}</pre></td></tr>"
            )
    return head + "".join(rows) + "</table></body></html>\n"


def _simple_html(result: CoverageResult, pages: dict[str, str], sources: Sources) -> str:
    t = result.totals
    rows = []
    for f in result.files:
        c = f.counts
        unhit = ", ".join(str(n) for n, cnt in sorted(f.lines.items()) if not cnt) or "-"
        fns = ", ".join(f"{html.escape(fn.name)}: {fn.count}" for fn in f.functions) or "-"
        note = "" if sources.get(f.path) is not None else f" ({NOT_PROVIDED})"
        rows.append(
            f"<tr><td><a href='{html.escape(pages[f.path])}'>{html.escape(f.path)}</a>{note}</td>"
            f"<td>{c.lines_hit}/{c.lines_total} ({percent_text(c.lines_hit, c.lines_total)})</td>"
            f"<td>{c.functions_hit}/{c.functions_total} ({percent_text(c.functions_hit, c.functions_total)})</td>"
            f"<td>{c.branches_hit}/{c.branches_total} ({percent_text(c.branches_hit, c.branches_total)})</td>"
            f"<td>{unhit}</td><td>{fns}</td></tr>"
        )
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>Coverage</title></head><body>"
        f"<h1>Coverage of programs/{html.escape(result.program)}</h1>"
        f"<p>Lines {t.lines_hit}/{t.lines_total} ({percent_text(t.lines_hit, t.lines_total)}), functions "
        f"{t.functions_hit}/{t.functions_total} ({percent_text(t.functions_hit, t.functions_total)}), branches "
        f"{t.branches_hit}/{t.branches_total} ({percent_text(t.branches_hit, t.branches_total)})</p>"
        "<table border='1'><tr><th>File</th><th>Lines</th><th>Functions</th><th>Branches</th>"
        "<th>Lines not hit</th><th>Function calls</th></tr>"
        + "".join(rows) + "</table></body></html>\n"
    )


def _readme_sources(result: CoverageResult, sources: Sources) -> str:
    missing = [f.path for f in result.files if sources.get(f.path) is None]
    if not missing:
        return "Source text: from the sources the client provided.\n"
    return (f"Source text: {NOT_PROVIDED_HELP}.\nFiles shown with line counts only ({NOT_PROVIDED}):\n"
            + "".join(f"  {p}\n" for p in missing))


def _write_builtin(result: CoverageResult, sources: Sources, out: Path) -> None:
    (out / "files").mkdir(parents=True)
    pages: dict[str, str] = {}
    for i, f in enumerate(result.files):
        pages[f.path] = f"files/{i}.html"
        (out / pages[f.path]).write_text(_file_page(f, sources.get(f.path)))
    (out / "index.html").write_text(_simple_html(result, pages, sources))


def _write_sources(result: CoverageResult, sources: Sources, root: Path) -> CoverageResult:
    """The sources (or placeholders) written under ``root``, and the result with its paths
    pointing at them."""
    taken: set[str] = set()
    files = []
    for i, f in enumerate(result.files):
        rel = _safe_relative(f.path, i, taken)
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        source = sources.get(f.path)
        if source is None:
            target.write_text(_placeholder(f))
        else:
            target.write_bytes(source)
        files.append(dataclasses.replace(f, path=str(target)))
    return dataclasses.replace(result, files=files)


async def html_archive(result: CoverageResult, sources: Sources | None = None,
                       scratch: Path | None = None) -> tuple[bytes, str]:
    """A .tar.gz of an HTML report (folder ``coverage-html/``, with a README.txt saying
    which generator made it and where the source text came from) and the generator's
    name. ``sources``: path -> text, None where not provided (see the section comment).
    ``scratch``: an existing folder for the work folder (the server's, in its data
    directory: a server writes nothing outside it); None: the system's temporary folder."""
    sources = sources or {}
    genhtml = shutil.which("genhtml")
    with tempfile.TemporaryDirectory(prefix="ms-cov-", dir=scratch) as tmp:
        work = Path(tmp)
        out = work / "out"
        if genhtml is None:
            readme = "Generated by MachineServer's built-in HTML writer (genhtml is not installed).\n"
            await asyncio.to_thread(_write_builtin, result, sources, out)
            extra = {"README.txt": readme + _readme_sources(result, sources) + "\n" + APPROXIMATIONS}
            return await asyncio.to_thread(_tar_dir, out, extra), "builtin"
        src_root = work / "src"
        staged = await asyncio.to_thread(_write_sources, result, sources, src_root)
        info = work / "coverage.info"
        info.write_text(lcov(staged))
        args = [genhtml, "--quiet", "--branch-coverage", "--function-coverage", "-o", str(out),
                "--prefix", str(src_root), "--title", f"programs/{result.program}", str(info)]
        proc = await asyncio.create_subprocess_exec(
            *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=str(work),
        )
        try:
            _, err = await asyncio.wait_for(proc.communicate(), GENHTML_TIMEOUT_S)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise Unavailable(f"genhtml did not finish in {GENHTML_TIMEOUT_S:.0f} s") from None
        if proc.returncode != 0:
            raise Unavailable(f"genhtml failed: {err.decode(errors='replace').strip()[-500:]}")
        readme = "Generated by genhtml (lcov) from MachineServer's LCOV tracefile.\n"
        extra = {"README.txt": readme + _readme_sources(result, sources) + "\n" + APPROXIMATIONS}
        archive = await asyncio.to_thread(_tar_dir, out, extra)
        return archive, "genhtml"
