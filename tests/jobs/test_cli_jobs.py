"""msctl job against a real server process, with real firmware from tests/firmware: a
suite file run to its verdicts (one line per finished run when the output is not a
terminal, a live progress bar on a pseudo-terminal), the results table and its filter,
the JUnit report read back with junitparser, the merged coverage exported, --no-wait then
watch, Ctrl-C (the job goes on, or is cancelled with --cancel-on-interrupt), and bad suite
files answered in one line naming the problem. Exit codes: 0 every run passed, 1 a run did
not, 2 no verdict (bad suite, refused), 130 interrupted."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import signal
import struct
import subprocess
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import junitparser
import pytest

from tests.helpers.firmware import ROOT, firmware
from tests.helpers.server import ServerProcess
from tests.helpers.tools import VENV_BIN, require_tool

BOARD = "lm3s6965evb"


@pytest.fixture
def server_process(tmp_path: Path) -> Iterator[ServerProcess]:
    """A server process whose jobs run on its own workers (the default, embedded Ray, is
    covered by tests/jobs/test_ray.py::test_embedded_runtime_started_on_first_job_and_stopped_with_the_server;
    here msctl is the subject)."""
    sp = ServerProcess(tmp_path / "data", "--job-engine", "local").start()
    try:
        yield sp
    finally:
        sp.stop()

def msctl(sp: ServerProcess, *args: str, timeout: float = 180, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, MSCTL_TARGET=sp.target)
    return subprocess.run([str(VENV_BIN / "msctl"), *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=cwd)


def suite_file(folder: Path, text: str, programs: tuple[str, ...] = ("hello", "fault", "echo")) -> Path:
    """A suite in its own folder, the programs copied beside it (paths relative to it)."""
    folder.mkdir(parents=True, exist_ok=True)
    for program in programs:
        (folder / f"{program}.elf").write_bytes(firmware(BOARD, program).read_bytes())
    path = folder / "suite.yaml"
    path.write_text(text)
    return path


MIXED = f"""\
display_name: mixed
labels: {{ci: test}}
programs: [hello.elf, fault.elf]
boards: [{BOARD}]
backends: [unicorn]
variants:
  - name: baseline
criteria:
  fail_regex: hardfault
  expected_exit_code: 0
  host_timeout: 60s
"""
# coverage merges into one report of one program: one program, two variants
PASSING = f"""\
display_name: passing
programs: [echo.elf]
boards: [{BOARD}]
variants:
  - name: typed
    console_input: "hi there\\nq"
  - name: quit
    console_input: "q"
criteria:
  pass_regex: "bye"
  expected_exit_code: 0
  coverage: true
  host_timeout: 60s
"""
# echo without its closing 'q' waits for input: the run lasts until its host timeout
WAITING = f"""\
programs: [echo.elf]
boards: [{BOARD}]
criteria: {{pass_regex: bye, host_timeout: 120s}}
"""


def job_of(stderr: str) -> str:
    """The job msctl created: its 'jobs/ID: N runs (...)' line on stderr."""
    line = next(x for x in stderr.splitlines() if x.startswith("jobs/"))
    return line.split(":", 1)[0]


def table_rows(stdout: str) -> list[list[str]]:
    """The rows of a table msctl printed (columns split on runs of 2+ spaces)."""
    lines = [x for x in stdout.splitlines() if x.strip() and not x.strip().startswith("─")]
    return [re.split(r"\s{2,}", x.strip()) for x in lines]


def test_run_a_suite_to_its_verdicts_results_and_junit(server_process: ServerProcess, tmp_path: Path) -> None:
    suite = suite_file(tmp_path / "suite", MIXED)
    report = tmp_path / "report.xml"
    run = msctl(server_process, "job", "run", str(suite), "-o", str(report))
    assert run.returncode == 1, (run.stdout, run.stderr)  # a run failed
    name = job_of(run.stderr)
    assert "uploaded hello.elf -> programs/" in run.stderr and "uploaded fault.elf -> programs/" in run.stderr
    assert f"{name}: 2 runs (mixed, engine local)" in run.stderr
    # not a terminal: one line per finished run, then the summary and the runs that did not pass
    progress = [x for x in run.stdout.splitlines() if x.startswith("[")]
    assert sorted(x.split("]", 1)[0] for x in progress) == ["[1/2", "[2/2"]
    assert any(x.split()[1:3] == ["PASSED", "hello.elf"] for x in progress), progress
    failed = next(x for x in progress if "fault.elf" in x)
    assert failed.split()[1] == "FAILED" and "fail regex matched" in failed, failed
    assert f"{name} DONE after " in run.stdout and "1 passed, 1 failed, 0 errored" in run.stdout
    assert "runs that did not pass" in run.stdout
    assert "\x1b[" not in run.stdout  # no terminal codes in a log

    # the JUnit report written at the end, read back with an independent parser
    xml = junitparser.JUnitXml.fromfile(str(report))
    suites = list(xml) if isinstance(xml, junitparser.JUnitXml) else [xml]
    cases = [case for s in suites for case in s]
    assert len(cases) == 2
    outcomes = sorted(type(r).__name__ for case in cases for r in case.result)
    assert outcomes == ["Failure"], outcomes
    # msctl job junit writes the same report
    again = tmp_path / "again.xml"
    junit = msctl(server_process, "job", "junit", name, "-o", str(again))
    assert junit.returncode == 0 and again.read_bytes() == report.read_bytes(), junit.stderr

    # the results table: a row per run with the verdict, exit code, node and reason
    results = msctl(server_process, "job", "results", name)
    assert results.returncode == 0, results.stderr
    rows = table_rows(results.stdout)
    assert rows[0] == ["RUN", "PROGRAM", "BOARD", "BACKEND", "VARIANT", "VERDICT", "EXIT", "INSTRUCTIONS",
                       "HOST TIME", "NODE", "REASON"]
    by_program = {r[1]: r for r in rows[1:]}
    assert set(by_program) == {"hello.elf", "fault.elf"}
    hello = by_program["hello.elf"]
    assert hello[2:7] == [BOARD, "unicorn", "baseline", "PASSED", "0"] and hello[9] == "local"
    fault = by_program["fault.elf"]
    assert fault[5] == "FAILED" and "fail regex matched" in fault[-1], fault
    only_failed = table_rows(msctl(server_process, "job", "results", name, "--filter", "verdict=FAILED").stdout)
    assert [r[1] for r in only_failed[1:]] == ["fault.elf"]
    as_json = json.loads(msctl(server_process, "--json", "job", "results", name).stdout)
    assert sorted(r["verdict"] for r in as_json["runs"]) == ["RUN_VERDICT_FAILED", "RUN_VERDICT_PASSED"]

    listed = table_rows(msctl(server_process, "job", "list").stdout)
    assert [name, "mixed", "DONE", "2", "1", "1", "0", "local"] == listed[1][:8]
    got = msctl(server_process, "job", "get", name.removeprefix("jobs/"))
    assert got.returncode == 0 and "state     DONE" in got.stdout
    assert "2 programs x 1 boards x 1 backends x 1 variants" in got.stdout


def test_a_passing_suite_exits_0_and_its_merged_coverage_exports(server_process: ServerProcess,
                                                                  tmp_path: Path) -> None:
    suite = suite_file(tmp_path / "suite", PASSING, programs=("echo",))
    run = msctl(server_process, "job", "run", str(suite))
    assert run.returncode == 0, (run.stdout, run.stderr)
    assert "2 passed, 0 failed, 0 errored" in run.stdout
    report = next(x.split()[1] for x in run.stdout.splitlines() if x.startswith("coverage: "))
    assert report.startswith("coverageReports/")
    lcov = tmp_path / "job.info"
    export = msctl(server_process, "coverage", "export", report, "--format", "lcov", "-o", str(lcov))
    assert export.returncode == 0, export.stderr
    text = lcov.read_text()
    assert "SF:" in text and "echo.c" in text and "DA:" in text, text[:400]


def test_no_wait_then_watch(server_process: ServerProcess, tmp_path: Path) -> None:
    suite = suite_file(tmp_path / "suite", MIXED)
    created = msctl(server_process, "job", "run", str(suite), "--no-wait")
    assert created.returncode == 0, created.stderr
    name = created.stdout.strip()
    assert name.startswith("jobs/") and name == job_of(created.stderr)
    watch = msctl(server_process, "job", "watch", name, "-o", str(tmp_path / "r.xml"))
    assert watch.returncode == 1, watch.stdout + watch.stderr
    assert f"{name} DONE after " in watch.stdout and (tmp_path / "r.xml").stat().st_size > 0
    as_json = msctl(server_process, "--json", "job", "watch", name)  # an ended job: its last word, as JSON
    assert as_json.returncode == 1 and json.loads(as_json.stdout)["state"] == "JOB_STATE_DONE"
    missing = msctl(server_process, "job", "watch", "jobs/nope")
    assert missing.returncode == 2 and missing.stderr.startswith("msctl: NOT_FOUND"), missing.stderr


def _interrupted(sp: ServerProcess, suite: Path, *extra: str) -> tuple[str, subprocess.CompletedProcess[str]]:
    env = dict(os.environ, MSCTL_TARGET=sp.target)
    proc = subprocess.Popen([str(VENV_BIN / "msctl"), "job", "run", str(suite), *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 60
        # wait until the job exists and msctl follows it
        while not msctl(sp, "--json", "job", "list", "--filter", "state=RUNNING").stdout.count("jobs/"):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return job_of(err), subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_ctrl_c_leaves_the_job_running_and_says_how_to_cancel(server_process: ServerProcess, tmp_path: Path) -> None:
    suite = suite_file(tmp_path / "suite", WAITING, programs=("echo",))
    name, done = _interrupted(server_process, suite)
    assert done.returncode == 130, (done.stdout, done.stderr)
    assert f"msctl job cancel {name}" in done.stderr and f"msctl job watch {name}" in done.stderr
    assert "Traceback" not in done.stderr
    state = json.loads(msctl(server_process, "--json", "job", "get", name).stdout)["job"]["state"]
    assert state == "JOB_STATE_RUNNING"
    cancelled = msctl(server_process, "job", "cancel", name)
    assert cancelled.returncode == 0 and cancelled.stdout.startswith(f"{name} CANCELLED"), cancelled.stdout


def test_ctrl_c_with_cancel_on_interrupt_cancels(server_process: ServerProcess, tmp_path: Path) -> None:
    suite = suite_file(tmp_path / "suite", WAITING, programs=("echo",))
    name, done = _interrupted(server_process, suite, "--cancel-on-interrupt")
    assert done.returncode == 130, (done.stdout, done.stderr)
    assert f"interrupted: cancelled {name} (CANCELLED" in done.stderr, done.stderr
    job = json.loads(msctl(server_process, "--json", "job", "get", name).stdout)["job"]
    assert job["state"] == "JOB_STATE_CANCELLED"
    rows = table_rows(msctl(server_process, "job", "results", name).stdout)
    assert [r[5] for r in rows[1:]] == ["CANCELLED"]


def test_a_live_progress_bar_on_a_terminal(server_process: ServerProcess, tmp_path: Path) -> None:
    suite = suite_file(tmp_path / "suite", MIXED)
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    env = dict(os.environ, MSCTL_TARGET=server_process.target, TERM="xterm-256color")
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen([str(VENV_BIN / "msctl"), "job", "run", str(suite)], stdin=follower, stdout=follower,
                            stderr=follower, env=env)
    os.close(follower)
    screen = b""
    try:
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the terminal closed: msctl ended
                break
            if not chunk:
                break
            screen += chunk
        proc.wait(timeout=120)
    finally:
        os.close(leader)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = screen.decode(errors="replace")
    assert proc.returncode == 1, text[-2000:]
    assert "━" in text and "2/2" in text, text[-2000:]  # the bar, complete
    assert "passed" in text and "running" in text and "\x1b[" in text
    assert "DONE after" in text


@pytest.mark.parametrize(("text", "message"), [
    (MIXED.replace("  expected_exit_code: 0", "  expected_exit: 0"),
     "suite.yaml: criteria: unknown key 'expected_exit' (known: pass_regex, fail_regex, expected_exit_code"),
    (MIXED + "timeout: 3\n", "suite.yaml: suite: unknown key 'timeout' (known: display_name, labels, programs"),
    (MIXED.replace("  - name: baseline", "  - {name: b, memory_patches: [{address: 0x20000000, data: zz}]}"),
     "suite.yaml: variants[0].memory_patches[0].data: wants hex bytes"),
    (MIXED.replace("hello.elf", "missing.elf"), "suite.yaml: programs[0]: no such file: missing.elf"),
    (MIXED.replace("host_timeout: 60s", "host_timeout: soon"), "suite.yaml: criteria.host_timeout: wants a duration"),
    (MIXED.replace("fail_regex: hardfault", "fail_regex: '(unclosed'"),
     "suite.yaml: criteria.fail_regex: not a regular expression"),
    ("programs: [hello.elf\nboards: [x]\n", "suite.yaml: bad YAML: line 2, column"),
    (MIXED.replace(f"boards: [{BOARD}]\n", ""), "suite.yaml: suite.boards: is required"),
])
def test_a_bad_suite_is_one_line_naming_the_problem(server_process: ServerProcess, tmp_path: Path,
                                                    text: str, message: str) -> None:
    suite = suite_file(tmp_path / "suite", text)
    r = msctl(server_process, "job", "run", str(suite))
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("msctl: ") and "Traceback" not in r.stderr, r.stderr
    assert message in r.stderr, r.stderr
    assert "uploaded" not in r.stdout + r.stderr  # checked before anything is sent
    assert msctl(server_process, "--json", "job", "list").stdout.count("jobs/") == 0


@pytest.mark.parametrize(("change", "expected"), [
    ((f"boards: [{BOARD}]", "boards: [no-such-board]"), ("msctl: NOT_FOUND", "no-such-board")),
    (("  host_timeout: 60s", "  host_timeout: 60s\n  retries: 9"), ("msctl: INVALID_ARGUMENT", "criteria.retries")),
])
def test_a_suite_the_server_refuses_exits_2_naming_the_problem(server_process: ServerProcess, tmp_path: Path,
                                                                change: tuple[str, str],
                                                                expected: tuple[str, str]) -> None:
    suite = suite_file(tmp_path / "suite", MIXED.replace(*change))
    r = msctl(server_process, "job", "run", str(suite))
    assert r.returncode == 2, (r.stdout, r.stderr)
    error = r.stderr[r.stderr.index("msctl: "):]
    assert error.startswith(expected[0]) and expected[1] in error and "Traceback" not in error, r.stderr
    assert msctl(server_process, "--json", "job", "list").stdout.count("jobs/") == 0


def readme_yaml(title: str) -> str:
    """The README's YAML block that starts with ``# title`` (its walk-through's suites),
    its program paths made absolute (they are relative to the repository root there)."""
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", text, flags=re.DOTALL)
    (block,) = [b for b in blocks if b.startswith(f"# {title}\n")]
    return block.replace("tests/firmware/prebuilt/", f"{ROOT}/tests/firmware/prebuilt/")


def test_the_readme_suite_runs_as_written(server_process: ServerProcess, tmp_path: Path) -> None:
    require_tool("qemu-system-arm", "the README's suite runs on unicorn and qemu")
    suite = tmp_path / "suite.yaml"
    suite.write_text(readme_yaml("suite.yaml"))
    report = tmp_path / "report.xml"
    run = msctl(server_process, "job", "run", str(suite), "-o", str(report))
    assert run.returncode == 0, (run.stdout, run.stderr)
    assert "4/4 done: 0 queued, 0 running, 4 passed, 0 failed, 0 errored" in run.stdout
    name = job_of(run.stderr)
    rows = table_rows(msctl(server_process, "job", "results", name).stdout)[1:]
    assert sorted((r[1], r[3], r[5]) for r in rows) == [
        ("crc32.elf", "qemu", "PASSED"), ("crc32.elf", "unicorn", "PASSED"),
        ("hello.elf", "qemu", "PASSED"), ("hello.elf", "unicorn", "PASSED")]
    assert table_rows(msctl(server_process, "job", "results", name, "--filter", "verdict=FAILED").stdout) == \
        [table_rows(msctl(server_process, "job", "results", name).stdout)[0]]
    xml = junitparser.JUnitXml.fromfile(str(report))
    assert sum(1 for s in (list(xml) if isinstance(xml, junitparser.JUnitXml) else [xml]) for _ in s) == 4


def test_the_readme_coverage_suite_exports(server_process: ServerProcess, tmp_path: Path) -> None:
    suite = tmp_path / "coverage.yaml"
    suite.write_text(readme_yaml("coverage.yaml"))
    run = msctl(server_process, "job", "run", str(suite))
    assert run.returncode == 0, (run.stdout, run.stderr)
    report = next(x.split()[1] for x in run.stdout.splitlines() if x.startswith("coverage: "))
    out = tmp_path / "job.info"
    export = msctl(server_process, "coverage", "export", report, "--format", "lcov", "-o", str(out))
    assert export.returncode == 0, export.stderr
    assert "crc32.c" in out.read_text()
