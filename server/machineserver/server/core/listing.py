"""Paging and filtering shared by every List RPC.

Page tokens are opaque to clients (base64 of an offset and a fingerprint of the filter,
so a token cannot be replayed against a different query). Filters are ``key=value``
terms joined by `` AND `` (AIP-160's simplest subset).
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from machineserver.server.core.errors import InvalidArgument

T = TypeVar("T")

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000


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


def page_bounds(page_size: int, page_token: str, filter_text: str = "") -> tuple[int, int]:
    """(offset, limit) for a request; InvalidArgument on a bad size or token."""
    if page_size < 0:
        raise InvalidArgument("page_size", "must not be negative")
    limit = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
    if not page_token:
        return 0, limit
    try:
        data = json.loads(base64.urlsafe_b64decode(page_token.encode()))
        offset, fp = int(data["o"]), str(data["f"])
    except (ValueError, KeyError, TypeError):
        raise InvalidArgument("page_token", "not a page token from this server") from None
    if fp != _fingerprint(filter_text) or offset < 0:
        raise InvalidArgument("page_token", "the token belongs to a different query")
    return offset, limit


def next_token(offset: int, limit: int, returned: int, total: int, filter_text: str = "") -> str:
    end = offset + returned
    if returned < limit or end >= total:
        return ""
    raw = json.dumps({"o": end, "f": _fingerprint(filter_text)}).encode()
    return base64.urlsafe_b64encode(raw).decode()


def paginate(
    items: Sequence[T], page_size: int, page_token: str, filter_text: str = ""
) -> Page[T]:
    offset, limit = page_bounds(page_size, page_token, filter_text)
    chunk = list(items[offset : offset + limit])
    return Page(chunk, next_token(offset, limit, len(chunk), len(items), filter_text))


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
    return ident
