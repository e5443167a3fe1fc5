"""Records in SQLite (WAL) through sqlite-utils, with a schema version and migrations.

Every record is one row; every change is one transaction. Rows keep their structured
fields as JSON text in a ``data`` column next to the indexed columns queries use, so a
new field needs no migration while a new query column does (and gets one).
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeAlias

import sqlite_utils

SCHEMA_VERSION = 6


def _migration_1(db: sqlite_utils.Database) -> None:
    common = {"id": str, "owner": str, "create_time": float, "update_time": float, "data": str}
    db.table("sessions").create({**common, "board": str, "backend": str, "state": str}, pk="id")
    db.table("programs").create({**common, "sha256": str, "blob": str, "format": str}, pk="id")
    db.table("snapshots").create({**common, "session": str, "board": str, "blob": str}, pk="id")
    db.table("board_templates").create({**common, "etag": str}, pk="id")
    db.table("coverage_reports").create({**common, "program": str}, pk="id")
    db.table("alert_rules").create(common, pk="id")
    db.table("alert_events").create(
        {"id": int, "rule": str, "state": str, "time": float, "data": str}, pk="id"
    )
    db.table("cosimulations").create(common, pk="id")
    db.table("audit_events").create(
        {"id": int, "time": float, "principal": str, "rpc": str, "resource": str, "code": str,
         "data": str},
        pk="id",
    )
    db.table("programs").create_index(["sha256"])
    db.table("snapshots").create_index(["session"])
    db.table("sessions").create_index(["create_time"])


def _migration_2(db: sqlite_utils.Database) -> None:
    """Breakpoints a user set on a session, kept across restarts (id: "{session}/{n}")."""
    db.table("breakpoints").create(
        {"id": str, "session": str, "create_time": float, "update_time": float, "data": str}, pk="id")
    db.table("breakpoints").create_index(["session"])


def _migration_3(db: sqlite_utils.Database) -> None:
    """Co-simulation snapshots (id: "{cosimulation}/{snapshot}")."""
    db.table("cosim_snapshots").create(
        {"id": str, "owner": str, "cosim": str, "blob": str, "create_time": float, "update_time": float,
         "data": str}, pk="id")
    db.table("cosim_snapshots").create_index(["cosim"])


# the tables whose rows belong to a tenant (issue 14: every record has its real owner)
TENANT_TABLES = ("sessions", "programs", "snapshots", "board_templates", "coverage_reports", "alert_rules",
                 "cosimulations", "cosim_snapshots")


def _migration_4(db: sqlite_utils.Database) -> None:
    """Tenants, API keys and the audit log's columns. Rows from before tenants belong to
    the "default" tenant (the one every caller had while auth was off)."""
    for table in TENANT_TABLES:
        db.execute(f"ALTER TABLE [{table}] ADD COLUMN tenant TEXT NOT NULL DEFAULT 'default'")
        db.table(table).create_index(["tenant"])
    db.table("api_keys").create(
        {"id": str, "secret_hash": str, "tenant": str, "create_time": float, "update_time": float,
         "expire_time": float, "revoke_time": float, "data": str}, pk="id")
    db.table("api_keys").create_index(["secret_hash"], unique=True)
    # the audit log (append-only; "id" is the sequence): who, tenant, method, resource,
    # outcome, request id, time; debug writes' address and length
    db.table("audit_events").drop()
    db.table("audit_events").create(
        {"id": int, "time": float, "principal": str, "tenant": str, "method": str, "resource": str,
         "code": str, "request_id": str, "transport": str, "address": int, "length": int, "peer": str,
         "data": str},
        pk="id", not_null={"time", "principal", "tenant", "method", "code"})
    db.table("audit_events").create_index(["tenant", "id"])
    db.table("audit_events").create_index(["time"])


def _migration_5(db: sqlite_utils.Database) -> None:
    """Regression jobs (issue 15): a job's record, and one row per run of its matrix (id
    "{job}/{n}"), updated as verdicts come."""
    common = {"id": str, "owner": str, "tenant": str, "create_time": float, "update_time": float, "data": str}
    db.table("jobs").create({**common, "state": int}, pk="id", not_null={"tenant"}, defaults={"tenant": "default"})
    db.table("jobs").create_index(["tenant"])
    db.table("job_runs").create(
        {"id": str, "job": str, "idx": int, "verdict": int, "tenant": str, "create_time": float,
         "update_time": float, "data": str}, pk="id", not_null={"tenant"}, defaults={"tenant": "default"})
    db.table("job_runs").create_index(["job", "idx"])


def _migration_6(db: sqlite_utils.Database) -> None:
    """Failure capsules (issue 16): a record per capsule; the archive is a blob."""
    db.table("capsules").create(
        {"id": str, "owner": str, "tenant": str, "session": str, "trigger": str, "blob": str,
         "create_time": float, "update_time": float, "data": str},
        pk="id", not_null={"tenant"}, defaults={"tenant": "default"})
    db.table("capsules").create_index(["tenant", "create_time"])
    db.table("capsules").create_index(["session"])
    db.table("capsules").create_index(["blob"])


# A write hook: called in every write transaction just before it commits, with the open
# connection, the table written and the row's id ("" when the transaction names none); it may
# write rows of its own there (the audit log's entry for the change, in the same
# transaction). What it returns, if anything, is called once the transaction is over, with
# whether it committed.
WriteHook: TypeAlias = Callable[[sqlite_utils.Database, str, str], Callable[[bool], None] | None]

# SQLite allows 32766 bound parameters per statement; stay far below it
MAX_IDS_PER_QUERY = 500

# Index i holds the migration from version i to i + 1.
MIGRATIONS: list[Callable[[sqlite_utils.Database], None]] = [_migration_1, _migration_2, _migration_3, _migration_4,
                                                                  _migration_5, _migration_6]


class Database:
    """The server's record store. Thread-safe (one connection behind a lock): calls are
    short, so the event loop calls them directly."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db = sqlite_utils.Database(conn)
        self._lock = threading.RLock()
        self._upserts: dict[tuple[str, tuple[str, ...]], str] = {}  # prepared upsert statements
        self.write_hook: WriteHook | None = None  # see WriteHook (set by the audit trail)
        conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a committed transaction survives the process being killed
        # (SIGKILL); only an OS crash may lose the last ones.
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA busy_timeout=5000")
        self._migrate()

    # ------------------------------------------------------------------ schema

    @property
    def schema_version(self) -> int:
        return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    def _migrate(self) -> None:
        with self._lock:
            version = self.schema_version
            if version > SCHEMA_VERSION:
                raise RuntimeError(
                    f"{self.path}: schema version {version} is newer than this server's "
                    f"({SCHEMA_VERSION}); upgrade the server"
                )
            for target in range(version, SCHEMA_VERSION):
                with self.transaction():
                    MIGRATIONS[target](self._db)
                    self._db.execute(f"PRAGMA user_version={target + 1}")

    @contextmanager
    def transaction(self, table: str = "", row_id: str = "") -> Iterator[sqlite_utils.Database]:
        """One write transaction (what it writes: ``table``, ``row_id``, for the write
        hook). The write hook runs last inside it, so what the hook writes commits or rolls
        back with the change."""
        finished: Callable[[bool], None] | None = None
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                hook = self.write_hook
                if hook is not None:
                    finished = hook(self._db, table, row_id)
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.conn.in_transaction:
                    self._db.execute("ROLLBACK")
                if finished is not None:
                    finished(False)
                raise
        if finished is not None:
            finished(True)

    # ------------------------------------------------------------------ records

    def put(self, table: str, row: Mapping[str, Any]) -> None:
        """Insert or replace one row (``data`` given as a mapping is stored as JSON): one
        upsert statement, prepared once per table and set of columns (sqlite-utils'
        generic upsert looks the table up on every call: ~0.4 ms; this ~0.05 ms)."""
        encoded = _encode(row)
        columns = tuple(encoded)
        sql = self._upserts.get((table, columns))
        if sql is None:
            names = ", ".join(f"[{c}]" for c in columns)
            updates = ", ".join(f"[{c}] = excluded.[{c}]" for c in columns if c != "id")
            sql = (f"INSERT INTO [{table}] ({names}) VALUES ({', '.join('?' * len(columns))}) "
                   f"ON CONFLICT(id) DO " + (f"UPDATE SET {updates}" if updates else "NOTHING"))
            self._upserts[(table, columns)] = sql
        with self.transaction(table, str(encoded.get("id", ""))) as db:
            db.execute(sql, [encoded[c] for c in columns])

    def get(self, table: str, row_id: str) -> dict[str, Any] | None:
        with self._lock:
            rows = list(self._db.table(table).rows_where("id = ?", [row_id], limit=1))
        return _decode(rows[0]) if rows else None

    def delete(self, table: str, row_id: str) -> bool:
        with self.transaction(table, row_id) as db:
            cursor = db.execute(f"DELETE FROM [{table}] WHERE id = ?", [row_id])
            return cursor.rowcount > 0

    def delete_where(self, table: str, where: str, params: Sequence[Any] = ()) -> int:
        """Delete the rows a condition matches (one transaction); how many went."""
        with self.transaction(table) as db:
            cursor = db.execute(f"DELETE FROM [{table}] WHERE {where}", list(params))
            return int(cursor.rowcount)

    def rows(
        self,
        table: str,
        where: str | None = None,
        params: Sequence[Any] = (),
        *,
        order_by: str = "create_time, id",
        limit: int | None = None,
        offset: int = 0,
    ) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.table(table).rows_where(
                where, list(params), order_by=order_by, limit=limit, offset=offset or None
            )
            return [_decode(r) for r in rows]

    def rows_by_id(self, table: str, ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """The rows with these ids (those that exist), by id: one query per
        :data:`MAX_IDS_PER_QUERY` ids."""
        out: dict[str, dict[str, Any]] = {}
        for start in range(0, len(ids), MAX_IDS_PER_QUERY):
            chunk = list(ids[start:start + MAX_IDS_PER_QUERY])
            marks = ", ".join("?" * len(chunk))
            with self._lock:
                rows = list(self._db.table(table).rows_where(f"id IN ({marks})", chunk))
            for row in rows:
                out[row["id"]] = _decode(row)
        return out

    def pages(self, table: str, page_size: int = 500, where: str | None = None,
              params: Sequence[Any] = ()) -> Iterator[list[dict[str, Any]]]:
        """Every row (or those ``where`` selects), in id order, a bounded page at a time:
        each page is its own query (keyset: ``id > last``), so the lock is held for one
        page, never for the whole table, and rows written meanwhile are seen or not, but
        no row is seen twice."""
        last: str | None = None
        while True:
            clauses = [f"({where})"] if where else []
            args = list(params)
            if last is not None:
                clauses.append("id > ?")
                args.append(last)
            with self._lock:
                rows = [_decode(r) for r in self._db.table(table).rows_where(
                    " AND ".join(clauses) or None, args, order_by="id", limit=page_size)]
            if rows:
                yield rows
            if len(rows) < page_size:
                return
            last = rows[-1]["id"]

    def count(self, table: str, where: str | None = None, params: Sequence[Any] = ()) -> int:
        with self._lock:
            sql = f"SELECT COUNT(*) FROM [{table}]" + (f" WHERE {where}" if where else "")
            return int(self._db.execute(sql, list(params)).fetchone()[0])

    def append(self, table: str, row: Mapping[str, Any]) -> int:
        """Insert a row into an append-only table (integer id); returns the id."""
        with self.transaction(table) as db:
            t = db.table(table)
            t.insert(_encode(row))
            if t.last_pk is None:  # set by every insert
                raise RuntimeError(f"the insert into {table} reported no row id")
            return int(t.last_pk)

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _encode(row: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(row)
    if "data" in out and not isinstance(out["data"], str):
        out["data"] = json.dumps(out["data"], sort_keys=True)
    return out


def _decode(row: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(row)
    if isinstance(out.get("data"), str):
        out["data"] = json.loads(out["data"])
    return out
