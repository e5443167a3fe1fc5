"""The quotas section of the server config, and the instruction meter's window."""

from __future__ import annotations

from pathlib import Path

import pytest

from machineserver.server.config import load
from machineserver.server.core.quotas import InstructionMeter, QuotaConfig, TenantQuotas, parse_config
from machineserver.server.drivers.base import Counters


def test_quotas_from_the_yaml_config(tmp_path: Path) -> None:
    path = tmp_path / "server.yaml"
    path.write_text("quotas:\n  default: {live_sessions: 5, instructions_per_hour: 1000000}\n"
                    "  tenants:\n    ci: {live_sessions: 50}\n    lab: {}\n")
    cfg = load(["--config", str(path)])
    assert cfg.quotas.of("anyone") == TenantQuotas(live_sessions=5, instructions_per_hour=1_000_000)
    # an override replaces only the limits it names
    assert cfg.quotas.of("ci") == TenantQuotas(live_sessions=50, instructions_per_hour=1_000_000)
    assert cfg.quotas.of("lab") == cfg.quotas.default
    assert load([]).quotas == QuotaConfig()  # no section: unlimited


@pytest.mark.parametrize(("section", "named"), [
    ({"default": {"live_session": 1}}, "unknown quota 'live_session'"),
    ({"default": {"live_sessions": -1}}, "quotas.default.live_sessions"),
    ({"default": {"live_sessions": 1.5}}, "quotas.default.live_sessions"),
    ({"default": {"live_sessions": "many"}}, "quotas.default.live_sessions"),
    ({"tenants": {"t": {"program_bytes": True}}}, "quotas.tenants.t.program_bytes"),
    ({"tenants": ["t"]}, "quotas.tenants"),
    ({"defaults": {}}, "unknown quotas setting 'defaults'"),
    ("5", "quotas must be a mapping"),
])
def test_bad_quotas_are_refused_naming_the_setting(section: object, named: str) -> None:
    with pytest.raises(ValueError, match=named.replace(".", r"\.").replace("(", r"\(")):
        parse_config(section, "server.yaml")


class FakeMachine:
    def __init__(self) -> None:
        self.instructions = 0
        self.ns = 0

    def counters(self) -> Counters:
        return Counters(self.instructions, self.ns)


def test_meter_window_reset_restore_and_uncounted_backends() -> None:
    now = [1000.0]
    meter = InstructionMeter(window=10.0, clock=lambda: now[0])
    m = FakeMachine()
    m.instructions = 500
    meter.observe("s", "t", m, 100.0)  # type: ignore[arg-type]
    assert meter.used("t") == 500
    m.instructions = 800
    meter.observe("s", "t", m, 100.0)  # type: ignore[arg-type]
    assert meter.used("t") == 800
    m.instructions = 100  # a reset: counts from zero again
    meter.observe("s", "t", m, 100.0)  # type: ignore[arg-type]
    assert meter.used("t") == 900
    m.instructions = 10_000_000  # a restore: not execution
    meter.rebase("s", m)  # type: ignore[arg-type]
    meter.observe("s", "t", m, 100.0)  # type: ignore[arg-type]
    assert meter.used("t") == 900
    now[0] += 5
    other = FakeMachine()  # a new machine (power-on) counts from zero
    other.instructions = 50
    meter.observe("s", "t", other, 100.0)  # type: ignore[arg-type]
    assert meter.used("t") == 950 and meter.used("u") == 0
    now[0] += 6  # the first 900 left the window
    assert meter.used("t") == 50
    now[0] += 10
    assert meter.used("t") == 0
    # a backend that counts no instructions: its virtual time at the board's clock
    uncounted = FakeMachine()
    meter.observe("q", "u", uncounted, 50.0)  # type: ignore[arg-type]
    uncounted.ns = 2_000_000  # 2 ms at 50 MHz
    meter.observe("q", "u", uncounted, 50.0)  # type: ignore[arg-type]
    assert meter.used("u") == 100_000
