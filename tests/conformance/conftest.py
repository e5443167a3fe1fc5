"""The backend conformance suite: the same end-to-end tests, through the SDK against a
real in-process server (port 0, a temporary data dir), run once per backend.

`backend` is parametrized over every backend; `qemu` is skipped (with the reason) when
its binaries are missing, and fails instead under scripts/test (tests/helpers/tools.py).
Where a backend cannot do something, the test checks that the server says so
(UNIMPLEMENTED with the reason, and the matching capability flag or board limit), never
that it silently differs.

Every test also checks that no QEMU child process outlives it. The helpers (Conf, the
boards) live in tests/helpers/conformance.py; require_backend and the QEMU check in
tests/helpers/backends.py.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from machineserver.sdk import AsyncClient
from tests.helpers.backends import no_qemu_left_behind, require_backend
from tests.helpers.conformance import BACKENDS, Conf


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    require_backend(str(request.param))
    return str(request.param)


@pytest.fixture(autouse=True)
def no_qemu_left() -> Iterator[None]:
    """Set up before (so torn down after) the server: every QEMU must be gone by then."""
    with no_qemu_left_behind():
        yield


# server and client: the fixtures of tests/conftest.py


@pytest.fixture
def conf(client: AsyncClient, backend: str) -> Conf:
    return Conf(client, backend)
