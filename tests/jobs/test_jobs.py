"""JobService on the local engine: a real server over gRPC, real firmware (tests/firmware)
on the real Unicorn and QEMU backends. Matrix expansion, verdicts, console input, memory
patches, forks from a snapshot, retries after a killed worker, cancel, a server killed mid-job
and restarted, JUnit read back with junitparser, the merged coverage against the runs' own
reports, bad requests, tenants."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import junitparser
import pytest
from elftools.elf.elffile import ELFFile

from machineserver.sdk import AsyncClient, Client
from machineserver.sdk.errors import MachineServerError as CallError
from machineserver.server.app import RunningServer, start
from machineserver.server.config import ServerConfig
from machineserver.v1 import job_pb2 as jpb
from tests.helpers.api import console_until, duration, until, upload
from tests.helpers.firmware import firmware
from tests.helpers.server import ServerProcess
from tests.tenancy.conftest import create_keys, tenants_on
from tests.tenancy.conftest import server_config as auth_config

BOARD = "mps2-an385"
V = jpb.RunVerdict


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[RunningServer, AsyncClient]]:
    running = await start(ServerConfig(listen="127.0.0.1:0", data_dir=tmp_path / "data", log_level="warning",
                                       workers=2, job_engine="local"))
    try:
        async with await AsyncClient.connect(f"127.0.0.1:{running.port}", timeout=60) as client:
            yield running, client
    finally:
        await running.stop(0.5)


def criteria(**fields: object) -> jpb.RunCriteria:
    return jpb.RunCriteria(**fields)  # type: ignore[arg-type]


async def create(client: AsyncClient, programs: list[str], boards: list[str], backends: list[str],
                 variants: list[jpb.JobVariant], crit: jpb.RunCriteria, **extra: object) -> jpb.Job:
    resp = await client.jobs.create_job(jpb.CreateJobRequest(
        matrix=jpb.JobMatrix(programs=programs, boards=boards, backends=backends, variants=variants),
        criteria=crit, **extra))  # type: ignore[arg-type]
    return resp.job


async def wait_job(client: AsyncClient, name: str, timeout: float = 120) -> tuple[jpb.Job, list[jpb.WatchJobResponse]]:
    """Watch the job to its end: (the last job, every message)."""
    seen: list[jpb.WatchJobResponse] = []

    async def watch() -> None:
        async for msg in client.jobs.watch_job(name=name, timeout=timeout):
            seen.append(msg)

    await asyncio.wait_for(watch(), timeout)
    return seen[-1].job, seen


async def runs_of(client: AsyncClient, job: str, filter_text: str = "") -> list[jpb.JobRun]:
    out: list[jpb.JobRun] = []
    token = ""
    while True:
        resp = await client.jobs.list_job_runs(parent=job, page_size=100, page_token=token, filter=filter_text)
        out.extend(resp.runs)
        token = resp.next_page_token
        if not token:
            return out


def string_address(elf: Path, needle: bytes) -> int:
    """Where ``needle`` lies in the ELF's loaded image."""
    with elf.open("rb") as f:
        for seg in ELFFile(f).iter_segments():
            if seg["p_type"] == "PT_LOAD":
                at = seg.data().find(needle)
                if at >= 0:
                    return int(seg["p_paddr"]) + at
    raise AssertionError(f"{needle!r} not in {elf}")


# --------------------------------------------------------------------------- matrix, verdicts


async def test_matrix_expands_and_judges_on_both_backends(served: tuple[RunningServer, AsyncClient]) -> None:
    _, client = served
    hello = await upload(client, BOARD, "hello")
    fault = await upload(client, BOARD, "fault")
    job = await create(client, [hello, fault], [BOARD, "lm3s6965evb"], ["unicorn", "qemu"],
                       [jpb.JobVariant(name="first"), jpb.JobVariant(name="second")],
                       criteria(expected_exit_code=0, max_instructions=20_000_000, host_timeout=duration(60)),
                       display_name="smoke", labels={"team": "fw"})
    assert job.counts.total == 16 and job.state == jpb.JOB_STATE_RUNNING and job.engine == "local"
    done, messages = await wait_job(client, job.name)
    assert done.state == jpb.JOB_STATE_DONE
    # the job first, then one message per run change, the last the job's end
    assert not messages[0].HasField("run") and not messages[-1].HasField("run")
    assert all(m.HasField("run") for m in messages[1:-1]) and len(messages) >= 2 + 16
    # the programs are built for mps2-an385: on lm3s6965evb (RAM elsewhere) they fault at once
    assert (done.counts.passed, done.counts.failed, done.counts.errored, done.counts.retries) == (4, 12, 0, 0)
    runs = await runs_of(client, job.name)
    assert [r.name for r in runs] == [f"{job.name}/runs/{i}" for i in range(16)]
    combos = {(r.program, r.board, r.backend, r.variant) for r in runs}
    assert combos == {(p, b, be, v) for p in (hello, fault) for b in (BOARD, "lm3s6965evb")
                      for be in ("unicorn", "qemu") for v in ("first", "second")}
    for r in runs:
        assert r.node == "local" and r.attempts == 1 and r.host_time.ToNanoseconds() > 0
        assert r.HasField("start_time") and r.HasField("end_time")
        if r.board == "lm3s6965evb":
            assert r.verdict == V.RUN_VERDICT_FAILED and r.failure_reason.startswith("fault at pc 0x"), r
            assert not r.HasField("exit_code")
        elif r.program == hello:
            assert r.verdict == V.RUN_VERDICT_PASSED, r
            assert r.console_tail == f"Hello from {BOARD}!\n".encode() and r.exit_code == 0
        else:
            assert r.verdict == V.RUN_VERDICT_FAILED, r
            assert r.exit_code == 3 and r.failure_reason == "exited with code 3, expected 0"
            assert r.console_tail.endswith(b"hardfault\n")
        if r.backend == "unicorn" and r.board == BOARD:
            assert r.instructions > 0
    failed = await runs_of(client, job.name, "verdict=FAILED AND backend=qemu")
    assert len(failed) == 6 and {(r.program, r.board) for r in failed} == {
        (fault, BOARD), (fault, "lm3s6965evb"), (hello, "lm3s6965evb")}
    listed = (await client.jobs.list_jobs(filter="labels.team=fw")).jobs
    assert [j.name for j in listed] == [job.name] and listed[0].counts.passed == 4
    assert (await client.jobs.list_jobs(filter="state=RUNNING")).jobs == []


async def test_console_input_regexes_and_budget(served: tuple[RunningServer, AsyncClient]) -> None:
    _, client = served
    echo = await upload(client, BOARD, "echo")
    job = await create(client, [echo], [BOARD], ["unicorn"], [
        jpb.JobVariant(name="silent"),
        jpb.JobVariant(name="quit", console_input=b"hi there\nq"),
        jpb.JobVariant(name="panic", console_input=b"PANIC\n"),
    ], criteria(pass_regex="bye", fail_regex="PAN+IC", max_instructions=3_000_000, host_timeout=duration(120)))
    done, _ = await wait_job(client, job.name)
    by_variant = {r.variant: r for r in await runs_of(client, job.name)}
    silent, quit_, panic = by_variant["silent"], by_variant["quit"], by_variant["panic"]
    assert silent.verdict == V.RUN_VERDICT_FAILED and silent.failure_reason == "budget reached: 3000000 instructions"
    assert silent.instructions == 3_000_000 and silent.console_tail == b"echo ready\n"
    assert quit_.verdict == V.RUN_VERDICT_PASSED and quit_.console_tail == b"echo ready\nhi there\nbye\n"
    assert panic.verdict == V.RUN_VERDICT_FAILED and panic.failure_reason == "fail regex matched: 'PANIC'"
    assert (done.counts.passed, done.counts.failed) == (1, 2)


async def test_memory_patch_variant(served: tuple[RunningServer, AsyncClient]) -> None:
    _, client = served
    hello = await upload(client, BOARD, "hello")
    at = string_address(firmware(BOARD, "hello"), b"Hello from")
    job = await create(client, [hello], [BOARD], ["unicorn"], [
        jpb.JobVariant(name="plain"),
        jpb.JobVariant(name="patched", memory_patches=[jpb.MemoryPatch(address=at, data=b"J")]),
    ], criteria(pass_regex="^Hello from", expected_exit_code=0, max_instructions=20_000_000))
    await wait_job(client, job.name)
    by_variant = {r.variant: r for r in await runs_of(client, job.name)}
    assert by_variant["plain"].verdict == V.RUN_VERDICT_PASSED
    patched = by_variant["patched"]
    assert patched.console_tail == f"Jello from {BOARD}!\n".encode()
    assert patched.verdict == V.RUN_VERDICT_FAILED
    assert patched.failure_reason == "exited with code 0 before the pass regex matched"


async def test_runs_fork_from_a_snapshot(served: tuple[RunningServer, AsyncClient]) -> None:
    """A session boots echo until it waits for input; its snapshot is where the fork
    variant's runs start (they never print the banner), only on the snapshot's board and
    backend; the boot variant boots on every backend."""
    _, client = served
    echo = await upload(client, BOARD, "echo")
    session = (await client.sessions.create_session(board_template=BOARD, backend="unicorn", program=echo,
                                                    power_on=True, run=True)).session.name
    await console_until(client, session, b"echo ready\n")
    await client.sessions.pause_session(name=session)
    snap = (await client.sessions.create_snapshot(name=session)).snapshot.name
    await client.sessions.delete_session(name=session)
    job = await create(client, [echo], [BOARD], ["unicorn", "qemu"], [
        jpb.JobVariant(name="boot"),
        jpb.JobVariant(name="fork", console_input=b"q", snapshot=snap),
    ], criteria(pass_regex="ready|bye", host_timeout=duration(60)))
    assert job.counts.total == 3  # the fork variant only where its snapshot was taken
    done, _ = await wait_job(client, job.name)
    assert done.counts.passed == 3, await runs_of(client, job.name)
    runs = {(r.backend, r.variant): r for r in await runs_of(client, job.name)}
    assert set(runs) == {("unicorn", "boot"), ("unicorn", "fork"), ("qemu", "boot")}
    assert runs[("unicorn", "fork")].console_tail == b"bye\n"  # no banner: it never booted
    assert runs[("unicorn", "fork")].exit_code == 0
    assert runs[("unicorn", "boot")].console_tail == runs[("qemu", "boot")].console_tail == b"echo ready\n"


# --------------------------------------------------------------------------- failures, retries, cancel


async def _running(client: AsyncClient, job: str, attempt: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = await runs_of(client, job)
        if any(r.verdict == V.RUN_VERDICT_RUNNING and r.attempts == attempt for r in runs):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"no run of {job} started attempt {attempt}")


async def test_killed_worker_is_retried_then_errored(served: tuple[RunningServer, AsyncClient]) -> None:
    running, client = served
    echo = await upload(client, BOARD, "echo")
    job = await create(client, [echo], [BOARD], ["unicorn"], [jpb.JobVariant(name="waits")],
                       criteria(pass_regex="bye", host_timeout=duration(60), retries=1))
    assert running.engine.workers is not None
    for attempt in (1, 2):
        await _running(client, job.name, attempt)
        pool = running.engine.workers
        await until(lambda: any(link.alive and link.machines for link in pool.links), 30,  # noqa: B023
                    what="the run's machine in a worker")
        await asyncio.sleep(0.2)  # running its program
        for link in pool.links:
            if link.alive and link.machines:
                os.kill(link.pid, signal.SIGKILL)
    done, _ = await wait_job(client, job.name)
    (run,) = await runs_of(client, job.name)
    assert run.verdict == V.RUN_VERDICT_ERRORED and run.attempts == 2, run
    assert "failed" in run.failure_reason or "died" in run.failure_reason, run.failure_reason
    assert done.counts.errored == 1 and done.counts.retries == 1


async def test_cancel_stops_running_and_queued_runs(served: tuple[RunningServer, AsyncClient]) -> None:
    running, client = served
    echo = await upload(client, BOARD, "echo")
    job = await create(client, [echo], [BOARD], ["unicorn"], [jpb.JobVariant(name=f"v{i}") for i in range(5)],
                       criteria(pass_regex="bye", host_timeout=duration(120)))
    await _running(client, job.name, 1)
    cancelled = (await client.jobs.cancel_job(name=job.name)).job
    assert cancelled.state == jpb.JOB_STATE_CANCELLED and cancelled.counts.cancelled == 5
    runs = await runs_of(client, job.name)
    assert {r.verdict for r in runs} == {V.RUN_VERDICT_CANCELLED}
    assert len(running.engine.jobs.run_engine.nodes()) == 1
    done, messages = await wait_job(client, job.name)  # an ended job: one message, then the end
    assert len(messages) == 1 and done.state == jpb.JOB_STATE_CANCELLED


# --------------------------------------------------------------------------- JUnit, coverage


async def test_junit_read_back(served: tuple[RunningServer, AsyncClient], tmp_path: Path) -> None:
    _, client = served
    hello = await upload(client, BOARD, "hello")
    fault = await upload(client, BOARD, "fault")
    job = await create(client, [hello, fault], [BOARD], ["unicorn"], [jpb.JobVariant(name="base")],
                       criteria(expected_exit_code=0, max_instructions=20_000_000), display_name="nightly")
    await wait_job(client, job.name)
    data = b"".join([m.chunk async for m in client.jobs.export_job_junit(name=job.name)])
    path = tmp_path / "report.xml"
    path.write_bytes(data)
    xml = junitparser.JUnitXml.fromfile(str(path))
    (suite,) = list(xml)
    assert suite.name == "nightly" and suite.tests == 2 and suite.failures == 1 and suite.errors == 0
    cases = {case.classname: case for case in suite}
    ok, bad = cases[f"{hello.removeprefix('programs/')}/{BOARD}/unicorn"], \
        cases[f"{fault.removeprefix('programs/')}/{BOARD}/unicorn"]
    assert ok.name == "base" and ok.is_passed
    (failure,) = bad.result
    assert isinstance(failure, junitparser.Failure)
    assert failure.message == "exited with code 3, expected 0" and "hardfault" in (failure.text or "")
    props = {p.get("name"): p.get("value") for p in bad._elem.iter("property")}
    assert props["node"] == "local" and props["attempts"] == "1" and int(props["instructions"]) > 0


def _halfwords(blocks: list[list[int]]) -> dict[int, int]:
    out: dict[int, int] = {}
    for first, size, count in blocks:
        for a in range(first, first + max(size, 2), 2):
            out[a] = out.get(a, 0) + count
    return out


async def test_merged_coverage_equals_the_union_of_the_runs(served: tuple[RunningServer, AsyncClient],
                                                            tmp_path: Path) -> None:
    _, client = served
    cov = await upload(client, BOARD, "coverage")
    job = await create(client, [cov], [BOARD], ["unicorn", "qemu"],
                       [jpb.JobVariant(name="a"), jpb.JobVariant(name="b")],
                       criteria(expected_exit_code=0, coverage=True, host_timeout=duration(60)))
    done, _ = await wait_job(client, job.name)
    assert done.counts.passed == 4 and done.coverage_report.startswith("coverageReports/")
    runs = await runs_of(client, job.name)
    assert all(r.coverage_report.startswith("coverageReports/") for r in runs)
    # independently: each run's own report as stored, summed per halfword here
    db = sqlite3.connect(str(tmp_path / "data" / "machineserver.sqlite3"))
    try:
        def blocks(report: str) -> list[list[int]]:
            row = db.execute("SELECT data FROM coverage_reports WHERE id = ?",
                             [report.removeprefix("coverageReports/")]).fetchone()
            return list(json.loads(row[0])["blocks"])

        union: dict[int, int] = {}
        for r in runs:
            own = _halfwords(blocks(r.coverage_report))
            assert own, r
            for a, c in own.items():
                union[a] = union.get(a, 0) + c
        assert _halfwords(blocks(done.coverage_report)) == union
    finally:
        db.close()
    summary = await client.coverage.get_coverage_summary(name=done.coverage_report)
    one = await client.coverage.get_coverage_summary(name=runs[0].coverage_report)
    assert summary.totals.lines_hit >= one.totals.lines_hit > 0
    reports = {r.name for r in (await client.coverage.list_coverage_reports()).reports}
    assert done.coverage_report in reports


# --------------------------------------------------------------------------- bad requests, tenants


async def test_bad_requests_name_their_fields(served: tuple[RunningServer, AsyncClient]) -> None:
    _, client = served
    hello = await upload(client, BOARD, "hello")
    fault = await upload(client, BOARD, "fault")
    echo = await upload(client, BOARD, "echo")
    budget = criteria(max_instructions=1000)
    cases: list[tuple[list[str], list[str], list[str], list[jpb.JobVariant], jpb.RunCriteria, str]] = [
        ([], [BOARD], [], [], budget, "matrix.programs"),
        ([hello], [], [], [], budget, "matrix.boards"),
        ([hello], [BOARD], ["nope"], [], budget, "matrix.backends[0]"),
        ([hello], [BOARD], [], [], criteria(), "criteria.max_instructions"),
        ([hello], [BOARD], [], [], criteria(max_instructions=1, pass_regex="(unclosed"), "criteria.pass_regex"),
        ([hello], [BOARD], [], [], criteria(max_instructions=1, fail_regex="[z-a]"), "criteria.fail_regex"),
        ([hello], [BOARD], [], [], criteria(max_instructions=1, retries=6), "criteria.retries"),
        ([hello], [BOARD], [], [], criteria(host_timeout=duration(7200)), "criteria.host_timeout"),
        ([hello, fault], [BOARD], [], [], criteria(max_instructions=1, coverage=True), "criteria.coverage"),
        ([hello], [BOARD], [], [jpb.JobVariant(name="x"), jpb.JobVariant(name="x")], budget,
         "matrix.variants[1].name"),
        ([hello], [BOARD], [], [jpb.JobVariant(name="")], budget, "matrix.variants[0].name"),
        ([hello], [BOARD], [], [jpb.JobVariant(name="p", memory_patches=[jpb.MemoryPatch(address=0xF0000000,
                                                                                         data=b"x")])],
         budget, "matrix.variants[0].memory_patches[0].address"),
        ([hello], [BOARD], [], [jpb.JobVariant(name=f"v{i}") for i in range(10_001)], budget, "matrix.variants"),
        ([hello, fault, echo], [BOARD, "lm3s6965evb"], ["unicorn", "qemu"],
         [jpb.JobVariant(name=f"v{i}") for i in range(1024)], budget, "matrix"),  # 12,288 runs
        (["programs/missing"], [BOARD], [], [], budget, ""),
    ]
    for programs, boards, backends, variants, crit, field in cases:
        with pytest.raises(CallError) as err:
            await create(client, programs, boards, backends, variants, crit)
        if field:
            assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT, (field, err.value)
            assert err.value.field_violations[0][0] == field, err.value
        else:
            assert err.value.code == grpc.StatusCode.NOT_FOUND
    # a snapshot of another board than the matrix's
    session = (await client.sessions.create_session(board_template="lm3s6965evb", backend="unicorn",
                                                    power_on=True)).session.name
    snap = (await client.sessions.create_snapshot(name=session)).snapshot.name
    with pytest.raises(CallError) as err:
        await create(client, [hello], [BOARD], ["unicorn"], [jpb.JobVariant(name="s", snapshot=snap)], budget)
    assert err.value.field_violations[0][0] == "matrix.variants[0].snapshot", err.value
    assert (await client.jobs.list_jobs()).jobs == []  # nothing half-made


async def test_another_tenants_job_is_not_found(tmp_path: Path) -> None:
    running = await start(auth_config(tmp_path / "data"))
    try:
        keys = await create_keys(running, (tmp_path / "admin.key").read_text().strip())
        async with tenants_on(running, keys) as t:
            hello = await upload(t.a, BOARD, "hello")
            job = await create(t.a, [hello], [BOARD], ["unicorn"], [],
                               criteria(expected_exit_code=0, max_instructions=20_000_000))
            assert job.owner == "apikey:alice" and job.tenant == "a"
            for call in (t.b.jobs.get_job(name=job.name), t.b.jobs.cancel_job(name=job.name),
                         t.b.jobs.list_job_runs(parent=job.name)):
                with pytest.raises(CallError) as err:
                    await call
                assert err.value.code == grpc.StatusCode.NOT_FOUND
            with pytest.raises(CallError) as err:  # nor may b run a's program
                await create(t.b, [hello], [BOARD], ["unicorn"], [], criteria(max_instructions=1))
            assert err.value.code == grpc.StatusCode.NOT_FOUND
            assert (await t.b.jobs.list_jobs()).jobs == []
            done, _ = await wait_job(t.a, job.name)
            assert done.counts.passed == 1
            assert [j.name for j in (await t.admin.jobs.list_jobs()).jobs] == [job.name]
    finally:
        await running.stop(0.5)


# --------------------------------------------------------------------------- restart


def test_killed_server_resumes_its_jobs(tmp_path: Path) -> None:
    """SIGKILL mid-job: after the restart the job completes; the runs that were running
    ran again (their retry), none is lost."""
    sp = ServerProcess(tmp_path / "data", "--workers", "2", "--job-engine", "local").start()
    try:
        with Client.connect(sp.target, timeout=60) as c:
            echo = c.upload_program(firmware(BOARD, "echo")).program.name
            job = c.jobs.create_job(jpb.CreateJobRequest(
                matrix=jpb.JobMatrix(programs=[echo], boards=[BOARD], backends=["unicorn"],
                                     variants=[jpb.JobVariant(name=f"v{i}") for i in range(4)]),
                criteria=jpb.RunCriteria(pass_regex="bye", max_instructions=4_000_000,
                                         host_timeout=duration(120), retries=1))).job
            deadline = time.monotonic() + 60
            while not any(r.verdict == V.RUN_VERDICT_RUNNING
                          for r in c.jobs.list_job_runs(parent=job.name).runs):
                assert time.monotonic() < deadline, "no run started"
                time.sleep(0.05)
        sp.stop(signal.SIGKILL)
        sp = ServerProcess(tmp_path / "data", "--workers", "2", "--job-engine", "local").start()
        with Client.connect(sp.target, timeout=60) as c:
            deadline = time.monotonic() + 120
            while (got := c.jobs.get_job(name=job.name).job).state == jpb.JOB_STATE_RUNNING:
                assert time.monotonic() < deadline, got
                time.sleep(0.1)
            runs = c.jobs.list_job_runs(parent=job.name).runs
            assert got.state == jpb.JOB_STATE_DONE and got.counts.total == len(runs) == 4
            assert {r.verdict for r in runs} == {V.RUN_VERDICT_FAILED}, runs
            assert all(r.failure_reason == "budget reached: 4000000 instructions" for r in runs)
            assert got.counts.retries >= 1 and any(r.attempts == 2 for r in runs)
    finally:
        sp.stop()
