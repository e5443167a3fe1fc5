"""One QEMU child process and its three connections: QMP (control), the gdbstub (debug)
and the console chardev.

Every socket is a unix socket in a private temp dir that *this* process binds and
listens on before QEMU starts, then hands to QEMU as an inherited file descriptor
(``-chardev socket,fd=N,server=on``): no port races between machines, and no polling
for a socket QEMU has not created yet (a connect just waits in the listen backlog until
QEMU accepts it).

The connections are made at once, not one after the other: QMP's handshake, the console
connections and the gdbstub's (with the caller's set-up requests on it, ``on_gdb``) all
wait for the same thing, QEMU's main loop, and finish together when it runs.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import fcntl
import logging
import os
import re
import shutil
import signal
import socket
import struct
import tempfile
import termios
import threading
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from typing import SupportsIndex

from qemu.qmp import QMPClient
from qemu.qmp.error import QMPError

from machineserver.server.drivers.base import BackendFailed
from machineserver.server.rsp import RspClient
from machineserver.server.rsp.client import DEFAULT_TIMEOUT

log = logging.getLogger(__name__)

QMP_TIMEOUT = 5.0
# a reply owed to an abandoned gdbstub request (its caller was cancelled) gets as long as
# any reply does (the client's request timeout), not the library's 1 s: a QEMU whose main
# loop is busy for a second is slow, not broken. The next request's own timeout covers
# that wait too, so a reply that never comes reads as what it is: QEMU stopped answering
GDB_RESYNC_TIMEOUT = DEFAULT_TIMEOUT
START_TIMEOUT = 10.0
STDERR_LINES = 40
# stderr lines written by QEMU itself (or our plugin): the only ones that can explain a
# death; anything else there (a board model's chatter, e.g. lm3s6965evb's "Timer with
# period zero, disabling") is noise in a failure reason
_QEMU_SAYS = re.compile(r"^(?:qemu-system-[\w-]+|qemu|msplugin): ")
_WARNING = re.compile(r"^[\w-]+: warning: ")
REASON_LINES = 4


def _short_tmpdir() -> str:
    # unix socket paths are limited to 107 bytes: fall back to /tmp for a long TMPDIR
    base = tempfile.gettempdir()
    if len(base) > 60:
        base = "/tmp"
    return tempfile.mkdtemp(prefix="ms-qemu-", dir=base)


def explaining_lines(lines: Iterable[str]) -> list[str]:
    """The stderr lines that explain why QEMU ended: its own messages (``qemu-system-arm:
    ...``, ``qemu: fatal: ...``), warnings left out, plus the first line of the register
    dump that follows a fatal error; the last :data:`REASON_LINES` of them."""
    out: list[str] = []
    after_fatal = False
    for line in lines:
        text = line.strip()
        if not text:
            continue
        if after_fatal:
            out.append(text)
            after_fatal = False
        elif _QEMU_SAYS.match(text) and not _WARNING.match(text):
            out.append(text)
            after_fatal = text.startswith("qemu: fatal:")
    return out[-REASON_LINES:]


def _reason(exc: BaseException) -> str:
    """What a failed start says: the first error of a group (the connections are made
    concurrently), as its text or, when it has none, its type."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return str(exc) or type(exc).__name__


PR_SET_THP_DISABLE, PR_GET_THP_DISABLE = 41, 42
_thp_lock = threading.Lock()
_thp_spawning = 0  # spawns in progress (any thread): the flag is restored after the last
_thp_before = 0


def _prctl(option: int, value: int = 0) -> int:
    """prctl(2), or -1 where there is none (not Linux)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(option, value, 0, 0, 0))
    except (OSError, AttributeError):
        return -1


@contextlib.contextmanager
def no_huge_pages_for_children() -> Iterator[None]:
    """Processes forked inside get no transparent huge pages (``PR_SET_THP_DISABLE``,
    which fork and execve pass on); this process's own setting is restored after.

    QEMU asks for huge pages for guest RAM (``MADV_HUGEPAGE``), so each 2 MiB region a
    small guest touches costs 2 MiB: measured here (mps2-an385, crc32 loaded and run),
    a QEMU's own memory is ~19 MiB with them and ~13 MiB without, at the same speed."""
    global _thp_spawning, _thp_before
    with _thp_lock:
        if _thp_spawning == 0:
            _thp_before = max(0, _prctl(PR_GET_THP_DISABLE))
            _prctl(PR_SET_THP_DISABLE, 1)
        _thp_spawning += 1
    try:
        yield
    finally:
        with _thp_lock:
            _thp_spawning -= 1
            if _thp_spawning == 0:
                _prctl(PR_SET_THP_DISABLE, _thp_before)


def _die_with_parent_prefix() -> list[str]:
    """A command prefix that SIGKILLs QEMU when the server dies (even by SIGKILL), so no
    emulator outlives the process that controls it: util-linux ``setpriv --pdeathsig``
    (Linux). Not a ``preexec_fn``: Python code between fork and exec in a process with
    gRPC's threads can deadlock or crash the child."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "KILL", "--"] if setpriv else []


class _DeliveringReader(asyncio.StreamReader):
    """A console connection's reader that hands what arrives to ``deliver`` in the
    transport's own callback, keeping nothing: once the socket holds no unread byte,
    everything QEMU wrote to it has been delivered (see :meth:`QemuInstance.console_pending`)."""

    def __init__(self, deliver: Callable[[bytes], None]) -> None:
        super().__init__()
        self._deliver = deliver

    def feed_data(self, data: Iterable[SupportsIndex]) -> None:
        try:
            self._deliver(bytes(data))
        except Exception:  # an events sink must not break the connection
            log.exception("console_output callback failed")


class QemuInstance:
    """A started QEMU; :meth:`start` builds it, :meth:`stop` ends it (idempotent).

    ``on_exit(returncode, stderr_tail)`` is called once when the process ends, unless
    the end was asked for through :meth:`stop`; ``on_console(data)`` gets what the guest
    writes. Both may be replaced while QEMU runs (a warm spare changes hands: see
    :mod:`.spares`). ``xml_registers`` is what the gdbstub handshake claims in
    ``qSupported`` (``"arm"`` on Arm; None elsewhere).
    """

    def __init__(
        self,
        binary: str,
        args: Sequence[str],
        *,
        on_console: Callable[[bytes], None],
        on_exit: Callable[[int, str], None],
        workdir: str | None = None,
        xml_registers: str | None = None,
    ) -> None:
        self.binary = binary
        self.extra_args = list(args)
        self.dir = workdir or _short_tmpdir()
        self.on_console = on_console
        self.on_exit = on_exit
        self.xml_registers = xml_registers
        self.proc: asyncio.subprocess.Process | None = None
        self.qmp: QMPClient | None = None
        self.rsp: RspClient | None = None
        self._con_writer: asyncio.StreamWriter | None = None
        # every console connection's writer is kept: a writer that is garbage-collected
        # closes its socket, and QEMU drops what the guest writes to a closed chardev
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: list[asyncio.Task[None]] = []
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=STDERR_LINES)
        self.stopping = False
        self.exited = asyncio.Event()
        self.returncode: int | None = None

    # ------------------------------------------------------------------ start
    def command_line(self, fds: dict[str, int]) -> list[str]:
        def sock(name: str) -> str:
            return f"socket,id={name},fd={fds[name]},server=on,wait=off"

        return [
            self.binary,
            "-nographic",
            "-monitor", "none",
            "-nodefaults",
            "-S",
            "-chardev", sock("con"),
            "-serial", "chardev:con",
            "-chardev", sock("semi"),
            "-semihosting-config", "enable=on,target=native,chardev=semi",
            "-chardev", sock("gdb"),
            "-gdb", "chardev:gdb",
            "-chardev", sock("qmp"),
            "-mon", "chardev=qmp,mode=control",
            *self.extra_args,
        ]  # fmt: skip

    async def start(self, *, connect_gdb: bool = True,
                    on_gdb: Callable[[RspClient], Awaitable[None]] | None = None) -> None:
        """Start QEMU and connect to it; ``on_gdb``: requests to make on the gdbstub
        connection as soon as it is up (while QMP's handshake may still go on). Nothing
        outlives a start that fails or is cancelled (BackendFailed says why it failed)."""
        listeners: dict[str, socket.socket] = {}
        try:
            for name in ("con", "semi", "gdb", "qmp"):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.bind(os.path.join(self.dir, f"{name}.sock"))
                s.listen(1)
                listeners[name] = s
            fds = {n: s.fileno() for n, s in listeners.items()}
            with no_huge_pages_for_children():
                self.proc = await asyncio.create_subprocess_exec(
                    *_die_with_parent_prefix(), *self.command_line(fds),
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.DEVNULL,
                    stderr=asyncio.subprocess.PIPE,
                    pass_fds=list(fds.values()),
                    start_new_session=True,  # a ^C in a terminal must not reach QEMU
                )
        except OSError as exc:
            self._cleanup_dir()
            raise BackendFailed(f"cannot start {self.binary}: {exc}") from None
        finally:
            for s in listeners.values():
                s.close()
        self._tasks.append(asyncio.create_task(self._read_stderr()))
        self._tasks.append(asyncio.create_task(self._watch()))
        try:
            await asyncio.wait_for(self._connect(connect_gdb, on_gdb), START_TIMEOUT)
        except Exception as exc:
            # QEMU refused the command line (or died): report what it said
            await asyncio.sleep(0.05)
            detail = self.describe_exit() if self.proc.returncode is not None else _reason(exc)
            await self.stop()
            raise BackendFailed(f"QEMU did not start: {detail}") from None
        except BaseException:  # cancelled: no QEMU is left behind
            await asyncio.shield(self.stop(kill=True))
            raise

    async def _connect(self, connect_gdb: bool,
                       on_gdb: Callable[[RspClient], Awaitable[None]] | None) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(self._connect_qmp())
            for name in ("con", "semi"):
                group.create_task(self._connect_console(name))
            if connect_gdb:
                group.create_task(self.connect_gdb(on_gdb))

    async def _connect_qmp(self) -> None:
        qmp = QMPClient(f"qemu-{os.path.basename(self.dir)}")
        try:
            await qmp.connect(os.path.join(self.dir, "qmp.sock"))
        except BaseException:
            with contextlib.suppress(Exception):
                await qmp.disconnect()
            raise
        self.qmp = qmp

    async def _connect_console(self, name: str) -> None:
        loop = asyncio.get_running_loop()
        reader = _DeliveringReader(lambda data: self.on_console(data))
        transport, protocol = await loop.create_unix_connection(
            lambda: asyncio.StreamReaderProtocol(reader), os.path.join(self.dir, f"{name}.sock"))
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        self._writers.append(writer)
        if name == "con":
            self._con_writer = writer

    def console_pending(self) -> int:
        """Bytes QEMU wrote to the console connections that are not delivered yet (still
        in the sockets: the event loop delivers them as it reads them)."""
        pending = 0
        for writer in self._writers:
            sock = writer.get_extra_info("socket")
            if sock is None or sock.fileno() < 0:
                continue
            try:
                raw = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
            except OSError:
                continue
            pending += struct.unpack("i", raw)[0]
        return pending

    async def connect_gdb(self, on_gdb: Callable[[RspClient], Awaitable[None]] | None = None) -> None:
        """Connect to the gdbstub; ``on_gdb``: requests to make on it first."""
        rsp = await RspClient.connect_unix(os.path.join(self.dir, "gdb.sock"),
                                           xml_registers=self.xml_registers,
                                           resync_timeout=GDB_RESYNC_TIMEOUT)
        self.rsp = rsp
        if on_gdb is not None:
            await on_gdb(rsp)

    # ------------------------------------------------------------------ tasks
    async def _read_stderr(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        with contextlib.suppress(asyncio.CancelledError):
            while line := await self.proc.stderr.readline():
                self.stderr_tail.append(line.decode("utf-8", "replace").rstrip())

    async def _watch(self) -> None:
        assert self.proc is not None
        rc = await self.proc.wait()
        self.returncode = rc
        # let the stderr reader drain what QEMU wrote last
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._tasks[0]), 0.5)
        self.exited.set()
        if not self.stopping:
            # QMP now, before anything reads its EOF; the gdbstub connection stays open
            # so that a reader still gets the stop/exit reply QEMU sent before it ended
            if self.qmp is not None:
                qmp, self.qmp = self.qmp, None
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(qmp.disconnect(), 2.0)
            try:
                self.on_exit(rc, "\n".join(self.stderr_tail))
            except Exception:
                log.exception("exit callback failed")

    def describe_exit(self) -> str:
        rc = self.returncode if self.returncode is not None else (
            self.proc.returncode if self.proc else None)
        if rc is None:
            status = "still running"
        elif rc < 0:
            try:
                status = f"killed by {signal.Signals(-rc).name}"
            except ValueError:
                status = f"killed by signal {-rc}"
        else:
            status = f"exit status {rc}"
        lines = explaining_lines(self.stderr_tail)
        return status + (": " + " | ".join(lines) if lines else "")

    # ------------------------------------------------------------------ control
    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None and not self.exited.is_set()

    async def qmp_call(self, cmd: str, args: dict[str, object] | None = None,
                       limit: float = QMP_TIMEOUT) -> object:
        if self.qmp is None or not self.alive:
            raise BackendFailed("QEMU is not running")
        try:
            return await asyncio.wait_for(self.qmp.execute(cmd, args), limit)
        except TimeoutError:
            raise BackendFailed(f"QMP {cmd} timed out after {limit} s") from None
        except (QMPError, EOFError, OSError) as exc:
            if self.proc is not None and self.proc.returncode is not None:
                raise BackendFailed(f"QEMU ended: {self.describe_exit()}") from None
            raise BackendFailed(f"QMP {cmd} failed: {exc}") from None

    async def hmp(self, command: str, limit: float = QMP_TIMEOUT) -> str:
        """An HMP command; QEMU reports HMP errors as a successful result text."""
        out = await self.qmp_call("human-monitor-command", {"command-line": command}, limit)
        text = str(out)
        if text.startswith("Error"):
            raise BackendFailed(f"HMP {command!r}: {text.strip()}")
        return text

    async def console_write(self, data: bytes) -> None:
        if self._con_writer is None:
            raise BackendFailed("the console is not connected")
        self._con_writer.write(data)
        await asyncio.wait_for(self._con_writer.drain(), QMP_TIMEOUT)

    # ------------------------------------------------------------------ stop
    async def _close_connections(self) -> None:
        if self.rsp is not None:
            await self.rsp.close()
        if self.qmp is not None:
            qmp, self.qmp = self.qmp, None
            # the connection may already be at EOF: disconnect() re-raises that; swallow it
            with contextlib.suppress(Exception):
                await asyncio.wait_for(qmp.disconnect(), 2.0)
        self._con_writer = None
        for writer in self._writers:
            writer.close()
        self._writers.clear()

    async def stop(self, *, limit: float = 2.0, kill: bool = False) -> None:
        """End the process: QMP quit, SIGKILL after ``limit`` (at once with ``kill``: a
        stuck or stopped QEMU answers nothing); reap it; free everything."""
        self.stopping = True
        proc = self.proc
        if kill and proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        if proc is not None and proc.returncode is None and self.qmp is not None and not kill:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.qmp.execute("quit"), 1.0)
        await self._close_connections()
        if proc is not None:
            if proc.returncode is None:
                try:
                    await asyncio.wait_for(proc.wait(), limit)
                except TimeoutError:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                    await proc.wait()
        for t in self._tasks:
            if not t.done():
                t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks.clear()
        self._cleanup_dir()

    def _cleanup_dir(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
