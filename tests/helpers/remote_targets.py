"""GDB servers for the gdbremote backend's tests: a QEMU started by the test itself, halted
(``-S``), with no program (the session loads it through the API), serving its gdbstub
and its UART on Unix sockets in a short directory of the test's own:

    qemu-system-arm -M mps2-an385 -nographic -nodefaults -monitor none -S
        -gdb unix:DIR/gdb.sock,server=on,wait=off -serial unix:DIR/con.sock,server=on,wait=off
        -semihosting-config enable=on,target=native

(``qemu-system-riscv32 -M sifive_e`` likewise). Semihosting stays on, so a firmware's exit
call ends QEMU as it would end a real run: the gdbstub sends ``W`` and closes.

``RemoteQemu`` is one such QEMU (``start``, ``kill`` as a crash would, ``start`` again at
the same sockets, ``stop``); ``RemoteTargets`` hands them out under one directory and
stops every one at the end; ``allow_patterns`` is what a test server's
``gdbremote_allow`` needs for them. Every process started here is killed and reaped by
``stop``/``close``.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tests.helpers.backends import BOARD_ARCH, QEMU_BINARIES

# Unix socket paths are limited to 107 bytes: the directories are short ones in /tmp
SOCKET_ROOT = "/tmp"
LISTENING = 0x10000  # __SO_ACCEPTCON in /proc/net/unix's Flags column


def qemu_command(board: str, gdb_socket: Path, console_socket: Path) -> list[str]:
    """The command line of a halted QEMU of ``board`` serving its gdbstub and UART."""
    args = [QEMU_BINARIES[BOARD_ARCH[board]], "-M", board, "-nographic", "-nodefaults", "-monitor", "none",
            "-S", "-gdb", f"unix:{gdb_socket},server=on,wait=off",
            "-serial", f"unix:{console_socket},server=on,wait=off",
            "-semihosting-config", "enable=on,target=native"]
    if board == "mps2-an385":
        args += ["-nic", "none"]  # its LAN9118 otherwise warns that it has no peer
    return args


def listening(*paths: Path) -> bool:
    """Whether a socket listens at every one of ``paths`` (read from /proc/net/unix, so
    that checking takes no connection from the one-client chardevs)."""
    want = {str(p) for p in paths}
    seen: set[str] = set()
    with open("/proc/net/unix") as table:
        next(table)
        for line in table:
            cols = line.split()
            if len(cols) >= 8 and cols[7] in want and int(cols[3], 16) & LISTENING:
                seen.add(cols[7])
    return seen == want


class RemoteQemu:
    """One QEMU behind ``-gdb`` for one board, at fixed socket paths in ``directory``."""

    def __init__(self, board: str, directory: Path) -> None:
        self.board = board
        self.directory = directory
        self.gdb_socket = directory / "gdb.sock"
        self.console_socket = directory / "con.sock"
        self.log_path = directory / "qemu.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def address(self) -> str:
        return f"unix:{self.gdb_socket}"

    @property
    def console(self) -> str:
        return f"unix:{self.console_socket}"

    def options(self, *, console: bool = True) -> dict[str, object]:
        """CreateSession ``options`` naming this QEMU (and its UART unless ``console``
        is False)."""
        remote = {"address": self.address}
        if console:
            remote["console"] = self.console
        return {"remote": remote}

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def spawn(self) -> None:
        """Start the process and return at once (``start`` also waits until it listens)."""
        assert not self.running(), "this QEMU is running already"
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(qemu_command(self.board, self.gdb_socket, self.console_socket),
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         start_new_session=True)
        self.starts += 1

    async def start(self, timeout: float = 10) -> RemoteQemu:
        """Start it (again, after ``kill``: QEMU replaces the old sockets) and return once
        both sockets listen."""
        self.spawn()
        assert self.proc is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not listening(self.gdb_socket, self.console_socket):
            if self.proc.poll() is not None:
                raise RuntimeError(f"QEMU for {self.board} exited with {self.proc.returncode}: {self.log()}")
            if loop.time() > deadline:
                self.stop()
                raise TimeoutError(f"QEMU for {self.board} did not listen in {timeout} s: {self.log()}")
            await asyncio.sleep(0.005)
        return self

    def kill(self) -> int:
        """SIGKILL (as a crash or a pulled cable would end it), reaped; its pid."""
        assert self.proc is not None
        pid = self.proc.pid
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        return pid

    def stop(self, grace: float = 2.0) -> None:
        """End it (SIGTERM, then SIGKILL after ``grace``) and reap it."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    async def wait_exit(self, timeout: float = 10) -> int:
        """QEMU's exit status once it ended by itself (a firmware's semihosting exit)."""
        assert self.proc is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (code := self.proc.poll()) is None:
            if loop.time() > deadline:
                raise AssertionError(f"QEMU {self.proc.pid} still runs after {timeout} s")
            await asyncio.sleep(0.01)
        return code


class RemoteTargets:
    """QEMUs for one test, each in its own subdirectory of one short temporary directory."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="msgr-", dir=SOCKET_ROOT))
        self.qemus: list[RemoteQemu] = []

    @property
    def allow_patterns(self) -> tuple[str, ...]:
        """gdbremote_allow patterns admitting these QEMUs' sockets (and TCP to this host)."""
        return (f"unix:{self.root}/*", "tcp:127.0.0.1:*")

    def new(self, board: str) -> RemoteQemu:
        """A QEMU for ``board``, not started yet."""
        qemu = RemoteQemu(board, self.root / f"q{len(self.qemus)}")
        self.qemus.append(qemu)
        return qemu

    async def start(self, board: str) -> RemoteQemu:
        return await self.new(board).start()

    def close(self) -> None:
        """Stop every QEMU (all reaped) and remove the directory."""
        for qemu in self.qemus:
            qemu.stop(grace=0.5)
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def remote_targets() -> Iterator[RemoteTargets]:
    targets = RemoteTargets()
    try:
        yield targets
    finally:
        targets.close()

