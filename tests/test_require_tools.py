"""The rule scripts/test relies on: under MS_REQUIRE_TEST_TOOLS=1 a test skipped
for a tool scripts/test installs fails (require_tool itself, and the conftest hook for a
skip from anywhere else), while other skips stay skips. Runs a small pytest in a child
process with this suite's conftest as a plugin and a PATH without the tools."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

import pytest

from tests.helpers.firmware import ROOT
from tests.helpers.tools import REQUIRE_TOOLS_ENV

CASES = '''
import pytest
from tests.helpers.tools import require_tool

def test_required_tool_missing():
    require_tool("gdb-multiarch")

def test_other_tool_missing():
    require_tool("no-such-tool-anywhere")

@pytest.mark.skipif(True, reason="qemu-system-arm is not installed")
def test_skipif_naming_a_required_tool():
    pass

def test_firmware_not_built():
    pytest.skip("firmware sifive_e/hello.elf not built")

def test_plugin_cannot_be_built():
    pytest.skip("the coverage plugin cannot be built here: compile error")

def test_no_gpu():
    pytest.skip("this host has no NVIDIA GPU")

def test_passes():
    pass
'''


def run_cases(tmp_path: Path, require: bool) -> tuple[int, dict[str, str]]:
    """The child pytest's exit status and {test name: outcome} over CASES."""
    (tmp_path / "test_cases.py").write_text(CASES)
    empty = tmp_path / "bin"
    empty.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != REQUIRE_TOOLS_ENV}
    env.update(PATH=str(empty), PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])))
    if require:
        env[REQUIRE_TOOLS_ENV] = "1"
    report = tmp_path / "report.xml"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tests.conftest", "-p", "no:cacheprovider", "-q",
         "--rootdir", str(tmp_path), "-c", os.devnull, f"--junitxml={report}", str(tmp_path / "test_cases.py")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert report.exists(), proc.stdout + proc.stderr
    outcomes: dict[str, str] = {}
    for case in ElementTree.parse(report).getroot().iter("testcase"):
        kinds = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
        outcomes[case.get("name", "")] = kinds[0] if kinds else "passed"
    return proc.returncode, outcomes


@pytest.mark.parametrize("require", [False, True], ids=["by-hand", "scripts-test"])
def test_missing_tools_fail_only_under_scripts_test(tmp_path: Path, require: bool) -> None:
    status, got = run_cases(tmp_path, require)
    assert status == (1 if require else 0)  # the run fails only under scripts/test
    tool_skip = "error" if require else "skipped"  # a skipif mark acts in setup: an error there
    assert got == {
        "test_required_tool_missing": "failure" if require else "skipped",
        "test_other_tool_missing": "skipped",
        "test_skipif_naming_a_required_tool": tool_skip,
        "test_firmware_not_built": "failure" if require else "skipped",
        "test_plugin_cannot_be_built": "failure" if require else "skipped",
        "test_no_gpu": "skipped",
        "test_passes": "passed",
    }, got
