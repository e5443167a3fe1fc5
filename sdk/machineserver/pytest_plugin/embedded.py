"""A MachineServer started inside the pytest process: its own event loop in a daemon thread,
port 0 on loopback, a temporary data directory, jobs on the server's own workers. The server
package is imported only here, and only when a test needs a server and no ``--ms-target``
was given."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 60.0


class EmbeddedServer:
    """``start()`` -> "127.0.0.1:PORT"; ``stop()`` stops it and removes its data directory."""

    def __init__(self) -> None:
        self.data_dir = Path(tempfile.mkdtemp(prefix="ms-pytest-"))
        self.target = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._running: Any = None  # machineserver.server.app.RunningServer
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def start(self) -> str:
        self._thread = threading.Thread(target=self._serve, name="machineserver-embedded", daemon=True)
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT_S):
            raise RuntimeError(f"the embedded MachineServer did not start in {START_TIMEOUT_S:g} s")
        if self._error is not None:
            raise RuntimeError(f"the embedded MachineServer did not start: {self._error}") from self._error
        return self.target

    def _serve(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            self._running = loop.run_until_complete(self._start())
            self.target = f"127.0.0.1:{self._running.port}"
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _start(self) -> Any:
        import structlog

        from machineserver.server.app import start
        from machineserver.server.config import ServerConfig
        from machineserver.server.obs.logging import configure

        if not structlog.is_configured():  # the server's info lines would fill every captured test output
            configure(level="warning")
        cfg = ServerConfig(listen="127.0.0.1:0", data_dir=self.data_dir / "data", job_engine="local",
                           log_level="warning")
        return await start(cfg)

    def stop(self) -> None:
        loop, running = self._loop, self._running
        if loop is not None and running is not None and loop.is_running():
            future = asyncio.run_coroutine_threadsafe(running.stop(1.0), loop)
            try:
                future.result(STOP_TIMEOUT_S)
            finally:
                loop.call_soon_threadsafe(loop.stop)
                if self._thread is not None:
                    self._thread.join(STOP_TIMEOUT_S)
        self._running = None
        shutil.rmtree(self.data_dir, ignore_errors=True)
