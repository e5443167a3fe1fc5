"""Client options a calling service expects: TLS, default deadlines, call metadata."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from machineserver.sdk import AsyncClient, errors
from machineserver.server.app import start
from machineserver.server.config import ServerConfig
from machineserver.v1 import common_pb2 as cpb
from tests.helpers.api import upload, wait_state
from tests.helpers.server import serving
from tests.helpers.tools import require_tool


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    openssl = require_tool("openssl", "makes the test certificate")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run([str(openssl), "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    return cert, key


async def test_tls_server_and_client(tmp_path: Path, certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    running = await start(ServerConfig(listen="127.0.0.1:0", data_dir=tmp_path / "d",
                                       tls_cert_file=str(cert), tls_key_file=str(key)))
    try:
        async with await AsyncClient.connect(f"localhost:{running.port}", root_certificates=cert.read_bytes()) as c:
            assert (await c.capabilities.get_capabilities()).api_version == "machineserver.v1"
        async with await AsyncClient.connect(f"localhost:{running.port}", timeout=2, retries=False) as plain:
            with pytest.raises(errors.Unavailable):
                await plain.capabilities.get_capabilities()
    finally:
        await running.stop(0.5)


async def test_default_deadline_applies(server_config: ServerConfig, tmp_path: Path) -> None:
    async with serving(server_config, timeout=0.3) as (_, c):
        prog = await upload(c, "lm3s6965evb", "echo")  # waits for input forever
        # set-up with time to spare (a loaded CI host); the client's default applies below
        s = (await c.sessions.create_session(board_template="lm3s6965evb", program=prog, power_on=True,
                                             timeout=30)).session
        with pytest.raises(errors.DeadlineExceeded):
            await c.debug.continue_(name=s.name, wait=True)
        # a continue never outlives the call that waits for it: the server halts the session
        # (the answer that says so may come after the client's own deadline on a loaded host)
        await wait_state(c, s.name, cpb.SESSION_STATE_HALTED)
