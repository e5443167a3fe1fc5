"""Which backends can run here, and the QEMU processes tests leave behind: for tests
through the API (conformance, coverage, GDB) and below it (the drivers' own tests).

``require_backend`` and ``require_qemu_plugin`` skip a test that cannot run here, or fail
it under scripts/test (tests/helpers/tools.py); ``no_qemu_left_behind`` fails a test
that leaves a QEMU child of this process running (or unreaped)."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator

import psutil

from tests.helpers.tools import require_tool, tool_missing

BOARD_ARCH = {
    "lm3s6965evb": "arm-cortex-m",
    "mps2-an385": "arm-cortex-m",
    "netduinoplus2": "arm-cortex-m",
    "sifive_e": "riscv32",
}
QEMU_BINARIES = {"arm-cortex-m": "qemu-system-arm", "riscv32": "qemu-system-riscv32"}


def require_backend(backend: str, board: str = "lm3s6965evb") -> None:
    """Skip (or, under scripts/test, fail) unless ``backend`` can run ``board`` here."""
    if backend == "qemu":
        require_tool(QEMU_BINARIES[BOARD_ARCH[board]], f"the qemu backend on {board}")


def require_qemu_plugin() -> str:
    """The QEMU TCG plugin (coverage and the instruction gate), built with the host's C
    compiler on first use; skips (fails under scripts/test) when it cannot be built."""
    from machineserver.server.drivers.qemu.plugin import plugin_status

    status = plugin_status()
    if status.path is None:
        tool_missing("gcc", f"the QEMU plugin cannot be built here: {status.reason}")
    return status.path


def qemu_children() -> list[psutil.Process]:
    """qemu-system-* processes started by this test process (zombies included)."""
    out = []
    for child in psutil.Process(os.getpid()).children(recursive=True):
        try:
            if child.name().startswith("qemu-system"):
                out.append(child)
        except psutil.NoSuchProcess:
            continue
    return out


def reaped(pid: int) -> bool:
    """Whether the QEMU ``pid`` is gone: ended and reaped (no zombie left)."""
    return pid not in {p.pid for p in qemu_children()}


@contextlib.contextmanager
def no_qemu_left_behind(settle_s: float = 2.0) -> Iterator[None]:
    """Around a test (or a fixture's life): every QEMU child started inside must be
    gone at the end, ``settle_s`` allowed for the reaping (nothing signals it); one that
    is not is killed, so that it does not leak into the next test, and fails this one."""
    before = {p.pid for p in qemu_children()}
    yield
    left: list[psutil.Process] = []
    deadline = time.monotonic() + settle_s
    while True:
        left = [p for p in qemu_children() if p.pid not in before]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    for p in left:
        with contextlib.suppress(psutil.Error):
            p.kill()
    assert not left, f"QEMU processes left behind (or not reaped): {[p.pid for p in left]}"
