"""The GDB servers of all sessions: at most one per session, started and stopped through
the API, stopped when their session is deleted and at shutdown.

A bridge binds loopback unless the server config lists more (``gdb_bridge_bind_allow``:
addresses or networks, "0.0.0.0"/"::" for every interface): RSP has no authentication,
so whoever reaches a bridge acts on the session as the identity that started it."""

from __future__ import annotations

import asyncio
import ipaddress
from dataclasses import dataclass

from machineserver.server.core.calls import CallChain, current_metadata
from machineserver.server.core.debug import Debugger
from machineserver.server.core.errors import InvalidArgument, Unavailable
from machineserver.server.core.gdbserver import GdbServer
from machineserver.server.core.netpolicy import bind_allowed
from machineserver.server.core.sessions import LiveSession, SessionManager
from machineserver.server.drivers.base import Feature


@dataclass(frozen=True)
class GdbEndpoint:
    session: str
    address: str
    port: int
    clients: int
    halt_on_detach: bool = False


class GdbBridges:
    def __init__(self, sessions: SessionManager, debugger: Debugger, calls: CallChain) -> None:
        self._sessions = sessions
        self._debugger = debugger
        self._calls = calls
        self._servers: dict[str, tuple[GdbServer, str, int]] = {}
        self._closing: set[asyncio.Task[None]] = set()
        # where bridges may listen beyond loopback (the server config's gdb_bridge_bind_allow)
        self.bind_allow: tuple[str, ...] = ()
        sessions.delete_hooks.append(self._on_delete)

    def get(self, live: LiveSession) -> GdbEndpoint | None:
        entry = self._servers.get(live.id)
        if entry is None:
            return None
        server, host, port = entry
        return GdbEndpoint(live.record.name, host, port, server.clients, server.halt_on_detach)

    async def start(self, live: LiveSession, bind_address: str, port: int,
                    halt_on_detach: bool = False) -> GdbEndpoint:
        """``halt_on_detach``: a gdb that detaches leaves the machine halted (default: it
        resumes). On a session whose bridge runs already: that bridge, with this setting."""
        for feature in (Feature.RUN_CONTROL, Feature.REGISTERS, Feature.MEMORY):
            live.feature(feature)
        host = bind_address or "127.0.0.1"
        if host != "localhost":
            try:
                ipaddress.ip_address(host)
            except ValueError:
                raise InvalidArgument("bind_address", f"{host!r} is not an IP address") from None
        if not bind_allowed(host, self.bind_allow):
            raise InvalidArgument("bind_address", f"{host} is not a loopback address, and this server's "
                                  "gdb_bridge_bind_allow does not allow it (a bridge has no authentication)")
        if not 0 <= port <= 65535:
            raise InvalidArgument("port", "must be between 0 and 65535")
        entry = self._servers.get(live.id)
        if entry is not None:
            entry[0].halt_on_detach = halt_on_detach
            running = self.get(live)
            assert running is not None
            return running
        server = GdbServer(self._sessions, self._debugger, live, self._calls, current_metadata(),
                           halt_on_detach=halt_on_detach)
        try:
            host, bound = await server.start(host, port)
        except OSError as exc:
            raise Unavailable(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        self._servers[live.id] = (server, host, bound)
        return GdbEndpoint(live.record.name, host, bound, 0, halt_on_detach)

    async def stop(self, live: LiveSession) -> None:
        entry = self._servers.pop(live.id, None)
        if entry is not None:
            await entry[0].stop()

    def _on_delete(self, live: LiveSession) -> None:
        entry = self._servers.pop(live.id, None)
        if entry is not None:
            task = asyncio.get_running_loop().create_task(entry[0].stop())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        for server, _, _ in list(self._servers.values()):
            await server.stop()
        self._servers.clear()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
