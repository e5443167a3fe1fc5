"""CapabilitiesService.

Answers that only change with the catalog are serialised once: GetCapabilities' whole
answer (per catalog generation), and each board template's message (per template revision,
in :class:`TemplateMessages`), so a page of ListBoardTemplates is the concatenation of its
templates' bytes, whatever its size, and only templates not seen since they changed are
read from the store and converted (a few at a time, giving the event loop back between).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict

from grpc import aio

from machineserver.server import __version__
from machineserver.server.api import convert
from machineserver.server.api.base import Servicer
from machineserver.server.api.interceptors import Preserialized, preserialized
from machineserver.server.api.telemetry import cluster_status
from machineserver.server.core import tenancy
from machineserver.server.core.catalog import FETCH_SLICE, LoopSlices, page_token_after
from machineserver.server.core.engine import Engine
from machineserver.server.core.features import served_features
from machineserver.server.core.listing import MAX_PAGE_BYTES
from machineserver.server.core.models import BoardTemplateRecord
from machineserver.server.drivers.base import BoardSpec, Feature, MemoryFootprint
from machineserver.server.lockstep.links import LINK_KINDS
from machineserver.v1 import capabilities_pb2 as pb
from machineserver.v1 import capabilities_pb2_grpc as pb_grpc
from machineserver.v1 import telemetry_pb2

API_VERSION = "machineserver.v1"
FOOTPRINT_SLICE = 64  # boards a backend is asked the memory footprints of at once
TEMPLATE_CACHE_BYTES = 32 << 20  # serialised template messages kept (about 20,000 templates)
MAX_CACHED_SCOPES = 256  # GetCapabilities answers kept, one per tenant scope
_TEMPLATES_FIELD = pb.ListBoardTemplatesResponse.DESCRIPTOR.fields_by_name["board_templates"].number
_TOKEN_FIELD = pb.ListBoardTemplatesResponse.DESCRIPTOR.fields_by_name["next_page_token"].number
_CLUSTER_FIELD = pb.GetCapabilitiesResponse.DESCRIPTOR.fields_by_name["cluster"].number


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def length_delimited(field_number: int, data: bytes) -> bytes:
    """One length-delimited field (a message or a string) as protobuf's wire format writes
    it: a repeated field's elements are each one of these, so serialised elements join."""
    return _varint(field_number << 3 | 2) + _varint(len(data)) + data


class TemplateMessages:
    """Each template's BoardTemplate message, serialised once per revision and framed as
    an element of ListBoardTemplatesResponse.board_templates; the least recently used go
    first past ``max_bytes``."""

    def __init__(self, max_bytes: int = TEMPLATE_CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, tuple[int, bytes]] = OrderedDict()
        self._bytes = 0

    def get(self, name: str, revision: int | None) -> bytes | None:
        item = self._items.get(name)
        if item is None or item[0] != revision:
            return None
        self._items.move_to_end(name)
        return item[1]

    def put(self, name: str, revision: int | None, message: pb.BoardTemplate) -> bytes:
        framed = length_delimited(_TEMPLATES_FIELD, message.SerializeToString())
        if revision is None:  # gone meanwhile: answer it, keep nothing
            return framed
        old = self._items.pop(name, None)
        if old is not None:
            self._bytes -= len(old[1])
        self._items[name] = (revision, framed)
        self._bytes += len(framed)
        while self._bytes > self.max_bytes and len(self._items) > 1:
            self._bytes -= len(self._items.popitem(last=False)[1][1])
        return framed

    def __len__(self) -> int:
        return len(self._items)


class CapabilitiesServicer(Servicer, pb_grpc.CapabilitiesServiceServicer):
    def __init__(self, engine: Engine) -> None:
        super().__init__(engine)
        # GetCapabilities' answer per tenant scope (it names the boards the caller sees: the
        # shipped ones and its tenant's), serialised, with the catalog generation it was built for
        self._answers: dict[str, tuple[int, pb.GetCapabilitiesResponse]] = {}
        self._answer_lock = asyncio.Lock()
        self.templates = TemplateMessages()
        # (backend, board) -> (template revision, footprint) as the last answer reported it
        self._footprints: dict[tuple[str, str], tuple[int | None, MemoryFootprint]] = {}

    async def GetCapabilities(
        self,
        request: pb.GetCapabilitiesRequest,
        context: aio.ServicerContext[pb.GetCapabilitiesRequest, pb.GetCapabilitiesResponse],
    ) -> pb.GetCapabilitiesResponse:
        scope = tenancy.caller_scope()
        answer = self._answers.get(scope)
        if answer is not None and answer[0] == self.engine.catalog.generation:
            built = answer[1]
        else:
            built = await self._build_answer(scope)
        # the cluster changes by itself (nodes come and go, resources are used): asked on
        # every call and appended to the cached bytes (a field appended to a message merges)
        cluster = (await cluster_status(self.engine)).SerializeToString()
        data = built.data if isinstance(built, Preserialized) else built.SerializeToString()
        return preserialized(data + length_delimited(_CLUSTER_FIELD, cluster), pb.GetCapabilitiesResponse)

    async def _build_answer(self, scope: str) -> pb.GetCapabilitiesResponse:
        """Derived from probes (cached by the registry) and board templates: built again
        only after a template changed (concurrent callers wait for one build), and sent as
        the bytes serialised then."""
        async with self._answer_lock:
            answer = self._answers.get(scope)
            generation = self.engine.catalog.generation
            if answer is not None and answer[0] == generation:
                return answer[1]
            caps = await self._capabilities()
            # telemetry sources are probed once per rebuild (NVML may initialise: off the loop)
            sources = await asyncio.to_thread(self.engine.telemetry.sources)
            caps.telemetry_sources.extend(
                telemetry_pb2.TelemetrySource(name=x.name, ok=x.ok, error=x.error) for x in sources
            )
            if len(self._answers) >= MAX_CACHED_SCOPES:
                self._answers.clear()
            self._answers[scope] = (generation, preserialized(caps.SerializeToString(), pb.GetCapabilitiesResponse))
            return self._answers[scope][1]

    async def _capabilities(self) -> pb.GetCapabilitiesResponse:
        reg, catalog = self.engine.backends, self.engine.catalog
        support = await catalog.support(reg)
        slices = LoopSlices()
        # every scope's answer shares the footprints; those of templates gone are dropped
        known = self._footprints = {k: v for k, v in self._footprints.items() if catalog.revision(k[1]) is not None}
        backends = []
        for info in reg.all_info():
            runnable = [n for n in support.boards.get(info.name, []) if catalog.shown(n)]  # the caller's
            backend = convert.backend_pb(info, served_features(info.features), runnable)
            # what a session of each board costs in memory: asked of the backend once per
            # template revision, a few boards at a time
            footprints: dict[str, MemoryFootprint] = {}
            ask: list[BoardSpec] = []
            for name in runnable:
                revision, spec = catalog.revision(name), catalog.spec(name)
                kept = known.get((info.name, name))
                if kept is not None and kept[0] == revision:
                    footprints[name] = kept[1]
                elif spec is not None:
                    ask.append(spec)
            for start in range(0, len(ask), FOOTPRINT_SLICE):
                footprints.update(await reg.memory_footprints(info.name, ask[start:start + FOOTPRINT_SLICE]))
                await slices.tick()
            for name, footprint in sorted(footprints.items()):
                self._footprints[(info.name, name)] = (catalog.revision(name), footprint)
                backend.board_footprints.append(
                    pb.BoardFootprint(board=name, memory_bytes=footprint.memory_bytes, basis=footprint.basis))
                await slices.tick()
            backends.append(backend)
        return pb.GetCapabilitiesResponse(
            server_version=__version__,
            api_version=API_VERSION,
            backends=backends,
            processors=[pb.Processor(name=cpu, arch=arch, backends=sorted(b))
                        for (cpu, arch), b in sorted(support.processors.items())],
            peripheral_models=[pb.PeripheralModel(name=m, backends=sorted(b))
                               for m, b in sorted(support.models.items())],
            buses=list(LINK_KINDS) if any(Feature.LOCKSTEP in i.features for i in reg.all_info()) else [],
            default_backend=reg.default,
        )

    async def ListBoardTemplates(
        self,
        request: pb.ListBoardTemplatesRequest,
        context: aio.ServicerContext[pb.ListBoardTemplatesRequest, pb.ListBoardTemplatesResponse],
    ) -> pb.ListBoardTemplatesResponse:
        catalog = self.engine.catalog
        page = await catalog.select(request.page_size, request.page_token, request.filter, self.engine.backends)
        found: dict[str, bytes] = {}
        missing: list[str] = []
        for name in page.items:
            framed = self.templates.get(name, catalog.revision(name))
            if framed is None:
                missing.append(name)
            else:
                found[name] = framed
        slices = LoopSlices()
        for start in range(0, len(missing), FETCH_SLICE):
            for rec, spec, revision in catalog.records(missing[start:start + FETCH_SLICE]):
                found[rec.id] = self.templates.put(rec.id, revision, convert.board_template_pb(rec, spec))
            await slices.tick()
        # a template deleted meanwhile is left out; the page stops before MAX_PAGE_BYTES
        parts: list[bytes] = []
        size, token, last = 0, page.next_page_token, ""
        for name in page.items:
            framed = found.get(name)
            if framed is None:
                continue
            if parts and size + len(framed) > MAX_PAGE_BYTES:
                token = page_token_after(last, request.filter)
                break
            parts.append(framed)
            last = name
            size += len(framed)
        answer = b"".join(parts)
        if token:
            answer += length_delimited(_TOKEN_FIELD, token.encode())
        return preserialized(answer, pb.ListBoardTemplatesResponse)

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
        rec, spec = self.engine.catalog.create(request.config)
        return pb.CreateBoardTemplateResponse(board_template=self._remember(rec, spec))

    async def UpdateBoardTemplate(
        self,
        request: pb.UpdateBoardTemplateRequest,
        context: aio.ServicerContext[pb.UpdateBoardTemplateRequest, pb.UpdateBoardTemplateResponse],
    ) -> pb.UpdateBoardTemplateResponse:
        rec, spec = self.engine.catalog.update(
            request.name, request.config, request.etag, list(request.update_mask.paths)
        )
        return pb.UpdateBoardTemplateResponse(board_template=self._remember(rec, spec))

    async def DeleteBoardTemplate(
        self,
        request: pb.DeleteBoardTemplateRequest,
        context: aio.ServicerContext[pb.DeleteBoardTemplateRequest, pb.DeleteBoardTemplateResponse],
    ) -> pb.DeleteBoardTemplateResponse:
        self.engine.catalog.delete(request.name)
        return pb.DeleteBoardTemplateResponse()

    def _remember(self, rec: BoardTemplateRecord, spec: BoardSpec) -> pb.BoardTemplate:
        """A template just written, as its message (kept for lists, under its new revision)."""
        message = convert.board_template_pb(rec, spec)
        self.templates.put(rec.id, self.engine.catalog.revision(rec.id), message)
        return message
