"""Coordinated snapshots of a co-simulation: every member's machine state and the
co-simulation's own (link state, pending inputs, a quantum a halt cut) as one artifact
(:mod:`.artifact`), kept in the blob store and recorded; restored as one unit; exported
and imported as streams."""

from __future__ import annotations

import asyncio
import copy
import secrets
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import TYPE_CHECKING

from machineserver.server.core import tenancy
from machineserver.server.core.cosim import artifact
from machineserver.server.core.cosim.coordinator import placement
from machineserver.server.core.cosim.model import CoSimSnapshotRecord, CoSimState
from machineserver.server.core.errors import (
    FailedPrecondition,
    InvalidArgument,
    MachineServerError,
    NotFound,
    ResourceExhausted,
)
from machineserver.server.core.listing import Page, paginate
from machineserver.server.core.models import from_row, record_row
from machineserver.server.core.sessions import driver_errors
from machineserver.server.core.snapshots import drop_unreferenced, put_new_blob
from machineserver.server.drivers.base import BadRequest, DriverError, Feature, MachineState, Snapshots
from machineserver.server.lockstep.links import LinkState
from machineserver.server.store.blobs import BlobStore, BlobTooLarge
from machineserver.server.store.db import Database

if TYPE_CHECKING:
    from machineserver.server.core.cosim.manager import CoSimManager, Runtime

TABLE = "cosim_snapshots"


class CoSimSnapshots:
    def __init__(self, manager: CoSimManager, db: Database, blobs: BlobStore, max_bytes: int) -> None:
        self.m = manager
        self.db = db
        self.blobs = blobs
        self.max_bytes = max_bytes

    def _shape(self, rt: Runtime) -> tuple[str, ...]:
        return tuple(f"{live.board.name}/{live.record.backend}" for live in rt.lives)

    async def create(self, rt: Runtime, display_name: str) -> CoSimSnapshotRecord:
        coord = self.m.require_runnable(rt, "take a snapshot")
        for live in rt.lives:
            live.feature(Feature.SNAPSHOTS)
        blobs = []
        for live in rt.lives:
            async with live.lock:
                machine = live.require_halted("take a snapshot")
                with driver_errors(live):
                    blobs.append(await machine.capability(Snapshots).save_state())
        art = artifact.Artifact(self._shape(rt), rt.rec.time_ref, rt.rec.quanta,
                                tuple(c - o for c, o in zip(coord.state.cycles, coord.state.origins, strict=True)),
                                coord.state.links.to_dict(), tuple(coord.state.inputs), tuple(blobs),
                                copy.deepcopy(coord.state.mid))
        data = artifact.encode(art)
        if self.max_bytes and len(data) > self.max_bytes:
            raise ResourceExhausted("limits.max_snapshot_bytes", f"the snapshot is larger than the server's "
                                    f"limits.max_snapshot_bytes ({self.max_bytes} bytes)")
        self.m.sessions.quotas.admit_snapshot_bytes(len(data))
        digest = await put_new_blob(self.blobs, self.db, data)  # a caller gone meanwhile leaves no blob
        try:
            return self._record(rt, digest, len(data), art, display_name)
        except BaseException:
            drop_unreferenced(self.blobs, self.db, digest)
            raise

    def _record(self, rt: Runtime, digest: str, size: int, art: artifact.Artifact,
                display_name: str) -> CoSimSnapshotRecord:
        """The record of a snapshot of ``rt``: it belongs to the co-simulation's tenant (it
        is reached through it); its owner is whoever took or imported it."""
        owner, _ = tenancy.stamp()
        rec = CoSimSnapshotRecord(id=f"{rt.rec.id}/snap-{secrets.token_hex(6)}", cosim=rt.rec.id, snapshot="",
                                  sha256=digest, size_bytes=size, virtual_time_ns=rt.rec.ns(art.time_ref),
                                  quanta=art.quanta, shape=art.shape, display_name=display_name, owner=owner,
                                  tenant=rt.rec.tenant)
        rec = CoSimSnapshotRecord(**{**rec.__dict__, "snapshot": rec.id.split("/", 1)[1]})
        self.db.put(TABLE, {**record_row(rec), "cosim": rt.rec.id, "blob": digest})
        return rec

    def get(self, name: str, field_name: str = "name") -> tuple[Runtime, CoSimSnapshotRecord]:
        prefix, _, snap = name.partition("/snapshots/")
        rt = self.m.get(prefix, field_name)
        if not snap or "/" in snap:
            raise InvalidArgument(field_name, f"{name!r} is not cosimulations/ID/snapshots/ID")
        row = self.db.get(TABLE, f"{rt.rec.id}/{snap}")
        if row is None:
            raise NotFound("cosimulation snapshot", name)
        data = dict(row["data"])
        data["shape"] = tuple(data["shape"])
        return rt, from_row(CoSimSnapshotRecord, data)

    def list_page(self, rt: Runtime, page_size: int, page_token: str) -> Page[CoSimSnapshotRecord]:
        rows = self.db.rows(TABLE, "cosim = ?", [rt.rec.id], order_by="create_time DESC, id")
        items = [from_row(CoSimSnapshotRecord, {**r["data"], "shape": tuple(r["data"]["shape"])}) for r in rows]
        return paginate(items, page_size, page_token, tenancy.list_scope({}).token_key(rt.rec.id))

    def delete(self, name: str) -> None:
        _, rec = self.get(name)
        self.delete_row(rec.id, rec.sha256)

    def delete_row(self, row_id: str, digest: str) -> None:
        self.db.delete(TABLE, row_id)
        if self.db.count(TABLE, "blob = ?", [digest]) == 0 and self.db.count("snapshots", "blob = ?", [digest]) == 0:
            self.blobs.delete(digest)

    def export_chunks(self, rec: CoSimSnapshotRecord) -> Iterator[bytes]:
        return self.blobs.iter_chunks(rec.sha256)

    async def restore(self, name: str) -> Runtime:
        rt, rec = self.get(name)
        if rt.state is CoSimState.RUNNING:
            raise FailedPrecondition(f"co-simulation {rt.rec.name} is running; pause it first",
                                     state=rt.state.value, required="not running")
        data = await asyncio.to_thread(self.blobs.get, rec.sha256)
        art = artifact.decode(data)
        self._check_shape(rt, art.shape)
        if rt.coord is not None:
            await rt.coord.end()
            rt.coord = None
        for live in rt.lives:
            if live.machine is None or live.state in (MachineState.OFF, MachineState.FAILED):
                await self.m.sessions.power_on(live, placement(rt.lives, rt.rec.quantum_ref))
        for live, blob in zip(rt.lives, art.blobs, strict=True):
            async with live.lock:
                machine = live.require_machine("restore a co-simulation snapshot")
                try:
                    with driver_errors(live):
                        await machine.capability(Snapshots).restore_state(blob)
                except (MachineServerError, DriverError, asyncio.CancelledError):
                    raise
                except Exception as exc:  # a member state its backend cannot take, however it fails
                    raise FailedPrecondition(
                        f"{name} cannot be restored into {live.record.name}: {exc.__class__.__name__}",
                        state="unrestorable snapshot", required="a snapshot these backends restore",
                    ) from None
                live.record.exit_code = None
                live.record.last_stop = None
                self.m.sessions.set_state(live, MachineState.HALTED, f"restored {name}")
        rt.rec.time_ref, rt.rec.quanta, rt.rec.last_stop = art.time_ref, art.quanta, None
        await self.m.enter_lockstep(rt, art.since_origin, LinkState.from_dict(art.link_state), art.inputs, art.mid)
        self.m.end_segment(rt, CoSimState.PAUSED, f"restored {name}")
        return rt

    def _check_shape(self, rt: Runtime, shape: Sequence[str]) -> None:
        mine = self._shape(rt)
        if tuple(shape) != mine:
            raise FailedPrecondition(f"the snapshot is of members {', '.join(shape)}; co-simulation {rt.rec.name} "
                                     f"has {', '.join(mine)}", required="the same members' boards and backends")

    async def import_(self, parent: str, display_name: str, sha256: str,
                      chunks: AsyncIterator[bytes]) -> CoSimSnapshotRecord:
        rt = self.m.get(parent, "metadata.parent")
        writer = self.blobs.writer(self.max_bytes)
        try:
            async for chunk in chunks:
                writer.write(chunk)
            self.m.sessions.quotas.admit_snapshot_bytes(writer.size)
        except BlobTooLarge:
            raise ResourceExhausted("limits.max_snapshot_bytes", f"the snapshot is larger than the server's "
                                    f"limits.max_snapshot_bytes ({self.max_bytes} bytes)") from None
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
        try:
            art = artifact.decode(await asyncio.to_thread(self.blobs.get, digest))
            self._check_shape(rt, art.shape)
            await asyncio.to_thread(self._check_members, rt, art)
        except MachineServerError:
            if self.db.count(TABLE, "blob = ?", [digest]) == 0 and self.db.count("snapshots", "blob = ?", [digest]) == 0:
                self.blobs.delete(digest)
            raise
        return self._record(rt, digest, size, art, display_name)

    def _check_members(self, rt: Runtime, art: artifact.Artifact) -> None:
        """Each member's state checked whole by its backend for its board (as a session
        snapshot's import is): INVALID_ARGUMENT naming the member and why."""
        for i, (live, blob) in enumerate(zip(rt.lives, art.blobs, strict=True)):
            where = f"member {i} ({live.board.name} on {live.record.backend})"
            driver = self.m.sessions.backends.get(live.record.backend, "metadata.parent")
            try:
                driver.check_snapshot(blob, live.board)
            except BadRequest as exc:
                raise InvalidArgument("chunk", f"not a co-simulation snapshot: {where}: {exc}") from None
            except Exception as exc:
                raise InvalidArgument("chunk", f"not a co-simulation snapshot: {where}: unreadable "
                                      f"({exc.__class__.__name__})") from None

    def delete_all(self, rt: Runtime) -> None:
        for row in self.db.rows(TABLE, "cosim = ?", [rt.rec.id]):
            self.delete_row(row["id"], row["blob"])
