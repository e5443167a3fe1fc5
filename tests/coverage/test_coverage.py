"""Coverage end to end through the SDK: collection in sessions, the mapping onto the
test firmware's source (tests/firmware/src/coverage.c), exports read by the real tools
(lcov, genhtml), Cobertura XML, JSON, merges and bad inputs; and the same counts on both
backends (a differential test on coverage.c and crc32.c, Arm and RISC-V).

The expected counts below are derived by hand from coverage.c (its header comment and
its statements at -O0) and crc32.c: the line numbers are those of the files.
"""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import tarfile
from pathlib import Path
from xml.etree import ElementTree as ET

import pytest

from machineserver.sdk import AsyncClient, errors
from machineserver.server.drivers.base import Feature, features_of
from machineserver.v1 import common_pb2 as cpb
from tests.helpers.backends import require_backend, require_qemu_plugin
from tests.helpers.firmware import FIRMWARE, firmware
from tests.helpers.tools import find_tool, require_tool

BOARD = "mps2-an385"
FILE = "src/coverage.c"
# every line with code (the DWARF line table's rows for the file) and how often it runs:
# called_three_times' three lines 3x, the for line 11x (its condition), its body 10x
LINE_COUNTS = {24: 0, 25: 0, 26: 0, 29: 3, 30: 3, 31: 3, 34: 1, 35: 1, 36: 1, 37: 1, 39: 0,
               41: 1, 42: 11, 43: 10, 45: 1, 46: 1, 47: 1, 48: 1, 49: 1, 50: 1, 51: 1}
HIT_LINES = {n for n, c in LINE_COUNTS.items() if c}
UNHIT_LINES = {n for n, c in LINE_COUNTS.items() if not c}  # never_called's body; the else
HIT_FUNCTIONS = {"main", "called_three_times"}
UNHIT_FUNCTIONS = {"never_called"}
IF_LINE, LOOP_LINE = 36, 42
# crc32.c: fill's loop body 4096x; per byte (300 rounds of 4096) and per bit (8 per byte)
CRC32_LINE_COUNTS = {22: 4096, 23: 4096, 30: 300 * 4096, 32: 8 * 300 * 4096}


def require_coverage(backend: str, board: str = BOARD) -> None:
    """Skip (fail under scripts/test) unless ``backend`` can collect coverage here."""
    require_backend(backend, board)
    if backend == "qemu":
        require_qemu_plugin()


@pytest.fixture(params=["unicorn", "qemu"])
def backend(request: pytest.FixtureRequest) -> str:
    require_coverage(str(request.param))
    return str(request.param)


async def upload(client: AsyncClient, program: str = "coverage", ext: str = "elf", board: str = BOARD) -> str:
    return str((await client.upload_program(firmware(board, program, ext))).program.name)


async def covered_session(client: AsyncClient, backend: str, program: str = "", board: str = BOARD) -> str:
    program = program or await upload(client, board=board)
    s = (await client.sessions.create_session(
        board_template=board, program=program, backend=backend, power_on=True,
        options={"coverage": True},
    )).session
    assert s.options.coverage
    await client.coverage.start_coverage(name=s.name)
    return str(s.name)


async def run_to_exit(client: AsyncClient, name: str) -> None:
    stop = (await client.debug.continue_(name=name, wait=True, timeout=60)).stop
    assert stop.reason == cpb.STOP_REASON_EXIT and stop.exit_code == 0, stop


async def collect(client: AsyncClient, backend: str, program: str = "", board: str = BOARD) -> tuple[str, str]:
    name = await covered_session(client, backend, program, board)
    await run_to_exit(client, name)
    report = (await client.coverage.stop_coverage(name=name)).report
    assert report.name.startswith("coverageReports/") and report.sessions == [name]
    return name, str(report.name)


async def export(client: AsyncClient, name: str, fmt: str, source_root: str = "") -> tuple[bytes, str]:
    msgs = [m async for m in client.coverage.export_coverage(name=name, format=fmt, source_root=source_root)]
    assert msgs and msgs[0].content_type
    assert all(not m.content_type for m in msgs[1:])
    return b"".join(m.chunk for m in msgs), msgs[0].content_type


async def json_report(client: AsyncClient, name: str) -> dict:  # type: ignore[type-arg]
    data, ctype = await export(client, name, "COVERAGE_FORMAT_JSON")
    assert ctype == "application/json"
    return json.loads(data)  # type: ignore[no-any-return]


def file_of(doc: dict, path: str = FILE) -> dict:  # type: ignore[type-arg]
    return next(f for f in doc["files"] if f["path"] == path)


def check_expected(doc: dict, runs: int = 1) -> None:  # type: ignore[type-arg]
    """The counts of ``runs`` runs of coverage.c to its end, on any backend."""
    f = file_of(doc)
    lines = {ln["line"]: ln["count"] for ln in f["lines"]}
    assert lines == {n: c * runs for n, c in LINE_COUNTS.items()}
    fns = {fn["name"]: fn for fn in f["functions"]}
    assert set(fns) == HIT_FUNCTIONS | UNHIT_FUNCTIONS
    assert {n for n, fn in fns.items() if fn["hit"]} == HIT_FUNCTIONS
    assert fns["never_called"]["count"] == 0 and fns["never_called"]["line"] == 24
    assert fns["called_three_times"]["count"] == 3 * runs and fns["main"]["count"] == runs
    branches = {b["line"]: b for b in f["branches"]}
    assert set(branches) == {IF_LINE, LOOP_LINE}  # the if and the loop condition
    if_branch, loop = branches[IF_LINE], branches[LOOP_LINE]
    # flag is always 1: `beq else` is never taken, the fall-through (then) always is
    assert if_branch["executed"] and (if_branch["taken"], if_branch["not_taken"]) == (0, runs)
    # back to the body 10 times, out of the loop once
    assert (loop["taken"], loop["not_taken"]) == (10 * runs, runs)
    c = f["counts"]
    assert (c["lines_hit"], c["lines_total"]) == (len(HIT_LINES), len(HIT_LINES | UNHIT_LINES))
    assert (c["functions_hit"], c["functions_total"]) == (2, 3)
    assert (c["branches_hit"], c["branches_total"]) == (3, 4)


async def test_collect_map_and_summarize(client: AsyncClient, backend: str) -> None:
    name, report = await collect(client, backend)
    for source in (report, name):  # the stored report and the session's last collection
        check_expected(await json_report(client, source))
    summary = await client.coverage.get_coverage_summary(name=report)
    per_file = {f.path: f.counts for f in summary.files}
    c = per_file[FILE]
    assert (c.lines_hit, c.lines_total, c.functions_hit, c.functions_total) == (17, 21, 2, 3)
    assert (c.branches_hit, c.branches_total) == (3, 4)
    assert c.line_percent == pytest.approx(100 * 17 / 21, abs=0.01)
    assert summary.totals.lines_total >= c.lines_total
    assert summary.totals.lines_hit == sum(f.counts.lines_hit for f in summary.files)
    listed = (await client.coverage.list_coverage_reports()).reports
    assert [r.name for r in listed] == [report]
    assert listed[0].totals.lines_hit == summary.totals.lines_hit
    assert listed[0].program.startswith("programs/")


def tool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120)


async def test_lcov_is_read_by_lcov_and_genhtml(client: AsyncClient, backend: str, tmp_path: Path) -> None:
    require_tool("lcov")
    require_tool("genhtml")
    _, report = await collect(client, backend)
    data, ctype = await export(client, report, "COVERAGE_FORMAT_LCOV", source_root=str(FIRMWARE))
    assert ctype == "text/plain"
    text = data.decode()
    assert f"SF:{FIRMWARE / FILE}\n" in text
    record = text.split(f"SF:{FIRMWARE / FILE}\n")[1].split("end_of_record")[0]
    assert "FN:24,never_called" in record and "FNDA:0,never_called" in record
    assert "DA:39,0" in record and "DA:37," in record and "DA:37,0" not in record
    assert "FNF:3" in record and "FNH:2" in record and "BRF:4" in record and "BRH:3" in record
    info = tmp_path / "coverage.info"
    info.write_bytes(data)
    summary = await asyncio.to_thread(tool, "lcov", "--summary", str(info), "--rc", "lcov_branch_coverage=1")
    assert summary.returncode == 0, summary.stderr
    out = summary.stdout + summary.stderr
    assert "WARNING" not in out.upper().replace("WARNINGS", ""), out
    assert "lines" in out and "functions" in out and "branches" in out
    html = await asyncio.to_thread(tool, "genhtml", "--branch-coverage", "-o", str(tmp_path / "html"), str(info))
    assert html.returncode == 0, html.stderr
    assert "WARNING" not in html.stderr.upper() and "ERROR" not in html.stderr.upper(), html.stderr
    assert (tmp_path / "html" / "index.html").is_file()


async def test_html_cobertura_and_json_exports(client: AsyncClient, backend: str) -> None:
    _, report = await collect(client, backend)
    data, ctype = await export(client, report, "COVERAGE_FORMAT_HTML", source_root=str(FIRMWARE))
    assert ctype == "application/gzip"
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        names = tar.getnames()
        readme = tar.extractfile("coverage-html/README.txt").read().decode()  # type: ignore[union-attr]
    assert "coverage-html/index.html" in names
    assert ("genhtml" in readme) == (find_tool("genhtml") is not None)

    data, ctype = await export(client, report, "COVERAGE_FORMAT_COBERTURA")
    assert ctype == "application/xml"
    root = ET.fromstring(data)
    assert root.tag == "coverage"
    cls = next(c for c in root.iter("class") if c.get("filename") == FILE)
    assert any(p.find("classes/class[@filename='src/coverage.c']") is not None
               for p in root.findall("packages/package"))
    lines = {int(ln.get("number", 0)): ln for ln in cls.findall("lines/line")}
    assert set(lines) == HIT_LINES | UNHIT_LINES
    assert {n for n, ln in lines.items() if int(ln.get("hits", 0))} == HIT_LINES
    assert lines[IF_LINE].get("branch") == "true" and lines[IF_LINE].get("condition-coverage") == "50% (1/2)"
    assert lines[LOOP_LINE].get("condition-coverage") == "100% (2/2)"
    methods = {m.get("name") for m in cls.findall("methods/method")}
    assert methods == HIT_FUNCTIONS | UNHIT_FUNCTIONS

    doc = json.loads((await export(client, report, "COVERAGE_FORMAT_JSON", source_root="/src/fw"))[0])
    assert file_of(doc, "/src/fw/" + FILE)["counts"]["lines_total"] == 21


async def test_merge_two_runs(client: AsyncClient, backend: str) -> None:
    program = await upload(client)
    first_session, first = await collect(client, backend, program)
    second_session, second = await collect(client, backend, program)
    merged = (await client.coverage.merge_coverage(names=[first, second_session])).report
    assert merged.name not in (first, second)
    assert set(merged.sessions) == {first_session, second_session}
    check_expected(await json_report(client, merged.name), runs=2)
    assert len((await client.coverage.list_coverage_reports()).reports) == 3


async def test_coverage_survives_breakpoints_and_pause(client: AsyncClient, backend: str) -> None:
    name = await covered_session(client, backend)
    bp = (await client.debug.set_breakpoint(name=name, location={"symbol": "called_three_times"})).breakpoint
    stop = (await client.debug.continue_(name=name, wait=True, timeout=60)).stop
    assert stop.reason == cpb.STOP_REASON_BREAKPOINT
    # halted at the entry of the first call: what ran so far, exactly; the instruction the
    # machine is halted at has not run (called_three_times: 0, its first line too)
    mid = file_of(await json_report(client, name))
    lines = {ln["line"]: ln["count"] for ln in mid["lines"]}
    assert lines == {**dict.fromkeys(LINE_COUNTS, 0), 34: 1, 35: 1, 36: 1, 37: 1, 41: 1, 42: 11, 43: 10, 45: 1, 46: 1}
    fns = {fn["name"]: fn["count"] for fn in mid["functions"]}
    assert fns == {"main": 1, "called_three_times": 0, "never_called": 0}
    branches = {b["line"]: (b["taken"], b["not_taken"]) for b in mid["branches"]}
    assert branches == {IF_LINE: (0, 1), LOOP_LINE: (10, 1)}
    await client.debug.clear_breakpoint(name=name, id=bp.id)
    await run_to_exit(client, name)
    report = (await client.coverage.stop_coverage(name=name)).report
    check_expected(await json_report(client, report.name))


async def test_halted_right_after_a_branch(client: AsyncClient, backend: str) -> None:
    """Halted at the first instruction after a branch (a breakpoint on the then-line,
    then on the loop body): that instruction has not run, but the branch has, and its
    outcome counts on the side it went, live and in a report stored while halted."""

    async def halt_at(line: int) -> tuple[dict[int, int], dict[int, tuple[int | None, int | None]]]:
        bp = (await client.debug.set_breakpoint(name=name, location={"file_line": f"coverage.c:{line}"})).breakpoint
        stop = (await client.debug.continue_(name=name, wait=True, timeout=60)).stop
        assert stop.reason == cpb.STOP_REASON_BREAKPOINT and stop.pc == bp.address
        await client.debug.clear_breakpoint(name=name, id=bp.id)
        return counts(file_of(await json_report(client, name)))

    def counts(f: dict) -> tuple[dict[int, int], dict[int, tuple[int | None, int | None]]]:  # type: ignore[type-arg]
        return ({ln["line"]: ln["count"] for ln in f["lines"]},
                {b["line"]: (b["taken"], b["not_taken"]) for b in f["branches"]})

    name = await covered_session(client, backend)
    lines, branches = await halt_at(37)  # the then-line: `beq else` ran, not taken
    assert (lines[36], lines[37]) == (1, 0)
    assert branches == {IF_LINE: (0, 1), LOOP_LINE: (None, None)}
    lines, branches = await halt_at(43)  # the loop body: the condition ran once, taken
    assert (lines[42], lines[43]) == (1, 0) and branches[LOOP_LINE] == (1, 0)
    lines, branches = await halt_at(43)  # again: the body ran once, the branch twice
    assert (lines[42], lines[43]) == (2, 1) and branches[LOOP_LINE] == (2, 0)
    report = (await client.coverage.stop_coverage(name=name)).report  # stored while halted
    assert counts(file_of(await json_report(client, report.name)))[1] == {IF_LINE: (0, 1), LOOP_LINE: (2, 0)}


async def test_reset_forgets_what_was_collected(client: AsyncClient, backend: str) -> None:
    name = await covered_session(client, backend)
    await run_to_exit(client, name)
    await client.coverage.reset_coverage(name=name)
    report = (await client.coverage.stop_coverage(name=name)).report
    assert report.totals.lines_hit == 0 and report.totals.lines_total > 0
    with pytest.raises(errors.FailedPrecondition):  # stopped: nothing to stop
        await client.coverage.stop_coverage(name=name)


async def test_bad_inputs(client: AsyncClient, backend: str) -> None:
    _, report = await collect(client, backend)
    with pytest.raises(errors.NotFound):
        await client.coverage.get_coverage_summary(name="coverageReports/nope")
    with pytest.raises(errors.NotFound):
        await export(client, "coverageReports/nope", "COVERAGE_FORMAT_LCOV")
    with pytest.raises(errors.NotFound):
        await client.coverage.start_coverage(name="sessions/nope")
    with pytest.raises(errors.InvalidArgument):
        await export(client, report, "COVERAGE_FORMAT_UNSPECIFIED")
    with pytest.raises(errors.InvalidArgument):
        await client.coverage.merge_coverage(names=[])
    with pytest.raises(errors.NotFound):
        await client.coverage.merge_coverage(names=[report, "coverageReports/nope"])
    # another program with coverage collected: merging it is refused
    other = await covered_session(client, backend, await upload(client, "hello"))
    with pytest.raises(errors.FailedPrecondition) as exc:
        await client.coverage.merge_coverage(names=[report, other])
    assert "same program" in exc.value.message
    # no debug info (an Intel HEX image): FAILED_PRECONDITION
    hexprog = await upload(client, "coverage", "hex")
    s = (await client.sessions.create_session(board_template=BOARD, program=hexprog, backend=backend,
                                               options={"coverage": True})).session
    with pytest.raises(errors.FailedPrecondition) as exc:
        await client.coverage.start_coverage(name=s.name)
    assert "line table" in exc.value.message
    # never started
    plain = (await client.sessions.create_session(board_template=BOARD, program=await upload(client),
                                                   backend=backend, power_on=True)).session
    with pytest.raises(errors.FailedPrecondition):
        await client.coverage.stop_coverage(name=plain.name)
    with pytest.raises(errors.FailedPrecondition):
        await client.coverage.get_coverage_summary(name=plain.name)
    if backend == "qemu":  # created without options.coverage: QEMU has no plugin loaded
        with pytest.raises(errors.Unimplemented) as exc:
            await client.coverage.start_coverage(name=plain.name)
        assert "coverage" in exc.value.message


async def test_capabilities_report_coverage_where_the_driver_has_it(client: AsyncClient) -> None:
    from machineserver.server.drivers.unicorn.backend import UnicornMachine

    caps = await client.capabilities.get_capabilities()
    by_name = {b.name: set(b.features) for b in caps.backends}
    assert cpb.FEATURE_COVERAGE in by_name["qemu"]
    has = UnicornMachine is not None and Feature.COVERAGE in features_of(UnicornMachine)
    assert (cpb.FEATURE_COVERAGE in by_name["unicorn"]) == has


def counts_by_file(doc: dict) -> dict:  # type: ignore[type-arg]
    """What a JSON export says about each file (lines, functions, branches, totals)."""
    return {f["path"]: (f["lines"], f["functions"], f["branches"], f["counts"]) for f in doc["files"]}


@pytest.mark.parametrize("board", [BOARD, "sifive_e"])
@pytest.mark.parametrize("program", ["coverage", "crc32"])
async def test_both_backends_give_the_same_counts(client: AsyncClient, board: str, program: str) -> None:
    """The same program gives the same line, function and branch counts on unicorn (its
    blocks split where slices stopped, branch outcomes from counted edges) and qemu (its
    own blocks, single steps up to the exit trap, outcomes derived from counts), every
    file, startup code and UART driver included."""
    require_coverage("unicorn")
    require_coverage("qemu", board)
    uploaded = await upload(client, program, board=board)
    docs = {}
    for backend in ("unicorn", "qemu"):
        _, report = await collect(client, backend, uploaded, board)
        docs[backend] = await json_report(client, report)
    assert counts_by_file(docs["unicorn"]) == counts_by_file(docs["qemu"])
    assert docs["unicorn"]["totals"] == docs["qemu"]["totals"]
    if program == "coverage":
        check_expected(docs["qemu"])
    else:
        f = file_of(docs["qemu"], "src/crc32.c")
        lines = {ln["line"]: ln["count"] for ln in f["lines"]}
        assert {n: lines[n] for n in CRC32_LINE_COUNTS} == CRC32_LINE_COUNTS
        assert {fn["name"]: fn["count"] for fn in f["functions"]} == {"main": 1}  # the rest inlined
        for b in f["branches"]:  # every branch ran; its outcomes add up to its runs
            assert b["executed"] and b["taken"] > 0 and b["not_taken"] > 0
        inner = next(b for b in f["branches"] if b["line"] == 31)  # the bit loop, per byte
        assert inner["taken"] + inner["not_taken"] == lines[32]


async def test_merge_across_backends(client: AsyncClient) -> None:
    """A unicorn and a qemu run of one program merge into the counts of two runs (the
    qemu source has no edges: the merged branches are derived from counts)."""
    require_coverage("unicorn")
    require_coverage("qemu")
    program = await upload(client)
    _, first = await collect(client, "unicorn", program)
    _, second = await collect(client, "qemu", program)
    merged = (await client.coverage.merge_coverage(names=[first, second])).report
    check_expected(await json_report(client, merged.name), runs=2)


async def test_nothing_to_cover_reads_100_percent(client: AsyncClient, backend: str) -> None:
    """0 of 0 (a file without branches) is 100 %, as genhtml rates it (it prints "-")
    and as Cobertura's rate of 1."""
    _, report = await collect(client, backend)
    summary = await client.coverage.get_coverage_summary(name=report)
    no_branches = [f for f in summary.files if f.counts.branches_total == 0]
    assert no_branches  # semihost_arm.c, startup code...
    assert all(f.counts.branch_percent == 100.0 for f in no_branches)
    by_path = {f.path: f.counts for f in summary.files}
    assert by_path[FILE].branch_percent == 75.0 and by_path[FILE].function_percent == pytest.approx(66.67)
    doc = await json_report(client, report)
    path = no_branches[0].path
    assert file_of(doc, path)["counts"]["branch_percent"] == 100.0
    root = ET.fromstring((await export(client, report, "COVERAGE_FORMAT_COBERTURA"))[0])
    cls = next(c for c in root.iter("class") if c.get("filename") == path)
    assert cls.get("branch-rate") == "1"
