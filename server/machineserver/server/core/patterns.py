"""Regular expressions that clients give (ExpectConsole's pattern, a job's pass and fail
regexes): compiled and searched with a time limit.

Python's ``re`` has no timeout and holds the GIL while it matches, so one pattern with
catastrophic backtracking (``(a|aa)+$`` against a long console line) would stall the server's
event loop, every tenant's calls with it. The ``regex`` module (a well-kept superset of
``re``; ``VERSION0`` keeps ``re``'s semantics) takes a timeout per search: a search that runs
past :data:`SEARCH_TIMEOUT_S` raises :class:`PatternTooSlow`, which callers turn into an answer
naming the pattern's field.
"""

from __future__ import annotations

import regex

from machineserver.server.core.errors import InvalidArgument

SEARCH_TIMEOUT_S = 0.25  # one search of one client pattern, at most


class PatternTooSlow(Exception):
    """A search ran past :data:`SEARCH_TIMEOUT_S` (catastrophic backtracking)."""

    def __init__(self, field: str) -> None:
        super().__init__(f"{field}: a search took over {SEARCH_TIMEOUT_S:g} s (a pattern that backtracks "
                         "catastrophically, e.g. a nested repeat); simplify it")
        self.field = field


class ClientPattern:
    """One compiled client pattern; :meth:`search` is bounded in time."""

    def __init__(self, text: str, field: str, max_bytes: int) -> None:
        if len(text.encode("utf-8", "surrogatepass")) > max_bytes:
            raise InvalidArgument(field, f"at most {max_bytes} bytes")
        try:
            self._compiled = regex.compile(text, flags=regex.VERSION0)
        except (regex.error, RecursionError, OverflowError, ValueError) as exc:
            raise InvalidArgument(field, f"does not compile as a regular expression (Python re syntax): {exc}") from None
        self.text = text
        self.field = field

    def search(self, subject: str) -> regex.Match[str] | None:
        try:
            return self._compiled.search(subject, timeout=SEARCH_TIMEOUT_S)
        except TimeoutError:
            raise PatternTooSlow(self.field) from None
