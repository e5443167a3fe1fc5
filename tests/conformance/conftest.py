"""The backend conformance suite: the same end-to-end tests, through the SDK against a
real in-process server (port 0, a temporary data dir), run once per backend.

`backend` is parametrized over every backend; `qemu` is skipped (with the reason) when
its binaries are missing, and fails instead under scripts/test (tests/helpers/tools.py).
Where a backend cannot do something, the test checks that the server says so
(UNIMPLEMENTED with the reason, and the matching capability flag or board limit), never
that it silently differs.

Every test also checks that no QEMU child process outlives it. The helpers (Conf, the
boards, require_backend) live in tests/helpers/conformance.py.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import psutil
import pytest

from machineserver.sdk import AsyncClient
from tests.helpers.conformance import BACKENDS, Conf, qemu_children, require_backend


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    require_backend(str(request.param))
    return str(request.param)


@pytest.fixture(autouse=True)
def no_qemu_left_behind() -> Iterator[None]:
    """Set up before (so torn down after) the server: every QEMU must be gone by then."""
    before = {p.pid for p in qemu_children()}
    yield
    left: list[psutil.Process] = []
    for _ in range(100):  # reaping is asynchronous (no signal to wait on): up to 2 s
        left = [p for p in qemu_children() if p.pid not in before]
        if not left:
            break
        time.sleep(0.02)
    for p in left:  # do not leak them into the next test, but fail this one
        with contextlib.suppress(psutil.Error):
            p.kill()
    assert not left, f"QEMU processes left behind (or not reaped): {[p.pid for p in left]}"


# server and client: the fixtures of tests/conftest.py


@pytest.fixture
def conf(client: AsyncClient, backend: str) -> Conf:
    return Conf(client, backend)
