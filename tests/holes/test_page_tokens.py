"""Forged page tokens (issue 14: ``{"o": 1e400}`` gave INTERNAL on all seven List RPCs):
every List RPC of every served service (found from the descriptors: each request with a
``page_token``, so a new one cannot be missed) answers INVALID_ARGUMENT naming
``page_token`` for anything this server did not write, through a real server; the same
List with no token still answers afterwards, and real tokens still walk the pages.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from grpc import aio

from machineserver.sdk import AsyncClient, errors
from machineserver.server.api.server import SERVICE_NAMES
from machineserver.server.app import RunningServer
from machineserver.server.config import ServerConfig
from machineserver.server.core import listing
from machineserver.server.core.errors import InvalidArgument
from machineserver.v1 import cosim_pb2
from tests.helpers.api import bad_request_field, upload


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode()


FORGED: list[str] = [
    _b64(b'{"o": 1e400}'),
    _b64(b'{"o": 1e400, "f": "00000000", "a": "x"}'),
    _b64(b'{"o": -1e400, "f": "00000000"}'),
    _b64(b'{"o": NaN, "f": "00000000"}'),
    _b64(b'{"o": Infinity, "f": "00000000"}'),
    _b64(b'{"o": -1, "f": "00000000"}'),
    _b64(b'{"o": 1.5, "f": "00000000"}'),
    _b64(b'{"o": 100000000000000000000000000000, "f": "00000000"}'),
    _b64(b'{"o": "5", "f": "00000000"}'),
    _b64(b'{"o": true, "f": "00000000"}'),
    _b64(b'{"o": null, "f": null, "a": null}'),
    _b64(b'{"o": 1, "f": 5, "a": 7}'),
    _b64(b'{"a": {"b": 1}, "f": []}'),
    _b64(b"[1, 2, 3]"),
    _b64(b'"just a string"'),
    _b64(b"null"),
    _b64(b"12"),
    _b64(b"{}"),
    _b64(b"\xff\xfe\xfd not utf-8"),
    _b64(b"[" * 300 + b"]" * 300),
    _b64(b'{"o": ' + b"9" * 5000 + b"}")[:900],
    "%%%not base64%%%",
    "a",
    "YQ",
    "\u00f1\u20ac\U0001f600",
    "=" * 100,
    "A" * 1000,
]


def list_methods() -> list[MethodDescriptor]:
    pool = descriptor_pool.Default()
    return [m for name in SERVICE_NAMES for m in pool.FindServiceByName(name).methods
            if "page_token" in m.input_type.fields_by_name]


def _serialize(msg: Message) -> bytes:
    return msg.SerializeToString()



@pytest.fixture
def server_config(tmp_path: Path) -> ServerConfig:
    """Jobs on the server's own workers: the job made for ListJobRuns needs no Ray here."""
    return ServerConfig(listen="127.0.0.1:0", data_dir=tmp_path / "data", log_level="warning", job_engine="local")


async def _parents(client: AsyncClient) -> dict[str, str]:
    """The parent each List RPC that takes one needs: a co-simulation, a job."""
    members = [(await client.sessions.create_session(board_template="lm3s6965evb")).session.name
               for _ in range(2)]
    created = await client.cosim.create_co_simulation(sessions=members, sync=cosim_pb2.SyncPolicy(quantum_ns=100_000))
    program = await upload(client, "lm3s6965evb", "hello")
    job = (await client.jobs.create_job(matrix={"programs": [program], "boards": ["lm3s6965evb"],
                                                "backends": ["unicorn"]},
                                        criteria={"pass_regex": "Hello", "host_timeout": "30s"})).job
    return {"ListCoSimSnapshots": str(created.cosimulation.name), "ListJobRuns": str(job.name)}


async def test_forged_page_tokens_are_invalid_argument_on_every_list_rpc(
        server: RunningServer, client: AsyncClient) -> None:
    methods = list_methods()
    names = {m.name for m in methods}
    # the seven of the probe, and any List RPC added since
    assert {"ListSessions", "ListPrograms", "ListSnapshots", "ListCoverageReports", "ListCoSimulations",
            "ListCoSimSnapshots", "ListAlertRules", "ListBoardTemplates"} <= names
    parents = await _parents(client)
    async with aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        for method in methods:
            path = f"/{method.containing_service.full_name}/{method.name}"
            request_cls = GetMessageClass(method.input_type)
            call = channel.unary_unary(path, _serialize, GetMessageClass(method.output_type).FromString)
            base: dict[str, Any] = {"parent": parents[method.name]} if "parent" in method.input_type.fields_by_name else {}
            for token in FORGED:
                with pytest.raises(aio.AioRpcError) as exc:
                    await call(request_cls(page_token=token, **base), timeout=20)
                assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method.name, token[:40], exc.value)
                assert bad_request_field(exc.value) == "page_token", (method.name, token[:40])
            # and the List itself still answers
            answer = await call(request_cls(**base), timeout=20)
            assert isinstance(answer, Message)


async def test_real_tokens_still_walk_the_pages_and_do_not_cross_queries(client: AsyncClient) -> None:
    made = [(await client.sessions.create_session(board_template="lm3s6965evb", labels={"k": "v"})).session.name
            for _ in range(5)]
    seen: list[str] = []
    token = ""
    while True:
        page = await client.sessions.list_sessions(page_size=2, page_token=token)
        seen += [s.name for s in page.sessions]
        token = page.next_page_token
        if not token:
            break
    assert seen == made
    first = await client.sessions.list_sessions(page_size=2)
    with pytest.raises(errors.InvalidArgument) as exc:
        await client.sessions.list_sessions(page_size=2, page_token=first.next_page_token, filter="labels.k=v")
    assert exc.value.field_violations[0][0] == "page_token"
    # a template token is not a session token
    templates = await client.capabilities.list_board_templates(page_size=1)
    with pytest.raises(errors.InvalidArgument):
        await client.sessions.list_sessions(page_token=templates.next_page_token)


@pytest.mark.parametrize("token", FORGED)
def test_token_reading_is_total(token: str) -> None:
    """The core's reader on its own: InvalidArgument("page_token"), nothing else."""
    with pytest.raises(InvalidArgument) as exc:
        listing.page_bounds(10, token)
    assert exc.value.field == "page_token"
