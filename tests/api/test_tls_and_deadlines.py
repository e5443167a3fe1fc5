"""Client options a calling service expects: TLS, default deadlines, call metadata."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from machineserver.sdk import AsyncClient, errors
from machineserver.server.app import start
from machineserver.server.config import ServerConfig
from tests.helpers.api import upload
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
        s = (await c.sessions.create_session(board_template="lm3s6965evb", program=prog, power_on=True)).session
        with pytest.raises(errors.DeadlineExceeded):
            await c.debug.continue_(name=s.name, wait=True)
        assert (await c.debug.halt(name=s.name, timeout=5)).stop.pc
