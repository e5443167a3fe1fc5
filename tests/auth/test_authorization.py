"""Roles and the configured rules, on a real server: what each role may call, what
PERMISSION_DENIED says, rules that grant, allow only, or deny; Attach commands and GDB
bridge packets run as (and are checked as) the caller that opened them."""

from __future__ import annotations

from pathlib import Path

import pytest

from machineserver.sdk import errors
from machineserver.server.app import start
from machineserver.server.rsp.client import RspClient
from machineserver.v1 import debug_pb2 as dpb
from tests.auth.conftest import ISSUER, AuthServer, Tokens, auth_config
from tests.helpers.api import upload


async def test_each_role_gets_what_it_needs(auth_server: AuthServer) -> None:
    viewer = await auth_server.key(["viewer"], name="v")
    operator = await auth_server.key(["operator"], name="o")
    async with await auth_server.client(api_key=viewer) as v, await auth_server.client(api_key=operator) as o:
        await v.sessions.list_sessions()
        await v.capabilities.get_capabilities()
        with pytest.raises(errors.PermissionDenied) as denied:
            await v.sessions.create_session(board_template="lm3s6965evb")
        text = str(denied.value)
        assert "/machineserver.v1.SessionService/CreateSession" in text and "operator role" in text
        assert "apikey:v" in text and "holds viewer" in text
        session = (await o.sessions.create_session(board_template="lm3s6965evb")).session
        assert (await v.sessions.get_session(name=session.name)).session.name == session.name
        with pytest.raises(errors.PermissionDenied, match="DeleteSession needs the operator role"):
            await v.sessions.delete_session(name=session.name)
        with pytest.raises(errors.PermissionDenied, match="CreateApiKey needs the admin role"):
            await o.access.create_api_key(display_name="x", tenant="default", roles=["ROLE_ADMIN"])
        with pytest.raises(errors.PermissionDenied, match="CreateBoardTemplate needs the admin role"):
            await o.capabilities.create_board_template(config="name: x")
        with pytest.raises(errors.PermissionDenied, match="ListAuditEvents needs the admin role"):
            await o.audit.list_audit_events()
        await o.sessions.delete_session(name=session.name)


async def test_quota_usage_own_tenant_for_viewers_others_for_admins(auth_server: AuthServer) -> None:
    viewer = await auth_server.key(["viewer"], tenant="t1")
    async with await auth_server.client(api_key=viewer) as v:
        usage = await v.access.get_quota_usage()
        assert usage.tenant == "t1" and {q.limit for q in usage.quotas} >= {"live_sessions", "running_sessions"}
        with pytest.raises(errors.PermissionDenied, match="admin role"):
            await v.access.get_quota_usage(tenant="t2")
    async with await auth_server.client(api_key=auth_server.admin_secret) as admin:
        assert (await admin.access.get_quota_usage(tenant="t2")).tenant == "t2"


async def test_rules_deny_allow_and_grant(tmp_path: Path, tokens: Tokens) -> None:
    rules = [
        # operators whose key name starts ro- may do everything an operator may, but delete
        {"match": {"principal": "apikey:ro-*"}, "deny": ["*/Delete*"]},
        # tokens of the fw group get viewer, and only the session listings and their identity
        {"match": {"issuer": ISSUER, "claims": {"group": "fw"}}, "roles": ["viewer"],
         "allow": ["/machineserver.v1.SessionService/List*", "/machineserver.v1.AccessService/GetCallerIdentity"]},
    ]
    running = await start(auth_config(tmp_path, tokens, rules=rules))
    server = AuthServer(running, auth_config(tmp_path, tokens), (tmp_path / "admin.key").read_text().strip(), tokens)
    try:
        ro = await server.key(["operator"], name="ro-1")
        async with await server.client(api_key=ro) as c:
            s = (await c.sessions.create_session(board_template="lm3s6965evb")).session
            with pytest.raises(errors.PermissionDenied) as denied:
                await c.sessions.delete_session(name=s.name)
            assert "DeleteSession" in str(denied.value) and "auth.rules[0] denies it" in str(denied.value)
        token = tokens.mint("dev", roles=[], group="fw")
        async with await server.client(bearer_token=token) as fw:
            who = (await fw.access.get_caller_identity()).identity
            assert list(who.roles) == [1]  # ROLE_VIEWER, granted by the rule
            await fw.sessions.list_sessions()
            await fw.sessions.list_programs()
            with pytest.raises(errors.PermissionDenied, match=r"not in the allowlist of auth\.rules\[1\]"):
                await fw.capabilities.get_capabilities()
        # the same token without the claim: no role at all
        async with await server.client(bearer_token=tokens.mint("dev2", roles=[])) as other:
            with pytest.raises(errors.PermissionDenied, match="holds no role"):
                await other.sessions.list_sessions()
    finally:
        await running.stop(0.5)


async def test_attach_commands_are_checked_as_the_rpcs_they_mirror(auth_server: AuthServer) -> None:
    operator = await auth_server.key(["operator"], name="o")
    viewer = await auth_server.key(["viewer"], name="v")
    async with await auth_server.client(api_key=operator) as o, await auth_server.client(api_key=viewer) as v:
        prog = await upload(o, "lm3s6965evb", "hello")
        s = (await o.sessions.create_session(board_template="lm3s6965evb", program=prog, power_on=True)).session
        requests = [dpb.AttachRequest(open=dpb.AttachOpen(name=s.name, control=True)),
                    dpb.AttachRequest(command=dpb.DebugCommand(tag=1, read_registers=dpb.ReadRegistersRequest())),
                    dpb.AttachRequest(command=dpb.DebugCommand(tag=2, write_memory=dpb.WriteMemoryRequest(
                        address=0x2000_0000, data=b"\x01")))]
        results = {}
        stream = v.debug.attach(requests)
        async for msg in stream:
            if msg.HasField("result"):
                results[msg.result.tag] = msg.result
            if len(results) == 2:
                break
        await stream.aclose()
        assert results[1].code == 0
        assert results[2].code == 7 and "WriteMemory needs the operator role" in results[2].message


async def test_gdb_bridge_packets_run_as_its_starter_and_stop_when_the_key_is_revoked(
        auth_server: AuthServer) -> None:
    async with await auth_server.client(api_key=auth_server.admin_secret) as admin:
        created = await admin.access.create_api_key(display_name="gdb", tenant="default", roles=["ROLE_OPERATOR"])
        async with await auth_server.client(api_key=created.secret) as o:
            prog = await upload(o, "lm3s6965evb", "hello")
            s = (await o.sessions.create_session(board_template="lm3s6965evb", program=prog,
                                                 power_on=True)).session
            port = (await o.debug.start_gdb_server(name=s.name)).gdb_server.port
            rsp = await RspClient.connect_tcp("127.0.0.1", port, xml_registers="arm")
            try:
                assert len(await rsp.read_memory(0x2000_0000, 4)) == 4
                await admin.access.revoke_api_key(name=created.api_key.name)
                with pytest.raises(Exception) as refused:
                    await rsp.read_memory(0x2000_0000, 4)
                assert "E" in str(refused.value)
            finally:
                await rsp.close()
