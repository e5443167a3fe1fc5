"""Two tenants and admins on one real server with authentication on, through the real
gRPC API and real API keys (created by the bootstrap admin key through AccessService).

Identities:

* ``a``: alice, operator of tenant "a"; ``b``: bob, operator of tenant "b";
* ``a_admin``: an admin key of tenant "a" (board templates are an admin's to create);
* ``admin``: root, admin of tenant "ops" (admins see every tenant).

Core-level tests set the identity without a server: :func:`acting_as` runs the code
inside a CallInfo whose identity is given, as the auth hook would leave it.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from machineserver.sdk import AsyncClient
from machineserver.server.api.auth import parse_settings
from machineserver.server.app import RunningServer, start
from machineserver.server.config import ServerConfig
from machineserver.server.core import calls
from machineserver.server.core.identity import AuthMethod, Identity, Role

KEYS = {  # client name -> (display name, tenant, role)
    "a": ("alice", "a", "operator"),
    "b": ("bob", "b", "operator"),
    "a_admin": ("alice-admin", "a", "admin"),
    "admin": ("root", "ops", "admin"),
}


def server_config(data_dir: Path, *, auth: bool = True) -> ServerConfig:
    settings = parse_settings({"enabled": True, "bootstrap_admin_key_file": str(data_dir.parent / "admin.key")},
                              "test") if auth else None
    cfg = ServerConfig(listen="127.0.0.1:0", data_dir=data_dir, log_level="warning", job_engine="local")
    return cfg if settings is None else dataclasses.replace(cfg, auth=settings)


@dataclass
class Tenants:
    a: AsyncClient
    b: AsyncClient
    a_admin: AsyncClient
    admin: AsyncClient
    running: RunningServer
    secrets: dict[str, str]


async def connect(running: RunningServer, secret: str | None) -> AsyncClient:
    return await AsyncClient.connect(f"127.0.0.1:{running.port}", timeout=30, retries=False, api_key=secret)


async def create_keys(running: RunningServer, bootstrap_secret: str) -> dict[str, str]:
    """A secret per client name of :data:`KEYS`."""
    out = {}
    async with await connect(running, bootstrap_secret) as boot:
        for client, (name, tenant, role) in KEYS.items():
            resp = await boot.access.create_api_key(display_name=name, tenant=tenant, roles=[f"ROLE_{role.upper()}"])
            out[client] = resp.secret
    return out


@contextlib.asynccontextmanager
async def tenants_on(running: RunningServer, secrets: dict[str, str]) -> AsyncIterator[Tenants]:
    clients = {name: await connect(running, secret) for name, secret in secrets.items()}
    try:
        yield Tenants(clients["a"], clients["b"], clients["a_admin"], clients["admin"], running, secrets)
    finally:
        for c in clients.values():
            await c.close()


@pytest.fixture
async def tenants(tmp_path: Path) -> AsyncIterator[Tenants]:
    running = await start(server_config(tmp_path / "data"))
    try:
        secrets = await create_keys(running, (tmp_path / "admin.key").read_text().strip())
        async with tenants_on(running, secrets) as t:
            yield t
    finally:
        await running.stop(0.5)


@contextlib.contextmanager
def acting_as(tenant: str, principal: str = "someone", role: Role = Role.OPERATOR) -> Iterator[Identity]:
    """Core-level tests: what runs inside is served as this identity (a CallInfo whose
    identity is set, as the auth hook sets it)."""
    who = Identity(principal, tenant, frozenset({role}), AuthMethod.API_KEY)
    call = calls.CallInfo("/test/Core", "test", {})
    call.identity = who
    token = calls.CURRENT.set(call)
    try:
        yield who
    finally:
        calls.CURRENT.reset(token)
