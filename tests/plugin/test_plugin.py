"""The machineserver pytest plugin, run as users run it: pytest in a subprocess on a test
file of its own (pytester), the plugin loaded by its entry point, against real firmware on
real backends."""

from __future__ import annotations

import json
import re
import subprocess
import zipfile
from pathlib import Path
from xml.etree import ElementTree

import pytest
from junitparser import JUnitXml, Properties, Property

from machineserver.sdk import Client
from tests.helpers.firmware import firmware
from tests.helpers.server import ServerProcess
from tests.helpers.tools import require_tool

BOARD = "mps2-an385"
INNER_TIMEOUT = 240


def run_inner(pytester: pytest.Pytester, source: str, *args: str) -> pytest.RunResult:
    pytester.makepyfile(test_inner=source)
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:randomly", *args,
                                         timeout=INNER_TIMEOUT)


def properties(xml: Path) -> dict[str, dict[str, list[str]]]:
    """Per test case name: property name -> values, read back with junitparser."""
    got: dict[str, dict[str, list[str]]] = {}
    for suite in JUnitXml.fromfile(str(xml)):
        for case in suite:
            props: dict[str, list[str]] = {}
            for group in case.iterchildren(Properties):
                for p in group.iterchildren(Property):
                    props.setdefault(p.name, []).append(p.value)
            got[case.name] = props
    return got


def test_plugin_costs_nothing_when_unused(pytester: pytest.Pytester) -> None:
    """Loaded by the entry point in every run, the plugin imports no server and starts
    nothing unless a test uses its fixtures."""
    result = run_inner(pytester, """
import sys, threading

def test_plain():
    assert "machineserver.pytest_plugin" in sys.modules
    assert not [m for m in sys.modules if m.startswith("machineserver.server")]
    assert not [t for t in threading.enumerate() if t.name == "machineserver-embedded"]
""", "--strict-markers")
    result.assert_outcomes(passed=1)


def test_markers_and_backends_run_each_test_per_backend(pytester: pytest.Pytester) -> None:
    hello = firmware(BOARD, "hello")
    result = run_inner(pytester, f"""
import pytest
from machineserver.testing import Virtual

@pytest.mark.board("{BOARD}")
@pytest.mark.program({str(hello)!r})
def test_hello(machine):
    m = machine.console.expect(r"Hello from (\\S+)!", timeout=Virtual(ms=50))
    assert m.group(1) == "{BOARD}"
    assert machine.wait_exit(timeout=Virtual(ms=50)) == 0
    print("BACKEND", machine.backend, machine.session.backend)

@pytest.mark.board("{BOARD}")
@pytest.mark.backend("qemu")
def test_qemu_only(machine):
    machine.load({str(hello)!r})
    assert machine.wait_exit() == 0
    assert machine.session.backend == "qemu"

@pytest.mark.backend("unicorn")
def test_no_board(machine):
    machine.load({str(hello)!r})
""", "--strict-markers", "--ms-backends", "unicorn,qemu", "-v", "-s", "-rA")
    result.assert_outcomes(passed=3, errors=1)
    out = result.stdout.str()
    for test in ("test_hello[unicorn]", "test_hello[qemu]", "test_qemu_only[qemu]"):
        assert f"PASSED test_inner.py::{test}" in out
    assert "test_qemu_only[unicorn]" not in out
    assert "BACKEND unicorn unicorn" in out and "BACKEND qemu qemu" in out
    assert "no board for the machine: add @pytest.mark.board" in out


def test_indirect_parametrisation_and_a_second_machine(pytester: pytest.Pytester) -> None:
    hello = firmware(BOARD, "hello")
    lm3s = firmware("lm3s6965evb", "hello")
    result = run_inner(pytester, f"""
import pytest

@pytest.mark.parametrize("machine", [{{"board": "{BOARD}", "program": {str(hello)!r}}}], indirect=True)
def test_two(machine):
    other = machine(board="lm3s6965evb", program={str(lm3s)!r})
    assert machine.wait_exit() == 0 and other.wait_exit() == 0
    assert machine.console.text == "Hello from {BOARD}!\\n"
    assert other.console.text == "Hello from lm3s6965evb!\\n"
    assert machine.name != other.name
""")
    result.assert_outcomes(passed=1)


def test_failed_test_leaves_a_capsule_and_junit_properties(pytester: pytest.Pytester, tmp_path: Path) -> None:
    echo = firmware(BOARD, "echo")
    capsules = tmp_path / "capsules"
    xml = tmp_path / "junit.xml"
    result = run_inner(pytester, f"""
import pytest
from machineserver.testing import Virtual

@pytest.mark.board("{BOARD}")
@pytest.mark.backend("unicorn")
def test_waits_for_a_greeting(machine):
    machine.load({str(echo)!r})
    machine.console.expect(r"echo ready", timeout=Virtual(ms=50))
    machine.console.expect(r"welcome", timeout=Virtual(ms=20))

@pytest.mark.board("{BOARD}")
@pytest.mark.backend("unicorn")
def test_passes(machine):
    machine.load({str(echo)!r})
    machine.console.expect(r"echo ready", timeout=Virtual(ms=50))
""", "--ms-capsules", str(capsules), f"--junitxml={xml}")
    result.assert_outcomes(passed=1, failed=1)
    out = result.stdout.str()
    # the failure says what was expected, why the wait ended and what the console held
    assert "console never matched 'welcome' within Virtual(20 ms): the timeout ran out" in out
    assert "--- console tail" in out and "echo ready" in out
    files = sorted(capsules.glob("*.capsule"))
    assert [f.name for f in files] == ["test_inner.py_test_waits_for_a_greeting_unicorn.capsule"]
    assert files[0].stat().st_size < 1_000_000
    with zipfile.ZipFile(files[0]) as z:
        manifest = json.loads(z.read("manifest.json"))
    assert manifest["capsule"]["trigger"] == "test_failure"
    assert manifest["capsule"]["test_id"] == "test_inner.py::test_waits_for_a_greeting[unicorn]"
    assert "console never matched 'welcome'" in manifest["capsule"]["reason"]
    assert manifest["backend"] == "unicorn" and manifest["board"] == BOARD
    assert "1 capsule(s) written" in out and str(files[0]) in out
    props = properties(xml)
    failed, passed = props["test_waits_for_a_greeting[unicorn]"], props["test_passes[unicorn]"]
    assert failed["ms_capsule"] == [str(files[0])]
    assert "ms_capsule" not in passed
    for p in (failed, passed):
        assert p["ms_backend"] == ["unicorn"] and p["ms_board"] == [BOARD]
        assert re.fullmatch(r"sessions/[\w-]+", p["ms_session"][0])
        assert int(p["ms_instructions"][0]) > 0
    assert failed["ms_session"] != passed["ms_session"]


def test_no_capsules_option(pytester: pytest.Pytester, tmp_path: Path) -> None:
    echo = firmware(BOARD, "echo")
    result = run_inner(pytester, f"""
import pytest

@pytest.mark.board("{BOARD}")
def test_fails(machine):
    machine.load({str(echo)!r})
    assert False, "deliberately"
""", "--ms-capsules", str(tmp_path / "c"), "--ms-no-capsules")
    result.assert_outcomes(failed=1)
    assert not (tmp_path / "c").exists()


def test_xdist_workers_share_a_server_and_coverage_merges_into_one_report(
        pytester: pytest.Pytester, tmp_path: Path) -> None:
    lcov = require_tool("lcov")
    cov = firmware(BOARD, "coverage")
    crc = firmware(BOARD, "crc32")
    xml = tmp_path / "junit.xml"
    info = tmp_path / "cov.info"
    seen = tmp_path / "seen"
    result = run_inner(pytester, f"""
import os
import pytest

@pytest.mark.board("{BOARD}")
@pytest.mark.backend("unicorn")
@pytest.mark.parametrize("n", range(4))
def test_coverage_program(machine, ms_target, n):
    machine.load({str(cov)!r} if n % 2 == 0 else {str(crc)!r})
    assert machine.wait_exit() == 0
    with open({str(seen)!r}, "a") as f:
        f.write(f"{{os.environ.get('PYTEST_XDIST_WORKER')}} {{ms_target}}\\n")
""", "-n", "2", "--ms-coverage", f"lcov:{info}", f"--junitxml={xml}")
    result.assert_outcomes(passed=4)
    out = result.stdout.str()
    workers = set(re.findall(r"(gw\d+) (127\.0\.0\.1:\d+)", seen.read_text()))
    assert {w for w, _ in workers} == {"gw0", "gw1"}  # both workers ran machines...
    assert len({t for _, t in workers}) == 1  # ...on the one server the controller started
    sessions = [p["ms_session"][0] for p in properties(xml).values()]
    assert len(set(sessions)) == 4
    # one LCOV tracefile for the whole run, readable by the real lcov
    text = info.read_text()
    assert text.count("end_of_record") >= 2
    assert re.search(r"^SF:.*coverage\.c$", text, re.M) and re.search(r"^SF:.*crc32\.c$", text, re.M)
    summary = subprocess.run([str(lcov), "--summary", str(info)], capture_output=True, text=True, timeout=60)
    assert summary.returncode == 0, summary.stderr
    lines = re.search(r"lines\.*: [\d.]+% \((\d+) of (\d+) lines?\)", summary.stdout + summary.stderr)
    assert lines and int(lines.group(1)) > 0
    assert f"coverage written, lcov: {info}" in out


def test_remote_target(pytester: pytest.Pytester, tmp_path: Path) -> None:
    hello = firmware(BOARD, "hello")
    server = ServerProcess(tmp_path / "data").start()
    try:
        result = run_inner(pytester, f"""
import pytest

@pytest.mark.board("{BOARD}")
def test_on_the_remote_server(machine, ms_target):
    assert ms_target == "{server.target}"
    machine.load({str(hello)!r})
    assert machine.wait_exit() == 0
""", "--ms-target", server.target, "-p", "no:xdist")
        result.assert_outcomes(passed=1)
        with Client.connect(server.target, timeout=20) as c:
            assert [p.display_name for p in c.sessions.list_programs().programs] == ["hello.elf"]
            assert not c.sessions.list_sessions().sessions  # the test's session was deleted after it
    finally:
        server.stop()


def test_bad_coverage_option_is_a_usage_error(pytester: pytest.Pytester) -> None:
    result = run_inner(pytester, "def test_x():\n    pass\n", "--ms-coverage", "gcov:x")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "--ms-coverage 'gcov:x': use FORMAT:PATH" in result.stderr.str()




def test_capsules_the_server_took_are_exported(pytester: pytest.Pytester, tmp_path: Path) -> None:
    """An assert symbol's hit (the server's own trigger) during a passing test: its capsule is
    exported next to the failure capsules, and named in the JUnit properties."""
    program = firmware(BOARD, "assert")
    capsules = tmp_path / "capsules"
    xml = tmp_path / "junit.xml"
    result = run_inner(pytester, f"""
import pytest

@pytest.mark.board("{BOARD}")
@pytest.mark.backend("unicorn", "qemu")
@pytest.mark.machine_options(assert_symbols=["__assert_func"])
def test_assert_fails(machine):
    machine.load({str(program)!r})
    # a host-time wait: a counted one on QEMU drives the machine in steps, and a step cut
    # short by the match at the assert's breakpoint loses that stop (reported to its owner)
    machine.console.expect(r"checking", timeout=5)
    assert machine.wait_exit() == 4  # past the assert: the capsule was taken on the way
    assert machine.console.text.endswith("assertion failed: left >= 0\\n")
""", "--ms-capsules", str(capsules), f"--junitxml={xml}")
    result.assert_outcomes(passed=2)
    for backend in ("unicorn", "qemu"):
        files = list(capsules.glob(f"test_inner.py_test_assert_fails_{backend}-assert-*.capsule"))
        assert len(files) == 1, sorted(capsules.iterdir())
        with zipfile.ZipFile(files[0]) as z:
            manifest = json.loads(z.read("manifest.json"))
        assert manifest["capsule"]["trigger"] == "assert" and manifest["backend"] == backend
        assert manifest["capsule"]["reason"] == "reached __assert_func"
        assert properties(xml)[f"test_assert_fails[{backend}]"]["ms_capsule"] == [str(files[0])]


def test_remote_target_with_an_api_key(pytester: pytest.Pytester, tmp_path: Path) -> None:
    """A server with authentication on: the plugin's calls carry --ms-api-key; without it
    they are refused (UNAUTHENTICATED), and the test says so."""
    hello = firmware(BOARD, "hello")
    key_file = tmp_path / "admin.key"
    config = tmp_path / "server.yaml"
    config.write_text(f"auth:\n  enabled: true\n  bootstrap_admin_key_file: {key_file}\n")
    server = ServerProcess(tmp_path / "data", "--config", str(config)).start()
    try:
        source = f"""
import pytest

@pytest.mark.board("{BOARD}")
def test_hello(machine):
    machine.load({str(hello)!r})
    assert machine.wait_exit() == 0
"""
        secret = key_file.read_text().strip()
        result = run_inner(pytester, source, "--ms-target", server.target, "--ms-api-key", secret)
        result.assert_outcomes(passed=1)
        refused = run_inner(pytester, source, "--ms-target", server.target)
        refused.assert_outcomes(failed=1)
        assert "UNAUTHENTICATED" in refused.stdout.str()
    finally:
        server.stop()


def test_coverage_in_every_format(pytester: pytest.Pytester, tmp_path: Path) -> None:
    """--ms-coverage repeated: one merged report per format (two tests of one program)."""
    program = firmware(BOARD, "coverage")
    out = tmp_path / "out"
    result = run_inner(pytester, f"""
import pytest

@pytest.mark.board("{BOARD}")
@pytest.mark.backend("unicorn", "qemu")
def test_coverage_program(machine):
    machine.load({str(program)!r})
    assert machine.wait_exit() == 0
""", "--ms-coverage", f"lcov:{out}/cov.info", "--ms-coverage", f"cobertura:{out}/cov.xml",
        "--ms-coverage", f"json:{out}/cov.json", "--ms-coverage", f"html:{out}/html")
    result.assert_outcomes(passed=2)
    info = (out / "cov.info").read_text()
    assert info.count("SF:") == len(set(re.findall(r"^SF:(.*)$", info, re.M)))  # merged: each file once
    assert re.search(r"^SF:.*coverage\.c$", info, re.M)
    xml = ElementTree.parse(out / "cov.xml").getroot()
    assert xml.tag == "coverage" and float(xml.get("line-rate", "0")) > 0
    assert json.loads((out / "cov.json").read_text())
    assert any(p.name == "index.html" for p in (out / "html").rglob("*.html"))
    summary = result.stdout.str()
    for fmt in ("lcov", "cobertura", "json", "html"):
        assert f"coverage written, {fmt}: {out}" in summary
