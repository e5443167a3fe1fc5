"""An asyncio client for the GDB remote serial protocol: one connection to a gdbstub
(QEMU's, OpenOCD's, gdbserver, our own bridge), as an explicit state machine.

States (:class:`State`) and what moves between them::

    CONNECTING --handshake done--> IDLE <--reply--> BUSY         (one request in flight)
                                   IDLE --c/s/vCont sent--> RUNNING --stop reply--> IDLE
    any --garbage / a late reply that never comes / too many '-'--> BROKEN
    any --the stub hangs up / close()--> CLOSED

Every call names the state it needs; called in another it raises :class:`RspStateError`
(``.state``, ``.required``), or :class:`RspClosed` once the connection is gone. BUSY only
queues: a second request waits for the first. RUNNING takes :meth:`RspProtocol.wait_stop`
and :meth:`RspProtocol.interrupt` (^C) only, so nothing is sent while the stop reply is
owed; a timeout in ``wait_stop`` leaves the client RUNNING (interrupt, then wait again).
:meth:`RspProtocol.resume` (and ``step``) is ``send_continue`` and ``wait_stop`` in one
call, one pass of the event loop cheaper.

The resynchronisation rule. RSP replies carry no request id: the next packet from the
stub answers the oldest unanswered request. So when a request is abandoned while its
reply is owed (its timeout expired, or the caller was cancelled), the client remembers
it, and the next request, before sending anything, first waits up to ``resync_timeout``
seconds for that owed reply and throws it away (``discarded`` counts them; a request
whose reply comes with ``O`` output packets, qRcmd, discards those too). If the owed
reply does not come in time, the client goes BROKEN: from then on it cannot tell whose
reply a packet is, and every call raises. A packet that arrives when no reply is owed,
bytes outside any packet, a bad checksum in no-ack mode, or a packet the stub refuses
(``-``) more than ``max_resends`` times also make it BROKEN. A reply is therefore never
handed to the wrong request: it is its own, or the call fails with a clear error.

Acknowledgements: in ack mode every packet received is answered ``+`` (or ``-`` on a
bad checksum: the stub sends it again), and a ``-`` from the stub makes the client send
its last packet again. The handshake switches both ends to no-ack mode when the stub
offers ``QStartNoAckMode`` (QEMU 7.2 does not).

Errors, all from :class:`RspError`::

    RspError                  the stub answered Exx (.code) or cannot do it (empty reply)
     +-- RspClosed            the connection is gone (also a ConnectionError)
     +-- RspTimeout           no reply in time (also a TimeoutError); the client resyncs
     +-- RspStateError        called in the wrong state (.state, .required)
     +-- RspProtocolError     the stub broke the protocol; the client is BROKEN
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import functools
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any, Concatenate, ParamSpec, SupportsIndex, TypedDict, TypeVar, Unpack

import structlog

from machineserver.server.rsp.codec import (
    INTERRUPT,
    Acks,
    CodecError,
    Event,
    EventKind,
    PacketReader,
    StopReply,
    decode_rle,
    escape_binary,
    frame,
    from_hex,
    hex_int,
    parse_console_output,
    parse_error,
    to_hex,
    unescape_binary,
)

log = structlog.get_logger(__name__)

DEFAULT_TIMEOUT = 5.0  # seconds a request waits for its reply
RESYNC_TIMEOUT = 1.0  # seconds the next request waits for a reply owed to an abandoned one
MAX_RESENDS = 3  # times one packet is sent again after '-' before the client gives up
RESUME_PACKETS = (b"c", b"C", b"s", b"S", b"vCont;")


class State(enum.Enum):
    CONNECTING = "connecting"  # the handshake runs
    IDLE = "idle"  # ready for a request
    BUSY = "busy"  # a request is in flight (others queue)
    RUNNING = "running"  # a continue/step was sent: the stop reply is owed
    BROKEN = "broken"  # the stream cannot be trusted any more
    CLOSED = "closed"  # the connection is gone


# --------------------------------------------------------------------------- errors


class RspError(Exception):
    """The stub answered ``Exx`` (``code``) or could not do what was asked; the root of
    every error this client raises. ``address`` is set for memory requests."""

    def __init__(self, message: str, code: int | None = None, *, address: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.address = address

    def __str__(self) -> str:
        return self.message


class RspClosed(RspError, ConnectionError):
    """The connection to the stub is closed (by the stub, by a broken socket, or by
    :meth:`RspProtocol.close`)."""


class RspTimeout(RspError, TimeoutError):
    """No reply in time. A request's reply is then owed: the next request first waits for
    it (see the module docstring)."""


class RspStateError(RspError):
    """A call made in a state that does not allow it."""

    def __init__(self, message: str, state: State, required: tuple[State, ...]) -> None:
        super().__init__(message)
        self.state = state
        self.required = required


class RspProtocolError(RspError):
    """The stub broke the protocol (garbage, a reply nobody asked for, a reply that
    never came); the client is BROKEN."""


# --------------------------------------------------------------------------- the state machine

_P = ParamSpec("_P")
_T = TypeVar("_T")
_Proto = TypeVar("_Proto", bound="RspProtocol")


def require(
    *states: State, action: str
) -> Callable[
    [Callable[Concatenate[_Proto, _P], Awaitable[_T]]],
    Callable[Concatenate[_Proto, _P], Coroutine[Any, Any, _T]],
]:
    """Guard a coroutine method: it runs only in one of ``states``, one call at a time.
    A call that finds the client BUSY waits for its turn, then checks again."""

    def decorate(
        func: Callable[Concatenate[_Proto, _P], Awaitable[_T]],
    ) -> Callable[Concatenate[_Proto, _P], Coroutine[Any, Any, _T]]:
        @functools.wraps(func)
        async def guarded(self: _Proto, /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
            self._require(states, action, may_wait=True)
            async with self._turn:
                self._require(states, action)
                return await func(self, *args, **kwargs)

        return guarded

    return decorate


class PushReader(asyncio.StreamReader):
    """The reading side of a connection the client opens itself: each chunk is handed to
    the client from the transport's own callback, the moment it arrives, instead of being
    buffered for a reader task to take (that task's wake-up cost a pass of the event loop
    on every reply: ~10 % of a single step against QEMU). Chunks, the end of the stream
    (None) and a broken connection (the exception) that come before the client attaches
    wait for it. Nothing is buffered: its ``read`` methods are not for use."""

    def __init__(self) -> None:
        super().__init__()
        self._sink: Callable[[bytes | BaseException | None], None] | None = None
        self._early: list[bytes | BaseException | None] = []

    def attach(self, sink: Callable[[bytes | BaseException | None], None]) -> None:
        self._sink = sink
        early, self._early = self._early, []
        for item in early:
            sink(item)

    def _push(self, item: bytes | BaseException | None) -> None:
        if self._sink is None:
            self._early.append(item)
        else:
            self._sink(item)

    def feed_data(self, data: Iterable[SupportsIndex]) -> None:
        self._push(bytes(data))

    def feed_eof(self) -> None:
        super().feed_eof()
        self._push(None)

    def set_exception(self, exc: Exception) -> None:
        super().set_exception(exc)
        self._push(exc)


@contextlib.asynccontextmanager
async def _expiring(timeout: float | None, failure: Callable[[], Exception]) -> AsyncIterator[None]:
    """``asyncio.timeout(timeout)`` whose own expiry raises ``failure()`` instead (an
    RspTimeout saying what did not come, or the client going BROKEN); a TimeoutError that
    anything else raises inside the block passes on unchanged. ``failure`` is called only
    then, so it can say how things stand at that moment."""
    limit = asyncio.timeout(timeout)
    try:
        async with limit:
            yield
    except TimeoutError:
        if not limit.expired():
            raise
        raise failure() from None


@dataclass
class _Owed:
    """A request abandoned while its reply was owed."""

    payload: bytes
    with_output: bool  # its reply may come after O (console output) packets


class RspProtocol:
    """The connection and its state machine: framing, acks, one request at a time, the
    resume/stop cycle and resynchronisation. :class:`RspClient` adds the commands.

    The bytes come from ``reader``: pushed as they arrive when it is a :class:`PushReader`
    (what ``connect_*`` make), else taken by a reader task."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        resync_timeout: float = RESYNC_TIMEOUT,
        max_resends: int = MAX_RESENDS,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self.resync_timeout = resync_timeout
        self.discarded = 0  # late replies thrown away while resynchronising
        self.on_output: Callable[[bytes], None] | None = None  # O packets while running
        self._state = State.CONNECTING
        self._why: RspError | None = None  # what made the client BROKEN or CLOSED
        self._turn = asyncio.Lock()
        self._acks = Acks(max_resends=max_resends)
        self._inbox: asyncio.Queue[Event | RspError] = asyncio.Queue()
        self._stash: collections.deque[bytes] = collections.deque()  # packets taken early
        self._owed: _Owed | None = None
        self._packets = PacketReader()
        self._reading = True  # False once the stream ended, broke or went bad
        self._pump_task: asyncio.Task[None] | None = None
        if isinstance(reader, PushReader):
            reader.attach(self._received)
        else:
            self._pump_task = asyncio.create_task(self._pump(), name="rsp-reader")

    # ------------------------------------------------------------------ state

    @property
    def state(self) -> State:
        return self._state

    @property
    def closed(self) -> bool:
        """No call can succeed any more (BROKEN or CLOSED)."""
        return self._state in (State.BROKEN, State.CLOSED)

    @property
    def ack_mode(self) -> bool:
        return self._acks.enabled

    @property
    def reply_owed(self) -> bool:
        """A request was abandoned before its reply came; the next one waits for it."""
        return self._owed is not None

    def _require(self, states: tuple[State, ...], action: str, *, may_wait: bool = False) -> None:
        state = self._state
        if state in states or (may_wait and state is State.BUSY):
            return
        if state is State.CLOSED:
            raise RspClosed(f"cannot {action}: the connection to the stub is closed"
                            + (f" ({self._why})" if self._why is not None else ""))
        needed = " or ".join(s.name for s in states)
        if state is State.BROKEN:
            hint = f"the connection is broken ({self._why}); close it and connect again"
        elif state is State.RUNNING:
            hint = "the target is running: interrupt() it and wait_stop() first"
        elif state is State.CONNECTING:
            hint = "the handshake has not finished"
        else:
            hint = "another call is in progress"
        raise RspStateError(f"cannot {action} while {state.name} (needs {needed}): {hint}", state, states)

    def _terminate(self, state: State, why: RspError) -> RspError:
        """Go BROKEN or CLOSED for good; returns ``why`` for the caller to raise."""
        if self._state is not State.CLOSED:
            if self._state is not State.BROKEN or state is State.CLOSED:
                self._state = state
            if self._why is None or state is State.BROKEN:
                self._why = why
            if state is State.BROKEN:
                log.warning("rsp_broken", reason=str(why))
            self._writer.close()
            self._reading = False
            if self._pump_task is not None:
                self._pump_task.cancel()
            self._inbox.put_nowait(RspClosed(str(why)))  # wakes a waiter in another task
        return why

    # ------------------------------------------------------------------ the byte stream

    async def _pump(self) -> None:
        """Reads a reader that does not push (see :class:`PushReader`)."""
        try:
            while self._reading:
                self._received(await self._reader.read(65536) or None)
        except (ConnectionError, OSError) as exc:
            self._received(exc)

    def _received(self, chunk: bytes | BaseException | None) -> None:
        """One chunk of the stream (None: its end; an exception: the connection broke):
        acks packets, undoes RLE, queues packets and acks for the caller of the moment;
        garbage and the end of the stream are queued as errors, and nothing after them."""
        if not self._reading:
            return
        problem: RspError | None = None
        if chunk is None:
            problem = RspClosed("the stub closed the connection")
        elif isinstance(chunk, BaseException):
            problem = RspClosed(f"the connection to the stub broke: {chunk}")
        else:
            for event in self._packets.feed(chunk):
                problem = self._receive(event)
                if problem is not None:
                    break
        if problem is not None:
            self._reading = False
            self._inbox.put_nowait(problem)

    def _receive(self, event: Event) -> RspError | None:
        if event.kind is EventKind.PACKET:
            self._write(self._acks.answer(event))
            try:
                payload = decode_rle(event.data)
            except CodecError as exc:
                return RspProtocolError(f"bad run-length encoding in {event.data[:40]!r}: {exc}")
            self._inbox.put_nowait(Event(EventKind.PACKET, payload))
        elif event.kind is EventKind.BAD_CHECKSUM:
            answer = self._acks.answer(event)
            if not self._acks.enabled:
                return RspProtocolError(f"bad checksum on {event.data[:40]!r} in no-ack mode")
            if self._acks.bad_in_a_row > self._acks.max_resends:
                return RspProtocolError(
                    f"{self._acks.bad_in_a_row} packets in a row with a bad checksum")
            self._write(answer)
        elif event.kind is EventKind.ACK:
            self._inbox.put_nowait(event)
        else:
            what = "^C" if event.kind is EventKind.INTERRUPT else repr(event.data[:40])
            return RspProtocolError(f"the stub sent {what} outside any packet")
        return None

    def _write(self, data: bytes) -> None:
        if data and not self._writer.is_closing():
            self._writer.write(data)

    async def _send(self, payload: bytes) -> None:
        framed = frame(payload)
        self._write(framed)
        self._acks.sent(framed)
        try:
            await self._writer.drain()
        except (ConnectionError, OSError) as exc:
            raise self._terminate(State.CLOSED, RspClosed(f"the connection to the stub broke: {exc}")) from None

    async def _take(self, *, block: bool = True, until_acked: bool = False) -> bytes | None:
        """The next packet's payload, handling acks on the way. None: nothing queued
        (``block=False``), or the last packet sent got its ack (``until_acked``)."""
        while True:
            if self._stash:
                return self._stash.popleft()
            if until_acked and not self._acks.unacknowledged:
                return None
            if not block and self._inbox.empty():
                return None
            item = await self._inbox.get() if block else self._inbox.get_nowait()
            if isinstance(item, RspError):
                if self.closed:  # close() from another task while this one waited
                    raise RspClosed(f"the connection to the stub is closed ({self._why})")
                closing = isinstance(item, RspClosed)
                raise self._terminate(State.CLOSED if closing else State.BROKEN, item)
            if item.kind is EventKind.ACK:
                resend = self._acks.received(item)
                if resend:
                    self._write(resend)
                elif self._acks.gave_up:
                    raise self._terminate(State.BROKEN, RspProtocolError(
                        f"the stub refused a packet {self._acks.max_resends + 1} times"))
                continue
            return item.data

    def _console_text(self, payload: bytes) -> bytes | None:
        """The text of an O (console output) packet; None for any other packet."""
        try:
            return parse_console_output(payload)
        except CodecError as exc:
            raise self._break(f"console output that is not hex: {exc}") from None

    def _break(self, message: str) -> RspError:
        return self._terminate(State.BROKEN, RspProtocolError(message))

    async def _settle(self) -> None:
        """Before sending: wait (bounded) for a reply owed to an abandoned request and
        discard it; a packet nobody asked for means the stream is out of step."""
        owed = self._owed
        if owed is not None:
            async with _expiring(self.resync_timeout, lambda: self._break(
                    f"the reply to {owed.payload[:40]!r} (abandoned earlier) did not come within "
                    f"{self.resync_timeout} s, so later replies cannot be matched to requests")):
                while True:
                    late = await self._take()
                    assert late is not None
                    if not (owed.with_output and self._console_text(late) is not None):
                        break
            self._owed = None
            self.discarded += 1
            log.info("rsp_late_reply_discarded", request=owed.payload[:40], reply=late[:40])
        unexpected = await self._take(block=False)
        if unexpected is not None:
            raise self._break(f"the stub sent {unexpected[:40]!r} when no reply was owed")

    # ------------------------------------------------------------------ requests

    async def _transact(self, payload: bytes, timeout: float | None,
                        output: list[bytes] | None = None) -> bytes:
        """Send ``payload`` and return its reply; ``output`` collects O packets that come
        before the reply (qRcmd). The caller holds the turn (or is the handshake)."""
        async with _expiring(timeout, lambda: RspTimeout(f"no reply to {payload[:40]!r} within {timeout} s")):
            await self._settle()
            if self._state is State.IDLE:
                self._state = State.BUSY
            try:
                self._owed = _Owed(payload, output is not None)
                await self._send(payload)
                while True:
                    reply = await self._take()
                    assert reply is not None
                    if output is None or (text := self._console_text(reply)) is None:
                        self._owed = None
                        return reply
                    output.append(text)
            finally:
                if self._state is State.BUSY:
                    self._state = State.IDLE

    @require(State.IDLE, action="send a request")
    async def _request(self, payload: bytes, timeout: float | None, output: list[bytes] | None) -> bytes:
        return await self._transact(payload, timeout, output)

    async def request(self, payload: bytes, *, timeout: float | None = DEFAULT_TIMEOUT) -> bytes:
        """Send one packet (unescaped payload: escape binary data yourself) and return the
        reply's payload (run-length decoded; binary replies still escaped)."""
        return await self._request(payload, timeout, None)

    # ------------------------------------------------------------------ running

    @require(State.IDLE, action="resume the target")
    async def send_continue(self, payload: bytes = b"c", *, timeout: float | None = DEFAULT_TIMEOUT) -> None:
        """Send ``c`` (or ``C``, ``s``, ``S``, ``vCont;...``) and return once the stub has
        it (acknowledged, in ack mode); the stop reply comes through :meth:`wait_stop`."""
        async with _expiring(timeout, lambda: RspTimeout(
                f"the stub did not acknowledge {payload[:20]!r} within {timeout} s")):
            await self._send_resume(payload)
            if self._acks.enabled:
                early = await self._take(until_acked=True)
                if early is not None:  # the stop reply before the ack: it counts as one
                    self._stash.appendleft(early)

    @require(State.RUNNING, action="wait for a stop reply")
    async def wait_stop(self, timeout: float | None = None) -> StopReply:
        """The stop reply owed since the last resume (``O`` console output packets before
        it go to ``on_output``). A timeout leaves the client RUNNING."""
        async with _expiring(timeout, lambda: RspTimeout(
                f"no stop reply within {timeout} s; the target still runs")):
            payload = await self._stop_payload()
        return self._stopped(payload)

    @require(State.IDLE, action="resume the target")
    async def resume(self, payload: bytes = b"c", *, timeout: float | None = None) -> StopReply:
        """:meth:`send_continue` then :meth:`wait_stop`, in one pass: the ack (and a
        resend that a ``-`` asks for) is taken while waiting for the stop reply, which
        saves a pass of the event loop, for a caller with nothing to do in between
        (:meth:`interrupt` from another task works once the packet is out). ``timeout``
        covers both; when it expires the client is RUNNING (interrupt, then wait_stop),
        or still IDLE if the packet never went out."""
        def no_stop_reply() -> RspTimeout:
            ran = "; the target still runs" if self._state is State.RUNNING else ""
            return RspTimeout(f"no stop reply to {payload[:20]!r} within {timeout} s{ran}")

        async with _expiring(timeout, no_stop_reply):
            await self._send_resume(payload)
            reply = await self._stop_payload()
        return self._stopped(reply)

    async def _send_resume(self, payload: bytes) -> None:
        """Send a packet that resumes the target (ValueError for any other), once the
        stream is in step: RUNNING from then on."""
        if not payload.startswith(RESUME_PACKETS):
            raise ValueError(f"{payload[:20]!r} does not resume the target")
        await self._settle()
        await self._send(payload)
        self._state = State.RUNNING

    async def _stop_payload(self) -> bytes:
        """The next packet that is not console output (``O`` packets go to ``on_output``)."""
        while True:
            payload = await self._take()
            assert payload is not None
            text = self._console_text(payload)
            if text is None:
                return payload
            if self.on_output is not None:
                self.on_output(text)

    def _stopped(self, payload: bytes) -> StopReply:
        """The stop reply in ``payload``; the target is stopped (IDLE) either way."""
        if not payload or parse_error(payload) is not None:
            self._state = State.IDLE  # the stub refused to resume
            raise _refusal(b"resume", payload)
        try:
            reply = StopReply.parse(payload)
        except CodecError as exc:
            raise self._break(f"a stop reply the client cannot read: {exc}") from None
        self._state = State.IDLE
        return reply

    def interrupt(self) -> bool:
        """Send ^C to a running target; its stop reply comes through :meth:`wait_stop`.
        Returns False, sending nothing, when the target is not running (a stop that just
        came wins the race)."""
        if self._state is State.RUNNING:
            self._write(INTERRUPT)
            return True
        self._require((State.IDLE, State.BUSY, State.CONNECTING), "interrupt the target")
        return False

    # ------------------------------------------------------------------ closing

    async def close(self) -> None:
        """Close the connection (idempotent); calls waiting in other tasks get RspClosed."""
        self._terminate(State.CLOSED, RspClosed("the client closed the connection"))
        if self._pump_task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._pump_task
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._writer.wait_closed(), 1.0)


def _refusal(request: bytes, reply: bytes, *, address: int | None = None) -> RspError:
    """The error for an ``Exx`` or empty (unsupported) reply."""
    text = reply.decode("ascii", "replace")
    where = f" at 0x{address:08x}" if address is not None else ""
    what = "not supported by the stub" if not reply else text
    return RspError(f"{request.decode('ascii', 'replace')}{where}: {what}", parse_error(reply), address=address)


# --------------------------------------------------------------------------- the commands


async def _streams(
    connect: Callable[[Callable[[], asyncio.StreamReaderProtocol]],
                      Awaitable[tuple[asyncio.BaseTransport, asyncio.StreamReaderProtocol]]],
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A reader and writer over a new connection, as ``asyncio.open_connection`` makes
    them, but reading through a :class:`PushReader`."""
    loop = asyncio.get_running_loop()
    reader = PushReader()
    protocol = asyncio.StreamReaderProtocol(reader)
    transport, _ = await connect(lambda: protocol)
    assert isinstance(transport, asyncio.WriteTransport)
    return reader, asyncio.StreamWriter(transport, protocol, reader, loop)


class ProtocolOptions(TypedDict, total=False):
    """The framing layer's tunables (:class:`RspProtocol`), passed through by the client."""

    resync_timeout: float
    max_resends: int


class RspClient(RspProtocol):
    """One connection to a gdbstub. Create with :meth:`connect_unix` or
    :meth:`connect_tcp`; ``features`` and ``packet_size`` come from its qSupported reply."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 **options: Unpack[ProtocolOptions]) -> None:
        super().__init__(reader, writer, **options)
        self.features: dict[str, str] = {}
        self.packet_size = 4096
        self.writes = 0  # register and memory writes sent (a snapshot cache's "unchanged since")

    # ------------------------------------------------------------------ connecting

    @classmethod
    async def connect_unix(cls, path: str, *, xml_registers: str | None = None,
                           timeout: float = DEFAULT_TIMEOUT, **options: Unpack[ProtocolOptions]) -> RspClient:
        """Connect to a stub on a Unix socket and shake hands. ``xml_registers`` names
        the architecture for qSupported's ``xmlRegisters=`` ("arm"; None on RISC-V)."""
        loop = asyncio.get_running_loop()
        return await cls._open(_streams(lambda protocol: loop.create_unix_connection(protocol, path)),
                               path, xml_registers, timeout, options)

    @classmethod
    async def connect_tcp(cls, host: str, port: int, *, xml_registers: str | None = None,
                          timeout: float = DEFAULT_TIMEOUT, **options: Unpack[ProtocolOptions]) -> RspClient:
        """Connect over TCP (TCP_NODELAY: packets are small and latency-bound)."""
        loop = asyncio.get_running_loop()
        return await cls._open(_streams(lambda protocol: loop.create_connection(protocol, host, port)),
                               f"{host}:{port}", xml_registers, timeout, options)

    @classmethod
    async def _open(cls, opening: Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]],
                    where: str, xml_registers: str | None, timeout: float,
                    options: ProtocolOptions) -> RspClient:
        try:
            reader, writer = await asyncio.wait_for(opening, timeout)
        except TimeoutError:
            raise RspTimeout(f"cannot connect to {where} within {timeout} s") from None
        except OSError as exc:
            raise RspClosed(f"cannot connect to {where}: {exc}") from exc
        sock = writer.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client = cls(reader, writer, **options)
        try:
            await client._handshake(xml_registers, timeout)
        except BaseException:
            await client.close()
            raise
        return client

    async def _handshake(self, xml_registers: str | None, timeout: float) -> None:
        ours = [b"multiprocess+", b"swbreak+", b"hwbreak+"]
        if xml_registers:
            ours.append(b"xmlRegisters=" + xml_registers.encode())
        reply = await self._transact(b"qSupported:" + b";".join(ours), timeout)
        if not reply or parse_error(reply) is not None:
            raise _refusal(b"qSupported", reply)
        for item in reply.decode("ascii", "replace").split(";"):
            name, sep, value = item.partition("=")
            if sep:
                self.features[name] = value
            elif item[-1:] in ("+", "-", "?"):
                self.features[item[:-1]] = item[-1]
        if "PacketSize" in self.features:
            with contextlib.suppress(CodecError):
                self.packet_size = hex_int(self.features["PacketSize"].encode())
        if self.supports("QStartNoAckMode") and await self._transact(b"QStartNoAckMode", timeout) == b"OK":
            self._acks.enabled = False
        self._state = State.IDLE

    def supports(self, feature: str) -> bool:
        """The stub's qSupported reply offered ``feature`` (``name+`` or ``name=value``)."""
        value = self.features.get(feature)
        return value is not None and value not in ("-", "?")

    # ------------------------------------------------------------------ generic

    async def request_ok(self, payload: bytes, *, timeout: float | None = DEFAULT_TIMEOUT) -> None:
        """A request whose answer must be ``OK``; anything else raises RspError."""
        reply = await self.request(payload, timeout=timeout)
        if reply != b"OK":
            raise _refusal(payload.split(b":")[0][:20], reply)

    async def _checked(self, payload: bytes, what: bytes, *, address: int | None = None) -> bytes:
        reply = await self.request(payload)
        if not reply or parse_error(reply) is not None:
            raise _refusal(what, reply, address=address)
        return reply

    def _decode_hex(self, what: bytes, reply: bytes, *, unavailable: int | None = None) -> bytes:
        try:
            return from_hex(reply, unavailable=unavailable)
        except CodecError as exc:
            raise RspProtocolError(f"{what.decode()}: {exc}") from None

    # ------------------------------------------------------------------ run control

    async def step(self, timeout: float | None = DEFAULT_TIMEOUT) -> StopReply:
        """One instruction (:meth:`resume` with ``s``); a timeout leaves the client
        RUNNING (interrupt, wait_stop)."""
        return await self.resume(b"s", timeout=timeout)

    async def halt_reason(self) -> StopReply:
        """``?``: why the target stopped."""
        reply = await self._checked(b"?", b"?")
        try:
            return StopReply.parse(reply)
        except CodecError as exc:
            raise RspProtocolError(f"?: {exc}") from None

    # ------------------------------------------------------------------ registers

    async def read_all_registers(self) -> bytes:
        """``g``: every register in the target's order (unavailable ones read as 0)."""
        return self._decode_hex(b"g", await self._checked(b"g", b"g"), unavailable=0)

    async def read_register(self, number: int) -> bytes:
        return self._decode_hex(b"p", await self._checked(b"p%x" % number, b"p"))

    async def write_register(self, number: int, value: bytes) -> None:
        self.writes += 1
        await self.request_ok(b"P%x=%s" % (number, to_hex(value)))

    # ------------------------------------------------------------------ memory

    def _chunk(self) -> int:
        # a reply carries 2 hex digits per byte plus framing
        return max(16, min(4096, (self.packet_size - 32) // 2))

    async def read_memory(self, address: int, size: int) -> bytes:
        out = bytearray()
        step = self._chunk()
        while len(out) < size:
            n = min(step, size - len(out))
            at = address + len(out)
            reply = await self._checked(b"m%x,%x" % (at, n), b"m", address=at)
            out += self._decode_hex(b"m", reply)
        return bytes(out)

    async def write_memory(self, address: int, data: bytes) -> None:
        self.writes += 1
        step = self._chunk()
        for off in range(0, len(data), step):
            chunk = data[off : off + step]
            reply = await self.request(b"M%x,%x:%s" % (address + off, len(chunk), to_hex(chunk)))
            if reply != b"OK":
                raise _refusal(b"M", reply, address=address + off)

    async def write_memory_binary(self, address: int, data: bytes) -> None:
        """``X`` with escaped binary data (half the bytes on the wire of ``M``)."""
        self.writes += 1
        step = max(16, (self.packet_size - 64) // 2)  # worst case: every byte escaped
        for off in range(0, len(data), step):
            chunk = data[off : off + step]
            reply = await self.request(b"X%x,%x:" % (address + off, len(chunk)) + escape_binary(chunk))
            if reply != b"OK":
                raise _refusal(b"X", reply, address=address + off)

    async def crc(self, address: int, length: int) -> int:
        """``qCRC``: the stub's CRC of target memory (compare with codec.gdb_crc32)."""
        reply = await self._checked(b"qCRC:%x,%x" % (address, length), b"qCRC", address=address)
        if reply[:1] != b"C":
            raise RspProtocolError(f"qCRC: unexpected reply {reply[:40]!r}")
        try:
            return hex_int(reply[1:])
        except CodecError as exc:
            raise RspProtocolError(f"qCRC: {exc}") from None

    # ------------------------------------------------------------------ break/watch

    async def insert_point(self, kind: int, address: int, length: int) -> None:
        """``Z``: 0 software breakpoint, 1 hardware, 2/3/4 write/read/access watchpoint;
        ``length`` is the breakpoint kind (2 = Thumb) or the watched size."""
        await self.request_ok(b"Z%d,%x,%x" % (kind, address, length))

    async def remove_point(self, kind: int, address: int, length: int) -> None:
        await self.request_ok(b"z%d,%x,%x" % (kind, address, length))

    # ------------------------------------------------------------------ queries

    async def read_xfer(self, obj: str, annex: str) -> bytes:
        """``qXfer:<obj>:read:<annex>``, every chunk, unescaped."""
        out = bytearray()
        length = max(64, min(0x3F00, self.packet_size - 8))
        while True:
            head = b"qXfer:%s:read:%s:" % (obj.encode(), annex.encode())
            reply = await self._checked(head + b"%x,%x" % (len(out), length), head[:-1])
            if reply[:1] not in (b"m", b"l"):
                raise RspProtocolError(f"qXfer: unexpected reply {reply[:40]!r}")
            try:
                out += unescape_binary(reply[1:])
            except CodecError as exc:
                raise RspProtocolError(f"qXfer: {exc}") from None
            if reply[:1] == b"l" or len(reply) == 1:
                return bytes(out)

    async def read_target_xml(self, annex: str = "target.xml") -> bytes:
        """The target description (or a document it includes)."""
        return await self.read_xfer("features", annex)

    async def monitor(self, command: str, *, timeout: float | None = DEFAULT_TIMEOUT) -> str:
        """``qRcmd``: run a monitor command on the stub; returns what it printed. An
        ``Exx`` answer raises RspError with the printed text in the message."""
        output: list[bytes] = []
        reply = await self._request(b"qRcmd," + to_hex(command.encode()), timeout, output)
        text = b"".join(output).decode("utf-8", "replace")
        if reply == b"OK":
            return text
        if not reply or parse_error(reply) is not None:
            err = _refusal(b"monitor " + command.encode(), reply)
            if text:
                err.message += f" ({text.strip()})"
            raise err
        # some stubs answer with the output itself, hex encoded, instead of O packets
        return text + self._decode_hex(b"qRcmd", reply).decode("utf-8", "replace")
