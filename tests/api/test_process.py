"""The server as a real process: SIGKILL loses no data, SIGTERM stops gracefully,
health and reflection answer, and clients we did not write (grpcurl, buf curl) work."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from machineserver.sdk import Client, errors
from machineserver.v1 import common_pb2 as cpb
from tests.helpers.firmware import firmware
from tests.helpers.server import ServerProcess
from tests.helpers.tools import VENV_BIN, require_tool


def test_sigkill_then_restart_keeps_every_record(tmp_path: Path) -> None:
    data = tmp_path / "data"
    sp = ServerProcess(data).start()
    with Client.connect(sp.target) as c:
        prog = c.upload_program(firmware("lm3s6965evb", "hello")).program
        s = c.sessions.create_session(board_template="lm3s6965evb", program=prog.name, power_on=True,
                                      labels={"keep": "me"}).session
        off = c.sessions.create_session(board_template="mps2-an385", session_id="stays-off").session
        snap = c.sessions.create_snapshot(name=s.name).snapshot
        tmpl = c.capabilities.get_board_template(name="lm3s6965evb").board_template
        c.capabilities.create_board_template(config=tmpl.config.replace("name: lm3s6965evb", "name: kept", 1))
    sp.stop(signal.SIGKILL)

    sp2 = ServerProcess(data).start()
    try:
        with Client.connect(sp2.target) as c:
            sessions = {x.name: x for x in c.sessions.list_sessions().sessions}
            assert set(sessions) == {s.name, off.name}
            back = sessions[s.name]
            assert back.state == cpb.SESSION_STATE_OFF and "restarted" in back.state_reason
            assert back.labels["keep"] == "me" and back.program == prog.name
            assert c.sessions.get_program(name=prog.name).program.sha256 == prog.sha256
            assert c.sessions.get_snapshot(name=snap.name).snapshot.sha256 == snap.sha256
            assert c.capabilities.get_board_template(name="kept").board_template.name == "boardTemplates/kept"
            # ready to power on again, and the snapshot still restores
            c.sessions.restore_snapshot(name=s.name, snapshot=snap.name)
            c.sessions.run_session(name=s.name)
            out = b""
            for data in c.console(s.name):  # follows until the line is there
                out += data
                if out.endswith(b"\n"):
                    break
            assert out.endswith(b"Hello from lm3s6965evb!\n")
    finally:
        sp2.stop()


def test_sigterm_stops_gracefully(tmp_path: Path) -> None:
    sp = ServerProcess(tmp_path / "data").start()
    with Client.connect(sp.target) as c:
        prog = c.upload_program(firmware("lm3s6965evb", "echo")).program
        c.sessions.create_session(board_template="lm3s6965evb", program=prog.name, run=True)
    start = time.monotonic()
    assert sp.stop(signal.SIGTERM) == 0
    assert time.monotonic() - start < 15


def test_a_second_server_on_the_same_port_fails_clearly(server_process: ServerProcess, tmp_path: Path) -> None:
    proc = subprocess.run([str(VENV_BIN / "machineserver"), "--listen", server_process.target,
                           "--data-dir", str(tmp_path / "other")], capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr


def test_bad_config_is_reported_without_traceback(tmp_path: Path) -> None:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("listen: 127.0.0.1:0\nno_such_setting: 1\n")
    proc = subprocess.run([str(VENV_BIN / "machineserver"), "--config", str(cfg)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "no_such_setting" in proc.stderr and "Traceback" not in proc.stderr


def test_config_file_and_environment(tmp_path: Path) -> None:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"data_dir: {tmp_path / 'from-file'}\nlimits:\n  max_sessions: 1\n")
    env = dict(os.environ, MACHINESERVER_CONFIG=str(cfg), MACHINESERVER_DEFAULT_BACKEND="unicorn")
    port_file = tmp_path / "port"
    proc = subprocess.Popen([str(VENV_BIN / "machineserver"), "--listen", "127.0.0.1:0", "--port-file", str(port_file),
                             "--log-format", "json"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not port_file.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        with Client.connect(f"127.0.0.1:{port_file.read_text()}") as c:
            c.sessions.create_session(board_template="lm3s6965evb")
            with pytest.raises(errors.ResourceExhausted):
                c.sessions.create_session(board_template="lm3s6965evb")
        assert (tmp_path / "from-file" / "machineserver.sqlite3").exists()
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    lines = [json.loads(x) for x in err.splitlines() if x.startswith("{")]
    assert any(x.get("event") == "serving" for x in lines)
    rpc = [x for x in lines if x.get("event") == "rpc"]
    assert rpc and all("request_id" in x for x in rpc)


def test_grpcurl_through_reflection(server_process: ServerProcess) -> None:
    grpcurl = require_tool("grpcurl")
    out = subprocess.run([str(grpcurl), "-plaintext", server_process.target, "list"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for svc in ("machineserver.v1.SessionService", "machineserver.v1.DebugService", "grpc.health.v1.Health"):
        assert svc in out.stdout
    caps = subprocess.run([str(grpcurl), "-plaintext", server_process.target,
                           "machineserver.v1.CapabilitiesService/GetCapabilities"],
                          capture_output=True, text=True, timeout=60)
    assert caps.returncode == 0, caps.stderr
    backends = {b["name"]: b for b in json.loads(caps.stdout)["backends"]}
    assert backends["unicorn"]["available"] is True
    health = subprocess.run([str(grpcurl), "-plaintext", "-d", '{"service": "machineserver.v1.SessionService"}',
                             server_process.target, "grpc.health.v1.Health/Check"],
                            capture_output=True, text=True, timeout=60)
    assert json.loads(health.stdout)["status"] == "SERVING"
    bad = subprocess.run([str(grpcurl), "-plaintext", "-d", '{"name": "sessions/nope"}', server_process.target,
                          "machineserver.v1.SessionService/GetSession"], capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "NotFound" in bad.stderr


def test_buf_curl_through_reflection(server_process: ServerProcess, tmp_path: Path) -> None:
    buf = require_tool("buf")
    env = dict(os.environ, BUF_CACHE_DIR=str(tmp_path / "buf-cache"))
    url = f"http://{server_process.target}/machineserver.v1.CapabilitiesService/GetCapabilities"
    out = subprocess.run([str(buf), "curl", "--protocol", "grpc", "--http2-prior-knowledge", url],
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    body = json.loads(out.stdout)
    assert any(b["name"] == "unicorn" and b["available"] for b in body["backends"])
    create = subprocess.run(
        [str(buf), "curl", "--protocol", "grpc", "--http2-prior-knowledge",
         f"http://{server_process.target}/machineserver.v1.SessionService/CreateSession",
         "-d", '{"boardTemplate": "lm3s6965evb", "sessionId": "from-buf"}'],
        capture_output=True, text=True, timeout=120, env=env)
    assert create.returncode == 0, create.stderr
    assert json.loads(create.stdout)["session"]["name"] == "sessions/from-buf"
