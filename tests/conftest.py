"""Shared fixtures: a real server (in-process on port 0, or as a child process) and
clients; and the hook that fails a scripts/test run for a test skipped because a tool
it installs is missing. The helpers themselves live in tests/helpers/."""

from __future__ import annotations

from collections.abc import AsyncIterator, Generator, Iterator
from pathlib import Path

import pytest

from machineserver.sdk import AsyncClient, Client
from machineserver.server.app import RunningServer, start
from machineserver.server.config import ServerConfig
from tests.helpers.server import ServerProcess
from tests.helpers.tools import REQUIRE_TOOLS_ENV, skip_is_for_a_missing_tool, tools_required


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, object, None]:
    """Under MS_REQUIRE_TEST_TOOLS=1 (scripts/test), a skip for a tool that
    scripts/test installs (or for firmware it builds) is a failure, wherever the skip
    came from: tests.helpers.tools.require_tool fails such tests itself, and this catches
    the rest (skipif marks, older ad-hoc checks)."""
    outcome = yield
    report: pytest.TestReport = outcome.get_result()  # type: ignore[attr-defined]
    if not report.skipped or not tools_required() or hasattr(report, "wasxfail"):
        return
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    if skip_is_for_a_missing_tool(reason):
        report.outcome = "failed"
        report.longrepr = (f"{item.nodeid} was skipped for a missing tool under {REQUIRE_TOOLS_ENV}=1 "
                           f"(scripts/test installs it, so the run must not pass without it): {reason}")


@pytest.fixture
def server_config(tmp_path: Path) -> ServerConfig:
    return ServerConfig(listen="127.0.0.1:0", data_dir=tmp_path / "data", log_level="warning")


@pytest.fixture
async def server(server_config: ServerConfig) -> AsyncIterator[RunningServer]:
    running = await start(server_config)
    try:
        yield running
    finally:
        await running.stop(0.5)


@pytest.fixture
async def client(server: RunningServer) -> AsyncIterator[AsyncClient]:
    async with await AsyncClient.connect(f"127.0.0.1:{server.port}", timeout=20) as c:
        yield c


@pytest.fixture
def server_process(tmp_path: Path) -> Iterator[ServerProcess]:
    sp = ServerProcess(tmp_path / "data").start()
    try:
        yield sp
    finally:
        sp.stop()


@pytest.fixture
def sync_client(server_process: ServerProcess) -> Iterator[Client]:
    with Client.connect(server_process.target, timeout=20) as c:
        yield c
