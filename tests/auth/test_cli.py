"""msctl's credentials and access verbs against a real server with auth on."""

from __future__ import annotations

import asyncio
import os

from tests.auth.conftest import AuthServer
from tests.helpers.tools import VENV_BIN


async def msctl(server: AuthServer, *argv: str, **env: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        str(VENV_BIN / "msctl"), "--target", server.target, *argv,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={k: v for k, v in os.environ.items() if not k.startswith("MSCTL_")} | env)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_whoami_and_apikey_verbs(auth_server: AuthServer) -> None:
    admin = {"MSCTL_API_KEY": auth_server.admin_secret}
    rc, out, _ = await msctl(auth_server, "whoami", **admin)
    assert rc == 0 and "apikey:bootstrap-admin" in out and "admin" in out
    rc, out, _ = await msctl(auth_server, "apikey", "create", "--name", "lab", "--tenant", "hw",
                             "--role", "viewer", "--ttl", "1d", **admin)
    assert rc == 0 and "shown only now" in out
    secret = out.strip().splitlines()[-1]
    assert secret.startswith("msk_")
    rc, out, _ = await msctl(auth_server, "--api-key", secret, "whoami")
    assert rc == 0 and "apikey:lab" in out and "hw" in out and "viewer" in out
    rc, out, _ = await msctl(auth_server, "apikey", "list", "--tenant", "hw", **admin)
    assert rc == 0 and "lab" in out and secret not in out
    name = next(line.split()[0] for line in out.splitlines() if "lab" in line)
    rc, out, _ = await msctl(auth_server, "apikey", "revoke", name, **admin)
    assert rc == 0 and "revoked" in out
    rc, _, err = await msctl(auth_server, "--api-key", secret, "whoami")
    assert rc == 1 and "revoked" in err
    rc, _, err = await msctl(auth_server, "session", "list")
    assert rc == 1 and "no credentials" in err
    token = auth_server.tokens.mint("carol", tenant="hw", roles=["operator"])
    rc, out, _ = await msctl(auth_server, "whoami", MSCTL_TOKEN=token)
    assert rc == 0 and "jwt:https://idp.test#carol" in out
