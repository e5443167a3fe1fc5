"""API keys: created, listed and revoked by admins; a call presents the secret.

A secret is ``msk_`` and 43 URL-safe characters (256 random bits). The store keeps only
its SHA-256 (``secret_hash``, unique): with that much entropy a plain hash cannot be
reversed or guessed, and a lookup by hash needs no constant-time comparison. The secret is
returned once, by :meth:`ApiKeyStore.create`. Revocation and expiry are checked on every
call; the cache of known keys (by hash) is this process's, and revoking goes through it,
so a revoked key fails from the next call on (one server owns a data directory).
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from machineserver.server.core.errors import InvalidArgument, NotFound, Unauthenticated
from machineserver.server.core.identity import DEFAULT_TENANT, Role
from machineserver.server.core.listing import Page, next_token, page_bounds, parse_filter
from machineserver.server.store.db import Database

TABLE = "api_keys"
SECRET_PREFIX = "msk_"
SHOWN_PREFIX = len(SECRET_PREFIX) + 6  # what a listing shows of a secret: "msk_" and 6 more
MAX_DISPLAY_NAME = 256
MAX_TENANT = 128
TENANT_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,128}")
MAX_CACHED_KEYS = 4096
BOOTSTRAP_NAME = "bootstrap-admin"


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def check_tenant(tenant: str, field: str = "tenant") -> str:
    if not tenant:
        raise InvalidArgument(field, "required")
    if not TENANT_PATTERN.fullmatch(tenant):
        raise InvalidArgument(field, f"at most {MAX_TENANT} characters: letters, digits, '-', '_', '.'")
    return tenant


@dataclass(frozen=True)
class ApiKeyRecord:
    id: str
    display_name: str
    principal: str
    tenant: str
    roles: frozenset[Role]
    secret_prefix: str
    create_time: float
    expire_time: float | None  # None: never
    revoke_time: float | None  # None: not revoked
    created_by: str

    @property
    def name(self) -> str:
        return f"apiKeys/{self.id}"

    def refusal(self, now: float) -> str:
        """Why calls with this key fail now ("" when they do not)."""
        if self.revoke_time is not None:
            return f"API key {self.name} was revoked"
        if self.expire_time is not None and now >= self.expire_time:
            return f"API key {self.name} expired"
        return ""


def _record(row: dict[str, Any]) -> ApiKeyRecord:
    data = row["data"]
    return ApiKeyRecord(
        id=row["id"], display_name=data["display_name"], principal=data["principal"], tenant=row["tenant"],
        roles=frozenset(Role(r) for r in data["roles"]), secret_prefix=data["secret_prefix"],
        create_time=row["create_time"], expire_time=row["expire_time"] or None,
        revoke_time=row["revoke_time"] or None, created_by=data.get("created_by", ""),
    )


class ApiKeyStore:
    def __init__(self, db: Database) -> None:
        self._db = db
        # a bounded cache of the keys in use: by secret hash (to authenticate) and by id
        # (to re-check a key whose caller a GDB bridge or an Attach stream inherited)
        self._by_hash: OrderedDict[str, ApiKeyRecord] = OrderedDict()
        self._by_id: dict[str, ApiKeyRecord] = {}

    def create(self, display_name: str, tenant: str, roles: frozenset[Role], *, ttl_seconds: float | None = None,
               created_by: str = "", secret: str | None = None) -> tuple[ApiKeyRecord, str]:
        """A new key and its secret (the only time the secret is seen). ``secret``: one
        given by the operator (bootstrap), else a new random one."""
        if not display_name:
            raise InvalidArgument("display_name", "required")
        if len(display_name.encode()) > MAX_DISPLAY_NAME:
            raise InvalidArgument("display_name", f"at most {MAX_DISPLAY_NAME} bytes")
        check_tenant(tenant)
        if not roles:
            raise InvalidArgument("roles", "at least one role")
        if ttl_seconds is not None and ttl_seconds <= 0:
            raise InvalidArgument("ttl", "must be positive (leave it unset for a key that does not expire)")
        secret = secret or new_secret()
        now = time.time()
        record = ApiKeyRecord(
            id=secrets.token_hex(8), display_name=display_name, principal=f"apikey:{display_name}", tenant=tenant,
            roles=frozenset(roles), secret_prefix=secret[:SHOWN_PREFIX], create_time=now,
            expire_time=now + ttl_seconds if ttl_seconds is not None else None, revoke_time=None,
            created_by=created_by,
        )
        self._db.put(TABLE, {
            "id": record.id, "secret_hash": hash_secret(secret), "tenant": tenant, "create_time": now,
            "update_time": now, "expire_time": record.expire_time or 0.0, "revoke_time": 0.0,
            "data": {"display_name": display_name, "principal": record.principal,
                     "roles": sorted(int(r) for r in roles), "secret_prefix": record.secret_prefix,
                     "created_by": created_by},
        })
        return record, secret

    def ensure(self, secret: str, display_name: str = BOOTSTRAP_NAME, tenant: str = DEFAULT_TENANT,
               roles: frozenset[Role] = frozenset({Role.ADMIN})) -> ApiKeyRecord:
        """The key with this secret, created if there is none (the bootstrap admin key:
        idempotent across restarts). A revoked one stays revoked."""
        if len(secret) < 32:
            raise ValueError("a bootstrap API key secret must be at least 32 characters")
        rows = self._db.rows(TABLE, "secret_hash = ?", [hash_secret(secret)], limit=1)
        if rows:
            return _record(rows[0])
        return self.create(display_name, tenant, roles, created_by="server config", secret=secret)[0]

    def authenticate(self, secret: str) -> ApiKeyRecord:
        """The key a call presents; Unauthenticated when it is unknown, revoked or expired."""
        digest = hash_secret(secret)
        record = self._by_hash.get(digest)
        if record is None:
            rows = self._db.rows(TABLE, "secret_hash = ?", [digest], limit=1)
            if not rows:
                raise Unauthenticated("unknown API key")
            record = self._remember(digest, _record(rows[0]))
        why = record.refusal(time.time())
        if why:
            raise Unauthenticated(why)
        return record

    def _remember(self, digest: str, record: ApiKeyRecord) -> ApiKeyRecord:
        self._by_hash[digest] = record
        self._by_id[record.id] = record
        if len(self._by_hash) > MAX_CACHED_KEYS:
            _, evicted = self._by_hash.popitem(last=False)
            self._by_id.pop(evicted.id, None)
        return record

    def refusal(self, key_id: str) -> str:
        """Why a key authenticated before fails now ("" when it does not): for commands
        that inherit a caller (a GDB bridge's packets, an Attach stream's commands)."""
        record = self._by_id.get(key_id)
        if record is None:
            row = self._db.get(TABLE, key_id)
            if row is None:
                return f"API key apiKeys/{key_id} no longer exists"
            record = _record(row)
        return record.refusal(time.time())

    def get(self, name: str) -> ApiKeyRecord:
        key_id = name.removeprefix("apiKeys/")
        row = self._db.get(TABLE, key_id) if key_id and "/" not in key_id else None
        if row is None:
            raise NotFound("API key", name)
        return _record(row)

    def list(self, page_size: int, page_token: str, filter_text: str) -> Page[ApiKeyRecord]:
        terms = parse_filter(filter_text, ["tenant", "revoked"])
        clauses, params = [], []
        if "tenant" in terms:
            clauses.append("tenant = ?")
            params.append(terms["tenant"])
        if "revoked" in terms:
            revoked = terms["revoked"].lower()
            if revoked not in ("true", "false"):
                raise InvalidArgument("filter", "revoked is true or false")
            clauses.append("revoke_time > 0" if revoked == "true" else "revoke_time = 0")
        where = " AND ".join(clauses) or None
        offset, limit = page_bounds(page_size, page_token, filter_text)
        total = self._db.count(TABLE, where, params)
        rows = self._db.rows(TABLE, where, params, limit=limit, offset=offset)
        return Page([_record(r) for r in rows], next_token(offset, len(rows), total, filter_text))

    def revoke(self, name: str) -> ApiKeyRecord:
        """Revokes a key (idempotent: a revoked key keeps its first revoke time); calls
        with it fail from now on."""
        record = self.get(name)
        if record.revoke_time is None:
            now = time.time()
            with self._db.transaction() as db:
                db.execute(f"UPDATE [{TABLE}] SET revoke_time = ?, update_time = ? WHERE id = ?",
                           [now, now, record.id])
            record = replace(record, revoke_time=now)
        if record.id in self._by_id:
            self._by_id[record.id] = record
            for digest, cached in self._by_hash.items():
                if cached.id == record.id:
                    self._by_hash[digest] = record
        return record


def read_bootstrap_secret(path: Path) -> tuple[str, bool]:
    """The bootstrap admin secret in ``path`` (its first line), and whether it was made
    now: a missing file is created (mode 0600) with a new secret, so a fresh install has an
    admin key the operator can read from the file."""
    if path.exists():
        lines = path.read_text().split()
        if not lines:
            raise ValueError(f"{path}: empty; it must hold an API key secret (at least 32 characters)")
        return lines[0], False
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = new_secret()
    with open(path, "x", encoding="ascii", opener=lambda p, flags: os.open(p, flags, 0o600)) as f:
        f.write(secret + "\n")
    return secret, True
