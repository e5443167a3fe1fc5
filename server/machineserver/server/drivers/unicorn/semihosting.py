"""ARM semihosting operations, shared by Cortex-M (``bkpt 0xab``) and RISC-V
(``slli x0,x0,0x1f; ebreak; srai x0,x0,7``). 32-bit targets: SYS_EXIT takes the
reason code itself; SYS_EXIT_EXTENDED takes a pointer to {reason, subcode}."""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass
from typing import Protocol

SYS_OPEN, SYS_CLOSE, SYS_WRITEC, SYS_WRITE0, SYS_WRITE, SYS_READ, SYS_READC = 1, 2, 3, 4, 5, 6, 7
SYS_ISTTY, SYS_SEEK, SYS_FLEN, SYS_CLOCK, SYS_TIME, SYS_ERRNO = 9, 0x0A, 0x0C, 0x10, 0x11, 0x13
SYS_GET_CMDLINE, SYS_HEAPINFO, SYS_EXIT, SYS_EXIT_EXTENDED = 0x15, 0x16, 0x18, 0x20
SYS_ELAPSED, SYS_TICKFREQ = 0x30, 0x31
ADP_STOPPED_APPLICATION_EXIT = 0x20026
_MASK = 0xFFFFFFFF


class SemihostHost(Protocol):
    def mem_read(self, address: int, size: int) -> bytes: ...

    def mem_write(self, address: int, data: bytes) -> None: ...

    def console_out(self, data: bytes) -> None: ...

    def console_read(self, size: int) -> bytes: ...

    def now_cycles(self) -> int: ...

    @property
    def cpu_hz(self) -> int: ...


@dataclass
class SemihostResult:
    value: int  # goes back to r0 / a0
    exit_code: int | None = None  # set: the program ended


def _words(host: SemihostHost, address: int, n: int) -> tuple[int, ...]:
    return struct.unpack(f"<{n}I", host.mem_read(address, 4 * n))


def _cstring(host: SemihostHost, address: int, limit: int = 4096) -> bytes:
    out = bytearray()
    while len(out) < limit:
        chunk = host.mem_read(address + len(out), 64 - ((address + len(out)) & 63))
        end = chunk.find(b"\0")
        if end >= 0:
            out += chunk[:end]
            break
        out += chunk
    return bytes(out)


def semihost_call(host: SemihostHost, op: int, arg: int) -> SemihostResult:
    """Run one operation; memory errors propagate (the caller turns them into a fault)."""
    if op == SYS_WRITEC:
        host.console_out(host.mem_read(arg, 1))
        return SemihostResult(0)
    if op == SYS_WRITE0:
        host.console_out(_cstring(host, arg))
        return SemihostResult(0)
    if op == SYS_WRITE:
        fh, buf, length = _words(host, arg, 3)
        if fh in (1, 2) and length:
            host.console_out(host.mem_read(buf, length))
            return SemihostResult(0)
        return SemihostResult(length)
    if op == SYS_READ:
        fh, buf, length = _words(host, arg, 3)
        data = host.console_read(length) if fh == 0 else b""
        if data:
            host.mem_write(buf, data)
        return SemihostResult(length - len(data))
    if op == SYS_READC:
        data = host.console_read(1)
        return SemihostResult(data[0] if data else _MASK)
    if op == SYS_OPEN:
        name_ptr, mode, length = _words(host, arg, 3)
        if host.mem_read(name_ptr, length) == b":tt":
            return SemihostResult(0 if mode < 4 else (1 if mode < 8 else 2))
        return SemihostResult(_MASK)
    if op in (SYS_CLOSE, SYS_SEEK, SYS_ERRNO):
        return SemihostResult(0)
    if op == SYS_ISTTY:
        return SemihostResult(1)
    if op == SYS_FLEN:
        return SemihostResult(0)
    if op == SYS_CLOCK:
        return SemihostResult((host.now_cycles() * 100 // max(host.cpu_hz, 1)) & _MASK)
    if op == SYS_TIME:
        return SemihostResult(int(time.time()) & _MASK)
    if op == SYS_GET_CMDLINE:
        buf, _length = _words(host, arg, 2)
        host.mem_write(buf, b"\0")
        host.mem_write(arg + 4, struct.pack("<I", 0))
        return SemihostResult(0)
    if op == SYS_HEAPINFO:
        (block,) = _words(host, arg, 1)
        host.mem_write(block, bytes(16))
        return SemihostResult(0)
    if op == SYS_ELAPSED:
        host.mem_write(arg, struct.pack("<Q", host.now_cycles()))
        return SemihostResult(0)
    if op == SYS_TICKFREQ:
        return SemihostResult(host.cpu_hz & _MASK)
    if op == SYS_EXIT:
        return SemihostResult(0, exit_code=0 if arg == ADP_STOPPED_APPLICATION_EXIT else 1)
    if op == SYS_EXIT_EXTENDED:
        reason, subcode = _words(host, arg, 2)
        code = subcode if reason == ADP_STOPPED_APPLICATION_EXIT else 1
        return SemihostResult(0, exit_code=code - (1 << 32) if code & 0x80000000 else code)
    return SemihostResult(_MASK)
