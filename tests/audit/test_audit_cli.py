"""``msctl audit list|watch`` against a real server process: a table, filters, times,
JSON lines, the live view; and the time parser."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import time

import pytest

from machineserver.cli.audit import parse_when
from machineserver.sdk import Client
from tests.helpers.server import ServerProcess
from tests.helpers.tools import VENV_BIN

RULE = {"metric": "cpu.percent", "comparison": "COMPARISON_GREATER", "threshold": 99, "duration": "0s"}


def msctl(sp: ServerProcess, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, MSCTL_TARGET=sp.target)
    return subprocess.run([str(VENV_BIN / "msctl"), *args], capture_output=True, text=True, env=env, timeout=timeout)


def test_msctl_audit_list_prints_a_table(server_process: ServerProcess) -> None:
    with Client.connect(server_process.target, timeout=20) as client:
        rule = client.telemetry.create_alert_rule(rule=RULE, metadata=[("x-request-id", "cli-rule")]).rule.name
        session = client.sessions.create_session(board_template="lm3s6965evb").session.name
        client.telemetry.delete_alert_rule(name=rule)
    out = msctl(server_process, "audit", "list")
    assert out.returncode == 0, out.stderr
    header, *rows = out.stdout.splitlines()
    assert header.split() == ["SEQ", "TIME", "PRINCIPAL", "TENANT", "METHOD", "RESOURCE", "CODE", "VIA", "ADDRESS",
                              "LENGTH", "REQUEST-ID"]
    assert len(rows) == 3
    first = rows[0].split()
    assert first[0] == "1" and first[3:5] == ["anonymous", "default"]  # the time is two words
    assert first[5:] == ["TelemetryService/CreateAlertRule", rule, "OK", "rpc", "-", "-", "cli-rule"]
    assert session in rows[1] and "SessionService/CreateSession" in rows[1]
    # the columns line up: every row's method starts where the header's METHOD does
    column = header.index("METHOD")
    assert all(r[column:].startswith(("TelemetryService/", "SessionService/")) for r in rows)

    filtered = msctl(server_process, "audit", "list", "--filter", f"resource={rule}")
    assert [r.split()[5] for r in filtered.stdout.splitlines()[1:]] == ["TelemetryService/CreateAlertRule",
                                                                         "TelemetryService/DeleteAlertRule"]
    assert msctl(server_process, "audit", "list", "--since", "1h").stdout.count("\n") == 4
    future = (dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)).isoformat()
    assert msctl(server_process, "audit", "list", "--since", future).stdout.strip() == "no audit entries match"
    assert len(msctl(server_process, "audit", "list", "--until", "1h").stdout.splitlines()) == 1
    lines = msctl(server_process, "--json", "audit", "list", "--limit", "2").stdout.splitlines()
    assert [json.loads(line)["sequence"] for line in lines] == ["1", "2"]  # int64 in JSON: a string
    bad = msctl(server_process, "audit", "list", "--filter", "colour=red")
    assert bad.returncode == 1 and "filter" in bad.stderr


def test_msctl_audit_watch_shows_the_past_then_new_entries(server_process: ServerProcess) -> None:
    with Client.connect(server_process.target, timeout=20) as client:
        first = client.telemetry.create_alert_rule(rule=RULE).rule.name
        env = dict(os.environ, MSCTL_TARGET=server_process.target)
        proc = subprocess.Popen([str(VENV_BIN / "msctl"), "audit", "watch", "--since", "10m", "--count", "2"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        try:
            assert proc.stdout is not None
            header = proc.stdout.readline()
            assert header.split()[:2] == ["SEQ", "TIME"]
            past = proc.stdout.readline()
            assert first in past
            second = client.telemetry.create_alert_rule(rule=RULE).rule.name
            out, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 0, err
    assert second in out and "CreateAlertRule" in out


def test_parse_when() -> None:
    now = dt.datetime(2026, 1, 2, 12, 0, tzinfo=dt.UTC)
    assert parse_when("30m", now) == now - dt.timedelta(minutes=30)
    assert parse_when("2h", now) == now - dt.timedelta(hours=2)
    assert parse_when("1.5d", now) == now - dt.timedelta(hours=36)
    assert parse_when("2026-01-01T00:00:00", now) == dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    assert parse_when("2026-01-01T01:00:00+01:00", now).timestamp() == dt.datetime(2026, 1, 1, tzinfo=dt.UTC).timestamp()
    with pytest.raises(Exception, match="duration ago"):
        parse_when("yesterday", now)
    assert time.time() - parse_when("10s").timestamp() == pytest.approx(10, abs=5)
