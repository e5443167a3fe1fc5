"""The backends this server can use: drivers found by entry points
(group ``machineserver.drivers``), probed once, kept by name."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import structlog

from machineserver.server.core.errors import InvalidArgument, Unavailable, Unimplemented
from machineserver.server.drivers.base import Backend, BackendInfo, BoardSpec, Feature, MemoryFootprint
from machineserver.server.drivers.discovery import ENTRY_POINT_GROUP, discover_backends
from machineserver.server.worker.backend import IsolatedBackend
from machineserver.server.worker.pool import WorkerPool

log = structlog.get_logger(__name__)

__all__ = ["ENTRY_POINT_GROUP", "BackendRegistry"]


class BackendRegistry:
    def __init__(self, backends: Iterable[Backend], default: str) -> None:
        self._backends = {b.name: b for b in backends}
        self._info: dict[str, BackendInfo] = {}
        self.default = default

    @classmethod
    def discover(cls, default: str, enabled: Iterable[str] | None = None) -> BackendRegistry:
        return cls(discover_backends(enabled), default)

    def isolated(self, pool: WorkerPool) -> BackendRegistry:
        """The same backends, their machines running in ``pool``'s worker processes."""
        return BackendRegistry([IsolatedBackend(b, pool) for b in self._backends.values()], self.default)

    def names(self) -> list[str]:
        return sorted(self._backends)

    def info(self, name: str) -> BackendInfo:
        if name not in self._info:
            try:
                self._info[name] = self._backends[name].probe()
            except Exception as exc:
                b = self._backends[name]
                self._info[name] = BackendInfo(
                    b.name, b.description, available=False, unavailable_reason=f"probe failed: {exc}"
                )
        return self._info[name]

    def all_info(self) -> list[BackendInfo]:
        return [self.info(n) for n in self.names()]

    def get(self, name: str, field: str = "backend") -> Backend:
        name = name or self.default
        backend = self._backends.get(name)
        if backend is None:
            raise InvalidArgument(field, f"unknown backend {name!r}; known: {', '.join(self.names())}")
        info = self.info(name)
        if not info.available:
            raise Unavailable(f"backend {name} is not available here: {info.unavailable_reason}")
        return backend

    def require_feature(self, backend_name: str, board: BoardSpec, feature: Feature) -> None:
        """UNIMPLEMENTED with the reason when the backend lacks ``feature``, in general or on
        ``board``; NOT_FOUND for an unknown backend."""
        self.get(backend_name)  # NotFound for an unknown backend
        info = self.info(backend_name)
        if feature not in info.features:
            why = info.unsupported.get(feature)
            raise Unimplemented(
                feature.value, f"backend {backend_name} does not support {feature.value.replace('_', ' ')}"
                + (f": {why}" if why else "")
            )
        reason = self.info(backend_name).board_limits.get(board.name, {}).get(feature)
        if reason:
            raise Unimplemented(
                feature.value,
                f"backend {backend_name} does not support {feature.value.replace('_', ' ')} "
                f"on board {board.name}: {reason}",
            )

    def runnable_boards(self, name: str, boards: Iterable[BoardSpec]) -> list[str]:
        backend = self._backends[name]
        if not self.info(name).available:
            return []
        return sorted(b.name for b in boards if backend.board_support(b) is None)

    async def memory_footprints(self, name: str, boards: Iterable[BoardSpec]) -> dict[str, MemoryFootprint]:
        """Board name -> what one more halted session of it costs on backend ``name``, for
        the boards it runs and can say that for."""
        backend = self._backends[name]
        if not self.info(name).available:
            return {}
        runnable = [b for b in boards if backend.board_support(b) is None]
        found = await asyncio.gather(*(backend.memory_footprint(b) for b in runnable), return_exceptions=True)
        out: dict[str, MemoryFootprint] = {}
        for board, footprint in zip(runnable, found, strict=True):
            if isinstance(footprint, MemoryFootprint):
                out[board.name] = footprint
            elif isinstance(footprint, BaseException):
                log.warning("memory_footprint_failed", driver=name, board=board.name, error=str(footprint))
        return out

    async def aclose(self) -> None:
        for backend in self._backends.values():
            try:
                await backend.aclose()
            except Exception as exc:
                log.warning("driver_close_failed", driver=backend.name, error=str(exc))
