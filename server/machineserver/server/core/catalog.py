"""Board templates: the ones shipped with the package (read-only) and user-made ones
stored in the database.

Each template is parsed once: a shipped one when the server starts, a user's when it is
stored. Its board is stored next to its text as plain data (``spec`` in the record's JSON,
with :data:`SPEC_FORMAT`), so a server starting reads it back without the YAML parser; a
record stored before that (or by an older parser) is parsed once at start and rewritten.

The catalog keeps every template's parsed board in memory (about 2 KB each); the records
themselves (text, owner, times) stay in the store and are read a bounded page at a time.
Lists page by name (the token holds the last name returned), so a page costs the same at
the start and the end of thousands of templates, and a template created or deleted
meanwhile never shifts a page. Work that grows with the catalog (a filter scanning for
matches, reading a page of records, the per-backend summary GetCapabilities reports) gives
the event loop back every :data:`SLICE_S` (:class:`LoopSlices`), so no other call waits
behind it for longer than that.

Every change gives the template a new ``revision`` (the catalog's generation then), so a
cache of anything derived from one template (the API keeps each template's message,
serialised) knows whether it is still current without reading the store.
"""

from __future__ import annotations

import asyncio
import base64
import bisect
import builtins
import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

from machineserver.server.core import boards as board_data
from machineserver.server.core import tenancy
from machineserver.server.core.backends import BackendRegistry
from machineserver.server.core.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    MachineServerError,
    NotFound,
)
from machineserver.server.core.limits import DEFAULT_BOUNDS, BoardBounds
from machineserver.server.core.listing import (
    DEFAULT_PAGE_SIZE,
    MAX_PAGE_SIZE,
    FieldGetters,
    Page,
    match_terms,
    parse_filter,
    read_page_token,
    resource_id,
    token_str,
)
from machineserver.server.core.models import BoardTemplateRecord, from_row, now, record_row
from machineserver.server.drivers.base import BoardSpec
from machineserver.server.store.db import Database

log = structlog.get_logger("machineserver.catalog")

TABLE = "board_templates"
COLLECTION = "boardTemplates"
FILTER_KEYS = ("arch", "builtin", "backend", "cpu", tenancy.FILTER_KEY)
# the version of board_data.board_to_dict's output a stored ``spec`` was written with: a
# record with another (or none) is parsed from its text again when the server starts
SPEC_FORMAT = 1
SLICE_S = 0.002  # the longest stretch of catalog-sized work between two yields to the loop
FETCH_SLICE = 25  # records read from the store per query while a page is built


def _etag(config: str) -> str:
    return hashlib.sha256(config.encode()).hexdigest()[:16]


class LoopSlices:
    """Cooperative slicing of work that grows with the data: ``await slices.tick()`` after
    each item gives the event loop back once :data:`SLICE_S` has passed since it last did."""

    __slots__ = ("_since",)

    def __init__(self) -> None:
        self._since = time.perf_counter()

    async def tick(self) -> bool:
        """True when it yielded (what the caller iterates over may have changed)."""
        if time.perf_counter() - self._since < SLICE_S:
            return False
        await asyncio.sleep(0)
        self._since = time.perf_counter()
        return True


@dataclass(frozen=True, slots=True)
class _Entry:
    """What the catalog keeps in memory per template."""

    spec: BoardSpec
    etag: str
    builtin: bool
    revision: int  # the catalog's generation when the template last changed (0: at start)
    tenant: str = ""  # the tenant a user's template belongs to ("" for the shipped ones: everyone's)


_GETTERS: FieldGetters[_Entry] = {
    "arch": lambda e: e.spec.arch.value,
    "builtin": lambda e: "true" if e.builtin else "false",
    "cpu": lambda e: e.spec.cpu,
}


@dataclass
class BoardSupport:
    """Which backends run which templates, as GetCapabilities reports it: per backend the
    boards it runs (names, sorted); per processor (cpu, arch) and per peripheral model the
    backends that run a board with it."""

    boards: dict[str, builtins.list[str]] = field(default_factory=dict)
    processors: dict[tuple[str, str], set[str]] = field(default_factory=dict)
    models: dict[str, set[str]] = field(default_factory=dict)


def page_token_after(after: str, filter_text: str) -> str:
    """The token of the page that starts after the template named ``after``."""
    raw = json.dumps({"a": after, "f": _fingerprint(filter_text)}).encode()
    return base64.urlsafe_b64encode(raw).decode()


def _fingerprint(filter_text: str) -> str:
    """Over the filter and the caller's tenant scope: a token from one tenant's List is
    refused in another's."""
    key = tenancy.list_scope({}).token_key(filter_text)
    return hashlib.sha256(key.encode()).hexdigest()[:8]


def _page_after(page_token: str, filter_text: str) -> str:
    """The last name the previous page returned ("" for the first page)."""
    if not page_token:
        return ""
    data = read_page_token(page_token)
    after, fp = token_str(data, "a"), token_str(data, "f")
    if fp != _fingerprint(filter_text):
        raise InvalidArgument("page_token", "the token belongs to a different query")
    return after


def _page_limit(page_size: int) -> int:
    if page_size < 0:
        raise InvalidArgument("page_size", "must not be negative")
    return min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


class BoardCatalog:
    def __init__(self, db: Database, bounds: BoardBounds = DEFAULT_BOUNDS) -> None:
        """``bounds``: what a board a client gives may ask for (templates created or
        updated, inline boards of sessions); stored and shipped boards are read as they are."""
        self._db = db
        self.bounds = bounds
        self.generation = 0  # bumped on every change, for caches of derived answers
        self._builtin: dict[str, BoardTemplateRecord] = {}
        self._entries: dict[str, _Entry] = {}
        for stem, text in board_data.shipped_board_texts().items():
            spec = board_data.board_from_dict(board_data.parse_board_text(text), field=f"{stem}.yaml")
            etag = _etag(text)
            self._builtin[spec.name] = BoardTemplateRecord(
                id=spec.name, config=text, builtin=True, etag=etag, create_time=0, update_time=0, tenant="")
            self._entries[spec.name] = _Entry(spec, etag, True, 0)
        # which backends run each template (by name), for the registry it was asked for
        self._runs_on: dict[str, frozenset[str]] = {}
        self._runs_on_registry: BackendRegistry | None = None
        self._support: tuple[int, BoardSupport] | None = None
        self._support_lock = asyncio.Lock()
        self._load_stored()
        self._names = sorted(self._entries)  # every template's name, kept sorted

    def _load_stored(self) -> None:
        """Every stored template's board, from its stored spec; records without a current
        one are parsed from their text and rewritten (once)."""
        reparsed: builtins.list[dict[str, Any]] = []
        for rows in self._db.pages(TABLE):
            for row in rows:
                board_id, data = row["id"], row["data"]
                if board_id in self._builtin:
                    log.warning("board_template_shadowed", board=board_id,
                                reason="a shipped template has this name; the stored one is not used")
                    continue
                spec = self._stored_spec(board_id, data)
                if spec is None:
                    try:
                        spec = self.parse(str(data.get("config", "")), f"{COLLECTION}/{board_id}")
                    except MachineServerError as exc:
                        log.warning("board_template_unreadable", board=board_id, error=str(exc))
                        continue
                    reparsed.append(row)
                self._entries[board_id] = _Entry(spec, str(data.get("etag", "")), False, 0, str(row["tenant"]))
        for row in reparsed:
            rec = from_row(BoardTemplateRecord, row["data"])
            self._store(rec, self._entries[rec.id].spec)
        if reparsed:
            log.info("board_templates_reparsed", count=len(reparsed))

    @staticmethod
    def _stored_spec(board_id: str, data: dict[str, Any]) -> BoardSpec | None:
        stored = data.get("spec")
        if data.get("spec_format") != SPEC_FORMAT or not isinstance(stored, dict):
            return None
        try:
            spec = board_data.board_from_dict(stored, field=f"{COLLECTION}/{board_id}")
        except MachineServerError:
            return None
        return spec if spec.name == board_id else None

    # ------------------------------------------------------------------ reads

    def get(self, name: str, field: str = "name") -> tuple[BoardTemplateRecord, BoardSpec]:
        board_id = resource_id(name, COLLECTION, field)
        if board_id in self._builtin:
            return self._builtin[board_id], self._entries[board_id].spec
        rec = self._stored(board_id)
        entry = self._entries.get(board_id)
        if entry is None:  # stored but unreadable at start: its own error, as it reads now
            return rec, self.parse(rec.config)
        return rec, entry.spec

    def _stored(self, board_id: str) -> BoardTemplateRecord:
        """A user's template a caller names: NotFound when there is none or the caller's
        tenant does not see it (the same answer)."""
        row = self._db.get(TABLE, board_id)
        if row is None or not tenancy.visible(str(row["tenant"])):
            raise NotFound("board template", board_id)
        return from_row(BoardTemplateRecord, row["data"])

    def spec(self, name: str) -> BoardSpec | None:
        """A template's parsed board, by name (no store access)."""
        entry = self._entries.get(name)
        return entry.spec if entry is not None else None

    def shown(self, name: str) -> bool:
        """Whether the current caller sees the template (the shipped ones: everyone)."""
        entry = self._entries.get(name)
        return entry is not None and (entry.builtin or tenancy.visible(entry.tenant))

    def revision(self, name: str) -> int | None:
        """The template's revision (changes whenever it does); None when there is none."""
        entry = self._entries.get(name)
        return entry.revision if entry is not None else None

    def names(self) -> builtins.list[str]:
        """Every template's name, sorted."""
        return builtins.list(self._names)

    def specs(self) -> builtins.list[BoardSpec]:
        """Every template's board, by name (from memory: nothing is parsed)."""
        return [self._entries[n].spec for n in self._names]

    def __len__(self) -> int:
        return len(self._names)

    async def list(
        self, page_size: int, page_token: str, filter_text: str, backends: BackendRegistry
    ) -> Page[tuple[BoardTemplateRecord, BoardSpec]]:
        """One page of records, in name order (see :meth:`select`)."""
        page = await self.select(page_size, page_token, filter_text, backends)
        items: builtins.list[tuple[BoardTemplateRecord, BoardSpec]] = []
        slices = LoopSlices()
        for start in range(0, len(page.items), FETCH_SLICE):
            items += [(rec, spec) for rec, spec, _ in self.records(page.items[start:start + FETCH_SLICE])]
            await slices.tick()
        return Page(items, page.next_page_token)

    async def select(
        self, page_size: int, page_token: str, filter_text: str, backends: BackendRegistry
    ) -> Page[str]:
        """One page of template names, in name order; ``backend=NAME`` in the filter keeps
        the templates that backend runs. From memory: the store is not read."""
        terms = parse_filter(filter_text, FILTER_KEYS)
        # the shipped templates are everyone's (but not those of a tenant=T filter); a
        # user's are its tenant's
        shipped = tenancy.FILTER_KEY not in terms
        scope = tenancy.list_scope(terms)
        limit = _page_limit(page_size)
        after = _page_after(page_token, filter_text)
        backend = terms.pop("backend", None)
        chosen: builtins.list[str] = []  # up to one more than the page: is there a next one?
        pos = bisect.bisect_right(self._names, after) if after else 0
        slices = LoopSlices()
        while len(chosen) <= limit and pos < len(self._names):
            name = self._names[pos]
            pos += 1
            entry = self._entries[name]
            if (shipped if entry.builtin else scope.admits(entry.tenant)) and match_terms(terms, _GETTERS, entry) and (
                    backend is None or backend in self._backends_running(name, entry.spec, backends)):
                chosen.append(name)
            if await slices.tick():
                pos = bisect.bisect_right(self._names, name)  # the names may have changed meanwhile
        more = len(chosen) > limit
        chosen = chosen[:limit]
        return Page(chosen, page_token_after(chosen[-1], filter_text) if more and chosen else "")

    def records(self, names: Sequence[str]) -> builtins.list[tuple[BoardTemplateRecord, BoardSpec, int]]:
        """The templates' records, boards and revisions, in the order given (one query to
        the store; pass a bounded number); a name with no template is left out."""
        rows = self._db.rows_by_id(TABLE, [n for n in names if n not in self._builtin])
        out: builtins.list[tuple[BoardTemplateRecord, BoardSpec, int]] = []
        for name in names:
            entry = self._entries.get(name)
            if entry is None:
                continue
            if entry.builtin:
                out.append((self._builtin[name], entry.spec, entry.revision))
            elif name in rows:
                out.append((from_row(BoardTemplateRecord, rows[name]["data"]), entry.spec, entry.revision))
        return out

    async def support(self, backends: BackendRegistry) -> BoardSupport:
        """Which backends run which templates; computed again only after a change, a
        slice at a time (concurrent callers share one computation)."""
        cached = self._support
        if cached is not None and cached[0] == self.generation and self._runs_on_registry is backends:
            return cached[1]
        async with self._support_lock:
            cached = self._support
            if cached is not None and cached[0] == self.generation and self._runs_on_registry is backends:
                return cached[1]
            generation = self.generation
            found = BoardSupport(boards={b: [] for b in backends.names()})
            slices = LoopSlices()
            for name in self.names():
                await slices.tick()
                entry = self._entries.get(name)
                if entry is None:  # deleted meanwhile
                    continue
                spec = entry.spec
                for backend in self._backends_running(name, spec, backends):
                    found.boards[backend].append(name)
                    found.processors.setdefault((spec.cpu, spec.arch.value), set()).add(backend)
                    for p in spec.peripherals:
                        found.models.setdefault(p.model, set()).add(backend)
            self._support = (generation, found)
            return found

    def _backends_running(self, name: str, spec: BoardSpec, backends: BackendRegistry) -> frozenset[str]:
        if backends is not self._runs_on_registry:
            self._runs_on.clear()
            self._runs_on_registry = backends
        found = self._runs_on.get(name)
        if found is None:
            found = self._runs_on[name] = frozenset(b for b in backends.names() if backends.runnable_boards(b, [spec]))
        return found

    @staticmethod
    def parse(config: str, field: str = "config") -> BoardSpec:
        return board_data.board_from_dict(board_data.parse_board_text(config, field=field), field=field)

    def parse_input(self, config: str, field: str = "config") -> BoardSpec:
        """A board a client gives (a template's config, a session's inline board), within
        the server's bounds (memory, interrupts, size, nesting)."""
        data = board_data.parse_board_text(config, field=field, bounds=self.bounds)
        return board_data.board_from_dict(data, field=field, bounds=self.bounds)

    # ------------------------------------------------------------------ writes

    def create(self, config: str) -> tuple[BoardTemplateRecord, BoardSpec]:
        """A user's template, of the caller's tenant. Template names are one namespace
        across tenants (sessions name templates by name): a name another tenant holds is
        ALREADY_EXISTS too."""
        if not config.strip():
            raise InvalidArgument("config", "is required")
        spec = self.parse_input(config)
        if spec.name in self._builtin or spec.name in self._entries or self._db.get(TABLE, spec.name) is not None:
            raise AlreadyExists("board template", spec.name)
        owner, tenant = tenancy.stamp()
        rec = BoardTemplateRecord(id=spec.name, config=config, etag=_etag(config), owner=owner, tenant=tenant)
        self._save(rec, spec)
        return rec, spec

    def update(self, name: str, config: str, etag: str, mask: builtins.list[str]) -> tuple[BoardTemplateRecord, BoardSpec]:
        bad = [p for p in mask if p != "config"]
        if bad:
            raise InvalidArgument("update_mask", f"only 'config' can be updated, not {', '.join(bad)}")
        board_id = resource_id(name, COLLECTION)
        if board_id in self._builtin:
            raise FailedPrecondition(f"board template {board_id} ships with the server and is read-only")
        rec = self._stored(board_id)  # not parsed: an unreadable one can be mended
        if etag and etag != rec.etag:
            raise Aborted(f"board template {rec.id} changed since etag {etag}; read it again")
        spec = self.parse_input(config)
        if spec.name != rec.id:
            raise InvalidArgument("config.name", f"cannot rename {rec.id} to {spec.name}; create a new template")
        rec.config, rec.etag, rec.update_time = config, _etag(config), now()
        self._save(rec, spec)
        return rec, spec

    def _store(self, rec: BoardTemplateRecord, spec: BoardSpec) -> None:
        """One transaction: the record, and its board as plain data where that reads back
        as the same board (it does not where properties hold what JSON cannot, e.g. a
        YAML date: such a record is parsed from its text at each start)."""
        row = record_row(rec, etag=rec.etag)
        stored = board_data.board_to_dict(spec)
        try:
            if board_data.board_from_dict(json.loads(json.dumps(stored))) == spec:
                row["data"].update(spec=stored, spec_format=SPEC_FORMAT)
        except (TypeError, ValueError, MachineServerError):
            pass
        self._db.put(TABLE, row)

    def delete(self, name: str) -> None:
        board_id = resource_id(name, COLLECTION)
        if board_id in self._builtin:
            raise FailedPrecondition(f"board template {board_id} ships with the server and cannot be deleted")
        self._stored(board_id)  # NotFound: none, or another tenant's
        if not self._db.delete(TABLE, board_id):
            raise NotFound("board template", board_id)
        if self._entries.pop(board_id, None) is not None:
            del self._names[bisect.bisect_left(self._names, board_id)]
        self._runs_on.pop(board_id, None)
        self.generation += 1

    def _save(self, rec: BoardTemplateRecord, spec: BoardSpec) -> None:
        """Store the record with its parsed board, and keep the board in memory."""
        self._store(rec, spec)
        if rec.id not in self._entries:
            bisect.insort(self._names, rec.id)
        self.generation += 1
        self._entries[rec.id] = _Entry(spec, rec.etag, False, self.generation, rec.tenant)
        self._runs_on.pop(rec.id, None)
