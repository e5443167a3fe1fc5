"""A co-simulation's events: what StreamCoSimulationEvents carries (state changes, stops,
barriers, link traffic), published to every subscriber of that co-simulation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from machineserver.server.core.cosim.model import CoSimRecord, CoSimState
from machineserver.server.core.pubsub import Hub, Subscription
from machineserver.server.lockstep.links import Traffic

if TYPE_CHECKING:
    from machineserver.server.core.cosim.manager import Runtime


@dataclass(frozen=True)
class CoSimEvent:
    cosim: str  # id
    kind: str  # subscribed | barrier | serial | interrupt | shared_memory | drop | stop | state
    state: CoSimState
    quanta: int
    virtual_time_ns: int
    message: str = ""
    session: str = ""
    to_session: str = ""
    data: bytes = b""
    irq: int = 0
    link: int = -1
    offset: int = 0
    snapshot: CoSimRecord | None = None  # subscribed, stop: the record as it was


def copy_record(rec: CoSimRecord) -> CoSimRecord:
    return CoSimRecord(**{**rec.__dict__, "sessions": list(rec.sessions), "links": list(rec.links)})


class CoSimEvents:
    """Every co-simulation's events, on one hub; a subscriber takes one co-simulation's."""

    def __init__(self) -> None:
        self.hub: Hub[CoSimEvent] = Hub(maxlen=4096)

    def close(self) -> None:
        self.hub.close()

    def publish(self, rt: Runtime, kind: str, message: str, *, snapshot: bool = False, time_ref: int = -1,
                 **fields: Any) -> None:
        if self.hub.subscriber_count == 0:
            return
        rec = rt.rec
        when = rec.time_ref if time_ref < 0 else time_ref
        self.hub.publish(CoSimEvent(rec.id, kind, CoSimState(rec.state), rec.quanta, rec.ns(when),
                                       message, snapshot=copy_record(rec) if snapshot else None, **fields))

    def state(self, rt: Runtime, message: str) -> None:
        self.publish(rt, "state", message)

    def traffic(self, rt: Runtime, traffic: list[Traffic]) -> None:
        if self.hub.subscriber_count == 0:
            return
        names = [live.record.name for live in rt.lives]
        for t in traffic:
            to = names[t.target] if t.target >= 0 else ""
            if t.kind == "serial":
                msg = f"{len(t.data)} bytes {names[t.source]} -> {to}"
            elif t.kind == "drop":
                msg = f"{len(t.data)} bytes dropped {names[t.source]} -> {to}: the queue is full"
            elif t.kind == "interrupt":
                msg = f"irq {t.irq} {names[t.source]} -> {to}"
            else:
                msg = f"{len(t.data)} bytes at +{t.offset} written by {names[t.source]}"
            self.publish(rt, t.kind, msg, time_ref=t.time_ref, session=names[t.source], to_session=to,
                          data=t.data, irq=t.irq, link=t.link, offset=t.offset)

    def subscribe(self, rt: Runtime) -> Subscription[CoSimEvent]:
        cid = rt.rec.id
        return self.hub.subscribe(lambda e: e.cosim == cid)

    def subscribed_event(self, rt: Runtime) -> CoSimEvent:
        rec = rt.rec
        return CoSimEvent(rec.id, "subscribed", CoSimState(rec.state), rec.quanta, rec.ns(rec.time_ref),
                          "subscribed", snapshot=copy_record(rec))
