"""CapabilitiesService: backends with availability and features, board templates CRUD,
and the bad inputs."""

from __future__ import annotations

import pytest
import yaml

from machineserver.sdk import AsyncClient, errors
from machineserver.v1 import common_pb2

CUSTOM = {
    "name": "my-board",
    "description": "a test board",
    "arch": "arm-cortex-m",
    "cpu": "cortex-m3",
    "cpu_mhz": 25,
    "console": "uart0",
    "backends": {"unicorn": "my-board"},
    "memory": [
        {"name": "flash", "base": 0, "size": 0x40000, "kind": "flash"},
        {"name": "sram", "base": 0x20000000, "size": 0x10000},
    ],
    "peripherals": [
        {"name": "uart0", "model": "uart-pl011", "base": 0x4000C000, "size": 0x1000, "irq": 5},
        {"name": "systick", "model": "systick", "base": 0xE000E010, "size": 0x10},
        {"name": "nvic", "model": "nvic", "base": 0xE000E100, "size": 0xC00},
        {"name": "scb", "model": "scb", "base": 0xE000ED00, "size": 0x90},
    ],
}


async def test_capabilities_report_unicorn_with_real_features(client: AsyncClient) -> None:
    caps = await client.capabilities.get_capabilities()
    assert caps.api_version == "machineserver.v1"
    assert caps.server_version
    assert caps.default_backend == "unicorn"
    unicorn = next(b for b in caps.backends if b.name == "unicorn")
    assert unicorn.available and unicorn.version.startswith("2.")
    feats = set(unicorn.features)
    assert {common_pb2.FEATURE_RUN_CONTROL, common_pb2.FEATURE_REGISTERS, common_pb2.FEATURE_MEMORY,
            common_pb2.FEATURE_BREAKPOINTS, common_pb2.FEATURE_SNAPSHOTS} <= feats
    # coverage is claimed exactly when the driver implements the Coverage interface
    from machineserver.server.drivers.base import Feature, features_of
    from machineserver.server.drivers.unicorn.backend import UnicornMachine

    has_coverage = UnicornMachine is not None and Feature.COVERAGE in features_of(UnicornMachine)
    assert (common_pb2.FEATURE_COVERAGE in feats) == has_coverage
    assert {"lm3s6965evb", "mps2-an385", "netduinoplus2", "sifive_e"} <= set(unicorn.boards)
    assert any(p.name == "cortex-m3" for p in caps.processors)
    assert any(p.name == "uart-pl011" for p in caps.peripheral_models)


async def test_shipped_templates_list_get_and_filter(client: AsyncClient) -> None:
    resp = await client.capabilities.list_board_templates()
    names = [t.name for t in resp.board_templates]
    assert names == sorted(names)
    assert "boardTemplates/lm3s6965evb" in names
    lm3s = (await client.capabilities.get_board_template(name="boardTemplates/lm3s6965evb")).board_template
    assert lm3s.builtin and lm3s.cpu == "cortex-m3" and lm3s.backend_machines["qemu"] == "lm3s6965evb"
    assert any(m.base == 0x20000000 and m.size == 0x10000 for m in lm3s.memory)
    riscv = await client.capabilities.list_board_templates(filter="arch=riscv32")
    assert [t.name for t in riscv.board_templates] == ["boardTemplates/sifive_e"]
    page1 = await client.capabilities.list_board_templates(page_size=2)
    assert len(page1.board_templates) == 2 and page1.next_page_token
    page2 = await client.capabilities.list_board_templates(page_size=2, page_token=page1.next_page_token)
    assert not set(t.name for t in page1.board_templates) & set(t.name for t in page2.board_templates)


async def test_user_template_create_update_delete(client: AsyncClient) -> None:
    created = (await client.capabilities.create_board_template(config=yaml.safe_dump(CUSTOM))).board_template
    assert created.name == "boardTemplates/my-board" and not created.builtin and created.etag
    with pytest.raises(errors.AlreadyExists):
        await client.capabilities.create_board_template(config=yaml.safe_dump(CUSTOM))
    changed = dict(CUSTOM, cpu_mhz=50)
    updated = (await client.capabilities.update_board_template(
        name=created.name, config=yaml.safe_dump(changed), etag=created.etag)).board_template
    assert updated.cpu_mhz == 50 and updated.etag != created.etag
    with pytest.raises(errors.Aborted):  # stale etag
        await client.capabilities.update_board_template(name=created.name, config=yaml.safe_dump(CUSTOM), etag=created.etag)
    with pytest.raises(errors.InvalidArgument) as exc:
        await client.capabilities.update_board_template(name=created.name, config=yaml.safe_dump(dict(CUSTOM, name="other")))
    assert exc.value.field_violations[0][0] == "config.name"
    # a session can run on it
    s = (await client.sessions.create_session(board_template="my-board")).session
    assert s.board == "my-board"
    await client.capabilities.delete_board_template(name=created.name)
    with pytest.raises(errors.NotFound):
        await client.capabilities.get_board_template(name=created.name)


async def test_builtin_templates_are_read_only(client: AsyncClient) -> None:
    with pytest.raises(errors.FailedPrecondition):
        await client.capabilities.delete_board_template(name="boardTemplates/lm3s6965evb")
    lm3s = (await client.capabilities.get_board_template(name="lm3s6965evb")).board_template
    with pytest.raises(errors.FailedPrecondition):
        await client.capabilities.update_board_template(name=lm3s.name, config=lm3s.config)


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ("{not yaml", "config"),
        ("- a list", "config"),
        (yaml.safe_dump({k: v for k, v in CUSTOM.items() if k != "arch"}), "config.arch"),
        (yaml.safe_dump(dict(CUSTOM, arch="x86")), "config.arch"),
        (yaml.safe_dump(dict(CUSTOM, name="Bad Name!")), "config.name"),
        (yaml.safe_dump(dict(CUSTOM, memory=[])), "config.memory"),
        (yaml.safe_dump(dict(CUSTOM, memory=[{"name": "a", "base": 0, "size": 16}, {"name": "b", "base": 8, "size": 16}])), "config.memory"),
        (yaml.safe_dump(dict(CUSTOM, memory=[{"name": "a", "base": "zz", "size": 16}])), "config.memory[0].base"),
        (yaml.safe_dump(dict(CUSTOM, console="uart9")), "config.console"),
        (yaml.safe_dump(dict(CUSTOM, cpu_mhz=-1)), "config.cpu_mhz"),
        ("", "config"),
    ],
)
async def test_bad_board_configs_name_the_field(client: AsyncClient, config: str, field: str) -> None:
    with pytest.raises(errors.InvalidArgument) as exc:
        await client.capabilities.create_board_template(config=config)
    assert exc.value.field_violations, exc.value
    assert exc.value.field_violations[0][0] == field


async def test_bad_names_and_pages(client: AsyncClient) -> None:
    with pytest.raises(errors.InvalidArgument):
        await client.capabilities.get_board_template(name="")
    with pytest.raises(errors.InvalidArgument):
        await client.capabilities.get_board_template(name="boardTemplates/a/b")
    with pytest.raises(errors.InvalidArgument) as exc:
        await client.capabilities.list_board_templates(page_token="garbage")
    assert exc.value.field_violations[0][0] == "page_token"
    with pytest.raises(errors.InvalidArgument):
        await client.capabilities.list_board_templates(page_size=-1)
    with pytest.raises(errors.InvalidArgument) as exc:
        await client.capabilities.list_board_templates(filter="colour=blue")
    assert "unknown filter key" in exc.value.message


async def test_capabilities_list_telemetry_sources(client: AsyncClient) -> None:
    caps = await client.capabilities.get_capabilities()
    sources = {s.name: s for s in caps.telemetry_sources}
    assert sources["psutil"].ok
    assert {"nvml", "tegrastats"} <= set(sources)  # present, working or not, with the reason
    assert all(s.ok or s.error for s in sources.values())
