"""Client patterns that backtrack catastrophically (``(a|aa)+$`` against a long run of "a"
followed by something else: exponential in the run's length with Python's ``re``) must not
stall the server. ExpectConsole's pattern and a job's pass regex are searched with a time
limit (core/patterns.py): the call answers INVALID_ARGUMENT naming the pattern, the job's run
ends ERRORED with the reason, and another caller's calls are answered meanwhile."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from machineserver.sdk import AsyncClient, errors
from machineserver.server.app import RunningServer, start
from machineserver.server.config import ServerConfig
from machineserver.server.core.patterns import SEARCH_TIMEOUT_S, ClientPattern, PatternTooSlow
from machineserver.v1 import common_pb2 as cpb
from machineserver.v1 import job_pb2 as jpb
from tests.helpers.api import console_until, duration, upload

BOARD = "mps2-an385"
EVIL = r"(a|aa)+$"
BAIT = b"a" * 64 + b"!\n"  # with re, (a|aa)+$ would try ~fib(64) ways before giving up


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[RunningServer, AsyncClient]]:
    running = await start(ServerConfig(listen="127.0.0.1:0", data_dir=tmp_path / "data", log_level="warning",
                                       workers=1, job_engine="local"))
    try:
        async with await AsyncClient.connect(f"127.0.0.1:{running.port}", timeout=60) as client:
            yield running, client
    finally:
        await running.stop(0.5)


def test_a_slow_search_is_cut_off() -> None:
    pattern = ClientPattern(EVIL, "pattern", 4096)
    began = time.monotonic()
    with pytest.raises(PatternTooSlow, match="pattern: a search took over"):
        pattern.search(BAIT.decode())
    assert time.monotonic() - began < 30 * SEARCH_TIMEOUT_S  # cut off, not run to its end (years)
    assert pattern.search("xx aaaa")  # the same pattern on an easy subject: an ordinary match


async def test_expect_console_with_a_catastrophic_pattern(served: tuple[RunningServer, AsyncClient]) -> None:
    _, client = served
    echo = await upload(client, BOARD, "echo")
    name = (await client.sessions.create_session(board_template=BOARD, backend="unicorn", program=echo,
                                                 run=True)).session.name
    await console_until(client, name, b"echo ready\n")
    await client.sessions.write_console(name=name, data=BAIT)
    await console_until(client, name, BAIT)

    async def pings() -> int:
        """Another caller's calls, answered while the evil expect is in progress."""
        answered = 0
        for _ in range(5):
            await client.sessions.get_session(name=name, timeout=5)
            answered += 1
        return answered

    evil = client.sessions.expect_console(name=name, pattern=EVIL, budget=cpb.Budget(host_time=duration(5)))
    refused, answered = await asyncio.gather(evil, pings(), return_exceptions=True)
    assert isinstance(refused, errors.InvalidArgument), refused
    assert "pattern" in str(refused) and "took over" in str(refused)
    assert answered == 5  # answered while the expect searched (each within its 5 s deadline)
    assert await pings() == 5
    state = (await client.sessions.get_session(name=name)).session.state
    assert state == cpb.SESSION_STATE_RUNNING  # the expect left it as it found it


async def test_a_jobs_catastrophic_pass_regex_errors_the_run(served: tuple[RunningServer, AsyncClient]) -> None:
    _, client = served
    echo = await upload(client, BOARD, "echo")
    job = (await client.jobs.create_job(jpb.CreateJobRequest(
        matrix=jpb.JobMatrix(programs=[echo], boards=[BOARD], backends=["unicorn"],
                             variants=[jpb.JobVariant(name="bait", console_input=BAIT)]),
        criteria=jpb.RunCriteria(pass_regex=EVIL, max_instructions=5_000_000, host_timeout=duration(60))))).job
    async for msg in client.jobs.watch_job(name=job.name, timeout=120):
        last = msg.job
    assert last.counts.errored == 1
    runs = (await client.jobs.list_job_runs(parent=job.name)).runs
    assert [r.verdict for r in runs] == [jpb.RunVerdict.RUN_VERDICT_ERRORED]
    assert "criteria.pass_regex: a search took over" in runs[0].failure_reason
