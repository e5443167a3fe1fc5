"""The ``gdbremote`` backend: a session on any GDB remote serial protocol target."""

from machineserver.server.drivers.gdbremote.backend import GdbRemoteBackend
from machineserver.server.drivers.gdbremote.machine import GdbRemoteMachine

__all__ = ["GdbRemoteBackend", "GdbRemoteMachine"]
