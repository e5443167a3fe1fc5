"""CoverageService. Collection hooks exist in drivers, but the core does not yet turn
executed blocks into line/function/branch reports, so every RPC answers UNIMPLEMENTED
with that reason (after checking the resource it names exists)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from grpc import aio

from machineserver.server.api.base import Servicer
from machineserver.server.core.errors import Unimplemented
from machineserver.server.core.features import NOT_SERVED_REASON
from machineserver.server.drivers.base import Feature
from machineserver.v1 import coverage_pb2 as pb
from machineserver.v1 import coverage_pb2_grpc as pb_grpc


class CoverageServicer(Servicer, pb_grpc.CoverageServiceServicer):
    def _unimplemented(self, name: str = "") -> Unimplemented:
        if name.startswith("sessions/"):
            self.engine.sessions.get(name)
        return Unimplemented("coverage", NOT_SERVED_REASON[Feature.COVERAGE])

    async def StartCoverage(self, request: pb.StartCoverageRequest, context: aio.ServicerContext) -> pb.StartCoverageResponse:
        raise self._unimplemented(request.name)

    async def StopCoverage(self, request: pb.StopCoverageRequest, context: aio.ServicerContext) -> pb.StopCoverageResponse:
        raise self._unimplemented(request.name)

    async def ResetCoverage(self, request: pb.ResetCoverageRequest, context: aio.ServicerContext) -> pb.ResetCoverageResponse:
        raise self._unimplemented(request.name)

    async def GetCoverageSummary(self, request: pb.GetCoverageSummaryRequest, context: aio.ServicerContext) -> pb.GetCoverageSummaryResponse:
        raise self._unimplemented(request.name)

    async def ExportCoverage(self, request: pb.ExportCoverageRequest, context: aio.ServicerContext) -> AsyncIterator[pb.ExportCoverageResponse]:
        raise self._unimplemented(request.name)
        yield  # an async generator, as a server-streaming handler must be

    async def MergeCoverage(self, request: pb.MergeCoverageRequest, context: aio.ServicerContext) -> pb.MergeCoverageResponse:
        raise self._unimplemented()

    async def ListCoverageReports(self, request: pb.ListCoverageReportsRequest, context: aio.ServicerContext) -> pb.ListCoverageReportsResponse:
        raise self._unimplemented()
