"""A GDB remote-serial-protocol (RSP) server for one session, so ``gdb-multiarch`` (or any
RSP client: an IDE, pyocd-style tools) can debug a simulated board through the core.

It speaks only to the core (:class:`SessionManager` for run control, :class:`Debugger` for
breakpoints, registers and memory), so it serves every backend alike; breakpoints gdb sets
are ordinary Debugger breakpoints (they show in ListBreakpoints and the Attach stream,
tagged with the gdb client's id) and are removed again when gdb detaches or disconnects.

What it answers (one thread, all-stop)::

    framing     $data#cs with +/- acks, QStartNoAckMode, ^C (0x03) while running
    queries     qSupported, qXfer:features:read:target.xml, qXfer:threads:read, qAttached,
                qC, qfThreadInfo/qsThreadInfo, qRcmd (monitor reset|halt|help), ?
                (``?`` on a running session halts it: attaching stops the target)
    registers   g G p P      (numbers as in the target description below)
    memory      m M X        (X with binary escaping)
    points      Z0/z0 software, Z1/z1 hardware, Z2/Z3/Z4 write/read/access watchpoints
    running     c s C S vCont? vCont;c|s|C|S, stop replies T05 (swbreak/hwbreak/watch/
                rwatch/awatch) expediting every register (gdb needs no ``g`` after a
                stop), T02 after ^C, W<code> on exit, T0b on a fault
    leaving     D (detach): gdb's points removed, then a HALTED session resumes, as
                gdbserver does (a debugger that goes away does not stop the firmware it
                looked at), unless the bridge has ``halt_on_detach``, or another gdb client
                is waiting to take over (one client at a time: the last one to detach
                decides); an EXITED or FAULTED session stays as it is. k / vKill never
                resume and never delete; a client that just disconnects leaves the
                session as it is (running or halted)
    else        the empty reply

Register numbering (the target description's ``regnum``):

* Cortex-M: ``org.gnu.gdb.arm.m-profile`` r0-r12 = 0-12, sp 13, lr 14, pc 15, xpsr 16;
  ``org.gnu.gdb.arm.m-system`` msp, psp, primask, basepri, faultmask, control = 17..
  (only those the session's machine offers: QEMU 7.2 offers none of them).
* RV32: ``org.gnu.gdb.riscv.cpu`` x0-x31 = 0-31, pc 32; ``org.gnu.gdb.riscv.csr`` with
  the machine-mode CSRs the machine offers, from 33.

Errors from the core become ``E01`` replies (the connection goes on); a broken connection
ends only that client. One client at a time: a second waits up to
``WAIT_FOR_PREVIOUS_CLIENT`` seconds for the first to leave, then is closed. Binds to
127.0.0.1 unless told otherwise.

gdb itself removes its breakpoints (``z0``) at every stop and inserts them again on
resume unless ``set breakpoint always-inserted on``; so they show in ListBreakpoints while
the target runs, or all the time with that setting.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import structlog

from machineserver.server.core import audit
from machineserver.server.core.calls import CURRENT, CallChain, Transport
from machineserver.server.core.debug import Breakpoint, BreakpointKind, Debugger, Location
from machineserver.server.core.errors import MachineServerError, Unimplemented
from machineserver.server.core.sessions import LiveSession, SessionManager
from machineserver.server.drivers.base import Arch, MachineState, RegisterAccess, StopInfo, StopReason
from machineserver.server.rsp.codec import (
    SIGINT,
    SIGKILL,
    SIGSEGV,
    SIGTRAP,
    Acks,
    CodecError,
    EventKind,
    PacketReader,
    console_reply,
    decode_rle,
    escape_binary,
    exited_reply,
    frame,
    killed_reply,
    le_hex,
    stopped_reply,
    unescape_binary,
)

log = structlog.get_logger(__name__)

PACKET_SIZE = 0x4000  # what qSupported announces (bytes of packet data we accept)
MAX_MEMORY_READ = (PACKET_SIZE - 8) // 2
THREAD_ID = 1
WAIT_FOR_PREVIOUS_CLIENT = 3.0  # seconds a new client waits for the previous one to leave

ARM_CORE = (*(f"r{i}" for i in range(13)), "sp", "lr", "pc", "xpsr")
ARM_SYSTEM = ("msp", "psp", "primask", "basepri", "faultmask", "control")
RV_CORE = (*(f"x{i}" for i in range(32)), "pc")
RV_CSRS = ("mstatus", "misa", "mie", "mtvec", "mscratch", "mepc", "mcause", "mtval", "mip")

_POINT_KINDS = {
    0: BreakpointKind.SOFTWARE,
    1: BreakpointKind.HARDWARE,
    2: BreakpointKind.WATCH_WRITE,
    3: BreakpointKind.WATCH_READ,
    4: BreakpointKind.WATCH_ACCESS,
}
_WATCH_STOP_KEYS = {
    BreakpointKind.WATCH_WRITE: "watch",
    BreakpointKind.WATCH_READ: "rwatch",
    BreakpointKind.WATCH_ACCESS: "awatch",
}
_THREAD = ("thread", f"{THREAD_ID:x}")  # the one thread, in every T stop reply
_client_ids = itertools.count(1)


class ProtocolError(Exception):
    """A malformed packet from the client (answered with E01)."""


# --------------------------------------------------------------------------- registers


@dataclass(frozen=True)
class RegisterLayout:
    arch: Arch
    names: tuple[str, ...]  # index = gdb register number
    xml: bytes

    @property
    def pc(self) -> int:
        return self.names.index("pc")


def build_layout(arch: Arch, offered: Sequence[str] | None) -> RegisterLayout:
    """The registers gdb sees, from those the session's machine offers (None: only the
    core registers every backend has)."""
    have = set(offered or ())
    reg = '    <reg name="{}" bitsize="32" regnum="{}"{}/>\n'
    parts: list[str] = ['<?xml version="1.0"?>\n<!DOCTYPE target SYSTEM "gdb-target.dtd">\n<target version="1.0">\n']
    names: list[str] = []

    def add(name: str, extra: str = "") -> None:
        parts.append(reg.format(name, len(names), extra))
        names.append(name)

    if arch is Arch.ARM_CORTEX_M:
        parts.append("  <architecture>arm</architecture>\n")
        parts.append('  <feature name="org.gnu.gdb.arm.m-profile">\n')
        for n in ARM_CORE:
            extra = ' type="data_ptr"' if n == "sp" else ' type="code_ptr"' if n == "pc" else ' type="int"'
            add(n, extra)
        parts.append("  </feature>\n")
        system = [n for n in ARM_SYSTEM if n in have]
        # gdb 13 requires msp and psp in m-system; offer the feature only with both
        if "msp" in system and "psp" in system:
            parts.append('  <feature name="org.gnu.gdb.arm.m-system">\n')
            for n in system:
                add(n, ' type="data_ptr"' if n in ("msp", "psp") else ' type="int" group="system"')
            parts.append("  </feature>\n")
    else:
        parts.append("  <architecture>riscv:rv32</architecture>\n")
        parts.append('  <feature name="org.gnu.gdb.riscv.cpu">\n')
        for n in RV_CORE:
            extra = ' type="code_ptr"' if n == "pc" else ' type="int"'
            add(n, extra)
        parts.append("  </feature>\n")
        csrs = [n for n in RV_CSRS if n in have]
        if csrs:
            parts.append('  <feature name="org.gnu.gdb.riscv.csr">\n')
            for n in csrs:
                add(n, ' type="int" group="csr"')
            parts.append("  </feature>\n")
    parts.append("</target>\n")
    return RegisterLayout(arch, tuple(names), "".join(parts).encode())


def _le32(value: int) -> bytes:
    return le_hex(value, 4)


def _u32(value: int) -> bytes:
    return (value & 0xFFFFFFFF).to_bytes(4, "little")


# --------------------------------------------------------------------------- the server


_DEBUG = "/machineserver.v1.DebugService/"
_SESSION = "/machineserver.v1.SessionService/"
_PACKET_METHODS = {
    b"g": "ReadRegisters", b"p": "ReadRegisters", b"G": "WriteRegister", b"P": "WriteRegister",
    b"m": "ReadMemory", b"M": "WriteMemory", b"X": "WriteMemory",
    b"Z": "SetBreakpoint", b"z": "ClearBreakpoint",
    b"c": "Continue", b"C": "Continue", b"s": "Step", b"S": "Step",
    b"?": "Halt",  # a stop query halts a running target (attaching stops it)
}


def method_for_packet(pkt: bytes) -> str | None:
    """The RPC with the same effect as a packet that reads or changes the target (so the
    same hooks and per-method rules apply to it); None for protocol chatter."""
    if pkt.startswith(b"vCont;"):
        action = pkt[6:7]
        return _DEBUG + ("Step" if action in (b"s", b"S") else "Continue")
    if pkt.startswith(b"qRcmd,"):
        try:
            words = bytes.fromhex(pkt[6:].decode()).decode(errors="replace").split()
        except ValueError:
            return None
        if words[:1] == ["reset"]:
            return _SESSION + "ResetSession"
        return _DEBUG + "Halt" if words[:1] == ["halt"] else None
    name = _PACKET_METHODS.get(pkt[:1])
    return _DEBUG + name if name else None


class GdbServer:
    """Serves one session over RSP. ``await start(host, port)`` (port 0: a free one),
    ``await stop()``; ``clients`` is the number of connected gdb clients."""

    def __init__(self, sessions: SessionManager, debugger: Debugger, live: LiveSession,
                 calls: CallChain | None = None, caller: Mapping[str, str] | None = None, *,
                 halt_on_detach: bool = False) -> None:
        """``halt_on_detach``: a detach leaves the machine halted (default: it resumes)."""
        self.sessions = sessions
        self.halt_on_detach = halt_on_detach
        self.debugger = debugger
        self.live = live
        # every packet that reads or changes the target goes through the engine's call
        # chain, as the caller who started the bridge (its metadata: identity, request id)
        self.calls = calls or CallChain()
        self.caller = dict(caller or {})
        self.caller.pop("x-request-id", None)  # each packet gets its own
        self.opener = CURRENT.get()  # the call that started the bridge: its connections run as its caller
        self._server: asyncio.Server | None = None
        self._conns: set[_Connection] = set()
        self._one_at_a_time = asyncio.Lock()
        self.address: tuple[str, int] | None = None

    @property
    def clients(self) -> int:
        """Connected gdb clients (the one being served and any waiting for it)."""
        return len(self._conns)

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        if self._server is not None:
            assert self.address is not None
            return self.address
        self._server = await asyncio.start_server(self._serve, host or "127.0.0.1", port)
        sock = self._server.sockets[0].getsockname()
        self.address = (str(sock[0]), int(sock[1]))
        log.info("gdbserver_started", session_id=self.live.id, host=self.address[0], port=self.address[1])
        return self.address

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for conn in list(self._conns):
            conn.close()
        tasks = [c.task for c in self._conns if c.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=10)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 5)
        log.info("gdbserver_stopped", session_id=self.live.id)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        CURRENT.set(self.opener)  # this connection's task: packets are commands within the bridge's call
        conn = _Connection(self, reader, writer)
        conn.task = asyncio.current_task()
        self._conns.add(conn)
        try:
            # one client at a time: a new one waits (its packets stay in the socket) while
            # the previous one finishes detaching; refused if that one is still attached
            try:
                await asyncio.wait_for(self._one_at_a_time.acquire(), WAIT_FOR_PREVIOUS_CLIENT)
            except TimeoutError:
                conn.log.warning("gdb_refused", reason="another gdb client is attached to this session")
                conn.event(audit.GDB_CONNECT, "UNAVAILABLE")
                writer.close()
                return
            try:
                await conn.serve()
            finally:
                self._one_at_a_time.release()
        finally:
            self._conns.discard(conn)


class _TargetAccess:
    """A connection's register and memory packets (g G p P m M X), in gdb's register
    numbering (the layout its target.xml describes), on the connection's session."""

    def __init__(self, live: LiveSession, debugger: Debugger) -> None:
        self.live = live
        self.debugger = debugger
        self.layout: RegisterLayout | None = None

    # ------------------------------------------------------------------ registers

    def registers(self) -> RegisterLayout:
        if self.layout is None:
            machine = self.live.machine
            offered = None
            if machine is not None and machine.has(RegisterAccess):
                offered = list(machine.capability(RegisterAccess).register_names())
            self.layout = build_layout(self.live.board.arch, offered)
        return self.layout

    async def read_values(self) -> list[int | None]:
        layout = self.registers()
        regs = await self.debugger.read_registers(self.live, list(layout.names))
        return [regs.get(n) for n in layout.names]

    async def read_all_registers(self) -> bytes:
        values = await self.read_values()
        return b"".join(b"xxxxxxxx" if v is None else _le32(v) for v in values)

    async def write_all_registers(self, data: bytes) -> bytes:
        layout = self.registers()
        try:
            raw = bytes.fromhex(data.decode())
        except ValueError:
            raise ProtocolError("G: bad hex") from None
        audit.note(resource=f"{self.live.record.name}/registers", address=0, length=len(raw))
        current = await self.read_values()
        for i, name in enumerate(layout.names):
            chunk = raw[i * 4 : i * 4 + 4]
            if len(chunk) < 4:
                break
            value = int.from_bytes(chunk, "little")
            if value != current[i]:
                await self.debugger.write_register(self.live, name, value)
        # G writes them all: the entry says so (write_register named each one it wrote)
        audit.note(resource=f"{self.live.record.name}/registers", address=0, length=len(raw))
        return b"OK"

    def _regnum(self, text: bytes) -> str:
        try:
            n = int(text, 16)
        except ValueError:
            raise ProtocolError("bad register number") from None
        names = self.registers().names
        if not 0 <= n < len(names):
            raise ProtocolError(f"no register {n}")
        return names[n]

    async def read_register(self, args: bytes) -> bytes:
        name = self._regnum(args)
        regs = await self.debugger.read_registers(self.live, [name])
        return _le32(regs[name])

    async def write_register(self, args: bytes) -> bytes:
        num, _, value = args.partition(b"=")
        name = self._regnum(num)
        try:
            raw = bytes.fromhex(value.decode())
        except ValueError:
            raise ProtocolError("P: bad hex") from None
        audit.note(resource=f"{self.live.record.name}/registers/{name}", register=name, address=int(num, 16),
                   length=len(raw))
        await self.debugger.write_register(self.live, name, int.from_bytes(raw[:4], "little"))
        audit.note(address=int(num, 16), length=len(raw))  # gdb's numbering, whatever the machine's
        return b"OK"

    # ------------------------------------------------------------------ memory

    @staticmethod
    def _addr_len(text: bytes) -> tuple[int, int]:
        try:
            a, n = text.split(b",", 1)
            return int(a, 16), int(n, 16)
        except ValueError:
            raise ProtocolError("bad address,length") from None

    async def read_memory(self, args: bytes) -> bytes:
        address, length = self._addr_len(args)
        if length == 0:
            return b""
        data = await self.debugger.read_memory(self.live, address, min(length, MAX_MEMORY_READ))
        return data.hex().encode()

    async def write_memory(self, args: bytes, *, binary: bool) -> bytes:
        head, sep, payload = args.partition(b":")
        if not sep:
            raise ProtocolError("missing ':'")
        address, length = self._addr_len(head)
        audit.note(resource=self.live.record.name, address=address, length=length)
        if binary:
            data = unescape_binary(payload)
        else:
            try:
                data = bytes.fromhex(payload.decode())
            except ValueError:
                raise ProtocolError("M: bad hex") from None
        if len(data) != length:
            raise ProtocolError(f"length {length} but {len(data)} bytes of data")
        if length == 0:
            return b"OK"  # gdb probes X support this way
        await self.debugger.write_memory(self.live, address, data)
        return b"OK"


class _Connection:
    def __init__(self, server: GdbServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.server = server
        self.sessions = server.sessions
        self.debugger = server.debugger
        self.live = server.live
        self.reader = reader
        self.writer = writer
        self.client_id = f"gdb-{next(_client_ids)}"
        peer = writer.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        self.task: asyncio.Task[None] | None = None
        self.acks = Acks()  # ack mode until QStartNoAckMode; resends the last reply on '-'
        self.events: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
        self.deferred: collections.deque[tuple[str, bytes]] = collections.deque()
        self.target = _TargetAccess(self.live, self.debugger)  # register and memory packets
        self.features: set[str] = set()
        self.points: dict[tuple[int, int, int], int] = {}  # (type, addr, size) -> our bp id
        self.closing = False
        self.log = log.bind(session_id=self.live.id, gdb_client=self.client_id, peer=self.peer)

    def close(self) -> None:
        self.closing = True
        self.writer.close()

    def event(self, method: str, code: str = "OK") -> None:
        """A connection event (gdb/connect, gdb/disconnect) for the audit log."""
        calls = self.server.calls
        call = calls.open(method, self.server.caller, transport=Transport.GDB, peer=self.peer)
        call.code = code
        call.audit.update(resource=self.live.record.name, client=self.client_id)
        calls.record(call)

    # ------------------------------------------------------------------ I/O

    async def _read_loop(self) -> None:
        pr = PacketReader()
        try:
            while True:
                data = await self.reader.read(65536)
                if not data:
                    break
                for ev in pr.feed(data):
                    if ev.kind is EventKind.ACK:
                        resend = self.acks.received(ev)
                        if resend:
                            self.writer.write(resend)
                        continue
                    if ev.kind is EventKind.NOISE:
                        continue  # between packets: skipped
                    answer = self.acks.answer(ev)
                    if answer:
                        self.writer.write(answer)
                    if ev.kind is not EventKind.BAD_CHECKSUM:
                        await self.events.put(ev)  # a packet or ^C
        except (ConnectionError, OSError):
            pass
        finally:
            await self.events.put(("eof", b""))

    def send(self, data: bytes) -> None:
        pkt = frame(data)
        self.acks.sent(pkt)
        self.writer.write(pkt)

    async def serve(self) -> None:
        self.log.info("gdb_connected")
        self.event(audit.GDB_CONNECT)
        reader_task = asyncio.create_task(self._read_loop())
        try:
            while not self.closing:
                kind, body = self.deferred.popleft() if self.deferred else await self.events.get()
                if kind == "eof":
                    break
                if kind == "interrupt":
                    continue  # not running: nothing to stop
                try:
                    reply = await self.dispatch(decode_rle(body))
                except MachineServerError as exc:
                    self.log.info("gdb_request_failed", packet=body[:40].decode(errors="replace"), error=str(exc))
                    reply = b"E01"
                except (ProtocolError, CodecError) as exc:
                    self.log.info("gdb_bad_packet", packet=body[:40].decode(errors="replace"), error=str(exc))
                    reply = b"E01"
                except (ConnectionError, OSError):
                    break
                except Exception:  # never let one packet take the server down
                    self.log.exception("gdb_request_crashed", packet=body[:40].decode(errors="replace"))
                    reply = b"E01"
                if reply is not None:
                    self.send(reply)
                    if body == b"QStartNoAckMode" and reply == b"OK":
                        self.acks.enabled = False
                with contextlib.suppress(ConnectionError, OSError):
                    await self.writer.drain()
        finally:
            reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader_task
            await self._remove_points()
            self.writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.writer.wait_closed(), 2)
            self.log.info("gdb_disconnected")
            self.event(audit.GDB_DISCONNECT)

    # ------------------------------------------------------------------ dispatch

    async def dispatch(self, pkt: bytes) -> bytes | None:
        """One packet: through the call chain when it touches the target (as the RPC with
        the same effect), straight to :meth:`handle` when it is protocol chatter."""
        method = method_for_packet(pkt)
        if method is None:
            return await self.handle(pkt)
        call = self.server.calls.open(method, self.server.caller, transport=Transport.GDB, peer=self.peer)
        return await self.server.calls.run(call, lambda: self.handle(pkt))

    async def handle(self, pkt: bytes) -> bytes | None:
        if not pkt:
            return b""
        c = pkt[:1]
        if c == b"q" or c == b"Q":
            return await self.query(pkt)
        if c == b"?":
            return await self.stop_status()
        if c == b"g":
            return await self.target.read_all_registers()
        if c == b"G":
            return await self.target.write_all_registers(pkt[1:])
        if c == b"p":
            return await self.target.read_register(pkt[1:])
        if c == b"P":
            return await self.target.write_register(pkt[1:])
        if c == b"m":
            return await self.target.read_memory(pkt[1:])
        if c == b"M":
            return await self.target.write_memory(pkt[1:], binary=False)
        if c == b"X":
            return await self.target.write_memory(pkt[1:], binary=True)
        if c in (b"Z", b"z"):
            return await self.point(pkt)
        if c in (b"c", b"C"):
            return await self.resume(step=False)
        if c in (b"s", b"S"):
            return await self.resume(step=True)
        if c == b"v":
            return await self.v_packet(pkt)
        if c == b"H":
            return b"OK"
        if c == b"T":
            return b"OK"  # thread alive
        if c == b"D":
            await self._remove_points()
            resumed = await self._resume_after_detach()
            self.send(b"OK")
            self.closing = True
            self.log.info("gdb_detached", resumed=resumed)
            return None
        if c == b"k":
            await self._remove_points()
            self.closing = True  # kill never deletes or stops the session
            self.log.info("gdb_killed")
            return None
        return b""

    async def query(self, pkt: bytes) -> bytes:
        if pkt.startswith(b"qSupported"):
            if b":" in pkt:
                self.features = {f.rstrip(b"+").decode() for f in pkt.split(b":", 1)[1].split(b";") if f.endswith(b"+")}
            return (
                b"PacketSize=%x;qXfer:features:read+;qXfer:threads:read+;QStartNoAckMode+;"
                b"vContSupported+;swbreak+;hwbreak+" % PACKET_SIZE
            )
        if pkt == b"QStartNoAckMode":
            return b"OK"
        if pkt.startswith(b"qXfer:features:read:"):
            return self.xfer(pkt[len(b"qXfer:features:read:") :], "target.xml")
        if pkt.startswith(b"qXfer:threads:read:"):
            return self.xfer(pkt[len(b"qXfer:threads:read:") :], "")
        if pkt == b"qAttached" or pkt.startswith(b"qAttached:"):
            return b"1"
        if pkt == b"qC":
            return b"QC%x" % THREAD_ID
        if pkt == b"qfThreadInfo":
            return b"m%x" % THREAD_ID
        if pkt == b"qsThreadInfo":
            return b"l"
        if pkt.startswith(b"qRcmd,"):
            return await self.monitor(pkt[len(b"qRcmd,") :])
        if pkt.startswith(b"qThreadExtraInfo"):
            return self.live.id.encode().hex().encode()
        return b""

    async def v_packet(self, pkt: bytes) -> bytes | None:
        if pkt == b"vCont?":
            return b"vCont;c;C;s;S"
        if pkt.startswith(b"vCont;"):
            action = pkt[len(b"vCont;") :].split(b";")[0].split(b":")[0]
            if not action or action[:1] not in b"cCsS":
                return b"E01"
            return await self.resume(step=action[:1] in b"sS")
        if pkt.startswith(b"vKill"):
            await self._remove_points()
            self.send(b"OK")
            self.closing = True
            self.log.info("gdb_killed")
            return None
        if pkt == b"vMustReplyEmpty":
            return b""
        return b""

    # ------------------------------------------------------------------ target description

    def xfer(self, args: bytes, expected_annex: str) -> bytes:
        """qXfer reads: the target description (annex target.xml) or the thread list."""
        try:
            annex, span = args.split(b":", 1)
            off_s, len_s = span.split(b",", 1)
            offset, length = int(off_s, 16), int(len_s, 16)
        except ValueError:
            raise ProtocolError("bad qXfer request") from None
        if annex.decode(errors="replace") != expected_annex:
            return b"E00"
        if expected_annex == "target.xml":
            xml = self.target.registers().xml
        else:
            xml = b'<?xml version="1.0"?>\n<threads>\n  <thread id="%x" core="0" name="%s"/>\n</threads>\n' % (
                THREAD_ID, self.live.board.name.encode())
        chunk = xml[offset : offset + length]
        more = offset + length < len(xml)
        return (b"m" if more else b"l") + escape_binary(chunk)

    # ------------------------------------------------------------------ stop replies

    async def stop_reply(
        self, info: StopInfo | None, *, interrupted: bool = False, stepping: bool = False
    ) -> bytes:
        if info is None:
            return stopped_reply(SIGTRAP)
        if info.reason is StopReason.EXIT:
            return exited_reply(info.exit_code or 0)
        sig = SIGTRAP
        extra: list[tuple[str, str]] = []
        if info.reason is StopReason.HALT:
            sig = SIGINT if interrupted or not stepping else SIGTRAP
        elif info.reason is StopReason.FAULT:
            sig = SIGSEGV
        elif info.reason is StopReason.BREAKPOINT and not stepping:
            hw = any(
                bp.address == info.pc and bp.kind is BreakpointKind.HARDWARE
                for bp in self.debugger.list_breakpoints(self.live)
            )
            key = "hwbreak" if hw else "swbreak"
            if key in self.features:
                extra.append((key, ""))
        elif info.reason is StopReason.WATCHPOINT and info.watch_address is not None:
            extra.append((self._watch_key(info), f"{info.watch_address:x}"))
        return stopped_reply(sig, registers=await self.expedite(info.pc), fields=[*extra, _THREAD])

    async def expedite(self, pc: int) -> dict[int, bytes]:
        """Every register (number -> value), so gdb needs no ``g`` after a stop (one round
        trip less per step); just the pc when the registers cannot be read."""
        layout = self.target.registers()
        try:
            values = await self.target.read_values()
        except MachineServerError:
            return {layout.pc: _u32(pc)}
        return {i: _u32(v) for i, v in enumerate(values) if v is not None}

    def _watch_key(self, info: StopInfo) -> str:
        assert info.watch_address is not None
        for bp in self.debugger.list_breakpoints(self.live):
            if bp.kind.watch is not None and bp.address <= info.watch_address < bp.address + bp.size:
                return _WATCH_STOP_KEYS[bp.kind]
        return "rwatch" if info.watch_access == "read" else "watch"

    async def stop_status(self) -> bytes:
        """``?``: a session found running is halted (attaching stops the target)."""
        state = self.live.state
        if state is MachineState.RUNNING:
            info = await self.sessions.pause(self.live, "halted by gdb")
            return await self.stop_reply(info, interrupted=True)
        if state is MachineState.EXITED:
            return exited_reply(self.live.record.exit_code or 0)
        if state is MachineState.FAULTED:
            return await self.stop_reply(self.live.last_stop)
        if state is MachineState.HALTED:
            regs = await self.debugger.read_registers(self.live, ["pc"])
            return stopped_reply(SIGTRAP, registers=await self.expedite(regs["pc"]), fields=[_THREAD])
        return killed_reply(SIGKILL)  # off or failed: there is no process

    # ------------------------------------------------------------------ run control

    async def resume(self, *, step: bool) -> bytes | None:
        live = self.live
        if live.state is MachineState.EXITED:
            return exited_reply(live.record.exit_code or 0)
        if live.state is MachineState.FAULTED:
            return await self.stop_reply(live.last_stop)  # it cannot go on: the fault again
        if step:
            info = await self.sessions.step(live, 1)
            return await self.stop_reply(info, stepping=True)
        await self.sessions.run(live)
        waiter = asyncio.create_task(self.sessions.ops.wait_for_stop(live, None))
        interrupted = False
        try:
            while True:
                getter = asyncio.create_task(self.events.get())
                done, _ = await asyncio.wait({waiter, getter}, return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await getter
                    break
                kind, body = getter.result()
                if kind == "interrupt":
                    if not waiter.done():
                        interrupted = True
                        await self.sessions.pause(live, "interrupted by gdb")
                    continue
                if kind == "eof":
                    # gdb went away while the target runs: leave it running
                    self.closing = True
                    waiter.cancel()
                    with contextlib.suppress(asyncio.CancelledError, MachineServerError):
                        await waiter
                    return None
                # all-stop: gdb sends nothing else while running; keep it for after the stop
                self.deferred.append((kind, body))
            try:
                info = waiter.result()
            except MachineServerError:
                # read afresh (annotated: mypy would keep the state narrowed from before the awaits)
                state: MachineState = live.state
                if state is MachineState.EXITED:
                    return exited_reply(live.record.exit_code or 0)
                return killed_reply(SIGKILL)
        finally:
            if not waiter.done():
                waiter.cancel()
        return await self.stop_reply(info, interrupted=interrupted)

    # ------------------------------------------------------------------ breakpoints and watchpoints

    async def point(self, pkt: bytes) -> bytes:
        insert = pkt[:1] == b"Z"
        try:
            typ_s, addr_s, kind_s = pkt[1:].split(b";", 1)[0].split(b",")
            typ, address, size = int(typ_s), int(addr_s, 16), int(kind_s, 16)
        except ValueError:
            raise ProtocolError("bad Z/z packet") from None
        audit.note(resource=self.live.record.name, address=address, length=size)
        kind = _POINT_KINDS.get(typ)
        if kind is None:
            return b""
        watch = kind.watch is not None
        key = (typ, address, size if watch else 0)
        if insert:
            if key in self.points:
                return b"OK"
            try:
                bp = await self.debugger.set_breakpoint(
                    self.live, Location(address=address), kind, size if watch else 0, client=self.client_id
                )
            except Unimplemented:
                return b""  # gdb then says the target cannot do it
            # set_breakpoint is idempotent: a point someone else set is not ours to remove
            self.points[key] = bp.id if bp.client == self.client_id else 0
            return b"OK"
        bp_id = self.points.pop(key, None)
        if bp_id:
            await self._clear(bp_id)
        return b"OK"

    async def _clear(self, bp_id: int) -> None:
        st = self.debugger.state(self.live)
        bp: Breakpoint | None = st.breakpoints.get(bp_id)
        if bp is not None and bp.client == self.client_id:
            await self.debugger.clear_breakpoint(self.live, bp_id)

    async def _remove_points(self) -> None:
        """Remove every point this client set. A backend that cannot edit points while
        running (QEMU's gdbstub) gets a short pause around the removal, then runs on."""
        self.points = {}
        if not self.sessions.contains(self.live):
            return
        try:
            await self.debugger.clear_client_breakpoints(self.live, self.client_id)
            return
        except MachineServerError as exc:
            if self.live.state is not MachineState.RUNNING:
                self.log.warning("gdb_breakpoints_not_removed", error=str(exc))
                return
        try:
            info = await self.sessions.pause(self.live, "removing gdb's breakpoints")
            await self.debugger.clear_client_breakpoints(self.live, self.client_id)
            # read afresh (annotated: mypy would keep the state narrowed from before the awaits)
            state: MachineState = self.live.state
            if state is MachineState.HALTED and info is not None and info.reason is StopReason.HALT:
                await self.sessions.run(self.live)  # only a stop of our own making
        except MachineServerError as exc:
            self.log.warning("gdb_breakpoints_not_removed", error=str(exc))

    async def _resume_after_detach(self) -> bool:
        """Run a HALTED session again after a detach (see the module docstring), as a
        Continue through the call chain (its rules and audit apply); True when it did."""
        live = self.live
        if (self.server.halt_on_detach or self.server.clients > 1 or not self.sessions.contains(live)
                or live.state is not MachineState.HALTED):
            return False
        call = self.server.calls.open(_DEBUG + "Continue", self.server.caller, transport=Transport.GDB, peer=self.peer)

        async def resume() -> None:
            await self.sessions.run(live)

        try:
            await self.server.calls.run(call, resume)
        except MachineServerError as exc:
            self.log.warning("gdb_detach_not_resumed", error=str(exc))
            return False
        return True

    # ------------------------------------------------------------------ monitor commands

    def console(self, text: str) -> None:
        self.send(console_reply(text))

    async def monitor(self, hexcmd: bytes) -> bytes:
        try:
            cmd = bytes.fromhex(hexcmd.decode()).decode(errors="replace").strip()
        except ValueError:
            raise ProtocolError("qRcmd: bad hex") from None
        words = cmd.split()
        if not words or words[0] == "help":
            self.console(
                "monitor reset [halt]  reset the board and leave it halted\n"
                "monitor halt          halt the board\n"
                f"session {self.live.id} ({self.live.board.name}, {self.live.record.backend})\n"
            )
            return b"OK"
        if words[0] == "reset" and (len(words) == 1 or words[1:] in (["halt"], ["init"])):
            await self.sessions.reset(self.live, cause="gdb monitor reset")
            self.console(f"session {self.live.id} reset, halted\n")
            return b"OK"
        if words == ["halt"]:
            if self.live.state is MachineState.RUNNING:
                await self.sessions.pause(self.live, "halted by gdb")
            self.console(f"session {self.live.id} is {self.live.state.value}\n")
            return b"OK"
        self.console(f"unknown monitor command {cmd!r}; try 'monitor help'\n")
        return b"E01"
