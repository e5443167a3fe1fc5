"""The record store and blob directory: schema versions, atomic blob writes."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from machineserver.server.store import db as dbmod
from machineserver.server.store.blobs import BlobStore, BlobTooLarge


def test_new_database_is_at_the_current_schema_and_reopens(tmp_path: Path) -> None:
    path = tmp_path / "ms.sqlite3"
    d = dbmod.Database(path)
    assert d.schema_version == dbmod.SCHEMA_VERSION
    d.put("sessions", {"id": "a", "owner": "o", "create_time": 1.0, "update_time": 1.0, "board": "b",
                       "backend": "unicorn", "state": "off", "data": {"x": 1}})
    d.close()
    again = dbmod.Database(path)
    assert again.get("sessions", "a")["data"] == {"x": 1}  # type: ignore[index]
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ms.sqlite3"
    dbmod.Database(path).close()
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version={dbmod.SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(RuntimeError, match="newer"):
        dbmod.Database(path)


def test_migrations_run_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ran: list[int] = []
    current = dbmod.SCHEMA_VERSION

    def add_column(db) -> None:  # type: ignore[no-untyped-def]
        ran.append(current + 1)
        db.table("sessions").add_column("note", str)

    path = tmp_path / "ms.sqlite3"
    dbmod.Database(path).close()
    monkeypatch.setattr(dbmod, "MIGRATIONS", [*dbmod.MIGRATIONS, add_column])
    monkeypatch.setattr(dbmod, "SCHEMA_VERSION", current + 1)
    d = dbmod.Database(path)
    assert ran == [current + 1] and d.schema_version == current + 1
    d.close()
    dbmod.Database(path).close()
    assert ran == [current + 1]  # not again


def test_a_version_1_database_gains_the_breakpoints_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "ms.sqlite3"
    with monkeypatch.context() as m:  # a database as the first release made it
        m.setattr(dbmod, "SCHEMA_VERSION", 1)
        old = dbmod.Database(path)
        old.put("sessions", {"id": "a", "owner": "", "create_time": 1.0, "update_time": 1.0, "board": "b",
                             "backend": "unicorn", "state": "off", "data": {}})
        assert "breakpoints" not in old._db.table_names()
        old.close()
    d = dbmod.Database(path)
    assert d.schema_version == dbmod.SCHEMA_VERSION >= 2
    assert d.get("sessions", "a") is not None  # kept
    d.put("breakpoints", {"id": "a/1", "session": "a", "create_time": 1.0, "update_time": 1.0, "data": {"n": 1}})
    d.put("breakpoints", {"id": "a/2", "session": "a", "create_time": 2.0, "update_time": 2.0, "data": {"n": 2}})
    assert [r["data"]["n"] for r in d.rows("breakpoints", "session = ?", ["a"])] == [1, 2]
    assert d.delete_where("breakpoints", "session = ?", ["a"]) == 2 and d.count("breakpoints") == 0


def test_a_failed_transaction_leaves_nothing(tmp_path: Path) -> None:
    d = dbmod.Database(tmp_path / "ms.sqlite3")
    with pytest.raises(ZeroDivisionError), d.transaction() as db:
        db.table("alert_rules").insert({"id": "r", "owner": "", "create_time": 0.0, "update_time": 0.0, "data": "{}"})
        raise ZeroDivisionError
    assert d.count("alert_rules") == 0


def test_blobs_are_content_addressed_and_atomic(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "blobs")
    digest = store.put(b"hello")
    assert store.get(digest) == b"hello" and store.path_for(digest).parent.name == digest[:2]
    assert store.put(b"hello") == digest
    w = store.writer(limit=4)
    with pytest.raises(BlobTooLarge):
        w.write(b"too long")
    assert not list((tmp_path / "blobs").glob(".incoming-*"))
    (tmp_path / "blobs" / ".incoming-stray").write_bytes(b"x")
    BlobStore(tmp_path / "blobs")  # a restart clears what a crash left
    assert not list((tmp_path / "blobs").glob(".incoming-*"))
    with pytest.raises(ValueError):
        store.path_for("../../etc/passwd")


def _row(i: int, kind: str = "even") -> dict[str, object]:
    return {"id": f"t{i:04d}", "owner": "o", "create_time": float(i), "update_time": float(i),
            "etag": kind, "data": {"n": i}}


def test_pages_visit_every_row_once_in_id_order_a_bounded_page_at_a_time(tmp_path: Path) -> None:
    d = dbmod.Database(tmp_path / "ms.sqlite3")
    ids = [f"t{i:04d}" for i in range(1, 1001)]
    for i in reversed(range(1, 1001)):  # stored out of order: pages go by id, not by insertion
        d.put("board_templates", _row(i, "even" if i % 2 == 0 else "odd"))
    pages = list(d.pages("board_templates", 128))
    assert [len(p) for p in pages] == [128] * 7 + [104]
    assert [r["id"] for p in pages for r in p] == ids
    assert pages[0][0]["data"] == {"n": 1}  # decoded like every other read
    evens = [r["id"] for p in d.pages("board_templates", 100, "etag = ?", ["even"]) for r in p]
    assert evens == ids[1::2]
    assert list(d.pages("board_templates", 10, "etag = ?", ["none"])) == []
    assert [len(p) for p in d.pages("board_templates", 500)] == [500, 500]  # an exact multiple ends cleanly


def test_pages_see_rows_written_between_pages_once(tmp_path: Path) -> None:
    d = dbmod.Database(tmp_path / "ms.sqlite3")
    for i in range(0, 100, 2):
        d.put("board_templates", _row(i))
    seen: list[str] = []
    for page in d.pages("board_templates", 10):
        seen += [r["id"] for r in page]
        last = int(page[-1]["id"][1:])
        d.put("board_templates", _row(last + 1))  # after this page: the next ones see it
        d.put("board_templates", _row(last - 1))  # before it: no page shows it
        d.put("board_templates", _row(last))  # rewritten: not seen twice
    assert len(seen) == len(set(seen))
    assert seen == sorted(seen)


def test_rows_by_id_reads_only_those_that_exist_in_bounded_queries(tmp_path: Path) -> None:
    d = dbmod.Database(tmp_path / "ms.sqlite3")
    for i in range(1200):
        d.put("board_templates", _row(i))
    wanted = [f"t{i:04d}" for i in range(0, 1200, 1)] + ["missing"]
    statements: list[str] = []
    d._db.conn.set_trace_callback(statements.append)
    rows = d.rows_by_id("board_templates", wanted)
    d._db.conn.set_trace_callback(None)
    assert set(rows) == set(wanted) - {"missing"}
    assert rows["t0042"]["data"] == {"n": 42}
    reads = [s for s in statements if "board_templates" in s and " IN (" in s]  # not sqlite-utils' schema looks
    assert len(reads) == 3  # 1201 ids, at most 500 a query
    assert all(s.count("'t") <= dbmod.MAX_IDS_PER_QUERY for s in reads)
    assert d.rows_by_id("board_templates", []) == {}
