"""API keys and JWTs against a real server over gRPC: who each credential makes the
caller, and each way it can fail (UNAUTHENTICATED with the reason)."""

from __future__ import annotations

import asyncio
import http.server
import json
import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from machineserver.sdk import errors
from machineserver.server.app import start
from machineserver.server.core.apikeys import hash_secret
from machineserver.v1 import access_pb2
from tests.auth.conftest import AUDIENCE, ISSUER, AuthServer, Tokens, auth_config


async def test_bootstrap_key_file_is_made_private_and_is_an_admin_of_default(auth_server: AuthServer,
                                                                           tmp_path: Path) -> None:
    path = tmp_path / "admin.key"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    async with await auth_server.client(api_key=auth_server.admin_secret) as admin:
        who = (await admin.access.get_caller_identity()).identity
    assert (who.principal, who.tenant, list(who.roles), who.auth_method) == (
        "apikey:bootstrap-admin", "default", [access_pb2.ROLE_ADMIN], access_pb2.AUTH_METHOD_API_KEY)
    # stored hashed: the secret is in no file of the data directory, its hash in the table
    for file in (tmp_path / "data").rglob("*"):
        if file.is_file():
            assert auth_server.admin_secret.encode() not in file.read_bytes(), file
    rows = auth_server.running.engine.db.rows("api_keys", "secret_hash = ?", [hash_secret(auth_server.admin_secret)])
    assert len(rows) == 1


async def test_api_key_create_list_revoke(auth_server: AuthServer) -> None:
    async with await auth_server.client(api_key=auth_server.admin_secret) as admin:
        created = await admin.access.create_api_key(display_name="ci", tenant="team-a",
                                                    roles=["ROLE_OPERATOR"])
        secret, key = created.secret, created.api_key
        assert secret.startswith("msk_") and len(secret) > 40
        assert key.secret_prefix and secret.startswith(key.secret_prefix) and len(key.secret_prefix) < 16
        assert (key.principal, key.tenant, list(key.roles), key.created_by) == (
            "apikey:ci", "team-a", [access_pb2.ROLE_OPERATOR], "apikey:bootstrap-admin")
        listed = await admin.access.list_api_keys(filter="tenant=team-a")
        assert [k.name for k in listed.api_keys] == [key.name]
        assert secret not in str(listed)  # never shown again
        # both metadata forms authenticate
        for options in ({"api_key": secret}, {"metadata": [("x-api-key", secret)]}):
            async with await auth_server.client(**options) as ci:
                who = (await ci.access.get_caller_identity()).identity
                assert (who.principal, who.tenant) == ("apikey:ci", "team-a")
        async with await auth_server.client(api_key=secret) as ci:
            await ci.sessions.list_sessions()
            revoked = await admin.access.revoke_api_key(name=key.name)
            assert revoked.api_key.HasField("revoke_time")
            # at once, on the same channel
            with pytest.raises(errors.Unauthenticated, match="revoked"):
                await ci.sessions.list_sessions()
        assert [k.name for k in (await admin.access.list_api_keys(filter="revoked=true")).api_keys] == [key.name]
        assert key.name not in [k.name for k in (await admin.access.list_api_keys(filter="revoked=false")).api_keys]
        with pytest.raises(errors.NotFound):
            await admin.access.revoke_api_key(name="apiKeys/nope")
        with pytest.raises(errors.InvalidArgument) as bad:
            await admin.access.create_api_key(display_name="x", tenant="no spaces", roles=["ROLE_VIEWER"])
        assert bad.value.field_violations[0][0] == "tenant"
        with pytest.raises(errors.InvalidArgument, match="roles"):
            await admin.access.create_api_key(display_name="x", tenant="t")


async def test_api_key_expires(auth_server: AuthServer) -> None:
    secret = await auth_server.key(["viewer"], ttl="1s")
    async with await auth_server.client(api_key=secret) as viewer:
        await viewer.sessions.list_sessions()
        await asyncio.sleep(1.3)
        with pytest.raises(errors.Unauthenticated, match="expired"):
            await viewer.sessions.list_sessions()


async def test_bad_and_missing_credentials(auth_server: AuthServer) -> None:
    cases: list[tuple[dict[str, Any], str]] = [({}, "no credentials"), ({"api_key": "msk_not-a-key"}, "unknown API key"),
             ({"metadata": [("authorization", "Basic dXNlcg==")]}, "scheme"),
             ({"bearer_token": "not.a.jwt"}, "not a valid JWT")]
    for options, reason in cases:
        async with await auth_server.client(**options) as c:
            with pytest.raises(errors.Unauthenticated, match=reason):
                await c.sessions.list_sessions()
            with pytest.raises(errors.Unauthenticated):  # streams too
                async for _ in c.sessions.stream_session_events(name="sessions/x"):
                    pass


async def test_health_stays_open(auth_server: AuthServer) -> None:
    from grpc import aio
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async with aio.insecure_channel(auth_server.target) as channel:
        resp = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
    assert resp.status == health_pb2.HealthCheckResponse.SERVING


async def test_jwt_claims_make_the_caller(auth_server: AuthServer, tokens: Tokens) -> None:
    token = tokens.mint("alice", tenant="team-b", roles=["viewer", "operator"], aud=[AUDIENCE, "other"])
    async with await auth_server.client(bearer_token=token) as alice:
        who = (await alice.access.get_caller_identity()).identity
        assert (who.principal, who.tenant, who.auth_method) == (f"jwt:{ISSUER}#alice", "team-b",
                                                               access_pb2.AUTH_METHOD_JWT)
        assert set(who.roles) == {access_pb2.ROLE_VIEWER, access_pb2.ROLE_OPERATOR}


@pytest.mark.parametrize(("mint", "reason"), [
    ({"exp_in": -60}, "expired"),
    ({"iss": "https://evil.test"}, "issuer"),
    ({"aud": "someone-else"}, "audience"),
    ({"tenant": None}, "tenant"),
])
async def test_jwt_refused(auth_server: AuthServer, tokens: Tokens, mint: dict[str, object], reason: str) -> None:
    async with await auth_server.client(bearer_token=tokens.mint(**mint)) as c:  # type: ignore[arg-type]
        with pytest.raises(errors.Unauthenticated, match=reason):
            await c.access.get_caller_identity()


async def test_jwt_bad_signature_and_unknown_key(auth_server: AuthServer, tokens: Tokens, tmp_path: Path) -> None:
    other = Tokens(tmp_path / "..", kid="k1")  # same kid, another key
    async with await auth_server.client(bearer_token=tokens.mint(key=other.key)) as c:
        with pytest.raises(errors.Unauthenticated, match="signature"):
            await c.access.get_caller_identity()
    stranger = Tokens(tmp_path / "..", kid="k9")
    async with await auth_server.client(bearer_token=tokens.mint(key=stranger.key)) as c:
        with pytest.raises(errors.Unauthenticated, match="key the JWKS does not hold"):
            await c.access.get_caller_identity()


async def test_jwt_leeway(auth_server: AuthServer, tokens: Tokens) -> None:
    # the server allows 5 s of clock skew: expired 2 s ago passes, 30 s ago does not
    async with await auth_server.client(bearer_token=tokens.mint(exp_in=-2)) as c:
        await c.access.get_caller_identity()
    async with await auth_server.client(bearer_token=tokens.mint(exp_in=-30)) as c:
        with pytest.raises(errors.Unauthenticated, match="expired"):
            await c.access.get_caller_identity()


@pytest.fixture
def jwks_url(tokens: Tokens) -> Iterator[tuple[str, list[int]]]:
    """The JWKS served over HTTP on a free port; the list counts the fetches."""
    fetches: list[int] = []
    body = tokens.jwks_file.read_bytes()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            fetches.append(1)
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            return None

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_port}/jwks.json", fetches
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


async def test_jwks_url_fetched_once_and_cached(tmp_path: Path, tokens: Tokens,
                                                jwks_url: tuple[str, list[int]]) -> None:
    url, fetches = jwks_url
    cfg = auth_config(tmp_path, tokens, jwt={"issuer": ISSUER, "audience": AUDIENCE, "jwks_url": url})
    running = await start(cfg)
    try:
        target = f"127.0.0.1:{running.port}"
        from machineserver.sdk import AsyncClient

        for sub in ("a", "b", "c"):
            async with await AsyncClient.connect(target, bearer_token=tokens.mint(sub)) as c:
                assert (await c.access.get_caller_identity()).identity.principal == f"jwt:{ISSUER}#{sub}"
        assert len(fetches) == 1
    finally:
        await running.stop(0.5)


def test_jwks_unreachable_url_is_unauthenticated_not_internal(tmp_path: Path, tokens: Tokens) -> None:
    async def scenario() -> None:
        cfg = auth_config(tmp_path, tokens, jwt={"issuer": ISSUER, "audience": AUDIENCE,
                                                 "jwks_url": "http://127.0.0.1:9/none", "jwks_timeout_seconds": 2})
        running = await start(cfg)
        try:
            from machineserver.sdk import AsyncClient

            async with await AsyncClient.connect(f"127.0.0.1:{running.port}", bearer_token=tokens.mint()) as c:
                with pytest.raises(errors.Unauthenticated, match="cannot fetch its JWKS"):
                    await c.access.get_caller_identity()
        finally:
            await running.stop(0.5)

    asyncio.run(scenario())
    assert json.loads(tokens.jwks_file.read_text())["keys"]
