"""Fixtures for telemetry tests: the fake NVML module and the fake tegrastats tool (both
stand in for hardware this machine lacks; tests that use them say "fake" in their names),
and in-process servers with metrics and tracing switched on."""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import ModuleType

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from machineserver.sdk import AsyncClient
from machineserver.server.app import RunningServer, start
from machineserver.server.config import ServerConfig
from tests.telemetry import fake_nvml as _fake_nvml

HERE = Path(__file__).resolve().parent
FAKE_TEGRASTATS = HERE / "fake_tegrastats"


@pytest.fixture
def fake_nvml(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """``import pynvml`` gives the fake (recorded example values) for this test."""
    _fake_nvml.reset()
    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml)
    yield _fake_nvml
    _fake_nvml.reset()


@pytest.fixture
def fake_tegrastats(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A ``tegrastats`` first on PATH that runs fake_tegrastats (with this Python)."""
    bin_dir = tmp_path / "fake-bin"
    bin_dir.mkdir()
    tool = bin_dir / "tegrastats"
    tool.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{FAKE_TEGRASTATS}" "$@"\n')
    tool.chmod(tool.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    return tool


@pytest.fixture
def spans() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
async def obs_server(server_config: ServerConfig, spans: InMemorySpanExporter) -> AsyncIterator[RunningServer]:
    """A server with /metrics on a free port and spans kept in memory."""
    from dataclasses import replace

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    running = await start(replace(server_config, metrics_listen="127.0.0.1:0"), tracer_provider=provider)
    try:
        yield running
    finally:
        await running.stop(0.5)
        provider.shutdown()


@pytest.fixture
async def obs_client(obs_server: RunningServer) -> AsyncIterator[AsyncClient]:
    async with await AsyncClient.connect(f"127.0.0.1:{obs_server.port}", timeout=20) as c:
        yield c
