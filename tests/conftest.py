"""Shared fixtures: a real server (in-process on port 0, or as a child process), clients,
and the test firmware (built from C with arm-none-eabi-gcc, or the committed samples)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from machineserver.sdk import AsyncClient, Client
from machineserver.server.app import RunningServer, start
from machineserver.server.config import ServerConfig
from machineserver.server.core.engine import Limits

ROOT = Path(__file__).resolve().parent.parent
FIRMWARE = ROOT / "tests" / "firmware"
VENV_BIN = Path(sys.executable).parent


def firmware(board: str, program: str, ext: str = "elf") -> Path:
    """A test firmware image: from build/ (made by `make -C tests/firmware`), else the
    committed prebuilt sample; skips the test when neither exists."""
    for base in (FIRMWARE / "build", FIRMWARE / "prebuilt"):
        path = base / board / f"{program}.{ext}"
        if path.exists():
            return path
    pytest.skip(f"firmware {board}/{program}.{ext} not built (run make -C tests/firmware)")


@pytest.fixture
def server_config(tmp_path: Path) -> ServerConfig:
    return ServerConfig(listen="127.0.0.1:0", data_dir=tmp_path / "data", log_level="warning")


@pytest.fixture
async def server(server_config: ServerConfig) -> AsyncIterator[RunningServer]:
    running = await start(server_config)
    try:
        yield running
    finally:
        await running.stop(0.5)


@pytest.fixture
async def client(server: RunningServer) -> AsyncIterator[AsyncClient]:
    async with await AsyncClient.connect(f"127.0.0.1:{server.port}", timeout=20) as c:
        yield c


def small_limits(**kw: int) -> Limits:
    return Limits(**kw)


class ServerProcess:
    """MachineServer as a child process (`machineserver --listen 127.0.0.1:0`)."""

    def __init__(self, data_dir: Path, *extra: str) -> None:
        self.data_dir = data_dir
        self.port_file = data_dir.parent / f"port-{os.getpid()}-{time.monotonic_ns()}"
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    def start(self) -> ServerProcess:
        self.port_file.unlink(missing_ok=True)
        self.log = open(self.data_dir.parent / "server.log", "ab")
        self.proc = subprocess.Popen(
            [str(VENV_BIN / "machineserver"), "--listen", "127.0.0.1:0", "--data-dir", str(self.data_dir),
             "--port-file", str(self.port_file), "--log-level", "warning", *self.extra],
            stdout=self.log, stderr=self.log, start_new_session=True,
        )
        deadline = time.monotonic() + 30
        while not self.port_file.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.read_log()}")
            if time.monotonic() > deadline:
                raise TimeoutError("server did not start in 30 s")
            time.sleep(0.02)
        self.port = int(self.port_file.read_text())
        return self

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def read_log(self) -> str:
        return (self.data_dir.parent / "server.log").read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


@pytest.fixture
def server_process(tmp_path: Path) -> Iterator[ServerProcess]:
    sp = ServerProcess(tmp_path / "data").start()
    try:
        yield sp
    finally:
        sp.stop()


@pytest.fixture
def sync_client(server_process: ServerProcess) -> Iterator[Client]:
    with Client.connect(server_process.target, timeout=20) as c:
        yield c


def have(tool: str) -> bool:
    return shutil.which(tool) is not None or (VENV_BIN / tool).exists()
