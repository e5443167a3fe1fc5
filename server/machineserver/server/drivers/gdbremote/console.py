"""The console endpoint of a gdbremote session (``gdbremote.console``): a TCP socket
(``tcp:HOST:PORT``), a Unix socket (``unix:/path``) or a serial device or pty
(``serial:/dev/ttyX``, opened non-blocking in raw mode). A reader task feeds what the
target prints to ``MachineEvents.console_output``; :class:`RemoteConsoleInput` writes to
it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import termios
import tty

from machineserver.server.drivers.base import BackendFailed, BadRequest, ConsoleInput, MachineEvents


def parse_endpoint(spec: str) -> tuple[str, str]:
    """("tcp", "HOST:PORT") | ("unix", path) | ("serial", path); BadRequest otherwise."""
    kind, sep, where = spec.partition(":")
    if not sep or kind not in ("tcp", "unix", "serial") or not where:
        raise BadRequest(f"gdbremote.console {spec!r} is not tcp:HOST:PORT, unix:/path or serial:/dev/ttyX",
                         field="extra")
    if kind == "tcp":
        host, _, port = where.rpartition(":")
        if not host or not port.isdigit():
            raise BadRequest(f"gdbremote.console {spec!r}: expected tcp:HOST:PORT", field="extra")
    return kind, where


class ConsoleEndpoint:
    """One open console connection and its reader task."""

    def __init__(self, spec: str, events: MachineEvents) -> None:
        self.kind, self.where = parse_endpoint(spec)
        self.spec = spec
        self.events = events
        self._writer: asyncio.StreamWriter | None = None
        self._fd: int | None = None
        self._reader_task: asyncio.Task[None] | None = None

    async def open(self) -> None:
        try:
            if self.kind == "serial":
                self._open_serial()
                return
            if self.kind == "tcp":
                host, _, port = self.where.rpartition(":")
                reader, self._writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), 5)
            else:
                reader, self._writer = await asyncio.wait_for(asyncio.open_unix_connection(self.where), 5)
        except (OSError, TimeoutError) as exc:
            raise BackendFailed(f"cannot open the console {self.spec}: {exc}") from None
        self._reader_task = asyncio.create_task(self._pump(reader), name="gdbremote-console")

    def _open_serial(self) -> None:
        fd = os.open(self.where, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        try:
            if os.isatty(fd):
                tty.setraw(fd, termios.TCSANOW)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        asyncio.get_running_loop().add_reader(fd, self._serial_readable)

    def _serial_readable(self) -> None:
        assert self._fd is not None
        try:
            data = os.read(self._fd, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            self.events.console_output(data)
        else:  # the other side went away (a pty's master closed)
            asyncio.get_running_loop().remove_reader(self._fd)

    async def _pump(self, reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(4096):
                self.events.console_output(data)

    async def write(self, data: bytes) -> None:
        try:
            if self._fd is not None:
                view = memoryview(data)
                while view:
                    try:
                        view = view[os.write(self._fd, view):]
                    except BlockingIOError:
                        await asyncio.sleep(0.001)
                return
            if self._writer is None or self._writer.is_closing():
                raise BackendFailed(f"the console {self.spec} is closed")
            self._writer.write(data)
            await self._writer.drain()
        except OSError as exc:
            raise BackendFailed(f"cannot write to the console {self.spec}: {exc}") from None

    async def close(self) -> None:
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader_task
            self._reader_task = None
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._writer.wait_closed(), 1)
            self._writer = None
        if self._fd is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._fd)
            os.close(self._fd)
            self._fd = None


class RemoteConsoleInput(ConsoleInput):
    def __init__(self, console: ConsoleEndpoint) -> None:
        self.console = console

    async def console_input(self, data: bytes) -> None:
        await self.console.write(data)
