"""CoSimService: co-simulations of several sessions in lock-step (core/cosim)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from grpc import aio

from machineserver.server.api import convert
from machineserver.server.api.base import Servicer, split_upload
from machineserver.server.core.cosim.events import CoSimEvent
from machineserver.server.core.cosim.manager import Runtime
from machineserver.server.core.cosim.model import (
    DEFAULT_SERIAL_QUEUE,
    CoSimRecord,
    CoSimSnapshotRecord,
    CoSimState,
)
from machineserver.server.core.errors import InvalidArgument
from machineserver.server.core.listing import resource_id
from machineserver.server.lockstep.links import Doorbell, Link, Serial, SharedRegion
from machineserver.v1 import cosim_pb2 as pb
from machineserver.v1 import cosim_pb2_grpc as pb_grpc

STATE_TO_PB = {
    CoSimState.PAUSED: pb.CO_SIM_STATE_PAUSED,
    CoSimState.RUNNING: pb.CO_SIM_STATE_RUNNING,
    CoSimState.STOPPED: pb.CO_SIM_STATE_STOPPED,
    CoSimState.FAILED: pb.CO_SIM_STATE_FAILED,
}
KIND_TO_PB = {
    "subscribed": pb.CO_SIM_EVENT_KIND_SUBSCRIBED,
    "barrier": pb.CO_SIM_EVENT_KIND_BARRIER,
    "serial": pb.CO_SIM_EVENT_KIND_SERIAL,
    "interrupt": pb.CO_SIM_EVENT_KIND_INTERRUPT,
    "shared_memory": pb.CO_SIM_EVENT_KIND_SHARED_MEMORY,
    "drop": pb.CO_SIM_EVENT_KIND_DROP,
    "stop": pb.CO_SIM_EVENT_KIND_STOP,
    "state": pb.CO_SIM_EVENT_KIND_STATE,
}


def _links_from_pb(links: list[pb.CoSimLink], index: dict[str, int]) -> list[Link]:
    """The request's links, sessions named as members' indexes; INVALID_ARGUMENT naming
    the field for a session that is not a member."""

    def member(name: str, where: str) -> int:
        if not name:
            raise InvalidArgument(where, "is required (a member session)")
        sid = resource_id(name, "sessions", where)
        if sid not in index:
            raise InvalidArgument(where, f"session {sid} is not one of the co-simulation's sessions")
        return index[sid]

    out: list[Link] = []
    for i, link in enumerate(links):
        base = f"links[{i}]"
        kind = link.WhichOneof("link")
        if kind == "shared_memory":
            sm = link.shared_memory
            out.append(SharedRegion(tuple(
                (member(m.session, f"{base}.shared_memory.mappings[{j}].session"), m.address)
                for j, m in enumerate(sm.mappings)), sm.size))
        elif kind == "interrupt":
            it = link.interrupt
            out.append(Doorbell(member(it.from_session, f"{base}.interrupt.from_session"), it.doorbell_address,
                                it.value_mask or 0xFFFFFFFF, member(it.to_session, f"{base}.interrupt.to_session"),
                                it.irq, it.latency_ns))
        elif kind == "serial":
            se = link.serial
            out.append(Serial(member(se.session_a, f"{base}.serial.session_a"),
                              member(se.session_b, f"{base}.serial.session_b"),
                              se.queue_limit_bytes or DEFAULT_SERIAL_QUEUE))
        else:
            raise InvalidArgument(base, "set one of shared_memory, interrupt, serial")
    return out


def _links_to_pb(rec: CoSimRecord, links: list[Link]) -> list[pb.CoSimLink]:
    names = [f"sessions/{s}" for s in rec.sessions]
    out = []
    for link in links:
        if isinstance(link, SharedRegion):
            out.append(pb.CoSimLink(shared_memory=pb.SharedMemoryLink(
                mappings=[pb.SharedMemoryLink.Mapping(session=names[m], address=a) for m, a in link.mappings],
                size=link.size)))
        elif isinstance(link, Doorbell):
            out.append(pb.CoSimLink(interrupt=pb.InterruptRoute(
                from_session=names[link.source], doorbell_address=link.address, value_mask=link.mask,
                to_session=names[link.target], irq=link.irq, latency_ns=link.latency_ns)))
        else:
            out.append(pb.CoSimLink(serial=pb.SerialLink(session_a=names[link.a], session_b=names[link.b],
                                                         queue_limit_bytes=link.queue_limit)))
    return out


def _stop_pb(stop: dict[str, object] | None) -> pb.CoSimStop | None:
    if not stop:
        return None
    return pb.CoSimStop(**stop)  # type: ignore[arg-type]


class CoSimServicer(Servicer, pb_grpc.CoSimServiceServicer):
    def _pb(self, rt: Runtime, rec: CoSimRecord | None = None) -> pb.CoSimulation:
        rec = rec or rt.rec
        cosim = self.engine.cosim
        links = rec.link_specs()
        state = cosim.link_state(rt)
        status = []
        for li in range(len(links)):
            c = state.counters.get(li)
            in_flight = sum(len(q) for q in state.queues.get(li, []))
            pending = sum(1 for _, p in state.pending if p == li)
            status.append(pb.CoSimLinkStatus(bytes=c.bytes if c else 0, interrupts=c.interrupts if c else 0,
                                             bytes_in_flight=in_flight, bytes_dropped=c.dropped if c else 0,
                                             interrupts_pending=pending))
        members = [pb.CoSimMember(session=m.session, virtual_time_ns=m.virtual_time_ns, cycles=m.cycles,
                                  state=convert.STATE_TO_PB[m.state], board=m.board, backend=m.backend)
                   for m in cosim.members(rt)]
        spec = rec.quantum_spec
        return pb.CoSimulation(
            name=rec.name, display_name=rec.display_name, sessions=[f"sessions/{s}" for s in rec.sessions],
            links=_links_to_pb(rec, links),
            sync=pb.SyncPolicy(quantum_ns=spec.get("quantum_ns", 0),
                               quantum_instructions=spec.get("quantum_instructions", 0)),
            state=STATE_TO_PB[CoSimState(rec.state)], state_reason=rec.state_reason, quanta=rec.quanta,
            virtual_time_ns=rec.ns(rec.time_ref), create_time=convert.timestamp(rec.create_time), owner=rec.owner,
            tenant=rec.tenant,
            members=members, link_status=status, last_stop=_stop_pb(rec.last_stop),
            quantum_ns=rec.ns(rec.quantum_ref))

    @staticmethod
    def _snapshot_pb(rec: CoSimSnapshotRecord) -> pb.CoSimSnapshot:
        return pb.CoSimSnapshot(name=rec.name, display_name=rec.display_name, virtual_time_ns=rec.virtual_time_ns,
                                quanta=rec.quanta, size_bytes=rec.size_bytes, sha256=rec.sha256,
                                create_time=convert.timestamp(rec.create_time), shape=list(rec.shape))

    async def CreateCoSimulation(
        self,
        request: pb.CreateCoSimulationRequest,
        context: aio.ServicerContext[pb.CreateCoSimulationRequest, pb.CreateCoSimulationResponse],
    ) -> pb.CreateCoSimulationResponse:
        ids = [resource_id(s, "sessions", f"sessions[{i}]") for i, s in enumerate(request.sessions)]
        index = {sid: i for i, sid in enumerate(ids)}
        links = _links_from_pb(list(request.links), index)
        rt = await self.engine.cosim.create(
            list(request.sessions), links, request.sync.quantum_ns, request.sync.quantum_instructions,
            request.display_name)
        return pb.CreateCoSimulationResponse(cosimulation=self._pb(rt))

    async def GetCoSimulation(
        self,
        request: pb.GetCoSimulationRequest,
        context: aio.ServicerContext[pb.GetCoSimulationRequest, pb.GetCoSimulationResponse],
    ) -> pb.GetCoSimulationResponse:
        return pb.GetCoSimulationResponse(cosimulation=self._pb(self.engine.cosim.get(request.name)))

    async def ListCoSimulations(
        self,
        request: pb.ListCoSimulationsRequest,
        context: aio.ServicerContext[pb.ListCoSimulationsRequest, pb.ListCoSimulationsResponse],
    ) -> pb.ListCoSimulationsResponse:
        page = self.engine.cosim.list_page(request.page_size, request.page_token, request.filter)
        return pb.ListCoSimulationsResponse(cosimulations=[self._pb(rt) for rt in page.items],
                                            next_page_token=page.next_page_token)

    async def DeleteCoSimulation(
        self,
        request: pb.DeleteCoSimulationRequest,
        context: aio.ServicerContext[pb.DeleteCoSimulationRequest, pb.DeleteCoSimulationResponse],
    ) -> pb.DeleteCoSimulationResponse:
        await self.engine.cosim.delete(self.engine.cosim.get(request.name))
        return pb.DeleteCoSimulationResponse()

    async def StartCoSimulation(
        self,
        request: pb.StartCoSimulationRequest,
        context: aio.ServicerContext[pb.StartCoSimulationRequest, pb.StartCoSimulationResponse],
    ) -> pb.StartCoSimulationResponse:
        cosim = self.engine.cosim
        rt = cosim.get(request.name)
        await cosim.start(rt, cosim.until_ref(rt, request.until_virtual_time_ns, "until_virtual_time_ns"))
        return pb.StartCoSimulationResponse(cosimulation=self._pb(rt))

    async def PauseCoSimulation(
        self,
        request: pb.PauseCoSimulationRequest,
        context: aio.ServicerContext[pb.PauseCoSimulationRequest, pb.PauseCoSimulationResponse],
    ) -> pb.PauseCoSimulationResponse:
        rt = self.engine.cosim.get(request.name)
        await self.engine.cosim.pause(rt)
        return pb.PauseCoSimulationResponse(cosimulation=self._pb(rt))

    async def StepCoSimulation(
        self,
        request: pb.StepCoSimulationRequest,
        context: aio.ServicerContext[pb.StepCoSimulationRequest, pb.StepCoSimulationResponse],
    ) -> pb.StepCoSimulationResponse:
        cosim = self.engine.cosim
        rt = cosim.get(request.name)
        if request.count and request.until_virtual_time_ns:
            raise InvalidArgument("count", "give count or until_virtual_time_ns, not both")
        until = cosim.until_ref(rt, request.until_virtual_time_ns, "until_virtual_time_ns")
        await cosim.step(rt, request.count, until)
        return pb.StepCoSimulationResponse(cosimulation=self._pb(rt))

    def _event_pb(self, rt: Runtime, ev: CoSimEvent) -> pb.StreamCoSimulationEventsResponse:
        return pb.StreamCoSimulationEventsResponse(
            cosimulation=f"cosimulations/{ev.cosim}", state=STATE_TO_PB[ev.state], quanta=ev.quanta,
            virtual_time_ns=ev.virtual_time_ns, message=ev.message, time=convert.timestamp(time.time()),
            kind=KIND_TO_PB[ev.kind], session=ev.session, to_session=ev.to_session, data=ev.data, irq=ev.irq,
            link=ev.link, offset=ev.offset,
            cosimulation_now=self._pb(rt, ev.snapshot) if ev.snapshot is not None else None)

    async def StreamCoSimulationEvents(
        self,
        request: pb.StreamCoSimulationEventsRequest,
        context: aio.ServicerContext[pb.StreamCoSimulationEventsRequest, pb.StreamCoSimulationEventsResponse],
    ) -> AsyncIterator[pb.StreamCoSimulationEventsResponse]:
        cosim = self.engine.cosim
        rt = cosim.get(request.name)
        every = request.barrier_every
        sub = cosim.events.subscribe(rt)
        try:
            yield self._event_pb(rt, cosim.events.subscribed_event(rt))
            async for ev in sub:
                if ev.kind == "barrier" and (not every or ev.quanta % every):
                    continue
                yield self._event_pb(rt, ev)
                if ev.kind == "state" and ev.message == "deleted":
                    return
        finally:
            sub.close()

    async def CreateCoSimSnapshot(
        self,
        request: pb.CreateCoSimSnapshotRequest,
        context: aio.ServicerContext[pb.CreateCoSimSnapshotRequest, pb.CreateCoSimSnapshotResponse],
    ) -> pb.CreateCoSimSnapshotResponse:
        cosim = self.engine.cosim
        rec = await cosim.snapshots.create(cosim.get(request.parent, "parent"), request.display_name)
        return pb.CreateCoSimSnapshotResponse(snapshot=self._snapshot_pb(rec))

    async def ListCoSimSnapshots(
        self,
        request: pb.ListCoSimSnapshotsRequest,
        context: aio.ServicerContext[pb.ListCoSimSnapshotsRequest, pb.ListCoSimSnapshotsResponse],
    ) -> pb.ListCoSimSnapshotsResponse:
        cosim = self.engine.cosim
        page = cosim.snapshots.list_page(cosim.get(request.parent, "parent"), request.page_size, request.page_token)
        return pb.ListCoSimSnapshotsResponse(snapshots=[self._snapshot_pb(r) for r in page.items],
                                             next_page_token=page.next_page_token)

    async def RestoreCoSimSnapshot(
        self,
        request: pb.RestoreCoSimSnapshotRequest,
        context: aio.ServicerContext[pb.RestoreCoSimSnapshotRequest, pb.RestoreCoSimSnapshotResponse],
    ) -> pb.RestoreCoSimSnapshotResponse:
        rt = await self.engine.cosim.snapshots.restore(request.name)
        return pb.RestoreCoSimSnapshotResponse(cosimulation=self._pb(rt))

    async def DeleteCoSimSnapshot(
        self,
        request: pb.DeleteCoSimSnapshotRequest,
        context: aio.ServicerContext[pb.DeleteCoSimSnapshotRequest, pb.DeleteCoSimSnapshotResponse],
    ) -> pb.DeleteCoSimSnapshotResponse:
        self.engine.cosim.snapshots.delete(request.name)
        return pb.DeleteCoSimSnapshotResponse()

    async def ExportCoSimSnapshot(
        self,
        request: pb.ExportCoSimSnapshotRequest,
        context: aio.ServicerContext[pb.ExportCoSimSnapshotRequest, pb.ExportCoSimSnapshotResponse],
    ) -> AsyncIterator[pb.ExportCoSimSnapshotResponse]:
        _, rec = self.engine.cosim.snapshots.get(request.name)
        yield pb.ExportCoSimSnapshotResponse(snapshot=self._snapshot_pb(rec))
        for chunk in self.engine.cosim.snapshots.export_chunks(rec):
            yield pb.ExportCoSimSnapshotResponse(chunk=chunk)
            await asyncio.sleep(0)

    async def ImportCoSimSnapshot(
        self,
        request_iterator: AsyncIterator[pb.ImportCoSimSnapshotRequest],
        context: aio.ServicerContext[pb.ImportCoSimSnapshotRequest, pb.ImportCoSimSnapshotResponse],
    ) -> pb.ImportCoSimSnapshotResponse:
        meta, chunks = await split_upload(request_iterator)
        rec = await self.engine.cosim.snapshots.import_(meta.parent, meta.display_name, meta.sha256, chunks)
        return pb.ImportCoSimSnapshotResponse(snapshot=self._snapshot_pb(rec))
