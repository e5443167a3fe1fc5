"""Secure by default: where the server, its metrics and its GDB bridges may listen."""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import pytest

from machineserver.sdk import errors
from machineserver.server.app import start
from machineserver.server.config import ServerConfig, check_exposure
from tests.auth.conftest import Pki, Tokens, auth_config
from tests.helpers.api import upload
from tests.helpers.server import ServerProcess, serving
from tests.helpers.tools import VENV_BIN


def test_beyond_loopback_without_auth_the_server_refuses_to_start(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(VENV_BIN / "machineserver"), "--listen", "0.0.0.0:0", "--data-dir", str(tmp_path / "data"),
         "--workers", "0"], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "refusing to listen on 0.0.0.0:0" in result.stderr
    assert "authentication" in result.stderr and "--insecure" in result.stderr
    assert not (tmp_path / "data").exists()  # refused before touching anything


def test_with_insecure_it_starts_and_warns(tmp_path: Path) -> None:
    # (the later --listen wins over the helper's loopback one)
    sp = ServerProcess(tmp_path / "data", "--insecure", "--workers", "0", "--listen", "0.0.0.0:0")
    try:
        sp.start()
        assert sp.port > 0
    finally:
        sp.stop()
    assert "INSECURE" in sp.read_log()


def test_exposure_rules(tmp_path: Path) -> None:
    base = ServerConfig(data_dir=tmp_path)
    tokens = Tokens(tmp_path)
    pki = Pki(tmp_path)
    cert, key = pki.issue("server", server=True)
    authed = auth_config(tmp_path, tokens)
    for listen in ("127.0.0.1:1", "[::1]:1", "localhost:1", "unix:/tmp/x.sock"):
        assert check_exposure(dataclasses.replace(base, listen=listen)) == []
    for listen in ("0.0.0.0:1", "[::]:1", ":1", "10.1.2.3:1", "example.com:1"):
        with pytest.raises(ValueError, match="refusing to listen"):
            check_exposure(dataclasses.replace(base, listen=listen))
        with pytest.raises(ValueError, match="TLS"):  # auth alone is not enough
            check_exposure(dataclasses.replace(authed, listen=listen))
        assert check_exposure(dataclasses.replace(authed, listen=listen, tls_cert_file=str(cert),
                                                  tls_key_file=str(key))) == []
        assert "INSECURE" in check_exposure(dataclasses.replace(base, listen=listen, insecure=True))[0]
    with pytest.raises(ValueError, match="metrics"):
        check_exposure(dataclasses.replace(base, metrics_listen="0.0.0.0:0"))
    assert check_exposure(dataclasses.replace(base, metrics_listen="0.0.0.0:0", metrics_allow_nonloopback=True)) == []
    with pytest.raises(ValueError, match="needs TLS"):
        check_exposure(dataclasses.replace(base, tls_client_ca_file=str(pki.ca_file)))
    with pytest.raises(ValueError, match=r"auth\.enabled"):
        check_exposure(dataclasses.replace(base, auth=dataclasses.replace(authed.auth, enabled=False)))


async def test_metrics_bind_rule(tmp_path: Path) -> None:
    cfg = ServerConfig(listen="127.0.0.1:0", data_dir=tmp_path / "data", workers=0, metrics_listen="0.0.0.0:0")
    with pytest.raises(ValueError, match="refusing to serve metrics"):
        await start(cfg)
    running = await start(dataclasses.replace(cfg, metrics_allow_nonloopback=True))
    try:
        assert running.metrics_port > 0
    finally:
        await running.stop(0.5)


async def test_gdb_bridge_binds_loopback_unless_allowed(tmp_path: Path) -> None:
    cfg = ServerConfig(listen="127.0.0.1:0", data_dir=tmp_path / "data", workers=0, log_level="warning")
    async with serving(cfg) as (_, client):
        prog = await upload(client, "lm3s6965evb", "hello")
        s = (await client.sessions.create_session(board_template="lm3s6965evb", program=prog, power_on=True)).session
        with pytest.raises(errors.InvalidArgument) as refused:
            await client.debug.start_gdb_server(name=s.name, bind_address="0.0.0.0")
        assert refused.value.field_violations[0][0] == "bind_address"
        assert "gdb_bridge_bind_allow" in str(refused.value)
        bridge = (await client.debug.start_gdb_server(name=s.name, bind_address="127.0.0.1")).gdb_server
        assert bridge.address == "127.0.0.1"
    async with serving(dataclasses.replace(cfg, data_dir=tmp_path / "data2",
                                           gdb_bridge_bind_allow=("0.0.0.0",))) as (_, client):
        prog = await upload(client, "lm3s6965evb", "hello")
        s = (await client.sessions.create_session(board_template="lm3s6965evb", program=prog, power_on=True)).session
        bridge = (await client.debug.start_gdb_server(name=s.name, bind_address="0.0.0.0")).gdb_server
        assert bridge.address == "0.0.0.0" and bridge.port > 0
