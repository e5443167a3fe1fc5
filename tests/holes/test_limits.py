"""Size limits on what clients send, and bounds on what their configs allocate (issue 14,
"Unbounded fields break the service for everyone" and "Configs that allocate without
bounds"), through a real server over gRPC:

- every RPC of every served service (from the descriptors, so a new one cannot be missed)
  given one string field over its limit answers INVALID_ARGUMENT naming that field; nothing
  is stored and everyone's Lists still work afterwards;
- the probe's cases: 5 MiB display names, a 7.9 MB template description;
- a message of a client stream after the first (Attach) is checked too;
- List pages stop before 4 MiB whatever the page size (sessions, board templates);
- board configs: 2 GiB of RAM, nvic.num_irq of 2^40 and -100, 100,000-deep JSON and YAML,
  a YAML billion laughs, max_console_bytes of 2^63-1; the bounds come from the server config.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from grpc import aio

from machineserver.sdk import AsyncClient, errors
from machineserver.server.api.server import SERVICE_NAMES
from machineserver.server.api.validation import DEFAULT_STRING_BYTES, FIELD_LIMITS, UNCHECKED
from machineserver.server.app import RunningServer
from machineserver.server.config import ServerConfig
from machineserver.server.core import boards
from machineserver.server.core.engine import Limits
from machineserver.server.core.listing import MAX_PAGE_BYTES
from machineserver.v1 import common_pb2 as cpb
from machineserver.v1 import debug_pb2 as dpb
from machineserver.v1 import session_pb2 as spb
from tests.helpers.api import bad_request_field
from tests.helpers.server import serving

TEXTS = boards.shipped_board_texts()


def board_yaml(name: str, base: str = "lm3s6965evb", **changes: Any) -> str:
    data = yaml.safe_load(TEXTS[base])
    data.update(name=name, **changes)
    return yaml.safe_dump(data)


def nvic_board(name: str, num_irq: object) -> str:
    data = yaml.safe_load(TEXTS["lm3s6965evb"])
    data["name"] = name
    for p in data["peripherals"]:
        if p["model"] == "nvic":
            p["properties"]["num_irq"] = num_irq
    return yaml.safe_dump(data)


def violation(exc: errors.MachineServerError) -> str:
    fields = exc.field_violations
    assert fields, f"no BadRequest in {exc!r}"
    return fields[0][0]


# --------------------------------------------------------------------------- every RPC


def served_methods() -> list[MethodDescriptor]:
    pool = descriptor_pool.Default()
    return [m for name in SERVICE_NAMES for m in pool.FindServiceByName(name).methods]


def _string_path(desc: Descriptor) -> list[FieldDescriptor] | None:
    """The shortest path of singular fields to a string field a client sets (breadth first)."""
    queue: list[tuple[Descriptor, list[FieldDescriptor]]] = [(desc, [])]
    seen = {desc.full_name}
    while queue:
        current, path = queue.pop(0)
        for f in current.fields:
            if f.type == FieldDescriptor.TYPE_STRING and f.name not in UNCHECKED:
                return [*path, f]
        for f in current.fields:
            sub = f.message_type
            if sub is None or f.is_repeated or sub.full_name in seen:
                continue
            seen.add(sub.full_name)
            queue.append((sub, [*path, f]))
    return None


def oversized(desc: Descriptor) -> tuple[Message, str] | None:
    """A request with one string field one byte over its limit, and that field's path."""
    path = _string_path(desc)
    if path is None:
        return None
    msg = GetMessageClass(desc)()
    target: Any = msg
    for f in path[:-1]:
        target = getattr(target, f.name)
    last = path[-1]
    limit = FIELD_LIMITS[last.name].bytes if last.name in FIELD_LIMITS else DEFAULT_STRING_BYTES
    value = "x" * (limit + 1)
    if last.is_repeated:
        getattr(target, last.name).append(value)
        return msg, ".".join(f.name for f in path) + "[0]"
    setattr(target, last.name, value)
    return msg, ".".join(f.name for f in path)


def _serialize(msg: Message) -> bytes:
    return msg.SerializeToString()


async def _one(msg: Message) -> AsyncIterator[Message]:
    yield msg


async def call_raw(channel: aio.Channel, method: MethodDescriptor, msg: Message) -> None:
    """Call ``method`` with ``msg`` (the only message of a client stream), reading every answer."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    ser = _serialize
    de = GetMessageClass(method.output_type).FromString
    if method.client_streaming and method.server_streaming:
        async for _ in channel.stream_stream(path, ser, de)(_one(msg), timeout=20):
            pass
    elif method.client_streaming:
        await channel.stream_unary(path, ser, de)(_one(msg), timeout=20)
    elif method.server_streaming:
        async for _ in channel.unary_stream(path, ser, de)(msg, timeout=20):
            pass
    else:
        await channel.unary_unary(path, ser, de)(msg, timeout=20)



async def test_a_field_over_its_limit_is_invalid_argument_naming_it_on_every_rpc(
        server: RunningServer, client: AsyncClient) -> None:
    methods = served_methods()
    assert len(methods) > 60, "the served services' descriptors were not found"
    tested, nothing_to_check = [], []
    async with aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        for method in methods:
            made = oversized(method.input_type)
            if made is None:
                nothing_to_check.append(method.name)
                continue
            msg, field = made
            with pytest.raises(aio.AioRpcError) as exc:
                await call_raw(channel, method, msg)
            assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method.full_name, exc.value)
            assert bad_request_field(exc.value) == field, method.full_name
            assert "at most" in (exc.value.details() or ""), method.full_name
            tested.append(method.name)
    # every family: sessions, programs, snapshots, debug (unary and Attach), coverage,
    # co-simulation, telemetry, templates; the methods left out take no strings at all
    for name in ("CreateSession", "UploadProgram", "ImportSnapshot", "Attach", "SetBreakpoint",
                 "ExportCoverage", "CreateCoSimulation", "ImportCoSimSnapshot", "CreateAlertRule",
                 "CreateBoardTemplate", "StreamConsole", "ListSessions"):
        assert name in tested
    # ImportCapsule sends only chunks (bounded by the import itself: limits.capsule_max_bytes)
    assert set(nothing_to_check) <= {"GetHostStatus", "StreamHostStatus", "StreamAlerts", "GetCapabilities",
                                     "GetCallerIdentity", "ImportCapsule"}, nothing_to_check
    # nothing was stored, and Lists answer for everyone
    assert not (await client.sessions.list_sessions()).sessions
    assert not (await client.sessions.list_programs()).programs
    assert not (await client.sessions.list_snapshots()).snapshots
    names = [t.name for t in (await client.capabilities.list_board_templates()).board_templates]
    assert all(n.removeprefix("boardTemplates/") in TEXTS for n in names)


async def test_probe_5_mib_display_names_are_refused_and_lists_keep_working(client: AsyncClient) -> None:
    for _ in range(2):
        with pytest.raises(errors.InvalidArgument) as exc:
            await client.sessions.create_session(board_template="lm3s6965evb", display_name="n" * (5 << 20))
        assert violation(exc.value) == "display_name"
        assert "at most 256 bytes" in exc.value.message
    # a multi-byte name is measured in UTF-8 bytes: 100 characters of 3 bytes each are over
    with pytest.raises(errors.InvalidArgument):
        await client.sessions.create_session(board_template="lm3s6965evb", display_name="\u20ac" * 100)
    ok = (await client.sessions.create_session(board_template="lm3s6965evb", display_name="d" * 256,
                                               labels={"k" * 63: "v" * 256})).session
    assert [s.name for s in (await client.sessions.list_sessions()).sessions] == [ok.name]
    with pytest.raises(errors.InvalidArgument) as exc:
        await client.sessions.create_session(board_template="lm3s6965evb", labels={f"l{i}": "v" for i in range(65)})
    assert violation(exc.value) == "labels"
    with pytest.raises(errors.InvalidArgument) as exc:
        await client.sessions.create_session(board_template="lm3s6965evb", labels={"team": "v" * 257})
    assert violation(exc.value) == "labels['team']"


async def test_probe_huge_template_description_is_refused_before_anything_is_stored(client: AsyncClient) -> None:
    huge = board_yaml("huge-desc", description="d" * 7_900_000)
    with pytest.raises(errors.InvalidArgument) as exc:
        await client.capabilities.create_board_template(config=huge)
    assert violation(exc.value) == "config"
    # under the config's limit but over the description's: the board check names it
    long_desc = board_yaml("long-desc", description="d" * (20 << 10))
    with pytest.raises(errors.InvalidArgument) as exc:
        await client.capabilities.create_board_template(config=long_desc)
    assert violation(exc.value) == "config.description"
    for name in ("huge-desc", "long-desc"):
        with pytest.raises(errors.NotFound):
            await client.capabilities.get_board_template(name=f"boardTemplates/{name}")
    listed = (await client.capabilities.list_board_templates(page_size=1000)).board_templates
    assert sorted(t.name.removeprefix("boardTemplates/") for t in listed) == sorted(TEXTS)
    await client.capabilities.create_board_template(config=board_yaml("fine-desc", description="d" * (16 << 10)))


async def test_each_message_of_a_client_stream_is_checked(server: RunningServer, client: AsyncClient) -> None:
    """Attach: the open message is fine, a later command over a limit ends the stream
    INVALID_ARGUMENT naming the command's field."""
    s = (await client.sessions.create_session(board_template="lm3s6965evb", power_on=True)).session

    async def requests() -> AsyncIterator[dpb.AttachRequest]:
        yield dpb.AttachRequest(open=dpb.AttachOpen(name=s.name))
        yield dpb.AttachRequest(command=dpb.DebugCommand(
            write_memory=dpb.WriteMemoryRequest(name=s.name, address=0x20000000, data=b"\0" * (2 << 20))))

    async with aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        attach = channel.stream_stream("/machineserver.v1.DebugService/Attach", _serialize,
                                       dpb.AttachResponse.FromString)
        with pytest.raises(aio.AioRpcError) as exc:
            async for _ in attach(requests(), timeout=20):
                pass
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_field(exc.value) == "command.write_memory.data"
    assert (await client.sessions.get_session(name=s.name)).session.state == cpb.SESSION_STATE_HALTED


# --------------------------------------------------------------------------- pages in bytes


def padded_board(name: str, pad: int) -> str:
    """An inline board whose text is ``pad`` bytes longer (a YAML comment)."""
    return board_yaml(name) + "#" + "p" * pad + "\n"


async def test_list_pages_stop_before_4_mib(client: AsyncClient) -> None:
    """40 sessions and 40 templates of 250 KiB each: 10 MB, past the 8 MiB message limit
    in one page. Each page stays under 4 MiB and the tokens walk them all."""
    pad = 250 << 10
    for i in range(40):
        await client.sessions.create_session(board_config=padded_board(f"big-{i}", pad))
        await client.capabilities.create_board_template(config=padded_board(f"big-t-{i:02d}", pad))
    seen: list[str] = []
    token, pages = "", 0
    while True:
        page = await client.sessions.list_sessions(page_size=1000, page_token=token)
        assert page.ByteSize() < MAX_PAGE_BYTES + (64 << 10)
        seen += [s.name for s in page.sessions]
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert len(seen) == len(set(seen)) == 40 and pages >= 3
    names: list[str] = []
    token = ""
    while True:
        tpage = await client.capabilities.list_board_templates(page_size=1000, page_token=token)
        assert tpage.ByteSize() < MAX_PAGE_BYTES + (64 << 10)
        names += [t.name for t in tpage.board_templates]
        token = tpage.next_page_token
        if not token:
            break
    assert len(names) == len(set(names)) == 40 + len(TEXTS)


# --------------------------------------------------------------------------- config bounds


async def test_board_configs_that_would_allocate_without_bounds_are_refused(client: AsyncClient) -> None:
    big_ram = board_yaml("big-ram", memory=[
        {"name": "flash", "base": 0, "size": 0x40000, "kind": "flash"},
        {"name": "sram", "base": 0x20000000, "size": 2 << 30, "kind": "ram"}])
    with pytest.raises(errors.InvalidArgument) as exc:
        await client.sessions.create_session(board_config=big_ram, power_on=True)
    assert violation(exc.value) == "board_config.memory"
    assert "limits.max_board_memory_bytes" in exc.value.message
    with pytest.raises(errors.InvalidArgument) as exc:
        await client.capabilities.create_board_template(config=big_ram)
    assert violation(exc.value) == "config.memory"

    for num_irq in (1 << 40, -100, "lots", 497):
        with pytest.raises(errors.InvalidArgument) as exc:
            await client.sessions.create_session(board_config=nvic_board("irqs", num_irq), power_on=True)
        assert violation(exc.value) == "board_config.peripherals[4].properties.num_irq", num_irq

    depth = 100_000
    deep_json = json.dumps({"name": "deep"})[:-1] + ', "x": ' + "[" * depth + "]" * depth + "}"
    deep_flow_yaml = "name: deep\nx: " + "[" * depth + "]" * depth + "\n"
    deep_block_yaml = "name: deep\nx:\n" + "- " * depth + "1\n"
    for text in (deep_json, deep_flow_yaml, deep_block_yaml):
        with pytest.raises(errors.InvalidArgument) as exc:
            await client.sessions.create_session(board_config=text)
        assert violation(exc.value) == "board_config"
        with pytest.raises(errors.InvalidArgument) as exc:
            await client.capabilities.create_board_template(config=text)
        assert violation(exc.value) == "config"
    just_deep = board_yaml("deep-ok") + "extra: " + "[" * 40 + "]" * 40 + "\n"
    with pytest.raises(errors.InvalidArgument) as exc:
        await client.sessions.create_session(board_config=just_deep)
    assert "nested deeper than 32" in exc.value.message

    laughs = ["name: laughs", 'l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    laughs += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 10)]
    with pytest.raises(errors.InvalidArgument) as exc:
        await client.sessions.create_session(board_config="\n".join(laughs) + "\n")
    assert violation(exc.value) == "board_config" and "aliases" in exc.value.message

    with pytest.raises(errors.InvalidArgument) as exc:
        await client.sessions.create_session(board_template="lm3s6965evb",
                                             limits=spb.ResourceLimits(max_console_bytes=(1 << 63) - 1))
    assert violation(exc.value) == "limits.max_console_bytes"

    assert not (await client.sessions.list_sessions()).sessions
    # within the bounds: a board with 1 MiB of RAM and 240 interrupts powers on
    fine = yaml.safe_load(nvic_board("fine", 240))
    fine["memory"][1]["size"] = 1 << 20
    s = (await client.sessions.create_session(board_config=yaml.safe_dump(fine), power_on=True)).session
    assert s.state == cpb.SESSION_STATE_HALTED


async def test_bounds_come_from_the_server_config(tmp_path: Path) -> None:
    limits = Limits(max_board_memory_bytes=4 << 20, max_irqs=64, max_console_bytes=1 << 20)
    cfg = ServerConfig(listen="127.0.0.1:0", data_dir=tmp_path / "data", log_level="warning", limits=limits)
    async with serving(cfg) as (_, client):
        # mps2-an385 has 8 MiB of RAM: refused inline, over this server's 4 MiB
        with pytest.raises(errors.InvalidArgument) as exc:
            await client.sessions.create_session(board_config=board_yaml("mps2-copy", "mps2-an385"))
        assert "at most 4194304" in exc.value.message
        with pytest.raises(errors.InvalidArgument) as exc:
            await client.sessions.create_session(board_config=nvic_board("irq96", 96))
        assert violation(exc.value) == "board_config.peripherals[4].properties.num_irq"
        with pytest.raises(errors.InvalidArgument):
            await client.sessions.create_session(board_template="lm3s6965evb",
                                                 limits=spb.ResourceLimits(max_console_bytes=(1 << 20) + 1))
        s = (await client.sessions.create_session(board_template="lm3s6965evb",
                                                  limits=spb.ResourceLimits(max_console_bytes=1 << 20))).session
        assert s.limits.max_console_bytes == 1 << 20


def test_the_readme_documents_the_limits() -> None:
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = text[text.index("### Size limits"):text.index("## What is where")]
    undocumented = [name for name in FIELD_LIMITS
                    if f"`{name}`" not in section and name not in ("from_session", "to_session", "session_a",
                                                                  "session_b", "description", "data", "paths")]
    assert not undocumented
    for setting in ("max_board_memory_bytes", "max_irqs", "max_config_depth", "max_config_nodes",
                    "max_config_bytes", "max_console_bytes"):
        assert f"`{setting}`" in section and hasattr(Limits(), setting)
