"""CapsuleService: failure capsules (core/capsules) through the API."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from grpc import aio

from machineserver.server.api import convert
from machineserver.server.api.base import Servicer
from machineserver.server.core.capsules import CapsuleRecord, Trigger
from machineserver.server.core.errors import InvalidArgument
from machineserver.v1 import capsule_pb2 as pb
from machineserver.v1 import capsule_pb2_grpc as pb_grpc

TRIGGER_TO_PB = {
    Trigger.FAULT: pb.CAPSULE_TRIGGER_FAULT,
    Trigger.ASSERT: pb.CAPSULE_TRIGGER_ASSERT,
    Trigger.EXPLICIT: pb.CAPSULE_TRIGGER_EXPLICIT,
    Trigger.TEST_FAILURE: pb.CAPSULE_TRIGGER_TEST_FAILURE,
}
TRIGGER_FROM_PB = {v: k for k, v in TRIGGER_TO_PB.items()}
TRIGGER_BY_VALUE = {k.value: v for k, v in TRIGGER_TO_PB.items()}


def capsule_pb(rec: CapsuleRecord) -> pb.Capsule:
    return pb.Capsule(
        name=rec.name,
        session=f"sessions/{rec.session}" if rec.session else "",
        trigger=TRIGGER_BY_VALUE.get(rec.trigger, pb.CAPSULE_TRIGGER_UNSPECIFIED),
        reason=rec.reason,
        test_id=rec.test_id,
        board=rec.board,
        backend=rec.backend,
        backend_version=rec.backend_version,
        server_version=rec.server_version,
        program=f"programs/{rec.program}" if rec.program else "",
        firmware_sha256=rec.firmware_sha256,
        pc=rec.pc,
        instructions=rec.instructions,
        virtual_time_ns=rec.virtual_time_ns,
        size_bytes=rec.size_bytes,
        sha256=rec.sha256,
        create_time=convert.timestamp(rec.create_time),
        owner=rec.owner,
        tenant=rec.tenant,
        missing=rec.missing,
    )


class CapsuleServicer(Servicer, pb_grpc.CapsuleServiceServicer):
    async def CreateCapsule(
        self,
        request: pb.CreateCapsuleRequest,
        context: aio.ServicerContext[pb.CreateCapsuleRequest, pb.CreateCapsuleResponse],
    ) -> pb.CreateCapsuleResponse:
        live = self.engine.sessions.get(request.name)
        if request.trigger == pb.CAPSULE_TRIGGER_UNSPECIFIED:
            trigger = Trigger.EXPLICIT
        elif request.trigger in TRIGGER_FROM_PB:
            trigger = TRIGGER_FROM_PB[request.trigger]
        else:
            raise InvalidArgument("trigger", f"unknown trigger {request.trigger}")
        rec = await self.engine.capsules.create(live, trigger, request.reason, request.test_id)
        return pb.CreateCapsuleResponse(capsule=capsule_pb(rec))

    async def GetCapsule(
        self,
        request: pb.GetCapsuleRequest,
        context: aio.ServicerContext[pb.GetCapsuleRequest, pb.GetCapsuleResponse],
    ) -> pb.GetCapsuleResponse:
        return pb.GetCapsuleResponse(capsule=capsule_pb(self.engine.capsules.get(request.name)))

    async def ListCapsules(
        self,
        request: pb.ListCapsulesRequest,
        context: aio.ServicerContext[pb.ListCapsulesRequest, pb.ListCapsulesResponse],
    ) -> pb.ListCapsulesResponse:
        page = self.engine.capsules.list(request.page_size, request.page_token, request.filter)
        return pb.ListCapsulesResponse(capsules=[capsule_pb(r) for r in page.items],
                                       next_page_token=page.next_page_token)

    async def DeleteCapsule(
        self,
        request: pb.DeleteCapsuleRequest,
        context: aio.ServicerContext[pb.DeleteCapsuleRequest, pb.DeleteCapsuleResponse],
    ) -> pb.DeleteCapsuleResponse:
        self.engine.capsules.delete(request.name)
        return pb.DeleteCapsuleResponse()

    async def ExportCapsule(
        self,
        request: pb.ExportCapsuleRequest,
        context: aio.ServicerContext[pb.ExportCapsuleRequest, pb.ExportCapsuleResponse],
    ) -> AsyncIterator[pb.ExportCapsuleResponse]:
        rec = self.engine.capsules.get(request.name)
        yield pb.ExportCapsuleResponse(capsule=capsule_pb(rec))
        for chunk in self.engine.capsules.export_chunks(rec):
            yield pb.ExportCapsuleResponse(chunk=chunk)
            await asyncio.sleep(0)

    async def ImportCapsule(
        self,
        request_iterator: AsyncIterator[pb.ImportCapsuleRequest],
        context: aio.ServicerContext[pb.ImportCapsuleRequest, pb.ImportCapsuleResponse],
    ) -> pb.ImportCapsuleResponse:
        async def chunks() -> AsyncIterator[bytes]:
            async for req in request_iterator:
                yield req.chunk

        rec = await self.engine.capsules.import_(chunks())
        return pb.ImportCapsuleResponse(capsule=capsule_pb(rec))

    async def OpenCapsule(
        self,
        request: pb.OpenCapsuleRequest,
        context: aio.ServicerContext[pb.OpenCapsuleRequest, pb.OpenCapsuleResponse],
    ) -> pb.OpenCapsuleResponse:
        live = await self.engine.capsules.open(request.name, request.session_id, request.display_name)
        return pb.OpenCapsuleResponse(session=convert.live_session_pb(live, self.engine.debugger))
