"""Coverage results in the formats CI tools read: LCOV tracefiles (lcov, genhtml),
HTML (genhtml's report when lcov is installed, else a plain one of ours) as .tar.gz,
Cobertura XML (GitLab, Jenkins) and JSON."""

from __future__ import annotations

import asyncio
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
            if path.is_file():
                tar.add(path, arcname=f"coverage-html/{path.relative_to(directory)}", recursive=False)
    return buf.getvalue()


def _simple_html(result: CoverageResult, source_root: str) -> str:
    t = result.totals
    rows = []
    for f in result.files:
        c = f.counts
        unhit = ", ".join(str(n) for n, cnt in sorted(f.lines.items()) if not cnt) or "-"
        fns = ", ".join(f"{html.escape(fn.name)}: {fn.count}" for fn in f.functions) or "-"
        rows.append(
            f"<tr><td>{html.escape(source_path(f.path, source_root))}</td>"
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


def _missing_sources(result: CoverageResult, source_root: str) -> list[str]:
    """Files genhtml could not read (relative paths resolve against the server's working
    directory, as genhtml's do)."""
    return [f.path for f in result.files if not Path(source_path(f.path, source_root)).is_file()]


async def html_archive(result: CoverageResult, source_root: str = "") -> tuple[bytes, str]:
    """A .tar.gz of an HTML report (folder ``coverage-html/``, with a README.txt saying
    which generator made it) and the generator's name."""
    genhtml = shutil.which("genhtml")
    with tempfile.TemporaryDirectory(prefix="ms-cov-") as tmp:
        work = Path(tmp)
        if genhtml is None:
            readme = "Generated by MachineServer's built-in HTML writer (genhtml is not installed).\n\n"
            (work / "out").mkdir()
            (work / "out" / "index.html").write_text(_simple_html(result, source_root))
            return _tar_dir(work / "out", {"README.txt": readme + APPROXIMATIONS}), "builtin"
        info = work / "coverage.info"
        info.write_text(lcov(result, source_root))
        out = work / "out"
        args = [genhtml, "--quiet", "--branch-coverage", "--function-coverage", "-o", str(out),
                "--title", f"programs/{result.program}", str(info)]
        missing = await asyncio.to_thread(_missing_sources, result, source_root)
        if missing:
            args.insert(1, "--no-source")
        proc = await asyncio.create_subprocess_exec(
            *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
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
        if missing:
            readme += ("Source files were not found on the server (give source_root), so pages "
                       "show counts without source text: " + ", ".join(missing) + "\n")
        archive = await asyncio.to_thread(_tar_dir, out, {"README.txt": readme + "\n" + APPROXIMATIONS})
        return archive, "genhtml"
