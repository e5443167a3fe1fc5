"""MachineServer for tests that need more than the root conftest's ``server`` and
``client`` fixtures: in-process on a configuration of the test's own (``serving``), or
as a child process (``machineserver --listen 127.0.0.1:0``) for what needs a real
process: SIGKILL and SIGTERM, restarts, two servers at once, clients we did not write."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from machineserver.sdk import AsyncClient
from machineserver.server.app import RunningServer, start
from machineserver.server.config import ServerConfig
from tests.helpers.tools import VENV_BIN


@contextlib.asynccontextmanager
async def serving(config: ServerConfig, *, timeout: float = 20,
                  **start_options: Any) -> AsyncIterator[tuple[RunningServer, AsyncClient]]:
    """``async with serving(config) as (running, client)``: a server started in this
    process on ``config`` (its ``listen`` port 0; ``start_options`` go to app.start, e.g.
    ``hooks``) and a client with a default deadline of ``timeout`` s; both closed after."""
    running = await start(config, **start_options)
    try:
        async with await AsyncClient.connect(f"127.0.0.1:{running.port}", timeout=timeout) as client:
            yield running, client
    finally:
        await running.stop(0.5)


class ServerProcess:
    """One server process on ``data_dir``; its log goes next to the data dir."""

    def __init__(self, data_dir: Path, *extra: str) -> None:
        self.data_dir = data_dir
        self.port_file = data_dir.parent / f"port-{os.getpid()}-{time.monotonic_ns()}"
        self.log_path = data_dir.parent / f"server-{data_dir.name}-{time.monotonic_ns()}.log"
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    def spawn(self) -> subprocess.Popen[bytes]:
        """Start the process and return at once (start() also waits until it serves)."""
        self.port_file.unlink(missing_ok=True)
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [str(VENV_BIN / "machineserver"), "--listen", "127.0.0.1:0", "--data-dir", str(self.data_dir),
             "--port-file", str(self.port_file), "--log-level", "warning", *self.extra],
            stdout=self.log, stderr=self.log, start_new_session=True,
        )
        return self.proc

    def start(self, timeout: float = 30) -> ServerProcess:
        proc = self.spawn()
        deadline = time.monotonic() + timeout
        while not self.port_file.exists():  # written atomically once the server serves
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}: {self.read_log()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"server did not start in {timeout} s: {self.read_log()}")
            time.sleep(0.02)
        self.port = int(self.port_file.read_text())
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def read_log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        """Signal the server and wait for it; kills its whole process group (QEMU children
        included) if it does not end in time, or after a SIGKILL."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if sig == signal.SIGKILL:
            # a killed server cannot stop its QEMU children: do it for it
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.log.close()
        return self.proc.returncode
