"""Starting worker processes fast: a zygote that imported the drivers once and forks a
worker per request (~10-20 ms, against ~250 ms for a Python start and its imports).

The zygote is one clean, single-threaded process per server process, started on first
use with ``python -m machineserver.server.worker.zygote``. The server must not fork itself
(gRPC's threads would be copied half-held), and multiprocessing's fork server would import
the server's ``__main__`` again. The zygote dies with the server (PR_SET_PDEATHSIG), and
its workers with it.

Control socket (AF_UNIX, SOCK_SEQPACKET: one message per packet)::

    server -> zygote   b"fork <json list of backends or null>"  + one fd (the worker's socket)
    zygote -> server   b"pid <pid>"                              the worker it forked
    zygote -> server   b"exit <pid> <status>"                    a worker ended (waitpid status:
                                                                 -N killed by signal N, else its code)
"""

from __future__ import annotations

import argparse
import array
import contextlib
import ctypes
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading

PR_SET_PDEATHSIG = 1
REAP_INTERVAL = 0.1  # seconds between looks for ended workers
PRELOAD = ("machineserver.server.worker.host", "machineserver.server.drivers.discovery",
           "machineserver.server.drivers.unicorn.backend", "machineserver.server.drivers.qemu.backend")


def die_with_parent(parent: int) -> None:
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the line above ran
        os._exit(1)


# --------------------------------------------------------------------------- the zygote


def _exit_status(status: int) -> int:
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def _reap(control: socket.socket) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        with contextlib.suppress(OSError):
            control.send(b"exit %d %d" % (pid, _exit_status(status)))


def _fork_worker(control: socket.socket, fd: int, enabled: list[str] | None) -> int:
    pid = os.fork()
    if pid == 0:  # the worker
        code = 0
        try:
            control.close()
            from machineserver.server.worker.host import worker_main

            worker_main(socket.socket(fileno=fd), os.getppid(), enabled)
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(fd)
    return pid


def zygote_main() -> None:
    parser = argparse.ArgumentParser(prog="machineserver-zygote")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--parent", type=int, required=True)
    args = parser.parse_args()
    die_with_parent(args.parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for module in PRELOAD:
        __import__(module)
    control = socket.socket(fileno=args.fd)
    while True:
        ready, _, _ = select.select([control], [], [], REAP_INTERVAL)
        _reap(control)
        if not ready:
            continue
        try:
            message, fds, _, _ = socket.recv_fds(control, 4096, 1)
        except OSError:
            return
        if not message:
            return  # the server closed its end
        if message.startswith(b"fork ") and fds:
            enabled = json.loads(message[5:])
            pid = _fork_worker(control, fds[0], enabled)
            control.send(b"pid %d" % pid)
        else:
            for fd in fds:
                os.close(fd)


# --------------------------------------------------------------------------- the server's side


class Zygote:
    """The server's handle on its zygote: thread-safe, usable from any event loop."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cond = threading.Condition()
        self._control: socket.socket | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._pids: list[int] = []
        self.exits: dict[int, int] = {}

    def _ensure_running(self) -> socket.socket:
        if self._control is not None and self._process is not None and self._process.poll() is None:
            return self._control
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "machineserver.server.worker.zygote", "--fd", str(theirs.fileno()),
                 "--parent", str(os.getpid())],
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, start_new_session=True)
        finally:
            theirs.close()
        self._control = ours
        threading.Thread(target=self._read, args=(ours,), name="worker-zygote-reader", daemon=True).start()
        return ours

    def _read(self, control: socket.socket) -> None:
        """Every message from the zygote: forked pids and ended workers."""
        while True:
            try:
                message = control.recv(4096)
            except OSError:
                message = b""
            with self._cond:
                if not message:
                    if self._control is control:
                        self._control = None
                    self._cond.notify_all()
                    return
                words = message.split()
                if words[0] == b"pid":
                    self._pids.append(int(words[1]))
                elif words[0] == b"exit":
                    self.exits[int(words[1])] = int(words[2])
                self._cond.notify_all()

    def fork(self, sock: socket.socket, enabled: list[str] | None, timeout: float = 30.0) -> int:
        """A new worker serving ``sock``; its pid."""
        with self._lock:
            control = self._ensure_running()
            fds = array.array("i", [sock.fileno()])
            control.sendmsg([b"fork " + json.dumps(enabled).encode()], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
            with self._cond:
                if not self._cond.wait_for(lambda: self._pids or self._control is not control, timeout):
                    raise OSError("the worker zygote did not answer")
                if not self._pids:
                    raise OSError("the worker zygote ended")
                return self._pids.pop(0)

    def wait_exit(self, pid: int, timeout: float | None) -> int | None:
        """A worker's exit status once the zygote saw it end (None if not within timeout)."""
        with self._cond:
            self._cond.wait_for(lambda: pid in self.exits or self._control is None, timeout)
            return self.exits.get(pid)


ZYGOTE = Zygote()


if __name__ == "__main__":
    zygote_main()
