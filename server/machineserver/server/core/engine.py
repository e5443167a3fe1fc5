"""The core, assembled: one object holding every core service over one data directory."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from machineserver.server.core import limits as bounds
from machineserver.server.core.apikeys import ApiKeyStore
from machineserver.server.core.audit import AuditTrail
from machineserver.server.core.backends import BackendRegistry
from machineserver.server.core.calls import CallChain
from machineserver.server.core.capsules import CapsuleManager, CapsuleSettings
from machineserver.server.core.catalog import BoardCatalog
from machineserver.server.core.cosim.manager import CoSimManager
from machineserver.server.core.coverage import CoverageManager
from machineserver.server.core.debug import Debugger, LineStepper
from machineserver.server.core.gdbbridges import GdbBridges
from machineserver.server.core.jobs.local import LocalEngine
from machineserver.server.core.jobs.manager import JobManager
from machineserver.server.core.programs import ProgramStore
from machineserver.server.core.quotas import QuotaConfig, Quotas
from machineserver.server.core.remote_targets import DEFAULT_REMOTE_ALLOW
from machineserver.server.core.sessions import SessionManager
from machineserver.server.core.snapshots import SnapshotStore
from machineserver.server.core.telemetry import Telemetry
from machineserver.server.store.blobs import BlobStore
from machineserver.server.store.db import Database
from machineserver.server.store.lock import DataDirLock
from machineserver.server.worker.pool import WorkerPool


@dataclass(frozen=True)
class Limits:
    max_sessions: int = 256
    max_program_bytes: int = 64 << 20
    max_snapshot_bytes: int = 512 << 20
    console_retain_bytes: int = 1 << 20
    max_telemetry_subscribers: int = 1000
    audit_retention_days: float = 0.0  # the server prunes audit entries older than this (0: keeps all)
    # what a client's configs may make the server allocate (core/limits.py)
    max_board_memory_bytes: int = bounds.MAX_BOARD_MEMORY_BYTES
    max_irqs: int = bounds.MAX_IRQS
    max_config_depth: int = bounds.MAX_CONFIG_DEPTH
    max_config_nodes: int = bounds.MAX_CONFIG_NODES
    max_config_bytes: int = bounds.MAX_CONFIG_BYTES
    max_console_bytes: int = bounds.MAX_CONSOLE_BYTES  # a session's limits.max_console_bytes
    # failure capsules (core/capsules): the largest archive, and pruning by age (every tenant)
    # and by count (per tenant: each keeps its newest N); 0 keeps them whatever their age or count
    capsule_max_bytes: int = 64 << 20
    capsule_max_age_s: float = 0.0
    capsule_max_count: int = 200

    def board_bounds(self) -> bounds.BoardBounds:
        return bounds.BoardBounds(self.max_board_memory_bytes, self.max_irqs, self.max_config_depth,
                                  self.max_config_nodes, self.max_config_bytes)


class Engine:
    """Everything below the API layer. Create inside a running event loop."""

    def __init__(self, data_dir: Path, backends: BackendRegistry, limits: Limits,
                 workers: WorkerPool | None = None, remote_allow: Sequence[str] = DEFAULT_REMOTE_ALLOW,
                 quotas: QuotaConfig | None = None) -> None:
        """Takes the data directory's lock first (DataDirLocked when another server holds
        it), then opens the records and blobs in it. With ``workers``, every backend's
        machines run in those worker processes (the engine does not close a pool it was
        given). ``quotas``: the per-tenant quotas (default: none)."""
        self.data_dir = data_dir
        # scratch files of the server's own (an HTML report's work folder): inside the data
        # directory, so a server writes nothing outside it; emptied at start
        self.scratch_dir = data_dir / "tmp"
        self.workers = workers
        self.own_workers = False  # whether close() closes the pool too
        if workers is not None:
            backends = backends.isolated(workers)
        self.lock = DataDirLock(data_dir)
        self.lock.acquire()
        try:
            self._open(data_dir, backends, limits, remote_allow, quotas or QuotaConfig())
        except BaseException:
            self.lock.release()
            raise

    def _open(self, data_dir: Path, backends: BackendRegistry, limits: Limits, remote_allow: Sequence[str],
              quotas: QuotaConfig) -> None:
        self.db = Database(data_dir / "machineserver.sqlite3")
        self.audit = AuditTrail(self.db, retention_days=limits.audit_retention_days)  # the store's write hook
        self.blobs = BlobStore(data_dir / "blobs")
        self.backends = backends
        self.calls = CallChain()  # the hooks every command passes through (api configures them)
        self.apikeys = ApiKeyStore(self.db)  # who may call (API keys, stored hashed)
        self.catalog = BoardCatalog(self.db, limits.board_bounds())
        self.quotas = Quotas(quotas, self.db)
        self.programs = ProgramStore(self.db, self.blobs, limits.max_program_bytes, quotas=self.quotas)
        self.sessions = SessionManager(
            self.db, self.catalog, backends, self.programs,
            max_sessions=limits.max_sessions, console_retain=limits.console_retain_bytes,
            max_console_bytes=limits.max_console_bytes,
            console_dir=data_dir / "console", remote_allow=remote_allow, quotas=self.quotas,
        )
        self.quotas.attach(self.sessions)
        self.debugger = Debugger(self.sessions)
        self.stepper = LineStepper(self.debugger)
        self.gdb = GdbBridges(self.sessions, self.debugger, self.calls)
        self.snapshots = SnapshotStore(self.db, self.blobs, self.sessions, limits.max_snapshot_bytes)
        self.coverage = CoverageManager(self.db, self.blobs, self.sessions, self.programs)
        self.telemetry = Telemetry(self.db, max_subscribers=limits.max_telemetry_subscribers)
        self.capsules = CapsuleManager(self.db, self.blobs, self.sessions, self.stepper, self.coverage, self.telemetry,
                                       CapsuleSettings(limits.capsule_max_bytes, limits.capsule_max_age_s,
                                                       limits.capsule_max_count))
        self.cosim = CoSimManager(self.db, self.blobs, self.sessions, limits.max_snapshot_bytes)
        # regression jobs; their runs on this server's backends until configure_jobs says otherwise
        self.jobs = JobManager(self.db, self.blobs, self.programs, self.catalog, backends, self.snapshots,
                               self.coverage, LocalEngine(backends, self.workers.size if self.workers else 0))

    async def start(self) -> None:
        shutil.rmtree(self.scratch_dir, ignore_errors=True)  # what a killed server left
        self.scratch_dir.mkdir(parents=True, exist_ok=True)
        await self.audit.start()
        await self.sessions.start()
        self.debugger.load()
        self.cosim.load()
        await self.telemetry.start()
        await self.capsules.start()
        await self.quotas.start()
        await self.jobs.start()

    def configure_jobs(self, engine: str = "local", concurrency: int = 0, *, ray_address: str = "",
                       ray_num_cpus: int = 0, default_backend: str = "unicorn",
                       enabled_backends: Sequence[str] | None = None) -> None:
        """Where jobs' runs execute (before start): "local" (``concurrency`` at once; 0: the
        worker pool's size, else one per core) or "ray" (core/jobs/ray_engine.py)."""
        if engine == "ray":
            from machineserver.server.core.jobs.ray_engine import RayEngine  # ray is imported only when used

            self.jobs.use_engine(RayEngine(address=ray_address, num_cpus=ray_num_cpus, default_backend=default_backend,
                                           backends=None if enabled_backends is None else list(enabled_backends)))
        elif concurrency:
            self.jobs.use_engine(LocalEngine(self.backends, concurrency))

    async def close(self) -> None:
        await self.jobs.close()
        await self.quotas.stop()
        await self.gdb.close()
        await self.cosim.shutdown()
        await self.telemetry.stop()
        await self.sessions.shutdown()
        await self.backends.aclose()
        if self.workers is not None and self.own_workers:
            await self.workers.close()
        await self.audit.stop()
        self.db.close()
        self.lock.release()
