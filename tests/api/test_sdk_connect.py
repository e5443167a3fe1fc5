"""Connecting with the SDK: ``async with AsyncClient.connect(...)`` (an awaitable that is
also an async context manager), ``await AsyncClient.connect(...)`` and ``with
Client.connect(...)`` against a real server; one ``ConnectOptions`` for both clients,
given as ``options=`` or as keywords but never both; the README's SDK snippets run as
written; and what mypy --strict makes of the user's side of it."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import typing
from collections.abc import Iterator
from pathlib import Path

import pytest
from grpc import aio

import machineserver.sdk
from machineserver.sdk import AsyncClient, AsyncConnection, Client, ConnectOptions, errors
from machineserver.sdk.client import ConnectKeywords
from machineserver.server.app import RunningServer
from tests.helpers.firmware import ROOT
from tests.helpers.server import ServerProcess
from tests.helpers.tools import mypy_errors

API = "machineserver.v1"


def target(server: RunningServer) -> str:
    return f"127.0.0.1:{server.port}"


async def test_async_with_connect_opens_then_closes_the_client(server: RunningServer) -> None:
    async with AsyncClient.connect(target(server), timeout=20) as ms:
        assert type(ms) is AsyncClient
        caps = await ms.capabilities.get_capabilities()
        assert caps.api_version == "machineserver.v1" and caps.backends
    with pytest.raises(aio.UsageError, match="Channel is closed"):
        await ms.capabilities.get_capabilities()


async def test_await_connect_and_async_with_await_still_work(server: RunningServer) -> None:
    ms = await AsyncClient.connect(target(server), timeout=20)
    assert isinstance(ms, AsyncClient)
    async with ms:
        assert (await ms.capabilities.get_capabilities()).api_version == API
    with pytest.raises(aio.UsageError):
        await ms.capabilities.get_capabilities()
    async with await AsyncClient.connect(target(server), timeout=20) as again:
        assert (await again.capabilities.get_capabilities()).api_version == API


async def test_a_connection_opens_one_client_however_often_it_is_awaited(server: RunningServer) -> None:
    connection = AsyncClient.connect(target(server), timeout=20)
    assert isinstance(connection, AsyncConnection)
    async with connection as entered:
        assert await connection is entered
        assert (await entered.capabilities.get_capabilities()).api_version == API
    with pytest.raises(aio.UsageError):
        await entered.capabilities.get_capabilities()


async def test_a_subclass_connects_as_itself(server: RunningServer) -> None:
    class Mine(AsyncClient):
        pass

    async with Mine.connect(target(server), timeout=20) as ms:
        assert type(ms) is Mine
        assert (await ms.capabilities.get_capabilities()).api_version == API


async def test_connect_options_reach_every_call(server: RunningServer) -> None:
    """Metadata from the options goes with each call (the server reads x-request-id back
    into its errors); a generator given as metadata is kept, so one options object serves
    two connections."""
    options = ConnectOptions(timeout=20, metadata=(pair for pair in [("x-request-id", "from-options")]))
    for _ in range(2):
        async with AsyncClient.connect(target(server), options=options) as ms:
            with pytest.raises(errors.NotFound) as exc:
                await ms.sessions.get_session(name="sessions/nope")
            assert exc.value.request_id == "from-options"


def test_options_and_keywords_together_are_refused_before_connecting() -> None:
    options = ConnectOptions(timeout=5)
    with pytest.raises(TypeError, match=r"options= or keyword options, not both; got options= and metadata=, timeout="):
        AsyncClient.connect("127.0.0.1:1", options=options, timeout=3, metadata=[])
    with pytest.raises(TypeError, match=r"not both; got options= and retries="):
        Client.connect("127.0.0.1:1", options=options, retries=False)
    with pytest.raises(TypeError, match="options must be a ConnectOptions, not dict"):
        Client.connect("127.0.0.1:1", options={"timeout": 3})  # type: ignore[arg-type]


def test_connect_options_are_checked_and_frozen() -> None:
    with pytest.raises(ValueError, match="either api_key or bearer_token"):
        ConnectOptions(api_key="k", bearer_token="t")
    with pytest.raises(ValueError, match="needs both private_key and certificate_chain"):
        ConnectOptions(private_key=b"key")
    with pytest.raises(ValueError, match="either api_key or bearer_token"):  # keywords build the same object
        AsyncClient.connect("127.0.0.1:1", api_key="k", bearer_token="t")
    args = {"grpc.max_receive_message_length": 1 << 20}
    options = ConnectOptions(api_key="secret", metadata=[("x-team", "fw")], channel_args=args)
    args["grpc.max_receive_message_length"] = 1
    assert options.channel_args == {"grpc.max_receive_message_length": 1 << 20}
    assert ("grpc.max_receive_message_length", 1 << 20) in options.channel_options()
    with pytest.raises(TypeError):
        options.channel_args["grpc.enable_retries"] = 0  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.timeout = 1  # type: ignore[misc]
    assert options.call_options().metadata == (("x-team", "fw"), ("authorization", "ApiKey secret"))
    assert ConnectOptions(bearer_token="jwt").call_options().metadata == (("authorization", "Bearer jwt"),)
    assert ConnectOptions().credentials() is None and ConnectOptions(tls=True).credentials() is not None
    assert hash(options) == hash(dataclasses.replace(options)) and options == dataclasses.replace(options)
    with pytest.raises(TypeError):
        ConnectOptions(5.0)  # type: ignore[misc]  # keyword-only: no positional mix-ups


def test_the_keywords_are_the_options_fields() -> None:
    """ConnectKeywords (connect's keywords) and ConnectOptions cannot drift apart."""
    keywords = typing.get_type_hints(ConnectKeywords)
    fields = typing.get_type_hints(ConnectOptions)
    assert keywords == fields
    assert list(keywords) == [f.name for f in dataclasses.fields(ConnectOptions)]
    assert "ConnectOptions" in machineserver.sdk.__all__ and machineserver.sdk.ConnectOptions is ConnectOptions


@pytest.fixture
def served(tmp_path: Path) -> Iterator[ServerProcess]:
    sp = ServerProcess(tmp_path / "data").start()
    try:
        yield sp
    finally:
        sp.stop()


def test_sync_client_with_options_or_keywords(served: ServerProcess) -> None:
    with Client.connect(served.target, options=ConnectOptions(timeout=20, retries=False)) as ms:
        assert ms.capabilities.get_capabilities().api_version == API
    with Client.connect(served.target, timeout=20, metadata=[("x-request-id", "sync-kw")]) as ms:
        with pytest.raises(errors.NotFound) as exc:
            ms.sessions.get_session(name="sessions/nope")
        assert exc.value.request_id == "sync-kw"


def readme_sdk_snippets() -> list[str]:
    """The README's Python blocks that connect to the default target and run crc32."""
    blocks = re.findall(r"^```python\n(.*?)^```$", (ROOT / "README.md").read_text(), re.M | re.S)
    return [b for b in blocks if '"127.0.0.1:50051"' in b and "crc32.elf" in b]


def test_the_readme_sdk_snippets_run_as_written(served: ServerProcess) -> None:
    snippets = readme_sdk_snippets()
    assert len(snippets) == 2 and any("async with AsyncClient.connect(" in s for s in snippets)
    for snippet in snippets:
        run = subprocess.run([sys.executable, "-c", snippet.replace("127.0.0.1:50051", served.target)],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        assert "crc32=0x80f45f04" in run.stdout, run.stdout + run.stderr


USER_CODE = '''
from __future__ import annotations

import dataclasses
from typing import assert_type

from machineserver.sdk import AsyncClient, AsyncConnection, Client, ConnectOptions


class Mine(AsyncClient):
    pass


async def connects() -> None:
    assert_type(AsyncClient.connect("h:1"), AsyncConnection[AsyncClient])
    async with AsyncClient.connect("h:1", timeout=5, metadata=[("k", "v")]) as ms:
        assert_type(ms, AsyncClient)
    assert_type(await AsyncClient.connect("h:1", options=ConnectOptions(tls=True)), AsyncClient)
    async with await AsyncClient.connect("h:1") as again:
        assert_type(again, AsyncClient)
    async with Mine.connect("h:1") as mine:
        assert_type(mine, Mine)
    with Client.connect("h:1", options=dataclasses.replace(ConnectOptions(), retries=False)) as sync:
        assert_type(sync, Client)


async def mistakes() -> None:
    AsyncClient.connect("h:1", timout=5)  # E: call-arg
    Client.connect("h:1", options={"timeout": 5})  # E: arg-type
    ConnectOptions(timeout="5")  # E: arg-type
    ConnectOptions(5.0)  # E: call-arg
    with AsyncClient.connect("h:1") as ms:  # E: attr-defined
        pass
'''


def test_user_code_connecting_is_typed_under_mypy_strict(tmp_path: Path) -> None:
    got, expected, output = mypy_errors(USER_CODE, tmp_path)
    assert len(expected) == 5
    assert got == expected, output
