"""Snapshots: whole-machine states saved by the driver, kept in the blob store and
recorded; restored into a session of the same board and backend; exported and imported
as streams.

The blob store's disk work (hashing, writing, fsync, reading a large blob) runs off the
event loop; a small blob is read inline (a thread hop would cost more than the read)."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Iterator

import structlog

from machineserver.server.core import tenancy
from machineserver.server.core.console import MarkKind
from machineserver.server.core.errors import (
    FailedPrecondition,
    InvalidArgument,
    MachineServerError,
    ResourceExhausted,
)
from machineserver.server.core.listing import (
    FieldGetters,
    Page,
    match_terms,
    paginate,
    parse_filter,
)
from machineserver.server.core.models import SnapshotRecord, from_row, record_row
from machineserver.server.core.sessions import (
    LiveSession,
    SessionManager,
    driver_errors,
    finish_uninterrupted,
)
from machineserver.server.drivers.base import (
    Backend,
    BadRequest,
    BoardSpec,
    DriverError,
    Feature,
    MachineState,
    Snapshots,
)
from machineserver.server.store.blobs import BlobStore, BlobTooLarge
from machineserver.server.store.db import Database

log = structlog.get_logger(__name__)

TABLE = "snapshots"
COSIM_TABLE = "cosim_snapshots"  # co-simulation snapshots share blobs with these
BLOB_WRITE_S = 120.0  # how long a snapshot's blob write may take before a gone caller stops waiting


def drop_unreferenced(blobs: BlobStore, db: Database, digest: str) -> None:
    """Remove a snapshot blob no record (of a session or a co-simulation) holds."""
    if db.count(TABLE, "blob = ?", [digest]) == 0 and db.count(COSIM_TABLE, "blob = ?", [digest]) == 0:
        blobs.delete(digest)


async def put_new_blob(blobs: BlobStore, db: Database, data: bytes) -> str:
    """Store a new snapshot's blob; a caller that goes away meanwhile leaves none behind
    (the write finishes, then the blob goes unless a record holds it)."""
    put = asyncio.ensure_future(asyncio.to_thread(blobs.put, data))
    if await finish_uninterrupted(put, BLOB_WRITE_S):
        if put.done() and not put.cancelled() and put.exception() is None:
            drop_unreferenced(blobs, db, put.result())
        raise asyncio.CancelledError()
    return await put


COLLECTION = "snapshots"
READ_INLINE = 256 * 1024  # blobs up to this size are read on the event loop


class SnapshotStore:
    def __init__(self, db: Database, blobs: BlobStore, sessions: SessionManager, max_bytes: int) -> None:
        self._db = db
        self._blobs = blobs
        self._sessions = sessions
        self._max_bytes = max_bytes

    def get(self, name: str, field: str = "name") -> SnapshotRecord:
        """The snapshot a caller names: NotFound when there is none or the caller's tenant
        does not see it (the same answer)."""
        return tenancy.fetch_visible(self._db, TABLE, SnapshotRecord, name, COLLECTION, "snapshot", field)

    def list(self, page_size: int, page_token: str, filter_text: str) -> Page[SnapshotRecord]:
        terms = parse_filter(filter_text, ["session", "board", "backend", tenancy.FILTER_KEY])
        scope = tenancy.list_scope(terms)
        if "session" in terms:
            terms["session"] = terms["session"].removeprefix("sessions/")
        getters: FieldGetters[SnapshotRecord] = {"session": lambda r: r.session, "board": lambda r: r.board, "backend": lambda r: r.backend}
        where, params = scope.where()
        rows = self._db.rows(TABLE, where, params, order_by="create_time DESC, id")
        items = [r for r in (from_row(SnapshotRecord, x["data"]) for x in rows) if match_terms(terms, getters, r)]
        return paginate(items, page_size, page_token, scope.token_key(filter_text))

    async def create(self, live: LiveSession, display_name: str) -> SnapshotRecord:
        live.require_machine("take a snapshot")
        live.feature(Feature.SNAPSHOTS)
        was_running = live.state is MachineState.RUNNING
        if was_running:
            await self._sessions.pause(live, "paused for a snapshot")
        try:
            async with live.lock:
                machine = live.require_machine("take a snapshot")
                with driver_errors(live):
                    blob: bytes = await machine.capability(Snapshots).save_state()
                instructions = machine.counters().instructions
        finally:
            if was_running and live.state is MachineState.HALTED:
                await self._sessions.run(live)
        if self._max_bytes and len(blob) > self._max_bytes:
            raise ResourceExhausted("limits.max_snapshot_bytes", f"the snapshot is larger than the server's "
                                    f"limits.max_snapshot_bytes ({self._max_bytes} bytes)")
        self._sessions.quotas.admit_snapshot_bytes(len(blob))
        digest = await self._put_blob(blob)
        owner, tenant = tenancy.stamp()
        rec = SnapshotRecord(
            id="snap-" + secrets.token_hex(6),
            session=live.id,
            board=live.board.name,
            backend=live.record.backend,
            sha256=digest,
            size_bytes=len(blob),
            program=live.record.program,
            display_name=display_name,
            instructions=instructions,
            owner=owner,
            tenant=tenant,
        )
        try:
            self._save(rec)
        except BaseException:
            self._drop_unreferenced(digest)
            raise
        if not self._blobs.exists(digest):  # deleted with its last other record meanwhile
            await asyncio.to_thread(self._blobs.put, blob)
        return rec

    async def restore(self, live: LiveSession, snapshot_name: str) -> None:
        live.refuse_member("restore a snapshot into the session")
        rec = self.get(snapshot_name, "snapshot")
        if rec.board != live.board.name or rec.backend != live.record.backend:
            raise FailedPrecondition(
                f"snapshot {rec.id} is of board {rec.board} on {rec.backend}; session {live.id} "
                f"is board {live.board.name} on {live.record.backend}"
            )
        live.feature(Feature.SNAPSHOTS)
        if live.machine is None or live.state is MachineState.OFF or live.state is MachineState.FAILED:
            await self._sessions.power_on(live)
        if live.state is MachineState.RUNNING:
            await self._sessions.pause(live, "paused for a restore")
        if rec.size_bytes <= READ_INLINE:
            blob = self._blobs.get(rec.sha256)
        else:
            blob = await asyncio.to_thread(self._blobs.get, rec.sha256)
        async with live.lock:
            machine = live.require_machine("restore a snapshot")
            try:
                with driver_errors(live):
                    await machine.capability(Snapshots).restore_state(blob)
            except (MachineServerError, DriverError, asyncio.CancelledError):
                raise
            except Exception as exc:  # a blob its backend cannot take, however it fails
                log.warning("snapshot_restore_failed", snapshot=rec.id, session=live.id, error=repr(exc))
                raise FailedPrecondition(
                    f"snapshot {rec.id} cannot be restored into session {live.id}: {exc.__class__.__name__}",
                    state="unrestorable snapshot", required="a snapshot this backend restores",
                ) from None
            live.console.mark(MarkKind.SNAPSHOT_RESTORED, f"restored {rec.name}")
            if rec.program:
                live.record.program = rec.program
            live.record.exit_code = None
            live.record.last_stop = None
            self._sessions.set_state(live, MachineState.HALTED, f"restored {rec.name}")

    def delete(self, name: str) -> None:
        rec = self.get(name)
        self._db.delete(TABLE, rec.id)
        if self._db.count(TABLE, "blob = ?", [rec.sha256]) == 0:
            self._blobs.delete(rec.sha256)

    def export_chunks(self, rec: SnapshotRecord) -> Iterator[bytes]:
        return self._blobs.iter_chunks(rec.sha256)

    async def import_(
        self,
        *,
        display_name: str,
        board: str,
        backend: str,
        sha256: str,
        instructions: int,
        chunks: AsyncIterator[bytes],
    ) -> SnapshotRecord:
        if not board:
            raise InvalidArgument("metadata.board", "is required")
        if not backend:
            raise InvalidArgument("metadata.backend", "is required")
        driver = self._sessions.backends.get(backend, "metadata.backend")
        _, spec = self._sessions.catalog.get(board, "metadata.board")
        reason = driver.board_support(spec)
        if reason is not None:
            raise InvalidArgument("metadata.board", f"backend {backend} cannot run board {spec.name}: {reason}")
        board = spec.name
        writer = self._blobs.writer(self._max_bytes)
        try:
            async for chunk in chunks:
                writer.write(chunk)
            self._sessions.quotas.admit_snapshot_bytes(writer.size)
        except BlobTooLarge:
            raise ResourceExhausted("limits.max_snapshot_bytes", f"the snapshot is larger than the server's "
                                    f"limits.max_snapshot_bytes ({self._max_bytes} bytes)") from None
        except BaseException:
            writer.abort()
            raise
        if writer.size == 0:
            writer.abort()
            raise InvalidArgument("chunk", "the import has no bytes")
        if sha256 and sha256.lower() != writer.sha256:
            writer.abort()
            raise InvalidArgument("metadata.sha256", f"checksum mismatch: got {writer.sha256}")
        size = writer.size
        digest = await asyncio.to_thread(writer.commit)
        await self._check_import(digest, driver, spec)
        owner, tenant = tenancy.stamp()
        rec = SnapshotRecord(
            id="snap-" + secrets.token_hex(6),
            session="",
            board=board,
            backend=backend,
            sha256=digest,
            size_bytes=size,
            display_name=display_name,
            instructions=instructions,
            owner=owner,
            tenant=tenant,
        )
        self._save(rec)
        return rec

    async def _check_import(self, digest: str, driver: Backend, board: BoardSpec) -> None:
        """An imported blob checked whole by its backend (format, version, board, bounded
        decompression, field types) before it is recorded; removed and INVALID_ARGUMENT
        (chunk) naming why when it is not a snapshot a restore could take."""
        def check() -> None:
            driver.check_snapshot(self._blobs.get(digest), board)

        try:
            await asyncio.to_thread(check)
        except Exception as exc:
            if self._db.count(TABLE, "blob = ?", [digest]) == 0 and self._db.count(
                    COSIM_TABLE, "blob = ?", [digest]) == 0:
                self._blobs.delete(digest)
            if isinstance(exc, BadRequest):
                raise InvalidArgument("chunk", f"not a {driver.name} snapshot of board {board.name}: {exc}") from None
            log.warning("snapshot_check_failed", backend=driver.name, board=board.name, error=repr(exc))
            raise InvalidArgument("chunk", f"not a {driver.name} snapshot of board {board.name}: "
                                  f"unreadable ({exc.__class__.__name__})") from None

    async def _put_blob(self, blob: bytes) -> str:
        return await put_new_blob(self._blobs, self._db, blob)

    def _drop_unreferenced(self, digest: str) -> None:
        drop_unreferenced(self._blobs, self._db, digest)

    def _save(self, rec: SnapshotRecord) -> None:
        self._db.put(TABLE, record_row(rec, session=rec.session, board=rec.board, blob=rec.sha256))
