"""Tenancy in the core managers themselves (every transport reaches them): identities
set as the auth hook leaves them (conftest.acting_as), no server in between."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import yaml

from machineserver.server.core import boards, tenancy
from machineserver.server.core.catalog import BoardCatalog
from machineserver.server.core.errors import AlreadyExists, InvalidArgument, NotFound
from machineserver.server.core.identity import DEFAULT_TENANT, Role
from machineserver.server.core.programs import ProgramStore, UploadMetadata
from machineserver.server.store.blobs import BlobStore
from machineserver.server.store.db import Database
from tests.helpers.firmware import firmware
from tests.tenancy.conftest import acting_as

BOARD = "mps2-an385"


def template(name: str) -> str:
    data = yaml.safe_load(boards.shipped_board_texts()[BOARD])
    data["name"] = name
    return yaml.safe_dump(data)


def test_list_scopes() -> None:
    with acting_as("a"):
        terms = {"tenant": "b", "state": "x"}
        scope = tenancy.list_scope(terms)
        assert terms == {"state": "x"}  # the tenant term is the scope's, not a field filter
        assert scope.where() == ("0", []) and not scope.admits("a") and not scope.admits("b")
        own = tenancy.list_scope({})
        assert own.where() == ("[tenant] = ?", ["a"]) and own.admits("a") and not own.admits("b")
        key_a = own.token_key("state=x")
    with acting_as("b"):
        assert tenancy.list_scope({}).token_key("state=x") != key_a
    with acting_as("ops", role=Role.ADMIN):
        everyone = tenancy.list_scope({})
        assert everyone.where() == (None, []) and everyone.admits("a") and everyone.admits("b")
        assert tenancy.list_scope({"tenant": "b"}).where() == ("[tenant] = ?", ["b"])
    # outside any call (the server's own work) and with auth off: the local admin
    assert tenancy.stamp() == ("anonymous", DEFAULT_TENANT) and tenancy.visible("a")


def test_board_template_writes_across_tenants_are_not_found(tmp_path: Path) -> None:
    catalog = BoardCatalog(Database(tmp_path / "db.sqlite3"))
    with acting_as("a", "alice"):
        rec, _ = catalog.create(template("only-a"))
        assert (rec.owner, rec.tenant) == ("alice", "a")
    with acting_as("b", "bob"):
        for action in (lambda: catalog.get("boardTemplates/only-a"),
                       lambda: catalog.update("boardTemplates/only-a", template("only-a"), "", []),
                       lambda: catalog.delete("boardTemplates/only-a")):
            with pytest.raises(NotFound) as hidden:
                action()
            assert str(hidden.value) == "board template 'only-a' not found"
        # names are one namespace: B cannot take A's name (see the report)
        with pytest.raises(AlreadyExists):
            catalog.create(template("only-a"))
        assert catalog.get(f"boardTemplates/{BOARD}")[0].builtin  # the shipped ones are everyone's
    with acting_as("ops", role=Role.ADMIN):
        catalog.update("boardTemplates/only-a", template("only-a"), "", [])
    with acting_as("a"):
        catalog.delete("boardTemplates/only-a")
        with pytest.raises(NotFound):
            catalog.get("boardTemplates/only-a")
    # a restart reads each template's tenant back
    with acting_as("a"):
        catalog.create(template("kept"))
    again = BoardCatalog(Database(tmp_path / "db.sqlite3"))
    with acting_as("b"), pytest.raises(NotFound):
        again.get("kept")
    with acting_as("a"):
        assert again.get("kept")[0].tenant == "a"


async def chunks_of(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def test_program_ids_per_tenant(tmp_path: Path) -> None:
    db = Database(tmp_path / "db.sqlite3")
    store = ProgramStore(db, BlobStore(tmp_path / "blobs"), 1 << 24)
    image = firmware(BOARD, "hello").read_bytes()
    digest = hashlib.sha256(image).hexdigest()
    with acting_as(DEFAULT_TENANT):
        default = (await store.upload(UploadMetadata(), chunks_of(image))).program
    # the default tenant's ids are those the server gave before tenants existed
    assert default.id == hashlib.sha256(f"{digest}:ELF:0".encode()).hexdigest()[:16]
    with acting_as("a"):
        a = await store.upload(UploadMetadata(), chunks_of(image))
        assert not a.deduplicated and a.program.id != default.id
        assert (await store.upload(UploadMetadata(), chunks_of(image))).deduplicated
    with acting_as("b"):
        with pytest.raises(NotFound):
            store.get(a.program.name)
        # a record's own reference (a session's program) still resolves, by id
        assert store.by_id(a.program.id).tenant == "a"
        assert store.list(50, "", "").items == []
        with pytest.raises(InvalidArgument):
            store.list(50, "", "unknown=1")
