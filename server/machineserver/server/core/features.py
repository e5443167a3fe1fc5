"""Which driver features the server can serve end to end today. A driver may implement
more (e.g. coverage hooks) than the core can turn into answers; CapabilitiesService
reports only the intersection, and the RPCs of the rest answer UNIMPLEMENTED."""

from __future__ import annotations

from machineserver.server.drivers.base import Feature

SERVED: frozenset[Feature] = frozenset(Feature) - {Feature.COVERAGE}

NOT_SERVED_REASON: dict[Feature, str] = {
    Feature.COVERAGE: "coverage reports (LCOV/HTML/Cobertura) are not built into this server yet",
}


def served_features(driver_features: frozenset[Feature]) -> frozenset[Feature]:
    return driver_features & SERVED
