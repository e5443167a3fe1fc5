"""Tenancy in the core managers: who a new record belongs to, whether the caller sees a
record, and which tenants a List reads.

Every manager that owns records asks here (never the servicers), so every transport
(RPC, Attach, the GDB bridge) gets the same answers:

* a record is created with ``owner`` = the caller's principal and ``tenant`` = the
  caller's tenant (:func:`stamp`);
* a lookup by name of a record the caller does not see raises the same NotFound as a
  missing id (:func:`visible` is an attribute compare: cheap on hot paths);
* a List reads only the caller's tenant (admins: every tenant, or the one a
  ``tenant=T`` filter term names), in SQL where the records live in the store
  (:class:`ListScope`), and its page tokens name the scope, so a token from one tenant
  is refused in another.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from machineserver.server.core import identity
from machineserver.server.core.errors import NotFound
from machineserver.server.core.listing import resource_id
from machineserver.server.core.models import StoredRecord, from_row

if TYPE_CHECKING:
    from machineserver.server.store.db import Database


class _Owned(StoredRecord, Protocol):
    tenant: str


T = TypeVar("T", bound=_Owned)

FILTER_KEY = "tenant"  # the filter term an admin narrows a List with


def stamp() -> tuple[str, str]:
    """(owner, tenant) for a record the current caller creates."""
    who = identity.current()
    return who.principal, who.tenant


def visible(tenant: str) -> bool:
    """Whether the current caller sees records of ``tenant``."""
    return identity.current().sees(tenant)


def fetch_visible(db: Database, table: str, cls: type[T], name: str, collection: str, kind: str,
                  field: str = "name") -> T:
    """The record a caller names (``"snapshots/ID"`` or ``"ID"``), read from ``table``:
    NotFound ("snapshot ID") when there is none or the caller's tenant does not see it, the
    same answer, so ids do not leak across tenants."""
    rid = resource_id(name, collection, field)
    row = db.get(table, rid)
    if row is None:
        raise NotFound(kind, rid)
    rec = from_row(cls, row["data"])
    if not visible(rec.tenant):
        raise NotFound(kind, rid)
    return rec


def caller_scope() -> str:
    """What the current caller sees, as a key for answers cached per scope: "*" for an
    admin (every tenant), else its tenant."""
    who = identity.current()
    return "*" if who.is_admin else who.tenant


@dataclass(frozen=True)
class ListScope:
    """The tenants one List reads: ``tenant`` None is every tenant (an admin);
    ``nothing``: a caller's filter named a tenant it does not see."""

    tenant: str | None
    nothing: bool = False

    def where(self, column: str = FILTER_KEY) -> tuple[str | None, list[Any]]:
        """The SQL condition (None: every row) and its parameters."""
        if self.nothing:
            return "0", []
        if self.tenant is None:
            return None, []
        return f"[{column}] = ?", [self.tenant]

    def admits(self, tenant: str) -> bool:
        """For records kept in memory (live sessions, co-simulations)."""
        return not self.nothing and (self.tenant is None or tenant == self.tenant)

    def token_key(self, filter_text: str) -> str:
        """What a page token's fingerprint is taken over: the filter and the scope, so a
        token from one tenant's List is refused in another's."""
        scope = "-" if self.nothing else (self.tenant if self.tenant is not None else "*")
        return f"{filter_text}\x00tenant={scope}"


def list_scope(terms: MutableMapping[str, str]) -> ListScope:
    """The scope of a List for the current caller; takes the ``tenant`` term out of
    ``terms`` (parsed with :data:`FILTER_KEY` allowed)."""
    who = identity.current()
    asked = terms.pop(FILTER_KEY, None)
    if who.is_admin:
        return ListScope(asked)
    if asked is not None and asked != who.tenant:
        return ListScope(who.tenant, nothing=True)
    return ListScope(who.tenant)
