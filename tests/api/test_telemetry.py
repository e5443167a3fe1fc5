"""TelemetryService: host status from psutil (real), shared samplers, session metrics,
alert rules and their evaluation (with a fake host sampler, named as such)."""

from __future__ import annotations

import time
from dataclasses import replace

import psutil
import pytest

from machineserver.sdk import AsyncClient, errors
from machineserver.server.app import RunningServer
from machineserver.server.core import telemetry
from machineserver.v1 import common_pb2 as cpb
from machineserver.v1 import telemetry_pb2 as tpb
from tests.helpers.api import alert_stream, duration, upload, wait_state
from tests.helpers.backends import require_backend, require_qemu_plugin


async def test_host_status_matches_psutil(client: AsyncClient) -> None:
    st = (await client.telemetry.get_host_status()).status
    assert len(st.cpus) == psutil.cpu_count()
    assert st.memory.total_bytes == psutil.virtual_memory().total
    assert 0 < st.memory.used_bytes < st.memory.total_bytes
    assert st.sources[0].name == "psutil" and st.sources[0].ok
    assert len(st.load_average) == 3


async def test_stream_interval_is_bounded(client: AsyncClient) -> None:
    # sharing one sampler among many subscribers, and the subscriber limit:
    # tests/telemetry/test_streams.py
    with pytest.raises(errors.InvalidArgument):
        async for _ in client.telemetry.stream_host_status(interval=duration(0.001)):
            pass
    with pytest.raises(errors.InvalidArgument):
        async for _ in client.telemetry.stream_host_status(interval=duration(120)):
            pass


async def test_session_metrics_count_steps(client: AsyncClient) -> None:
    prog = await upload(client, "lm3s6965evb", "crc32")
    s = (await client.sessions.create_session(board_template="lm3s6965evb", program=prog, power_on=True)).session
    await client.debug.step(name=s.name, count=12345)
    m = (await client.telemetry.get_session_metrics(name=s.name)).metrics
    assert m.instructions == 12345 and m.virtual_time_ns > 0 and m.session == s.name
    got = []
    async for msg in client.telemetry.stream_session_metrics(name=s.name, interval=duration(0.05)):
        got.append(msg.metrics)
        if len(got) == 2:
            break
    assert got[-1].instructions == 12345


REAL_SAMPLE_HOST = telemetry.sample_host


def fake_sample(cpu: float) -> telemetry.HostSample:
    """A fake host sample (not psutil) with a chosen CPU load and one fake GPU."""
    base = REAL_SAMPLE_HOST()
    return replace(base, time=time.time(), cpu_percent=cpu,
                   gpus=(telemetry.GpuSample(0, "fake-gpu", temperature_celsius=90.0),))


@pytest.fixture
def fake_host(monkeypatch: pytest.MonkeyPatch) -> dict[str, float]:
    """Every host sample the server takes (its alert evaluator's too) is a fake one with
    the CPU load this dict holds, so the real host's load cannot fire or resolve a rule
    behind the test's back."""
    load = {"cpu": 0.0}
    monkeypatch.setattr(telemetry, "sample_host", lambda meter=None: fake_sample(load["cpu"]))
    # the server's own sampler merges the host's extra sources (thermal zones, NVML, ...)
    # into psutil's sample: those would replace the fake GPU
    monkeypatch.setattr(telemetry.HostSampler, "__call__", lambda self, meter=None: fake_sample(load["cpu"]))
    # the tests evaluate the rules themselves: the server's own evaluator would race them with
    # a sample taken (in a thread, a real psutil sample under the fake) before the load changed
    monkeypatch.setattr(telemetry.Telemetry, "_ensure_evaluator", lambda self: None)
    return load


async def test_alert_rules_fire_and_resolve_with_a_fake_sampler(client: AsyncClient, server: RunningServer,
                                                                fake_host: dict[str, float]) -> None:
    tel = server.engine.telemetry
    rule = (await client.telemetry.create_alert_rule(rule={
        "metric": "cpu.percent", "comparison": "COMPARISON_GREATER", "threshold": 80, "duration": "0s",
        "display_name": "busy"})).rule
    assert rule.name.startswith("alertRules/")
    rules = tel.rules()
    async with alert_stream(client) as alerts:
        assert list(alerts.first.firing) == []  # subscribed, and nothing fires yet
        fake_host["cpu"] = 95.0
        tel.evaluate(rules, fake_sample(95.0))
        tel.evaluate(rules, fake_sample(95.0))  # still firing: no second event
        fake_host["cpu"] = 10.0
        tel.evaluate(rules, fake_sample(10.0))
        events = [await alerts.next(5), await alerts.next(5)]
    assert [e.state for e in events] == [tpb.ALERT_STATE_FIRING, tpb.ALERT_STATE_RESOLVED]
    assert events[0].value == 95.0 and events[0].rule == rule.name
    assert not any(e.HasField("subscribed") for e in events)
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


async def test_alert_stream_starts_with_the_alerts_firing_now(client: AsyncClient, server: RunningServer,
                                                               fake_host: dict[str, float]) -> None:
    tel = server.engine.telemetry
    fake_host["cpu"] = 50.0  # neither busy nor idle
    hot = (await client.telemetry.create_alert_rule(rule={
        "metric": "gpu.temperature_celsius", "comparison": "COMPARISON_GREATER", "threshold": 85})).rule
    busy = (await client.telemetry.create_alert_rule(rule={
        "metric": "cpu.percent", "comparison": "COMPARISON_GREATER", "threshold": 80})).rule
    idle = (await client.telemetry.create_alert_rule(rule={
        "metric": "cpu.percent", "comparison": "COMPARISON_LESS", "threshold": 5})).rule
    fake_host["cpu"] = 95.0
    tel.evaluate(tel.rules(), fake_sample(95.0))  # the fake GPU is at 90 C, the CPU at 95 %
    async with alert_stream(client) as alerts:
        firing = {a.rule: a for a in alerts.first.firing}
        assert set(firing) == {hot.name, busy.name}
        assert all(a.state == tpb.ALERT_STATE_FIRING for a in firing.values())
        assert firing[busy.name].value == 95.0 and firing[hot.name].value == 90.0
        assert idle.name not in firing
        fake_host["cpu"] = 1.0
        tel.evaluate(tel.rules(), fake_sample(1.0))  # busy resolves, idle fires
        changes = {(a.rule, a.state) for a in [await alerts.next(5), await alerts.next(5)]}
    assert changes == {(busy.name, tpb.ALERT_STATE_RESOLVED), (idle.name, tpb.ALERT_STATE_FIRING)}
    async with alert_stream(client) as again:
        assert {a.rule for a in again.first.firing} == {hot.name, idle.name}
    await client.telemetry.delete_alert_rule(name=hot.name)
    async with alert_stream(client) as after_delete:
        assert {a.rule for a in after_delete.first.firing} == {idle.name}


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


@pytest.mark.parametrize("backend", ["unicorn", "qemu"])
async def test_counts_say_whether_they_are_exact(client: AsyncClient, backend: str) -> None:
    """The default count is exact on both backends (Unicorn: its native block hook; QEMU:
    its plugin's per-block total), and the same as icount's."""
    require_backend(backend)
    if backend == "qemu":
        require_qemu_plugin()
    prog = await upload(client, "lm3s6965evb", "hello")
    fast = (await client.sessions.create_session(board_template="lm3s6965evb", program=prog, run=True,
                                                 backend=backend)).session
    exact = (await client.sessions.create_session(board_template="lm3s6965evb", program=prog, run=True,
                                                  backend=backend, options={"icount": True})).session
    for s in (fast, exact):
        await wait_state(client, s.name, cpb.SESSION_STATE_EXITED)
    a = (await client.telemetry.get_session_metrics(name=fast.name)).metrics
    b = (await client.telemetry.get_session_metrics(name=exact.name)).metrics
    assert a.counts_exact and b.counts_exact
    # hello is a few hundred instructions: both counts say so, the same
    assert 100 < b.instructions < 100_000 and a.instructions == b.instructions
