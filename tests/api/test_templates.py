"""Board templates at scale: parsed once, paged by name from the store, answers serialised
once, and work that grows with the catalog giving the event loop back."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from machineserver.sdk import AsyncClient, errors
from machineserver.server.api.capabilities import TemplateMessages, length_delimited
from machineserver.server.app import RunningServer
from machineserver.server.config import ServerConfig
from machineserver.server.core import boards
from machineserver.server.core import catalog as catalog_mod
from machineserver.server.core.backends import BackendRegistry
from machineserver.server.core.catalog import TABLE, BoardCatalog
from machineserver.server.core.models import BoardTemplateRecord, record_row
from machineserver.server.store.db import Database
from machineserver.v1 import capabilities_pb2 as pb
from tests.helpers.server import serving

SHIPPED = ("lm3s6965evb", "mps2-an385", "netduinoplus2", "sifive_e")
TEXTS = boards.shipped_board_texts()


def config(name: str, base: str = "lm3s6965evb", **changes: object) -> str:
    data = yaml.safe_load(TEXTS[base])
    data.update(name=name, **changes)
    return yaml.safe_dump(data)


def user_configs(count: int) -> Iterator[tuple[str, str]]:
    """(name, config) pairs cycling through the shipped boards."""
    for i in range(count):
        base = SHIPPED[i % len(SHIPPED)]
        yield f"u-{i:04d}", config(f"u-{i:04d}", base)


async def create_many(client: AsyncClient, configs: Iterator[tuple[str, str]]) -> None:
    async def creator() -> None:
        for _, text in configs:
            await client.capabilities.create_board_template(config=text)

    await asyncio.gather(*(creator() for _ in range(8)))


async def walk(client: AsyncClient, page_size: int, filter_text: str = "") -> list[pb.BoardTemplate]:
    out: list[pb.BoardTemplate] = []
    token = ""
    while True:
        page = await client.capabilities.list_board_templates(page_size=page_size, page_token=token,
                                                              filter=filter_text)
        assert len(page.board_templates) <= page_size
        out += page.board_templates
        token = page.next_page_token
        if not token:
            return out


def count_parses(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every config the catalog parses from text from now on (the shipped ones aside)."""
    seen: list[str] = []
    real = BoardCatalog.parse

    def parse(config: str, field: str = "config") -> object:
        seen.append(field)
        return real(config, field)

    monkeypatch.setattr(BoardCatalog, "parse", staticmethod(parse))
    return seen


async def test_every_template_once_in_name_order_whatever_the_page_size(client: AsyncClient) -> None:
    await create_many(client, user_configs(300))
    everything = await walk(client, 1000)
    names = [t.name for t in everything]
    assert len(names) == 304 and names == sorted(names) and len(set(names)) == 304
    for size in (1, 7, 50):
        assert [t.name for t in await walk(client, size)] == names
    # the listed messages (joined from bytes serialised once) are the templates themselves
    listed = {t.name: t for t in everything}
    for name in (names[0], names[150], names[-1], "boardTemplates/u-0003"):
        assert listed[name] == (await client.capabilities.get_board_template(name=name)).board_template
    assert listed["boardTemplates/u-0003"].config == config("u-0003", "sifive_e")
    # filters page the same way
    riscv = await walk(client, 13, "arch=riscv32")
    assert [t.name for t in riscv] == sorted([f"boardTemplates/u-{i:04d}" for i in range(3, 300, 4)]
                                             + ["boardTemplates/sifive_e"])
    assert [t.name for t in await walk(client, 3, "builtin=true")] == [f"boardTemplates/{n}" for n in SHIPPED]
    caps = await client.capabilities.get_capabilities()
    runs_on_unicorn = next(b for b in caps.backends if b.name == "unicorn").boards
    assert [t.name.split("/")[1] for t in await walk(client, 64, "backend=unicorn")] == list(runs_on_unicorn)
    assert await walk(client, 10, "backend=nonesuch") == []


async def test_a_page_holds_while_templates_come_and_go(client: AsyncClient) -> None:
    await create_many(client, user_configs(40))
    first = await client.capabilities.list_board_templates(page_size=10)
    last_name = first.board_templates[-1].name.split("/")[1]
    await client.capabilities.delete_board_template(name=first.board_templates[-2].name)  # a user one
    await client.capabilities.create_board_template(config=config("a-before-everything"))
    await client.capabilities.create_board_template(config=config(last_name + "-next"))
    rest = await walk_from(client, first.next_page_token, 10)
    assert rest[0] == f"boardTemplates/{last_name}-next"  # what comes after the page's last name
    assert not set(rest) & {t.name for t in first.board_templates}
    assert "boardTemplates/a-before-everything" not in rest
    assert len(rest) == 44 + 2 - 1 - 10  # nothing else skipped


async def walk_from(client: AsyncClient, token: str, page_size: int) -> list[str]:
    names: list[str] = []
    while token:
        page = await client.capabilities.list_board_templates(page_size=page_size, page_token=token)
        names += [t.name for t in page.board_templates]
        token = page.next_page_token
    return names


async def test_page_tokens_belong_to_their_query(client: AsyncClient) -> None:
    await create_many(client, user_configs(12))
    page = await client.capabilities.list_board_templates(page_size=2, filter="arch=arm-cortex-m")
    again = await client.capabilities.list_board_templates(page_size=2, filter="arch=arm-cortex-m",
                                                           page_token=page.next_page_token)
    assert again.board_templates and again.board_templates[0].name > page.board_templates[-1].name
    with pytest.raises(errors.InvalidArgument) as exc:
        await client.capabilities.list_board_templates(page_size=2, filter="arch=riscv32",
                                                       page_token=page.next_page_token)
    assert exc.value.field_violations[0][0] == "page_token"
    with pytest.raises(errors.InvalidArgument):  # base64 of something that is no token
        await client.capabilities.list_board_templates(page_token="eyJ4IjogMX0=")


async def test_lists_show_each_change(client: AsyncClient) -> None:
    created = (await client.capabilities.create_board_template(config=config("chg"))).board_template
    assert next(t for t in await walk(client, 100) if t.name == created.name) == created  # as created
    updated = (await client.capabilities.update_board_template(
        name=created.name, config=config("chg", cpu_mhz=99), etag=created.etag)).board_template
    assert updated.cpu_mhz == 99
    assert next(t for t in await walk(client, 100) if t.name == created.name) == updated
    await client.capabilities.delete_board_template(name=created.name)
    assert created.name not in [t.name for t in await walk(client, 100)]
    again = (await client.capabilities.create_board_template(config=config("chg", "mps2-an385"))).board_template
    assert next(t for t in await walk(client, 100) if t.name == created.name) == again
    assert again.cpu == "cortex-m3" and again.config == config("chg", "mps2-an385")


async def test_capabilities_follow_template_changes(client: AsyncClient, server: RunningServer,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    before = await client.capabilities.get_capabilities()
    await client.capabilities.create_board_template(config=config("late-m4", "netduinoplus2", cpu="cortex-m4"))
    builds: list[int] = []
    real = server.engine.catalog.support

    async def support(backends: BackendRegistry) -> catalog_mod.BoardSupport:
        builds.append(1)
        return await real(backends)

    monkeypatch.setattr(server.engine.catalog, "support", support)
    answers = await asyncio.gather(*(client.capabilities.get_capabilities() for _ in range(8)))
    assert builds == [1]  # one build for concurrent callers
    assert all(a == answers[0] for a in answers)
    unicorn = next(b for b in answers[0].backends if b.name == "unicorn")
    assert "late-m4" in unicorn.boards and "late-m4" not in next(
        b for b in before.backends if b.name == "unicorn").boards
    await client.capabilities.delete_board_template(name="late-m4")
    after = await client.capabilities.get_capabilities()
    assert builds == [1, 1]
    assert "late-m4" not in next(b for b in after.backends if b.name == "unicorn").boards
    assert after == before


async def test_templates_are_parsed_once_and_outlive_the_server(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = ServerConfig(listen="127.0.0.1:0", data_dir=tmp_path / "data", log_level="warning", workers=0)
    async with serving(cfg) as (_, client):
        await create_many(client, user_configs(30))
        listed = await walk(client, 7)
    parses = count_parses(monkeypatch)
    async with serving(cfg) as (_, client):
        assert await walk(client, 7) == listed
        assert (await client.capabilities.get_board_template(name="u-0007")).board_template == next(
            t for t in listed if t.name == "boardTemplates/u-0007")
        s = (await client.sessions.create_session(board_template="u-0005")).session
        assert s.board == "u-0005"
        await client.capabilities.get_capabilities()
    assert parses == []  # the boards were read back as stored, not parsed again


async def test_records_stored_before_are_parsed_once_and_rewritten(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "data"
    data.mkdir()
    db = Database(data / "machineserver.sqlite3")
    for name, text in [("old-a", config("old-a")), ("old-b", config("old-b", "sifive_e")),
                       ("old-bad", config("old-bad", arch="x86"))]:  # as an older server wrote them: no board
        db.put(TABLE, record_row(BoardTemplateRecord(id=name, config=text, etag=name), etag=name))
    db.close()
    cfg = ServerConfig(listen="127.0.0.1:0", data_dir=data, log_level="warning", workers=0)
    parses = count_parses(monkeypatch)
    async with serving(cfg) as (_, client):
        assert sorted(parses) == ["boardTemplates/old-a", "boardTemplates/old-b", "boardTemplates/old-bad"]
        names = [t.name for t in await walk(client, 50)]
        assert {"boardTemplates/old-a", "boardTemplates/old-b"} <= set(names)
        assert "boardTemplates/old-bad" not in names  # unreadable: not listed, and says why when asked
        with pytest.raises(errors.InvalidArgument) as exc:
            await client.capabilities.get_board_template(name="old-bad")
        assert "x86" in exc.value.message
        mended = (await client.capabilities.update_board_template(name="old-bad", config=config("old-bad"))).board_template
        assert mended.arch == "arm-cortex-m" and mended.name in [t.name for t in await walk(client, 50)]
        await client.capabilities.delete_board_template(name="old-bad")
        assert (await client.capabilities.get_board_template(name="old-b")).board_template.arch == "riscv32"
    rows = Database(data / "machineserver.sqlite3").rows_by_id(TABLE, ["old-a", "old-b", "old-bad"])
    assert set(rows) == {"old-a", "old-b"}
    assert all(r["data"]["spec_format"] == catalog_mod.SPEC_FORMAT for r in rows.values())
    parses.clear()
    async with serving(cfg) as (_, client):
        assert (await client.capabilities.get_board_template(name="old-a")).board_template.cpu == "cortex-m3"
    assert parses == []


async def test_a_board_json_cannot_hold_is_parsed_from_its_text(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    text = TEXTS["lm3s6965evb"].replace("name: lm3s6965evb", "name: dated", 1) + "\n"
    data = yaml.safe_load(text)
    data["peripherals"][0]["properties"] = {"calibrated": "2024-05-01"}
    dated = yaml.safe_dump(data).replace("'2024-05-01'", "2024-05-01")  # a YAML date, not a string
    cfg = ServerConfig(listen="127.0.0.1:0", data_dir=tmp_path / "data", log_level="warning", workers=0)
    async with serving(cfg) as (_, client):
        await client.capabilities.create_board_template(config=dated)
    parses = count_parses(monkeypatch)
    async with serving(cfg) as (running, client):
        assert parses == ["boardTemplates/dated"]
        spec = running.engine.catalog.spec("dated")
        assert spec is not None and str(spec.peripherals[0].properties["calibrated"]) == "2024-05-01"
        assert (await client.capabilities.get_board_template(name="dated")).board_template.config == dated


def test_stored_boards_read_back_equal() -> None:
    for text in TEXTS.values():
        spec = BoardCatalog.parse(text)
        assert boards.board_from_dict(boards.board_to_dict(spec)) == spec
    odd = boards.board_from_dict(yaml.safe_load(config("odd", reset_vector=0x20000000, vector_table=0x1000)))
    assert boards.board_from_dict(boards.board_to_dict(odd)) == odd


async def test_work_that_grows_with_the_catalog_gives_the_loop_back(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    db = Database(tmp_path / "ms.sqlite3")
    catalog = BoardCatalog(db)
    for _, text in user_configs(400):
        catalog.create(text)
    backends = BackendRegistry.discover("unicorn", None)
    monkeypatch.setattr(catalog_mod, "SLICE_S", 0.0)  # yield after every template
    turns = 0

    async def ticker() -> None:
        nonlocal turns
        while True:
            await asyncio.sleep(0)
            turns += 1

    async def loop_turns_during(work: object) -> int:
        nonlocal turns
        turns = 0
        task = asyncio.create_task(ticker())
        await work  # type: ignore[misc]
        task.cancel()
        return turns

    assert await loop_turns_during(catalog.select(50, "", "cpu=none-such", backends)) >= 400
    assert await loop_turns_during(catalog.support(backends)) >= 400
    page = await catalog.list(1000, "", "", backends)
    assert len(page.items) == 404


def test_template_messages_are_framed_as_list_elements_and_bounded() -> None:
    templates = [pb.BoardTemplate(name=f"boardTemplates/t{i}", config="x" * size)
                 for i, size in enumerate((0, 100, 127, 128, 16_383, 16_384, 300_000))]
    cache = TemplateMessages()
    framed = [cache.put(t.name, 1, t) for t in templates]
    token = "tok" * 50
    joined = b"".join(framed) + length_delimited(2, token.encode())
    assert joined == pb.ListBoardTemplatesResponse(board_templates=templates, next_page_token=token).SerializeToString()
    assert cache.get(templates[0].name, 1) == framed[0]
    assert cache.get(templates[0].name, 2) is None  # another revision
    assert cache.get("boardTemplates/none", 1) is None
    small = TemplateMessages(max_bytes=1000)
    for i in range(20):
        small.put(f"t{i}", 1, pb.BoardTemplate(name=f"t{i}", config="y" * 100))
    assert len(small) < 10 and small.get("t19", 1) is not None and small.get("t0", 1) is None
    small.get("t12", 1)  # recently used: kept longer than older ones
    for i in range(20, 24):
        small.put(f"t{i}", 1, pb.BoardTemplate(name=f"t{i}", config="y" * 100))
    assert small.get("t12", 1) is not None
    assert list(itertools.islice(iter(small._items), 1)) != ["t12"]


async def test_footprints_are_asked_once_per_template_version_a_few_at_a_time(
        client: AsyncClient, server: RunningServer, monkeypatch: pytest.MonkeyPatch) -> None:
    from machineserver.server.api import capabilities as caps_mod
    from machineserver.server.drivers.base import BoardSpec, MemoryFootprint

    await create_many(client, user_configs(150))
    asked: list[tuple[str, list[str]]] = []

    async def memory_footprints(backend: str, specs: list[BoardSpec]) -> dict[str, MemoryFootprint]:
        asked.append((backend, [s.name for s in specs]))
        return {s.name: MemoryFootprint(memory_bytes=1000 + len(s.name), basis="test") for s in specs}

    monkeypatch.setattr(server.engine.backends, "memory_footprints", memory_footprints)
    caps = await client.capabilities.get_capabilities()
    unicorn = next(b for b in caps.backends if b.name == "unicorn")
    assert {f.board: f.memory_bytes for f in unicorn.board_footprints} == {n: 1000 + len(n) for n in unicorn.boards}
    assert all(len(names) <= caps_mod.FOOTPRINT_SLICE for _, names in asked)
    assert sorted(n for b, names in asked if b == "unicorn" for n in names) == sorted(unicorn.boards)
    asked.clear()
    await client.capabilities.update_board_template(name="u-0001", config=config("u-0001", cpu_mhz=7))
    caps = await client.capabilities.get_capabilities()
    assert [names for b, names in asked if b == "unicorn"] == [["u-0001"]]  # only the one that changed
    assert len(next(b for b in caps.backends if b.name == "unicorn").board_footprints) == len(unicorn.boards)
