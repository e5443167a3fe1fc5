"""SessionService: sessions, programs, console, events, snapshots."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from grpc import aio

from machineserver.server.api import convert
from machineserver.server.api.base import Servicer, split_upload
from machineserver.server.api.waits import OUTCOME_TO_PB, budget_from_pb, call_time_left, host_time_pb
from machineserver.server.core import identity
from machineserver.server.core.console import ConsoleMark, MarkKind
from machineserver.server.core.errors import InvalidArgument
from machineserver.server.core.images import ImageFormat
from machineserver.server.core.programs import UploadMetadata
from machineserver.server.core.sessions import CreateParams, LiveSession
from machineserver.server.core.waits import Waits
from machineserver.v1 import session_pb2 as pb
from machineserver.v1 import session_pb2_grpc as pb_grpc


class ProgramUpload:
    """An UploadProgram stream in its parts: the metadata, the program's chunks, then the
    source bundle's chunks (sources_chunk), in that order."""

    def __init__(self, requests: AsyncIterator[pb.UploadProgramRequest]) -> None:
        self._requests = requests.__aiter__()
        self._first_source: bytes | None = None

    async def metadata(self) -> pb.ProgramMetadata:
        try:
            first = await self._requests.__anext__()
        except StopAsyncIteration:
            raise InvalidArgument("metadata", "the stream is empty; send the metadata first") from None
        if first.WhichOneof("content") != "metadata":
            raise InvalidArgument("metadata", "the first message must carry the metadata")
        return first.metadata

    async def program(self) -> AsyncIterator[bytes]:
        async for req in self._requests:
            kind = req.WhichOneof("content")
            if kind == "chunk":
                yield req.chunk
            elif kind == "sources_chunk":
                self._first_source = req.sources_chunk
                return
            else:
                raise InvalidArgument("metadata", "metadata may only come first")

    async def sources(self) -> AsyncIterator[bytes]:
        if self._first_source is None:
            return
        yield self._first_source
        async for req in self._requests:
            kind = req.WhichOneof("content")
            if kind == "sources_chunk":
                yield req.sources_chunk
            elif kind == "chunk":
                raise InvalidArgument("chunk", "the program's chunks must all come before sources_chunk")
            else:
                raise InvalidArgument("metadata", "metadata may only come first")


class SessionServicer(Servicer, pb_grpc.SessionServiceServicer):
    def _session(self, live: LiveSession) -> pb.Session:
        return convert.live_session_pb(live, self.engine.debugger)

    # ------------------------------------------------------------------ sessions

    async def CreateSession(
        self,
        request: pb.CreateSessionRequest,
        context: aio.ServicerContext[pb.CreateSessionRequest, pb.CreateSessionResponse],
    ) -> pb.CreateSessionResponse:
        live = await self.engine.sessions.create(CreateParams(
            board_template=request.board_template,
            board_config=request.board_config,
            backend=request.backend,
            display_name=request.display_name,
            labels=dict(request.labels),
            max_instructions=request.limits.max_instructions,
            max_console_bytes=request.limits.max_console_bytes,
            icount=request.options.icount,
            coverage=request.options.coverage,
            remote_target=request.options.remote.address,
            remote_console=request.options.remote.console,
            program=request.program,
            power_on=request.power_on,
            run=request.run,
            session_id=request.session_id,
            capsule_on_fault=request.options.capsules.on_fault,
            capsule_assert_symbols=tuple(request.options.capsules.assert_symbols),
        ))
        return pb.CreateSessionResponse(session=self._session(live))

    async def GetSession(
        self,
        request: pb.GetSessionRequest,
        context: aio.ServicerContext[pb.GetSessionRequest, pb.GetSessionResponse],
    ) -> pb.GetSessionResponse:
        return pb.GetSessionResponse(session=self._session(self.engine.sessions.get(request.name)))

    async def ListSessions(
        self,
        request: pb.ListSessionsRequest,
        context: aio.ServicerContext[pb.ListSessionsRequest, pb.ListSessionsResponse],
    ) -> pb.ListSessionsResponse:
        page = self.engine.sessions.list(request.page_size, request.page_token, request.filter)
        return pb.ListSessionsResponse(
            sessions=[convert.session_record_pb(r) for r in page.items], next_page_token=page.next_page_token
        )

    async def DeleteSession(
        self,
        request: pb.DeleteSessionRequest,
        context: aio.ServicerContext[pb.DeleteSessionRequest, pb.DeleteSessionResponse],
    ) -> pb.DeleteSessionResponse:
        await self.engine.sessions.delete(self.engine.sessions.get(request.name))
        return pb.DeleteSessionResponse()

    async def PowerOnSession(
        self,
        request: pb.PowerOnSessionRequest,
        context: aio.ServicerContext[pb.PowerOnSessionRequest, pb.PowerOnSessionResponse],
    ) -> pb.PowerOnSessionResponse:
        live = self.engine.sessions.get(request.name)
        await self.engine.sessions.power_on(live)
        return pb.PowerOnSessionResponse(session=self._session(live))

    async def PowerOffSession(
        self,
        request: pb.PowerOffSessionRequest,
        context: aio.ServicerContext[pb.PowerOffSessionRequest, pb.PowerOffSessionResponse],
    ) -> pb.PowerOffSessionResponse:
        live = self.engine.sessions.get(request.name)
        await self.engine.sessions.power_off(live)
        return pb.PowerOffSessionResponse(session=self._session(live))

    async def ResetSession(
        self,
        request: pb.ResetSessionRequest,
        context: aio.ServicerContext[pb.ResetSessionRequest, pb.ResetSessionResponse],
    ) -> pb.ResetSessionResponse:
        live = self.engine.sessions.get(request.name)
        who = identity.current().principal
        cause = "ResetSession" if who == identity.LOCAL_ADMIN.principal else f"ResetSession by {who}"
        await self.engine.sessions.reset(live, request.run_after_reset, cause)
        return pb.ResetSessionResponse(session=self._session(live))

    async def RunSession(
        self,
        request: pb.RunSessionRequest,
        context: aio.ServicerContext[pb.RunSessionRequest, pb.RunSessionResponse],
    ) -> pb.RunSessionResponse:
        live = self.engine.sessions.get(request.name)
        await self.engine.sessions.run(live)
        return pb.RunSessionResponse(session=self._session(live))

    async def PauseSession(
        self,
        request: pb.PauseSessionRequest,
        context: aio.ServicerContext[pb.PauseSessionRequest, pb.PauseSessionResponse],
    ) -> pb.PauseSessionResponse:
        live = self.engine.sessions.get(request.name)
        stop = await self.engine.sessions.pause(live)
        pos = self.engine.debugger.position(live, stop.pc) if stop else None
        return pb.PauseSessionResponse(session=self._session(live), stop=convert.stop_pb(stop, pos))

    # ------------------------------------------------------------------ programs

    async def UploadProgram(
        self,
        request_iterator: AsyncIterator[pb.UploadProgramRequest],
        context: aio.ServicerContext[pb.UploadProgramRequest, pb.UploadProgramResponse],
    ) -> pb.UploadProgramResponse:
        parts = ProgramUpload(request_iterator)
        meta = await parts.metadata()
        fmt: ImageFormat | None = None
        if meta.format:
            fmt = convert.enum_value(convert.FORMAT_FROM_PB, meta.format, "metadata.format")
        result = await self.engine.programs.upload(
            UploadMetadata(meta.display_name, fmt, meta.load_address, meta.sha256), parts.program(),
            sources=parts.sources(),
        )
        return pb.UploadProgramResponse(program=convert.program_pb(result.program), deduplicated=result.deduplicated)

    async def ListPrograms(
        self,
        request: pb.ListProgramsRequest,
        context: aio.ServicerContext[pb.ListProgramsRequest, pb.ListProgramsResponse],
    ) -> pb.ListProgramsResponse:
        page = self.engine.programs.list(request.page_size, request.page_token, request.filter)
        return pb.ListProgramsResponse(programs=[convert.program_pb(p) for p in page.items], next_page_token=page.next_page_token)

    async def GetProgram(
        self,
        request: pb.GetProgramRequest,
        context: aio.ServicerContext[pb.GetProgramRequest, pb.GetProgramResponse],
    ) -> pb.GetProgramResponse:
        return pb.GetProgramResponse(program=convert.program_pb(self.engine.programs.get(request.name)))

    async def DeleteProgram(
        self,
        request: pb.DeleteProgramRequest,
        context: aio.ServicerContext[pb.DeleteProgramRequest, pb.DeleteProgramResponse],
    ) -> pb.DeleteProgramResponse:
        prog = self.engine.programs.get(request.name)
        users = [s.record.name for s in self.engine.sessions.visible() if s.record.program == prog.id]
        self.engine.programs.delete(request.name, users, request.force)
        return pb.DeleteProgramResponse()

    async def LoadProgram(
        self,
        request: pb.LoadProgramRequest,
        context: aio.ServicerContext[pb.LoadProgramRequest, pb.LoadProgramResponse],
    ) -> pb.LoadProgramResponse:
        live = self.engine.sessions.get(request.name)
        await self.engine.sessions.load_program(live, request.program)
        return pb.LoadProgramResponse(session=self._session(live))

    # ------------------------------------------------------------------ console and events

    async def StreamConsole(
        self,
        request: pb.StreamConsoleRequest,
        context: aio.ServicerContext[pb.StreamConsoleRequest, pb.StreamConsoleResponse],
    ) -> AsyncIterator[pb.StreamConsoleResponse]:
        live = self.engine.sessions.get(request.name)
        async for chunk in self.engine.sessions.console_stream(live, request.offset, request.follow):
            yield pb.StreamConsoleResponse(offset=chunk.offset, data=chunk.data, dropped_bytes=chunk.dropped,
                                           marks=[_mark_pb(m) for m in chunk.marks])

    async def WriteConsole(
        self,
        request: pb.WriteConsoleRequest,
        context: aio.ServicerContext[pb.WriteConsoleRequest, pb.WriteConsoleResponse],
    ) -> pb.WriteConsoleResponse:
        live = self.engine.sessions.get(request.name)
        n = await self.engine.sessions.write_console(live, request.data)
        return pb.WriteConsoleResponse(bytes_written=n)

    async def ExpectConsole(
        self,
        request: pb.ExpectConsoleRequest,
        context: aio.ServicerContext[pb.ExpectConsoleRequest, pb.ExpectConsoleResponse],
    ) -> pb.ExpectConsoleResponse:
        live = self.engine.sessions.get(request.name)
        budget = budget_from_pb(request.budget)
        result = await Waits(self.engine.sessions).expect_console(
            live, request.pattern, request.offset, budget, call_time_left(context))
        found = result.match
        stop = result.stop
        return pb.ExpectConsoleResponse(
            outcome=OUTCOME_TO_PB[result.outcome],
            match=found.text if found else "", match_start=found.start if found else 0,
            match_end=found.end if found else 0, groups=list(found.groups) if found else [],
            end_offset=result.end_offset, console_tail=result.console_tail,
            stop=convert.stop_pb(stop, self.engine.debugger.position(live, stop.pc) if stop else None),
            state=convert.STATE_TO_PB[result.state], instructions=result.used.instructions,
            virtual_time_ns=result.used.virtual_ns, host_time=host_time_pb(result.used),
        )

    async def StreamSessionEvents(
        self,
        request: pb.StreamSessionEventsRequest,
        context: aio.ServicerContext[pb.StreamSessionEventsRequest, pb.StreamSessionEventsResponse],
    ) -> AsyncIterator[pb.StreamSessionEventsResponse]:
        sessions = self.engine.sessions
        only = sessions.get(request.name) if request.name else None
        only_id = only.id if only is not None else None
        sub = sessions.subscribe_events(only)
        try:
            # Subscribed first, then the state read with no await in between: every change
            # after this state is in the subscription's queue.
            matched = [only] if only is not None else sorted(
                sessions.visible(), key=lambda live: (live.record.create_time, live.id))
            yield pb.StreamSessionEventsResponse(subscribed=pb.SessionEventsSubscribed(
                sessions=[self._session(live) for live in matched]))
            async for ev in sub:
                pos = None
                if ev.stop is not None and (live := sessions.find(ev.session)) is not None:
                    pos = self.engine.debugger.position(live, ev.stop.pc)
                yield convert.event_pb(ev, pos)
                if only_id is not None and sessions.find(only_id) is None:
                    return  # the session was deleted
        finally:
            sub.close()

    # ------------------------------------------------------------------ snapshots

    async def CreateSnapshot(
        self,
        request: pb.CreateSnapshotRequest,
        context: aio.ServicerContext[pb.CreateSnapshotRequest, pb.CreateSnapshotResponse],
    ) -> pb.CreateSnapshotResponse:
        live = self.engine.sessions.get(request.name)
        rec = await self.engine.snapshots.create(live, request.display_name)
        return pb.CreateSnapshotResponse(snapshot=convert.snapshot_pb(rec))

    async def ListSnapshots(
        self,
        request: pb.ListSnapshotsRequest,
        context: aio.ServicerContext[pb.ListSnapshotsRequest, pb.ListSnapshotsResponse],
    ) -> pb.ListSnapshotsResponse:
        page = self.engine.snapshots.list(request.page_size, request.page_token, request.filter)
        return pb.ListSnapshotsResponse(snapshots=[convert.snapshot_pb(s) for s in page.items], next_page_token=page.next_page_token)

    async def GetSnapshot(
        self,
        request: pb.GetSnapshotRequest,
        context: aio.ServicerContext[pb.GetSnapshotRequest, pb.GetSnapshotResponse],
    ) -> pb.GetSnapshotResponse:
        return pb.GetSnapshotResponse(snapshot=convert.snapshot_pb(self.engine.snapshots.get(request.name)))

    async def RestoreSnapshot(
        self,
        request: pb.RestoreSnapshotRequest,
        context: aio.ServicerContext[pb.RestoreSnapshotRequest, pb.RestoreSnapshotResponse],
    ) -> pb.RestoreSnapshotResponse:
        live = self.engine.sessions.get(request.name)
        await self.engine.snapshots.restore(live, request.snapshot)
        return pb.RestoreSnapshotResponse(session=self._session(live))

    async def DeleteSnapshot(
        self,
        request: pb.DeleteSnapshotRequest,
        context: aio.ServicerContext[pb.DeleteSnapshotRequest, pb.DeleteSnapshotResponse],
    ) -> pb.DeleteSnapshotResponse:
        self.engine.snapshots.delete(request.name)
        return pb.DeleteSnapshotResponse()

    async def ExportSnapshot(
        self,
        request: pb.ExportSnapshotRequest,
        context: aio.ServicerContext[pb.ExportSnapshotRequest, pb.ExportSnapshotResponse],
    ) -> AsyncIterator[pb.ExportSnapshotResponse]:
        rec = self.engine.snapshots.get(request.name)
        yield pb.ExportSnapshotResponse(snapshot=convert.snapshot_pb(rec))
        for chunk in self.engine.snapshots.export_chunks(rec):
            yield pb.ExportSnapshotResponse(chunk=chunk)
            await asyncio.sleep(0)

    async def ImportSnapshot(
        self,
        request_iterator: AsyncIterator[pb.ImportSnapshotRequest],
        context: aio.ServicerContext[pb.ImportSnapshotRequest, pb.ImportSnapshotResponse],
    ) -> pb.ImportSnapshotResponse:
        meta, chunks = await split_upload(request_iterator)
        rec = await self.engine.snapshots.import_(
            display_name=meta.display_name, board=meta.board, backend=meta.backend,
            sha256=meta.sha256, instructions=meta.instructions, chunks=chunks,
        )
        return pb.ImportSnapshotResponse(snapshot=convert.snapshot_pb(rec))


MARK_KIND_TO_PB = {
    MarkKind.RESET: pb.CONSOLE_MARK_KIND_RESET,
    MarkKind.POWER_ON: pb.CONSOLE_MARK_KIND_POWER_ON,
    MarkKind.SNAPSHOT_RESTORED: pb.CONSOLE_MARK_KIND_SNAPSHOT_RESTORED,
}


def _mark_pb(mark: ConsoleMark) -> pb.ConsoleMark:
    return pb.ConsoleMark(offset=mark.offset, kind=MARK_KIND_TO_PB[mark.kind], time=convert.timestamp(mark.time),
                          detail=mark.detail)
