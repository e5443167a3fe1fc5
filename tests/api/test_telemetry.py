"""TelemetryService: host status from psutil (real), shared samplers, session metrics,
alert rules and their evaluation (with a fake host sampler, named as such)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import psutil
import pytest
from google.protobuf import duration_pb2

from machineserver.sdk import AsyncClient, errors
from machineserver.server.app import RunningServer
from machineserver.server.core import telemetry
from machineserver.v1 import telemetry_pb2 as tpb
from tests.api.test_sessions import upload


def interval(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d


async def test_host_status_matches_psutil(client: AsyncClient) -> None:
    st = (await client.telemetry.get_host_status()).status
    assert len(st.cpus) == psutil.cpu_count()
    assert st.memory.total_bytes == psutil.virtual_memory().total
    assert 0 < st.memory.used_bytes < st.memory.total_bytes
    assert st.sources[0].name == "psutil" and st.sources[0].ok
    assert len(st.load_average) == 3


async def test_stream_interval_is_bounded(client: AsyncClient) -> None:
    # sharing one sampler among many subscribers: tests/telemetry/test_streams.py
    with pytest.raises(errors.InvalidArgument):
        async for _ in client.telemetry.stream_host_status(interval=interval(0.001)):
            pass
    with pytest.raises(errors.InvalidArgument):
        async for _ in client.telemetry.stream_host_status(interval=interval(120)):
            pass


async def test_subscriber_limit(client: AsyncClient, server: RunningServer) -> None:
    server.engine.telemetry.max_subscribers = 2

    async def hold() -> None:
        async for _ in client.telemetry.stream_host_status(interval=interval(0.05)):
            await asyncio.sleep(10)

    tasks = [asyncio.create_task(hold()) for _ in range(2)]
    await asyncio.sleep(0.3)
    try:
        with pytest.raises(errors.ResourceExhausted):
            async for _ in client.telemetry.stream_host_status(interval=interval(0.05)):
                pass
    finally:
        for t in tasks:
            t.cancel()


async def test_session_metrics_count_steps(client: AsyncClient) -> None:
    prog = await upload(client, "lm3s6965evb", "crc32")
    s = (await client.sessions.create_session(board_template="lm3s6965evb", program=prog, power_on=True)).session
    await client.debug.step(name=s.name, count=12345)
    m = (await client.telemetry.get_session_metrics(name=s.name)).metrics
    assert m.instructions == 12345 and m.virtual_time_ns > 0 and m.session == s.name
    got = []
    async for msg in client.telemetry.stream_session_metrics(name=s.name, interval=interval(0.05)):
        got.append(msg.metrics)
        if len(got) == 2:
            break
    assert got[-1].instructions == 12345


def fake_sample(cpu: float) -> telemetry.HostSample:
    """A fake host sample (not psutil) with a chosen CPU load and one fake GPU."""
    base = telemetry.sample_host()
    return replace(base, time=time.time(), cpu_percent=cpu,
                   gpus=(telemetry.GpuSample(0, "fake-gpu", temperature_celsius=90.0),))


async def test_alert_rules_fire_and_resolve_with_a_fake_sampler(client: AsyncClient, server: RunningServer) -> None:
    tel = server.engine.telemetry
    rule = (await client.telemetry.create_alert_rule(rule={
        "metric": "cpu.percent", "comparison": "COMPARISON_GREATER", "threshold": 80, "duration": "0s",
        "display_name": "busy"})).rule
    assert rule.name.startswith("alertRules/")
    events: list[tpb.StreamAlertsResponse] = []

    async def listen() -> None:
        async for ev in client.telemetry.stream_alerts():
            events.append(ev)
            if len(events) == 2:
                return

    task = asyncio.create_task(listen())
    await asyncio.sleep(0.2)
    rules = tel.rules()
    tel.evaluate(rules, fake_sample(95.0))
    tel.evaluate(rules, fake_sample(95.0))  # still firing: no second event
    tel.evaluate(rules, fake_sample(10.0))
    await asyncio.wait_for(task, 5)
    assert [e.state for e in events] == [tpb.ALERT_STATE_FIRING, tpb.ALERT_STATE_RESOLVED]
    assert events[0].value == 95.0 and events[0].rule == rule.name
    assert server.engine.db.count("alert_events") == 2
    listed = await client.telemetry.list_alert_rules()
    assert [r.name for r in listed.rules] == [rule.name]
    await client.telemetry.delete_alert_rule(name=rule.name)
    with pytest.raises(errors.NotFound):
        await client.telemetry.delete_alert_rule(name=rule.name)


@pytest.mark.parametrize(
    ("rule", "field"),
    [
        ({"metric": "nope", "comparison": "COMPARISON_GREATER"}, "rule.metric"),
        ({"metric": "cpu.percent"}, "rule.comparison"),
        ({"metric": "cpu.percent", "comparison": "COMPARISON_LESS", "threshold": "NaN"}, "rule.threshold"),
        ({"metric": "cpu.percent", "comparison": "COMPARISON_LESS", "duration": "-5s"}, "rule.duration"),
    ],
)
async def test_bad_alert_rules(client: AsyncClient, rule: dict, field: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(errors.InvalidArgument) as exc:
        await client.telemetry.create_alert_rule(rule=rule)
    assert exc.value.field_violations[0][0] == field


async def test_duration_holds_before_firing() -> None:
    import tempfile
    from pathlib import Path

    from machineserver.server.store.db import Database

    tel = telemetry.Telemetry(Database(Path(tempfile.mkdtemp()) / "t.db"))
    rule = telemetry.AlertRuleRecord(id="r", metric="gpu.temperature_celsius", comparison=">", threshold=85, duration_s=30)
    sub = tel.alerts.subscribe()
    s0 = fake_sample(0)
    tel.evaluate([rule], replace(s0, time=1000.0))
    tel.evaluate([rule], replace(s0, time=1020.0))
    assert not sub._items
    tel.evaluate([rule], replace(s0, time=1031.0))
    assert sub._items and sub._items[0].firing


async def test_counts_say_whether_they_are_exact(client: AsyncClient) -> None:
    prog = await upload(client, "lm3s6965evb", "hello")
    fast = (await client.sessions.create_session(board_template="lm3s6965evb", program=prog, run=True)).session
    exact = (await client.sessions.create_session(board_template="lm3s6965evb", program=prog, run=True,
                                                  options={"icount": True})).session
    for _ in range(100):
        a = (await client.telemetry.get_session_metrics(name=fast.name)).metrics
        b = (await client.telemetry.get_session_metrics(name=exact.name)).metrics
        if a.state == b.state == 4:  # both exited
            break
        await asyncio.sleep(0.02)
    assert b.counts_exact and not a.counts_exact
    # hello is a few hundred instructions: the exact count says so (the estimate is far off)
    assert 100 < b.instructions < 100_000
