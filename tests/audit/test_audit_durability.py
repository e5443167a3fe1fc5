"""Same transaction, proven by SIGKILL: a server process killed under a stream of
acknowledged mutations has, for every acknowledged change, its audit entry, and for every
entry that says a change was made, the change; no record without its entry. The log is
read from the database file as the killed server left it, then through a restarted
server (sequences go on after the last)."""

from __future__ import annotations

import contextlib
import signal
import sqlite3
import threading
import time
from pathlib import Path

from machineserver.sdk import Client, errors
from machineserver.v1 import common_pb2 as cpb
from tests.helpers.firmware import firmware
from tests.helpers.server import ServerProcess

S = "/machineserver.v1.SessionService/"
T = "/machineserver.v1.TelemetryService/"
RULE = {"metric": "cpu.percent", "comparison": "COMPARISON_GREATER", "threshold": 99, "duration": "0s"}


def _hammer(target: str, worker: int, stop: threading.Event, acked: list[tuple[str, str, str]]) -> None:
    """Mutations until stopped (or the server dies): alert rules created and some deleted,
    sessions created; each acknowledged one as (request id, method, resource)."""
    with Client.connect(target, timeout=10, retries=False) as client:
        n = 0
        try:
            while not stop.is_set():
                n += 1
                rid = f"w{worker}-{n}"
                if n % 3 == 0:
                    name = client.sessions.create_session(
                        board_template="lm3s6965evb", metadata=[("x-request-id", rid)]).session.name
                    acked.append((rid, S + "CreateSession", name))
                else:
                    name = client.telemetry.create_alert_rule(rule=RULE, metadata=[("x-request-id", rid)]).rule.name
                    acked.append((rid, T + "CreateAlertRule", name))
                    if n % 2 == 0:
                        client.telemetry.delete_alert_rule(name=name, metadata=[("x-request-id", rid + "-del")])
                        acked.append((rid + "-del", T + "DeleteAlertRule", name))
        except errors.MachineServerError:
            pass  # the server was killed


def _continue_and_wait(target: str, name: str) -> None:
    """A Continue that changes the session (halted -> running: committed) and then waits
    for a stop that never comes (echo waits for input): the kill finds it mid-call."""
    with Client.connect(target, timeout=60, retries=False) as client, contextlib.suppress(errors.MachineServerError):
        client.debug.continue_(name=name, wait=True, metadata=[("x-request-id", "waiting-continue")])


def test_every_acknowledged_change_has_its_entry_after_sigkill(server_process: ServerProcess, tmp_path: Path) -> None:
    with Client.connect(server_process.target, timeout=20) as client:
        prog = client.upload_program(firmware("lm3s6965evb", "echo")).program.name
        waiting = client.sessions.create_session(board_template="lm3s6965evb", program=prog, power_on=True).session.name
        continuing = threading.Thread(target=_continue_and_wait, args=(server_process.target, waiting))
        continuing.start()
        while client.sessions.get_session(name=waiting).session.state != cpb.SESSION_STATE_RUNNING:
            time.sleep(0.01)
    acked: list[tuple[str, str, str]] = []
    stop = threading.Event()
    workers = [threading.Thread(target=_hammer, args=(server_process.target, i, stop, acked)) for i in range(3)]
    for w in workers:
        w.start()
    deadline = time.monotonic() + 60
    while len(acked) < 60 and time.monotonic() < deadline:
        time.sleep(0.01)
    server_process.stop(signal.SIGKILL)  # mid-stream: calls are in flight
    stop.set()
    for w in [*workers, continuing]:
        w.join(30)
    assert len(acked) >= 60, f"only {len(acked)} mutations acknowledged in 60 s"

    db = sqlite3.connect(str(server_process.data_dir / "machineserver.sqlite3"))
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        rules = {f"alertRules/{r}" for (r,) in db.execute("SELECT id FROM alert_rules")}
        sessions = {f"sessions/{r}" for (r,) in db.execute("SELECT id FROM sessions")}
        log = db.execute("SELECT id, method, resource, code, request_id FROM audit_events ORDER BY id").fetchall()
        (state,) = db.execute("SELECT state FROM sessions WHERE id = ?", [waiting.split("/")[1]]).fetchone()
    finally:
        db.close()
    ok = {(rid, method, resource) for _, method, resource, code, rid in log if code == "OK"}
    # the call the kill interrupted: its change (running) committed, and its entry with it
    assert state == "running"
    assert ("waiting-continue", "/machineserver.v1.DebugService/Continue", waiting) in ok
    # every acknowledged change: its entry, and the change
    for rid, method, resource in acked:
        assert (rid, method, resource) in ok, f"acknowledged {method} {resource} ({rid}) has no audit entry"
    deleted = {resource for _, method, resource in ok if method == T + "DeleteAlertRule"}
    for _, method, resource in acked:
        if method == T + "CreateAlertRule":
            assert (resource in rules) != (resource in deleted), resource
        elif method == S + "CreateSession":
            assert resource in sessions, resource
    # every entry that says a change was made: the change (committed ones not acknowledged too)
    created_rules = {resource for _, method, resource in ok if method == T + "CreateAlertRule"}
    assert created_rules - deleted == rules
    assert {resource for _, method, resource in ok if method == S + "CreateSession"} == sessions
    assert not [entry for entry in log if entry[3] != "OK"], "no call failed before the kill"
    assert [entry[0] for entry in log] == list(range(log[0][0], log[0][0] + len(log)))  # no gaps

    # a restarted server serves the same log and goes on after its last entry
    again = ServerProcess(server_process.data_dir).start()
    try:
        with Client.connect(again.target, timeout=20) as client:
            listed: list[int] = []
            token = ""
            while True:
                page = client.audit.list_audit_events(page_size=1000, page_token=token)
                listed += [e.sequence for e in page.events]
                token = page.next_page_token
                if not token:
                    break
            assert listed == [entry[0] for entry in log]
            client.telemetry.create_alert_rule(rule=RULE, metadata=[("x-request-id", "after-restart")])
            (latest,) = client.audit.list_audit_events(filter="method=CreateAlertRule AND principal=anonymous",
                                                       page_size=1000).events[-1:]
            assert latest.request_id == "after-restart" and latest.sequence > log[-1][0]
    finally:
        again.stop()
