"""Paging and filtering shared by every List RPC.

Page tokens are opaque to clients (base64 of an offset and a fingerprint of the filter,
so a token cannot be replayed against a different query). Reading one is total: whatever
a client sends (bad base64, not JSON, JSON nested thousands deep, ``1e400``, NaN, a
negative or huge offset, a list) is INVALID_ARGUMENT naming ``page_token``, never an
error of ours. Filters are ``key=value`` terms joined by `` AND `` (AIP-160's simplest
subset).

A page holds at most ``page_size`` records (default :data:`DEFAULT_PAGE_SIZE`, at most
:data:`MAX_PAGE_SIZE`) and stops before :data:`MAX_PAGE_BYTES` of records (estimated from
the records' own data, :func:`estimated_bytes`), so no answer can outgrow the message
limit however large the records are; ``next_page_token`` continues after the last record
returned either way.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from machineserver.server.core.calls import CURRENT
from machineserver.server.core.errors import InvalidArgument

T = TypeVar("T")

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
# a page stops before this many bytes of records (the message limit is 8 MiB: the rest is
# headroom for what a record's message adds to its data)
MAX_PAGE_BYTES = 4 << 20
MAX_TOKEN_CHARS = 512  # longer than any token this server writes
MAX_OFFSET = 1 << 31
_BAD_TOKEN = "not a page token from this server"


def parse_filter(text: str, allowed: Sequence[str]) -> dict[str, str]:
    """``"state=RUNNING AND labels.team=fw"`` -> ``{"state": "RUNNING", "labels.team": "fw"}``.
    Keys must be in ``allowed`` (a key ending in "." allows any suffix, e.g. "labels.")."""
    terms: dict[str, str] = {}
    text = text.strip()
    if not text:
        return terms
    for raw in text.split(" AND "):
        key, sep, value = raw.strip().partition("=")
        key, value = key.strip(), value.strip().strip('"')
        if not sep or not key:
            raise InvalidArgument("filter", f"{raw.strip()!r} is not KEY=VALUE")
        if key not in allowed and not any(a.endswith(".") and key.startswith(a) for a in allowed):
            raise InvalidArgument(
                "filter", f"unknown filter key {key!r}; known: {', '.join(allowed)}"
            )
        terms[key] = value
    return terms


@dataclass(frozen=True)
class Page(Generic[T]):
    items: list[T]
    next_page_token: str


def _fingerprint(filter_text: str) -> str:
    return hashlib.sha256(filter_text.encode()).hexdigest()[:8]


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number here")


def read_page_token(page_token: str) -> dict[str, Any]:
    """The fields of a page token this server wrote; InvalidArgument("page_token") for
    anything else, whatever it holds."""
    if len(page_token) > MAX_TOKEN_CHARS or not page_token.isascii():
        raise InvalidArgument("page_token", _BAD_TOKEN)
    try:
        raw = base64.urlsafe_b64decode(page_token.encode("ascii"))
        data = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, binascii.Error, RecursionError):  # UnicodeDecodeError is a ValueError
        raise InvalidArgument("page_token", _BAD_TOKEN) from None
    if not isinstance(data, dict):
        raise InvalidArgument("page_token", _BAD_TOKEN)
    return data


def token_int(data: Mapping[str, Any], key: str, maximum: int = MAX_OFFSET) -> int:
    """An integer field of a read token: a JSON integer in [0, maximum], nothing else (not
    a float, not a bool, not 1e400)."""
    value = data.get(key)
    if type(value) is not int or not 0 <= value <= maximum:
        raise InvalidArgument("page_token", _BAD_TOKEN)
    return value


def token_str(data: Mapping[str, Any], key: str) -> str:
    value = data.get(key)
    if type(value) is not str:
        raise InvalidArgument("page_token", _BAD_TOKEN)
    return value


def page_bounds(page_size: int, page_token: str, filter_text: str = "") -> tuple[int, int]:
    """(offset, limit) for a request; InvalidArgument on a bad size or token."""
    if page_size < 0:
        raise InvalidArgument("page_size", "must not be negative")
    limit = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
    if not page_token:
        return 0, limit
    data = read_page_token(page_token)
    offset, fp = token_int(data, "o"), token_str(data, "f")
    if fp != _fingerprint(filter_text):
        raise InvalidArgument("page_token", "the token belongs to a different query")
    return offset, limit


def next_token(offset: int, returned: int, total: int, filter_text: str = "") -> str:
    """The token of the page after one that returned ``returned`` records from
    ``offset`` ("" when none are left)."""
    end = offset + returned
    if end >= total:
        return ""
    raw = json.dumps({"o": end, "f": _fingerprint(filter_text)}).encode()
    return base64.urlsafe_b64encode(raw).decode()


_SCALAR_BYTES = 10  # a number, a bool, None, or an object that is not data (a task, a lock)
_MAX_DEPTH = 4  # nested data below a record that counts (deeper: counted as a scalar)


def estimated_bytes(value: object, depth: int = 0) -> int:
    """About the bytes ``value`` (a record: a dataclass of strings, numbers, mappings and
    lists) takes in a message: the text it holds plus a few bytes per field. Cheap, and
    never below what its strings and bytes take."""
    if isinstance(value, str):
        return len(value) + 2 if value.isascii() else len(value.encode()) + 2
    if isinstance(value, bytes | bytearray):
        return len(value) + 2
    if depth >= _MAX_DEPTH:
        return _SCALAR_BYTES
    if isinstance(value, Mapping):
        return sum(estimated_bytes(k, depth + 1) + estimated_bytes(v, depth + 1) + 2 for k, v in value.items())
    if isinstance(value, list | tuple | set | frozenset):
        return sum(estimated_bytes(v, depth + 1) for v in value) + 2
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return sum(estimated_bytes(getattr(value, f.name), depth + 1) + 1 for f in dataclasses.fields(value))
    return _SCALAR_BYTES


def paginate(
    items: Sequence[T], page_size: int, page_token: str, filter_text: str = "",
    size_of: Callable[[T], int] = estimated_bytes,
) -> Page[T]:
    """One page of ``items``: up to the page size, and stopping before
    :data:`MAX_PAGE_BYTES` (by ``size_of``; a page always holds at least one record)."""
    offset, limit = page_bounds(page_size, page_token, filter_text)
    chunk: list[T] = []
    budget = MAX_PAGE_BYTES
    for item in items[offset : offset + limit]:
        size = size_of(item)
        if chunk and size > budget:
            break
        chunk.append(item)
        budget -= size
    return Page(chunk, next_token(offset, len(chunk), len(items), filter_text))


# filter key -> the value a record has for it; a key ending in "." (``labels.``) gives a
# mapping that the rest of a term's key (``labels.team``) looks up
FieldGetters = Mapping[str, Callable[[T], str | Mapping[str, str]]]


def match_terms(terms: Mapping[str, str], getters: FieldGetters[T], obj: T) -> bool:
    """True when every term matches; ``labels.K`` terms look up ``getters["labels."]``
    which must return a mapping."""
    for key, value in terms.items():
        if key in getters:
            if getters[key](obj) != value:
                return False
            continue
        prefix = key.split(".", 1)[0] + "."
        mapping = getters[prefix](obj)
        if isinstance(mapping, str) or mapping.get(key[len(prefix):]) != value:
            return False
    return True


def resource_id(name: str, collection: str, field: str = "name") -> str:
    """``"sessions/abc"`` (or just ``"abc"``) -> ``"abc"``; InvalidArgument if malformed."""
    if not name:
        raise InvalidArgument(field, f"is required (e.g. {collection}/ID)")
    prefix = collection + "/"
    ident = name[len(prefix):] if name.startswith(prefix) else name
    if not ident or "/" in ident or len(ident) > 128:
        raise InvalidArgument(field, f"{name!r} is not a {collection} resource name ({collection}/ID)")
    call = CURRENT.get()
    if call is not None and "target" not in call.audit:  # what the call acts on (the audit log's resource)
        call.audit["target"] = prefix + ident
    return ident
