"""Board templates: the ones shipped with the package (read-only) and user-made ones
stored in the database."""

from __future__ import annotations

import builtins
import hashlib

from machineserver.server.core import boards as board_data
from machineserver.server.core.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from machineserver.server.core.listing import (
    FieldGetters,
    Page,
    match_terms,
    paginate,
    parse_filter,
    resource_id,
)
from machineserver.server.core.models import BoardTemplateRecord, from_row, now, record_row
from machineserver.server.drivers.base import BoardSpec
from machineserver.server.store.db import Database

TABLE = "board_templates"
COLLECTION = "boardTemplates"


def _etag(config: str) -> str:
    return hashlib.sha256(config.encode()).hexdigest()[:16]


class BoardCatalog:
    def __init__(self, db: Database) -> None:
        self._db = db
        self.generation = 0  # bumped on every change, for caches of derived answers
        self._builtin: dict[str, tuple[BoardTemplateRecord, BoardSpec]] = {}
        for stem, text in board_data.shipped_board_texts().items():
            spec = board_data.board_from_dict(board_data.parse_board_text(text), field=f"{stem}.yaml")
            rec = BoardTemplateRecord(id=spec.name, config=text, builtin=True, etag=_etag(text), create_time=0, update_time=0)
            self._builtin[spec.name] = (rec, spec)

    # ------------------------------------------------------------------ reads

    def get(self, name: str, field: str = "name") -> tuple[BoardTemplateRecord, BoardSpec]:
        board_id = resource_id(name, COLLECTION, field)
        if board_id in self._builtin:
            return self._builtin[board_id]
        row = self._db.get(TABLE, board_id)
        if row is None:
            raise NotFound("board template", board_id)
        rec = from_row(BoardTemplateRecord, row["data"])
        return rec, self.parse(rec.config)

    def all(self) -> list[tuple[BoardTemplateRecord, BoardSpec]]:
        items = dict(self._builtin)
        for row in self._db.rows(TABLE):
            rec = from_row(BoardTemplateRecord, row["data"])
            items.setdefault(rec.id, (rec, self.parse(rec.config)))
        return [items[k] for k in sorted(items)]

    def specs(self) -> list[BoardSpec]:
        return [spec for _, spec in self.all()]

    def list(
        self, page_size: int, page_token: str, filter_text: str, backend_boards: dict[str, builtins.list[str]]
    ) -> Page[tuple[BoardTemplateRecord, BoardSpec]]:
        terms = parse_filter(filter_text, ["arch", "builtin", "backend", "cpu"])
        getters: FieldGetters[tuple[BoardTemplateRecord, BoardSpec]] = {
            "arch": lambda t: t[1].arch.value,
            "builtin": lambda t: "true" if t[0].builtin else "false",
            "cpu": lambda t: t[1].cpu,
        }
        backend = terms.pop("backend", None)
        items = [t for t in self.all() if match_terms(terms, getters, t)]
        if backend is not None:
            items = [t for t in items if t[1].name in backend_boards.get(backend, [])]
        return paginate(items, page_size, page_token, filter_text)

    @staticmethod
    def parse(config: str, field: str = "config") -> BoardSpec:
        return board_data.board_from_dict(board_data.parse_board_text(config, field=field), field=field)

    # ------------------------------------------------------------------ writes

    def create(self, config: str, owner: str = "") -> tuple[BoardTemplateRecord, BoardSpec]:
        if not config.strip():
            raise InvalidArgument("config", "is required")
        spec = self.parse(config)
        if spec.name in self._builtin or self._db.get(TABLE, spec.name) is not None:
            raise AlreadyExists("board template", spec.name)
        rec = BoardTemplateRecord(id=spec.name, config=config, etag=_etag(config), owner=owner)
        self._save(rec)
        return rec, spec

    def update(self, name: str, config: str, etag: str, mask: builtins.list[str]) -> tuple[BoardTemplateRecord, BoardSpec]:
        bad = [p for p in mask if p != "config"]
        if bad:
            raise InvalidArgument("update_mask", f"only 'config' can be updated, not {', '.join(bad)}")
        rec, _ = self.get(name)
        if rec.builtin:
            raise FailedPrecondition(f"board template {rec.id} ships with the server and is read-only")
        if etag and etag != rec.etag:
            raise Aborted(f"board template {rec.id} changed since etag {etag}; read it again")
        spec = self.parse(config)
        if spec.name != rec.id:
            raise InvalidArgument("config.name", f"cannot rename {rec.id} to {spec.name}; create a new template")
        rec.config, rec.etag, rec.update_time = config, _etag(config), now()
        self._save(rec)
        return rec, spec

    def delete(self, name: str) -> None:
        rec, _ = self.get(name)
        if rec.builtin:
            raise FailedPrecondition(f"board template {rec.id} ships with the server and cannot be deleted")
        self._db.delete(TABLE, rec.id)
        self.generation += 1

    def _save(self, rec: BoardTemplateRecord) -> None:
        self._db.put(TABLE, record_row(rec, etag=rec.etag))
        self.generation += 1
