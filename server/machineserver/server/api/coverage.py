"""CoverageService: collection in sessions, stored reports, summaries, merges and
exports (LCOV, HTML, Cobertura XML, JSON) streamed in chunks."""

from __future__ import annotations

from collections.abc import AsyncIterator

from grpc import aio

from machineserver.server.api import convert
from machineserver.server.api.base import CHUNK_SIZE, Servicer
from machineserver.server.core import coverage_export as export
from machineserver.server.core.coverage import CoverageReportRecord
from machineserver.server.core.coverage_mapping import Counts
from machineserver.server.core.errors import InvalidArgument
from machineserver.v1 import coverage_pb2 as pb
from machineserver.v1 import coverage_pb2_grpc as pb_grpc

FORMAT_FROM_PB = {
    pb.COVERAGE_FORMAT_LCOV: export.ExportFormat.LCOV,
    pb.COVERAGE_FORMAT_HTML: export.ExportFormat.HTML,
    pb.COVERAGE_FORMAT_COBERTURA: export.ExportFormat.COBERTURA,
    pb.COVERAGE_FORMAT_JSON: export.ExportFormat.JSON,
}


def counts_pb(c: Counts) -> pb.CoverageCounts:
    return pb.CoverageCounts(
        lines_hit=c.lines_hit, lines_total=c.lines_total,
        functions_hit=c.functions_hit, functions_total=c.functions_total,
        branches_hit=c.branches_hit, branches_total=c.branches_total,
        line_percent=c.line_percent, function_percent=c.function_percent, branch_percent=c.branch_percent,
    )


def report_pb(rec: CoverageReportRecord) -> pb.CoverageReport:
    return pb.CoverageReport(
        name=rec.name,
        program=f"programs/{rec.program}" if rec.program else "",
        sessions=[f"sessions/{s}" for s in rec.sessions],
        totals=counts_pb(Counts.from_dict(rec.totals)),
        create_time=convert.timestamp(rec.create_time),
        owner=rec.owner,
        tenant=rec.tenant,
    )


class CoverageServicer(Servicer, pb_grpc.CoverageServiceServicer):
    async def StartCoverage(
        self,
        request: pb.StartCoverageRequest,
        context: aio.ServicerContext[pb.StartCoverageRequest, pb.StartCoverageResponse],
    ) -> pb.StartCoverageResponse:
        await self.engine.coverage.start(self.engine.sessions.get(request.name))
        return pb.StartCoverageResponse()

    async def StopCoverage(
        self,
        request: pb.StopCoverageRequest,
        context: aio.ServicerContext[pb.StopCoverageRequest, pb.StopCoverageResponse],
    ) -> pb.StopCoverageResponse:
        live = self.engine.sessions.get(request.name)
        rec = await self.engine.coverage.stop(live)
        return pb.StopCoverageResponse(report=report_pb(rec))

    async def ResetCoverage(
        self,
        request: pb.ResetCoverageRequest,
        context: aio.ServicerContext[pb.ResetCoverageRequest, pb.ResetCoverageResponse],
    ) -> pb.ResetCoverageResponse:
        await self.engine.coverage.reset(self.engine.sessions.get(request.name))
        return pb.ResetCoverageResponse()

    async def GetCoverageSummary(
        self,
        request: pb.GetCoverageSummaryRequest,
        context: aio.ServicerContext[pb.GetCoverageSummaryRequest, pb.GetCoverageSummaryResponse],
    ) -> pb.GetCoverageSummaryResponse:
        result = await self.engine.coverage.result(request.name)
        return pb.GetCoverageSummaryResponse(
            files=[pb.FileCoverage(path=f.path, counts=counts_pb(f.counts)) for f in result.files],
            totals=counts_pb(result.totals),
        )

    async def ExportCoverage(
        self,
        request: pb.ExportCoverageRequest,
        context: aio.ServicerContext[pb.ExportCoverageRequest, pb.ExportCoverageResponse],
    ) -> AsyncIterator[pb.ExportCoverageResponse]:
        fmt = FORMAT_FROM_PB.get(request.format)
        if fmt is None:
            raise InvalidArgument("format", "give one of LCOV, HTML, COBERTURA, JSON")
        result = await self.engine.coverage.result(request.name)
        root = request.source_root
        if fmt is export.ExportFormat.LCOV:
            data = export.lcov(result, root).encode()
        elif fmt is export.ExportFormat.JSON:
            data = export.to_json(result, root).encode()
        elif fmt is export.ExportFormat.COBERTURA:
            data = export.cobertura(result, root).encode()
        else:
            texts = await self.engine.coverage.html_sources(result, request.sources)
            data, _generator = await export.html_archive(result, texts, scratch=self.engine.scratch_dir)
        content_type = export.CONTENT_TYPES[fmt]
        for off in range(0, max(len(data), 1), CHUNK_SIZE):
            yield pb.ExportCoverageResponse(
                chunk=data[off : off + CHUNK_SIZE], content_type=content_type if off == 0 else ""
            )

    async def MergeCoverage(
        self,
        request: pb.MergeCoverageRequest,
        context: aio.ServicerContext[pb.MergeCoverageRequest, pb.MergeCoverageResponse],
    ) -> pb.MergeCoverageResponse:
        rec = await self.engine.coverage.merge(list(request.names))
        return pb.MergeCoverageResponse(report=report_pb(rec))

    async def ListCoverageReports(
        self,
        request: pb.ListCoverageReportsRequest,
        context: aio.ServicerContext[pb.ListCoverageReportsRequest, pb.ListCoverageReportsResponse],
    ) -> pb.ListCoverageReportsResponse:
        page = self.engine.coverage.list(request.page_size, request.page_token, request.filter)
        return pb.ListCoverageReportsResponse(
            reports=[report_pb(r) for r in page.items], next_page_token=page.next_page_token
        )
