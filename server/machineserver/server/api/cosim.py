"""CoSimService: not built yet; every RPC answers UNIMPLEMENTED with the reason, and
CapabilitiesService lists no co-simulation buses."""

from __future__ import annotations

from collections.abc import AsyncIterator

from grpc import aio

from machineserver.server.api.base import Servicer
from machineserver.server.core.errors import Unimplemented
from machineserver.v1 import cosim_pb2 as pb
from machineserver.v1 import cosim_pb2_grpc as pb_grpc

REASON = "co-simulation (lock-step quanta, shared memory, serial and interrupt links) is not built into this server yet"


def _unimplemented() -> Unimplemented:
    return Unimplemented("cosimulation", REASON)


class CoSimServicer(Servicer, pb_grpc.CoSimServiceServicer):
    async def CreateCoSimulation(
        self,
        request: pb.CreateCoSimulationRequest,
        context: aio.ServicerContext[pb.CreateCoSimulationRequest, pb.CreateCoSimulationResponse],
    ) -> pb.CreateCoSimulationResponse:
        for name in request.sessions:
            self.engine.sessions.get(name, "sessions")
        raise _unimplemented()

    async def GetCoSimulation(
        self,
        request: pb.GetCoSimulationRequest,
        context: aio.ServicerContext[pb.GetCoSimulationRequest, pb.GetCoSimulationResponse],
    ) -> pb.GetCoSimulationResponse:
        raise _unimplemented()

    async def ListCoSimulations(
        self,
        request: pb.ListCoSimulationsRequest,
        context: aio.ServicerContext[pb.ListCoSimulationsRequest, pb.ListCoSimulationsResponse],
    ) -> pb.ListCoSimulationsResponse:
        raise _unimplemented()

    async def DeleteCoSimulation(
        self,
        request: pb.DeleteCoSimulationRequest,
        context: aio.ServicerContext[pb.DeleteCoSimulationRequest, pb.DeleteCoSimulationResponse],
    ) -> pb.DeleteCoSimulationResponse:
        raise _unimplemented()

    async def StartCoSimulation(
        self,
        request: pb.StartCoSimulationRequest,
        context: aio.ServicerContext[pb.StartCoSimulationRequest, pb.StartCoSimulationResponse],
    ) -> pb.StartCoSimulationResponse:
        raise _unimplemented()

    async def PauseCoSimulation(
        self,
        request: pb.PauseCoSimulationRequest,
        context: aio.ServicerContext[pb.PauseCoSimulationRequest, pb.PauseCoSimulationResponse],
    ) -> pb.PauseCoSimulationResponse:
        raise _unimplemented()

    async def StepCoSimulation(
        self,
        request: pb.StepCoSimulationRequest,
        context: aio.ServicerContext[pb.StepCoSimulationRequest, pb.StepCoSimulationResponse],
    ) -> pb.StepCoSimulationResponse:
        raise _unimplemented()

    async def StreamCoSimulationEvents(
        self,
        request: pb.StreamCoSimulationEventsRequest,
        context: aio.ServicerContext[pb.StreamCoSimulationEventsRequest, pb.StreamCoSimulationEventsResponse],
    ) -> AsyncIterator[pb.StreamCoSimulationEventsResponse]:
        raise _unimplemented()
        yield  # an async generator, as a server-streaming handler must be
