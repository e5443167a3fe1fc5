"""Programs: chunked uploads into the blob store, format detection and parsing,
deduplication by content, and parsed images/symbol tables cached for loading.

A program belongs to the tenant that uploaded it. Deduplication is per tenant: the same
bytes uploaded by another tenant make that tenant's own record (a different id), so an
upload never hands out, or reveals, another tenant's program. The blob store below stays
content-addressed (one copy of the bytes)."""

from __future__ import annotations

import asyncio
import builtins
import hashlib
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass

from machineserver.server.core import sources, tenancy
from machineserver.server.core.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from machineserver.server.core.identity import DEFAULT_TENANT
from machineserver.server.core.images import ImageFormat, ParsedImage, detect_format, parse_image
from machineserver.server.core.listing import (
    FieldGetters,
    Page,
    match_terms,
    paginate,
    parse_filter,
    resource_id,
)
from machineserver.server.core.models import ProgramRecord, from_row, record_row
from machineserver.server.core.quotas import QuotaConfig, Quotas
from machineserver.server.core.symbols import SymbolTable
from machineserver.server.store.blobs import BlobStore, BlobTooLarge
from machineserver.server.store.db import Database

TABLE = "programs"
COLLECTION = "programs"


@dataclass(frozen=True)
class UploadMetadata:
    display_name: str = ""
    format: ImageFormat | None = None  # None: detect
    load_address: int = 0
    sha256: str = ""


@dataclass(frozen=True)
class UploadResult:
    program: ProgramRecord
    deduplicated: bool


class ProgramStore:
    def __init__(self, db: Database, blobs: BlobStore, max_bytes: int, *, quotas: Quotas | None = None) -> None:
        self._db = db
        self.quotas = quotas if quotas is not None else Quotas(QuotaConfig(), db)  # per tenant (core/quotas.py)
        self._blobs = blobs
        self._max_bytes = max_bytes
        self._cache: OrderedDict[str, tuple[ParsedImage, SymbolTable | None]] = OrderedDict()
        self._records: dict[str, ProgramRecord] = {}  # programs never change once stored

    async def upload(
        self, meta: UploadMetadata, chunks: AsyncIterator[bytes],
        sources: AsyncIterator[bytes] | None = None,
    ) -> UploadResult:
        """``sources``: the chunks of a source bundle sent after the program's (see
        core.sources): checked (INVALID_ARGUMENT naming sources_chunk), stored as a blob
        of the program's; the same program with other sources is another program."""
        if meta.sha256 and (len(meta.sha256) != 64 or not all(c in "0123456789abcdef" for c in meta.sha256.lower())):
            raise InvalidArgument("metadata.sha256", "must be 64 hex digits")
        writer = self._blobs.writer(self._max_bytes)
        try:
            async for chunk in chunks:
                writer.write(chunk)
            self.quotas.admit_program_bytes(writer.size)
        except BlobTooLarge:
            raise ResourceExhausted(
                "limits.max_program_bytes",
                f"the program is larger than the server's limits.max_program_bytes ({self._max_bytes} bytes)",
            ) from None
        except BaseException:
            writer.abort()
            raise
        if meta.sha256 and meta.sha256.lower() != writer.sha256:
            writer.abort()
            raise InvalidArgument(
                "metadata.sha256", f"checksum mismatch: got {writer.sha256}, expected {meta.sha256.lower()}"
            )
        if writer.size == 0:
            writer.abort()
            raise InvalidArgument("chunk", "the upload has no bytes")
        digest = writer.commit()
        data = self._blobs.get(digest)
        try:
            fmt = meta.format or detect_format(data[:64])
            if fmt is None:
                raise InvalidArgument(
                    "metadata.format", "not an ELF or Intel HEX file; for raw binaries give format BIN"
                )
            if fmt is ImageFormat.BIN and meta.format is ImageFormat.BIN and meta.load_address < 0:
                raise InvalidArgument("metadata.load_address", "must not be negative")
            parsed = parse_image(data, fmt, meta.load_address)
        except BaseException:  # whatever went wrong, the upload leaves no blob behind
            if not self._blob_referenced(digest):
                self._blobs.delete(digest)
            raise
        try:
            bundle = None if sources is None else await self._store_sources(sources)
        except BaseException:
            if not self._blob_referenced(digest):
                self._blobs.delete(digest)
            raise
        load_address = meta.load_address if fmt is ImageFormat.BIN else 0
        owner, tenant = tenancy.stamp()
        program_id = _program_id(tenant, digest, fmt, load_address)
        if bundle is not None:
            program_id = hashlib.sha256(f"{program_id}:sources:{bundle[0]}".encode()).hexdigest()[:16]
        existing = self._db.get(TABLE, program_id)
        if existing is not None:
            return UploadResult(from_row(ProgramRecord, existing["data"]), deduplicated=True)
        image = parsed.image
        rec = ProgramRecord(
            id=program_id,
            sha256=digest,
            format=fmt.value,
            size_bytes=len(data),
            display_name=meta.display_name,
            load_address=load_address,
            entry_point=image.entry,
            arch=image.arch.value if image.arch else "",
            segments=[(s.address, len(s.data)) for s in image.segments],
            has_symbols=parsed.has_symbols,
            has_debug_info=parsed.has_debug_info,
            sources_sha256=bundle[0] if bundle else "",
            source_files=bundle[1] if bundle else [],
            owner=owner,
            tenant=tenant,
        )
        self._db.put(TABLE, record_row(rec, sha256=digest, blob=digest, format=rec.format))
        return UploadResult(rec, deduplicated=False)

    def _blob_referenced(self, digest: str) -> bool:
        return self._db.count(TABLE, "blob = ?", [digest]) > 0

    async def _store_sources(self, chunks: AsyncIterator[bytes]) -> tuple[str, builtins.list[str]] | None:
        """A source bundle read (bounded) and stored: (its blob, its paths); None when empty."""
        writer = self._blobs.writer(self._max_bytes)
        parts: builtins.list[bytes] = []
        try:
            async for chunk in chunks:
                writer.write(chunk)
                parts.append(chunk)
        except BlobTooLarge:
            raise ResourceExhausted(
                "limits.max_program_bytes",
                f"the source bundle is larger than the server's limits.max_program_bytes ({self._max_bytes} bytes)",
            ) from None
        except BaseException:
            writer.abort()
            raise
        if writer.size == 0:
            writer.abort()
            return None
        try:
            bundle = await asyncio.to_thread(sources.read_bundle, b"".join(parts), sources.DEFAULT_LIMITS,
                                             "sources_chunk")
        except BaseException:
            writer.abort()
            raise
        return await asyncio.to_thread(writer.commit), bundle.names()

    def _sources_referenced(self, digest: str) -> bool:
        return self._db.count(TABLE, "json_extract(data, '$.sources_sha256') = ?", [digest]) > 0

    def get(self, name: str, field: str = "name") -> ProgramRecord:
        """The program a caller names: NotFound when there is none or the caller's tenant
        does not see it (the same answer)."""
        pid = resource_id(name, COLLECTION, field)
        rec = self.by_id(pid, field)
        if not tenancy.visible(rec.tenant):
            raise NotFound("program", pid)
        return rec

    def by_id(self, pid: str, field: str = "name") -> ProgramRecord:
        """A program a record refers to (a session's, a report's), by id, for the server's
        own work: no tenant check (never for a name a caller gave)."""
        rec = self._records.get(pid)
        if rec is None:
            row = self._db.get(TABLE, pid)
            if row is None:
                raise NotFound("program", pid)
            rec = self._records[pid] = from_row(ProgramRecord, row["data"])
        return rec

    def list(self, page_size: int, page_token: str, filter_text: str) -> Page[ProgramRecord]:
        terms = parse_filter(filter_text, ["format", "arch", "sha256", tenancy.FILTER_KEY])
        scope = tenancy.list_scope(terms)
        getters: FieldGetters[ProgramRecord] = {"format": lambda p: p.format, "arch": lambda p: p.arch, "sha256": lambda p: p.sha256}
        where, params = scope.where()
        rows = self._db.rows(TABLE, where, params, order_by="create_time DESC, id")
        items = [p for p in (from_row(ProgramRecord, r["data"]) for r in rows) if match_terms(terms, getters, p)]
        return paginate(items, page_size, page_token, scope.token_key(filter_text))

    def delete(self, name: str, in_use_by: builtins.list[str], force: bool) -> None:
        rec = self.get(name)
        if in_use_by and not force:
            raise FailedPrecondition(
                f"program {rec.id} is used by {', '.join(in_use_by)}; delete those or pass force"
            )
        self._db.delete(TABLE, rec.id)
        self._cache.pop(rec.id, None)
        self._records.pop(rec.id, None)
        if not self._blob_referenced(rec.sha256):
            self._blobs.delete(rec.sha256)
        if rec.sources_sha256 and not self._sources_referenced(rec.sources_sha256):
            self._blobs.delete(rec.sources_sha256)

    def load(self, rec: ProgramRecord) -> tuple[ParsedImage, SymbolTable | None]:
        """The parsed image and (for ELF) its symbol table, cached."""
        hit = self._cache.get(rec.id)
        if hit is not None:
            self._cache.move_to_end(rec.id)
            return hit
        data = self._blobs.get(rec.sha256)
        fmt = ImageFormat(rec.format)
        parsed = parse_image(data, fmt, rec.load_address)
        symbols = SymbolTable(data) if fmt is ImageFormat.ELF else None
        self._cache[rec.id] = (parsed, symbols)
        while len(self._cache) > 64:
            self._cache.popitem(last=False)
        return parsed, symbols


def _program_id(tenant: str, digest: str, fmt: ImageFormat, load_address: int) -> str:
    """A program's id: the same for the same bytes, format and load address within a
    tenant (deduplication), different across tenants. The default tenant's ids are those
    of the server before tenants (records stored then keep theirs)."""
    key = f"{digest}:{fmt.value}:{load_address}"
    if tenant != DEFAULT_TENANT:
        key = f"{tenant}\x00{key}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]
