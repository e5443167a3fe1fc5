"""Which driver features the server can serve end to end. A driver may implement more
than the core can turn into answers; CapabilitiesService reports only the intersection,
and the RPCs of the rest answer UNIMPLEMENTED with the reason in ``NOT_SERVED_REASON``.

Today every driver feature is served (coverage too: core/coverage.py maps executed
blocks onto lines, functions and branches), so the intersection is what a driver's
machine class implements."""

from __future__ import annotations

from machineserver.server.drivers.base import Feature

SERVED: frozenset[Feature] = frozenset(Feature)

NOT_SERVED_REASON: dict[Feature, str] = {}


def served_features(driver_features: frozenset[Feature]) -> frozenset[Feature]:
    return driver_features & SERVED
