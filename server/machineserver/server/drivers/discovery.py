"""Finding drivers: the backends installed under the entry-point group
``machineserver.drivers`` (ours and third parties'), constructed once each. Used by the
server (which probes and lists them) and by every worker process (which hosts their
machines), so both see the same set."""

from __future__ import annotations

from collections.abc import Iterable
from importlib.metadata import entry_points

import structlog

from machineserver.server.drivers.base import Backend

log = structlog.get_logger(__name__)

ENTRY_POINT_GROUP = "machineserver.drivers"


def discover_backends(enabled: Iterable[str] | None = None) -> list[Backend]:
    """The installed backends (only those named in ``enabled`` when given). A driver that
    fails to load is logged and left out: a broken third-party driver must not stop us."""
    wanted = set(enabled) if enabled is not None else None
    found: list[Backend] = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if wanted is not None and ep.name not in wanted:
            continue
        try:
            factory = ep.load()
            backend = factory()
        except Exception as exc:
            log.warning("driver_load_failed", driver=ep.name, error=str(exc))
            continue
        found.append(backend)
    return found
