"""structlog set-up: one line per event, JSON in production, console in development, with
context: the request id and rpc of the call being served (from the call itself, see
:func:`~machineserver.server.core.calls.add_call_context`) and whatever is bound through
contextvars (session_id, trace_id, a command's own request id)."""

from __future__ import annotations

import logging
import sys

import structlog

from machineserver.server.core.calls import add_call_context


def configure(fmt: str = "console", level: str = "info") -> None:
    renderer: structlog.typing.Processor
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=False)
    logging.basicConfig(stream=sys.stderr, level=level.upper(), format="%(message)s")
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            add_call_context,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
