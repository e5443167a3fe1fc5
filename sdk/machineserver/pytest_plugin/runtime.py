"""The plugin's state for one pytest process: its settings (options and ini keys), the
server it talks to (remote, or embedded and started on first need), and what the run
collected: coverage reports to merge, capsules written, notes for the summary."""

from __future__ import annotations

import io
import os
import tarfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from machineserver.pytest_plugin.embedded import EmbeddedServer
    from machineserver.sdk import Client
    from machineserver.testing import Programs

COVERAGE_FORMATS = ("lcov", "cobertura", "html", "json")


def _value(config: pytest.Config, name: str) -> Any:
    """An option's value, else its ini key's."""
    got = config.getoption(name)
    return got if got not in (None, "", []) else config.getini(name)


def _split(text: str | list[str]) -> list[str]:
    items = text if isinstance(text, list) else [text]
    return [part.strip() for item in items for part in str(item).replace(",", " ").split() if part.strip()]


@dataclass
class Settings:
    target: str = ""
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    api_key: str = ""
    token: str = ""
    board: str = ""
    backends: list[str] = field(default_factory=list)
    coverage: list[tuple[str, Path]] = field(default_factory=list)
    capsule_dir: Path | None = None

    @classmethod
    def from_config(cls, config: pytest.Config) -> Settings:
        here = config.invocation_params.dir
        coverage: list[tuple[str, Path]] = []
        for spec in _split(_value(config, "ms_coverage") or []):
            fmt, sep, path = spec.partition(":")
            if not sep or fmt not in COVERAGE_FORMATS or not path:
                raise pytest.UsageError(
                    f"--ms-coverage {spec!r}: use FORMAT:PATH with FORMAT one of {', '.join(COVERAGE_FORMATS)}")
            coverage.append((fmt, here / path))
        capsule_dir: Path | None = None
        if not config.getoption("ms_no_capsules"):
            given = _value(config, "ms_capsules")
            capsule_dir = here / given if given else config.rootpath / ".ms-capsules"
        return cls(
            target=_value(config, "ms_target") or "",
            tls_ca=config.getoption("ms_tls_ca") or "",
            tls_cert=config.getoption("ms_tls_cert") or "",
            tls_key=config.getoption("ms_tls_key") or "",
            api_key=config.getoption("ms_api_key") or os.environ.get("MS_API_KEY", ""),
            token=config.getoption("ms_token") or "",
            board=_value(config, "ms_board") or "",
            backends=_split(_value(config, "ms_backends") or []),
            coverage=coverage,
            capsule_dir=capsule_dir,
        )


class Run:
    """What one pytest process (the controller, a worker, or a plain run) holds."""

    def __init__(self, settings: Settings, *, worker_output: dict[str, Any] | None = None) -> None:
        self.settings = settings
        self.worker_output = worker_output  # set in an xdist worker: sent to the controller at its end
        self.server: EmbeddedServer | None = None
        self._client: Client | None = None
        self._programs: Programs | None = None
        self.coverage_reports: list[tuple[str, str]] = []  # (report name, program)
        self.capsules: list[str] = []
        self.coverage_files: list[str] = []
        self.notes: list[str] = []

    # ---------------------------------------------------------------- the server

    def target(self) -> str:
        if not self.settings.target:
            from machineserver.pytest_plugin.embedded import EmbeddedServer

            self.server = EmbeddedServer()
            self.settings.target = self.server.start()
        return self.settings.target

    def client(self) -> Client:
        if self._client is None:
            from machineserver.sdk import Client

            s = self.settings
            self._client = Client.connect(
                self.target(), timeout=60, api_key=s.api_key or None, bearer_token=s.token or None,
                tls=bool(s.tls_ca or s.tls_cert), root_certificates=_read(s.tls_ca),
                certificate_chain=_read(s.tls_cert), private_key=_read(s.tls_key))
        return self._client

    def programs(self) -> Programs:
        if self._programs is None:
            from machineserver.testing import Programs

            self._programs = Programs(self.client())
        return self._programs

    # ---------------------------------------------------------------- what the run made

    def record_coverage(self, report: str, program: str) -> None:
        self.coverage_reports.append((report, program))
        if self.worker_output is not None:
            self.worker_output.setdefault("ms_coverage", []).append([report, program])

    def record_capsule(self, path: Path) -> None:
        self.capsules.append(str(path))
        if self.worker_output is not None:
            self.worker_output.setdefault("ms_capsules", []).append(str(path))

    def note(self, text: str) -> None:
        self.notes.append(text)
        if self.worker_output is not None:
            self.worker_output.setdefault("ms_notes", []).append(text)

    def absorb(self, worker_output: dict[str, Any]) -> None:
        """What an xdist worker recorded (the controller merges and reports it all)."""
        self.coverage_reports += [(r, p) for r, p in worker_output.get("ms_coverage", [])]
        self.capsules += list(worker_output.get("ms_capsules", []))
        self.notes += list(worker_output.get("ms_notes", []))

    # ---------------------------------------------------------------- the end

    def finish_coverage(self) -> None:
        """Merge every machine's coverage (one stored report per program) and export it once
        per requested format. Several programs: LCOV holds them all in one tracefile (lcov
        adds up records of the same file); the other formats get one file per program."""
        if not self.settings.coverage:
            return
        if not self.coverage_reports:
            self.note("coverage: no machine collected coverage (no program with debug info was run)")
            return
        from machineserver.v1 import coverage_pb2

        client = self.client()
        by_program: dict[str, list[str]] = defaultdict(list)
        for report, program in self.coverage_reports:
            by_program[program].append(report)
        merged = [client.coverage.merge_coverage(names=names).report.name for _, names in sorted(by_program.items())]
        formats = {"lcov": coverage_pb2.COVERAGE_FORMAT_LCOV, "cobertura": coverage_pb2.COVERAGE_FORMAT_COBERTURA,
                   "html": coverage_pb2.COVERAGE_FORMAT_HTML, "json": coverage_pb2.COVERAGE_FORMAT_JSON}

        def export(report: str, fmt: str) -> bytes:
            return b"".join(m.chunk for m in client.coverage.export_coverage(name=report, format=formats[fmt]))

        for fmt, path in self.settings.coverage:
            path.parent.mkdir(parents=True, exist_ok=True)
            if fmt == "lcov":
                path.write_bytes(b"".join(export(r, fmt) for r in merged))
                written = [path]
            elif len(merged) == 1:
                written = [_write(fmt, path, export(merged[0], fmt))]
            else:
                written = [_write(fmt, path.with_name(f"{path.stem}-{r.rsplit('/', 1)[-1]}{path.suffix}"),
                                  export(r, fmt)) for r in merged]
            self.coverage_files += [f"{fmt}: {p}" for p in written]

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        if self.server is not None:
            self.server.stop()
            self.server = None


def _read(path: str) -> bytes | None:
    return Path(path).read_bytes() if path else None


def _write(fmt: str, path: Path, data: bytes) -> Path:
    if fmt != "html":
        path.write_bytes(data)
        return path
    path.mkdir(parents=True, exist_ok=True)  # the server's .tar.gz, unpacked
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        tar.extractall(path, filter="data")
    return path
