"""mTLS: with tls_client_ca_file the server requires a client certificate its CA
signed; the certificate's CN maps to an identity (auth.mtls_identities)."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from machineserver.sdk import AsyncClient, errors
from machineserver.server.app import RunningServer, start
from machineserver.v1 import access_pb2
from tests.auth.conftest import Pki, Tokens, auth_config


@pytest.fixture
async def mtls_server(tmp_path: Path, tokens: Tokens) -> AsyncIterator[tuple[RunningServer, Pki]]:
    pki = Pki(tmp_path)
    cert, key = pki.issue("server", server=True)
    cfg = auth_config(tmp_path, tokens, mtls_identities={
        "ci-runner": {"tenant": "ci", "roles": ["operator"]},
        "dashboard": {"tenant": "ops", "roles": ["viewer"]},
    })
    cfg = dataclasses.replace(cfg, tls_cert_file=str(cert), tls_key_file=str(key), tls_client_ca_file=str(pki.ca_file))
    running = await start(cfg)
    try:
        yield running, pki
    finally:
        await running.stop(0.5)


async def _connect(running: RunningServer, pki: Pki, cn: str | None, signer: Pki | None = None,
                   **options: object) -> AsyncClient:
    chain = key = None
    if cn is not None:
        cert_file, key_file = pki.issue(cn, signer=signer)
        chain, key = cert_file.read_bytes(), key_file.read_bytes()
    return await AsyncClient.connect(f"localhost:{running.port}", timeout=10, retries=False,
                                     root_certificates=pki.ca_file.read_bytes(), certificate_chain=chain,
                                     private_key=key, **options)  # type: ignore[arg-type]


async def test_client_certificate_is_the_identity(mtls_server: tuple[RunningServer, Pki]) -> None:
    running, pki = mtls_server
    async with await _connect(running, pki, "ci-runner") as ci:
        who = (await ci.access.get_caller_identity()).identity
        assert (who.principal, who.tenant, list(who.roles), who.auth_method) == (
            "mtls:CN=ci-runner", "ci", [access_pb2.ROLE_OPERATOR], access_pb2.AUTH_METHOD_MTLS)
        await ci.sessions.list_sessions()
    async with await _connect(running, pki, "dashboard") as dash:
        with pytest.raises(errors.PermissionDenied, match="operator role"):
            await dash.sessions.create_session(board_template="lm3s6965evb")


async def test_unmapped_or_foreign_or_missing_certificates_are_refused(mtls_server: tuple[RunningServer, Pki],
                                                                        tmp_path: Path) -> None:
    running, pki = mtls_server
    async with await _connect(running, pki, "stranger") as c:
        with pytest.raises(errors.Unauthenticated, match="CN=stranger is not mapped"):
            await c.access.get_caller_identity()
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    foreign = Pki(other_dir)  # a CA the server does not trust: the handshake fails
    async with await _connect(running, pki, "ci-runner", signer=foreign) as c:
        with pytest.raises(errors.Unavailable):
            await c.access.get_caller_identity()
    async with await _connect(running, pki, None) as c:  # no certificate at all
        with pytest.raises(errors.Unavailable):
            await c.access.get_caller_identity()


async def test_an_api_key_on_an_mtls_connection_names_the_caller(mtls_server: tuple[RunningServer, Pki],
                                                                 tmp_path: Path) -> None:
    running, pki = mtls_server
    admin_secret = (tmp_path / "admin.key").read_text().strip()
    async with await _connect(running, pki, "dashboard", api_key=admin_secret) as c:
        who = (await c.access.get_caller_identity()).identity
        assert (who.principal, who.auth_method) == ("apikey:bootstrap-admin", access_pb2.AUTH_METHOD_API_KEY)
