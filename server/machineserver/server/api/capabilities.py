"""CapabilitiesService."""

from __future__ import annotations

import asyncio

from grpc import aio

from machineserver.server import __version__
from machineserver.server.api import convert
from machineserver.server.api.base import Servicer
from machineserver.server.core.features import served_features
from machineserver.v1 import capabilities_pb2 as pb
from machineserver.v1 import capabilities_pb2_grpc as pb_grpc
from machineserver.v1 import telemetry_pb2

API_VERSION = "machineserver.v1"


class CapabilitiesServicer(Servicer, pb_grpc.CapabilitiesServiceServicer):
    _cached: tuple[int, pb.GetCapabilitiesResponse] | None = None

    async def GetCapabilities(
        self,
        request: pb.GetCapabilitiesRequest,
        context: aio.ServicerContext[pb.GetCapabilitiesRequest, pb.GetCapabilitiesResponse],
    ) -> pb.GetCapabilitiesResponse:
        # Derived from probes (cached by the registry) and board templates: rebuilt only
        # when a template changes.
        generation = self.engine.catalog.generation
        if self._cached is None or self._cached[0] != generation:
            caps = self._capabilities()
            specs = self.engine.catalog.specs()
            for backend in caps.backends:  # what a session of each board costs in memory
                footprints = await self.engine.backends.memory_footprints(backend.name, specs)
                backend.board_footprints.extend(
                    pb.BoardFootprint(board=board, memory_bytes=f.memory_bytes, basis=f.basis)
                    for board, f in sorted(footprints.items())
                )
            # telemetry sources are probed once per rebuild (NVML may initialise: off the loop)
            sources = await asyncio.to_thread(self.engine.telemetry.sources)
            caps.telemetry_sources.extend(
                telemetry_pb2.TelemetrySource(name=x.name, ok=x.ok, error=x.error) for x in sources
            )
            self._cached = (generation, caps)
        return self._cached[1]

    def _capabilities(self) -> pb.GetCapabilitiesResponse:
        reg = self.engine.backends
        specs = self.engine.catalog.specs()
        backends = []
        processors: dict[tuple[str, str], set[str]] = {}
        models: dict[str, set[str]] = {}
        for info in reg.all_info():
            runnable = reg.runnable_boards(info.name, specs)
            backends.append(convert.backend_pb(info, served_features(info.features), runnable))
            for spec in specs:
                if spec.name in runnable:
                    processors.setdefault((spec.cpu, spec.arch.value), set()).add(info.name)
                    for p in spec.peripherals:
                        models.setdefault(p.model, set()).add(info.name)
        return pb.GetCapabilitiesResponse(
            server_version=__version__,
            api_version=API_VERSION,
            backends=backends,
            processors=[pb.Processor(name=cpu, arch=arch, backends=sorted(b))
                        for (cpu, arch), b in sorted(processors.items())],
            peripheral_models=[pb.PeripheralModel(name=m, backends=sorted(b)) for m, b in sorted(models.items())],
            buses=[],
            default_backend=reg.default,
        )

    async def ListBoardTemplates(
        self,
        request: pb.ListBoardTemplatesRequest,
        context: aio.ServicerContext[pb.ListBoardTemplatesRequest, pb.ListBoardTemplatesResponse],
    ) -> pb.ListBoardTemplatesResponse:
        reg = self.engine.backends
        specs = self.engine.catalog.specs()
        per_backend = {name: reg.runnable_boards(name, specs) for name in reg.names()}
        page = self.engine.catalog.list(request.page_size, request.page_token, request.filter, per_backend)
        return pb.ListBoardTemplatesResponse(
            board_templates=[convert.board_template_pb(rec, spec) for rec, spec in page.items],
            next_page_token=page.next_page_token,
        )

    async def GetBoardTemplate(
        self,
        request: pb.GetBoardTemplateRequest,
        context: aio.ServicerContext[pb.GetBoardTemplateRequest, pb.GetBoardTemplateResponse],
    ) -> pb.GetBoardTemplateResponse:
        rec, spec = self.engine.catalog.get(request.name)
        return pb.GetBoardTemplateResponse(board_template=convert.board_template_pb(rec, spec))

    async def CreateBoardTemplate(
        self,
        request: pb.CreateBoardTemplateRequest,
        context: aio.ServicerContext[pb.CreateBoardTemplateRequest, pb.CreateBoardTemplateResponse],
    ) -> pb.CreateBoardTemplateResponse:
        rec, spec = self.engine.catalog.create(request.config, self.principal(context))
        return pb.CreateBoardTemplateResponse(board_template=convert.board_template_pb(rec, spec))

    async def UpdateBoardTemplate(
        self,
        request: pb.UpdateBoardTemplateRequest,
        context: aio.ServicerContext[pb.UpdateBoardTemplateRequest, pb.UpdateBoardTemplateResponse],
    ) -> pb.UpdateBoardTemplateResponse:
        rec, spec = self.engine.catalog.update(
            request.name, request.config, request.etag, list(request.update_mask.paths)
        )
        return pb.UpdateBoardTemplateResponse(board_template=convert.board_template_pb(rec, spec))

    async def DeleteBoardTemplate(
        self,
        request: pb.DeleteBoardTemplateRequest,
        context: aio.ServicerContext[pb.DeleteBoardTemplateRequest, pb.DeleteBoardTemplateResponse],
    ) -> pb.DeleteBoardTemplateResponse:
        self.engine.catalog.delete(request.name)
        return pb.DeleteBoardTemplateResponse()
