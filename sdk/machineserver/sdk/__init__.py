"""MachineServer Python SDK.

    from machineserver.sdk import AsyncClient, Client, ConnectOptions
    with Client.connect("127.0.0.1:50051") as ms:
        print(ms.capabilities.get_capabilities())
    async with AsyncClient.connect("127.0.0.1:50051", options=ConnectOptions(timeout=5)) as ms:
        print(await ms.capabilities.get_capabilities())
"""

from machineserver.sdk import errors
from machineserver.sdk.client import AsyncClient, AsyncConnection, Client, ConnectOptions
from machineserver.sdk.errors import MachineServerError
from machineserver.v1 import (
    capabilities_pb2,
    common_pb2,
    cosim_pb2,
    coverage_pb2,
    debug_pb2,
    session_pb2,
    telemetry_pb2,
)

__all__ = [
    "AsyncClient",
    "AsyncConnection",
    "Client",
    "ConnectOptions",
    "MachineServerError",
    "capabilities_pb2",
    "common_pb2",
    "cosim_pb2",
    "coverage_pb2",
    "debug_pb2",
    "errors",
    "session_pb2",
    "telemetry_pb2",
]
