"""AuditService: the audit log, listed and streamed (core/audit.py writes it).

Who may read it: the per-method allowlist (api/auth.py) gives AuditService to the admin
role by default. An admin sees every tenant's entries; should the config open the log to
another role, that caller sees only its own tenant's entries (whatever ``tenant=`` it
asks for). There is no RPC that changes or deletes an entry.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from google.protobuf import timestamp_pb2
from grpc import aio

from machineserver.server.api import convert
from machineserver.server.api.base import Servicer
from machineserver.server.core import identity
from machineserver.server.core.audit import AuditEntry, AuditQuery, page_token, read_token
from machineserver.server.core.errors import InvalidArgument
from machineserver.server.core.listing import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE
from machineserver.v1 import audit_pb2 as pb
from machineserver.v1 import audit_pb2_grpc as pb_grpc

TRANSPORT_TO_PB = {
    "rpc": pb.AUDIT_TRANSPORT_RPC,
    "attach": pb.AUDIT_TRANSPORT_ATTACH,
    "gdb": pb.AUDIT_TRANSPORT_GDB,
}
REPLAY_PAGE = 500


def event_pb(e: AuditEntry) -> pb.AuditEvent:
    event = pb.AuditEvent(
        sequence=e.sequence, time=convert.timestamp(e.time), principal=e.principal, tenant=e.tenant,
        method=e.method, resource=e.resource, code=e.code, request_id=e.request_id,
        transport=TRANSPORT_TO_PB.get(e.transport, pb.AUDIT_TRANSPORT_UNSPECIFIED), peer=e.peer,
    )
    if e.address is not None:
        event.address = e.address
    if e.length is not None:
        event.length = e.length
    return event


def _time(ts: timestamp_pb2.Timestamp, has: bool) -> float | None:
    return ts.seconds + ts.nanos / 1e9 if has else None


def _query(filter_text: str, start: float | None = None, end: float | None = None) -> AuditQuery:
    who = identity.current()
    return AuditQuery.parse(filter_text, start, end, visible_tenant=None if who.is_admin else who.tenant)


class AuditServicer(Servicer, pb_grpc.AuditServiceServicer):
    async def ListAuditEvents(
        self,
        request: pb.ListAuditEventsRequest,
        context: aio.ServicerContext[pb.ListAuditEventsRequest, pb.ListAuditEventsResponse],
    ) -> pb.ListAuditEventsResponse:
        if request.page_size < 0:
            raise InvalidArgument("page_size", "must not be negative")
        limit = min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        query = _query(request.filter, _time(request.start_time, request.HasField("start_time")),
                       _time(request.end_time, request.HasField("end_time")))
        after = read_token(request.page_token, query)
        entries = self.engine.audit.entries(query, after=after, limit=limit + 1)
        more = len(entries) > limit
        entries = entries[:limit]
        token = page_token(entries[-1].sequence, query) if more else ""
        return pb.ListAuditEventsResponse(events=[event_pb(e) for e in entries], next_page_token=token)

    async def StreamAuditEvents(
        self,
        request: pb.StreamAuditEventsRequest,
        context: aio.ServicerContext[pb.StreamAuditEventsRequest, pb.StreamAuditEventsResponse],
    ) -> AsyncIterator[pb.StreamAuditEventsResponse]:
        """Replays the entries after ``after_sequence``, then follows new ones. Each
        subscriber's queue is bounded: one that falls behind further re-reads what it
        missed from the log (nothing is skipped); the stream ends when the caller goes."""
        if request.after_sequence < 0:
            raise InvalidArgument("after_sequence", "must not be negative")
        audit = self.engine.audit
        query = _query(request.filter)
        sub = audit.subscribe(query)  # before reading the log: nothing falls between the two
        try:
            last = request.after_sequence if request.after_sequence > 0 else audit.last_sequence()
            dropped = 0
            replay = True
            while True:
                if replay:
                    while page := audit.entries(query, after=last, limit=REPLAY_PAGE):
                        for e in page:
                            yield pb.StreamAuditEventsResponse(event=event_pb(e))
                        last = page[-1].sequence
                    replay = False
                entry = await sub.get()
                if entry is None:
                    return
                if sub.dropped != dropped:  # the queue overflowed: read the gap from the log
                    dropped, replay = sub.dropped, True
                    continue
                if entry.sequence > last:
                    yield pb.StreamAuditEventsResponse(event=event_pb(entry))
                    last = entry.sequence
        finally:
            sub.close()
