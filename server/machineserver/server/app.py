"""The server process: config, logging, engine, gRPC server, graceful stop on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog
from grpc import aio
from grpc_health.v1 import health
from opentelemetry.trace import TracerProvider

from machineserver.server import __version__
from machineserver.server.api.auth import AuthHook, required_roles
from machineserver.server.api.interceptors import CallHook
from machineserver.server.api.server import SERVICES, build_server, mark_not_serving
from machineserver.server.config import ServerConfig, check_exposure, load
from machineserver.server.core.apikeys import read_bootstrap_secret
from machineserver.server.core.backends import BackendRegistry
from machineserver.server.core.engine import Engine
from machineserver.server.obs.logging import configure
from machineserver.server.obs.metrics import ServerMetrics
from machineserver.server.obs.tracing import TracingHook, tracing_configured
from machineserver.server.store.lock import DataDirLocked
from machineserver.server.worker.pool import WorkerPool

log = structlog.get_logger("machineserver")


@dataclass
class RunningServer:
    server: aio.Server
    port: int
    engine: Engine
    _health: health.aio.HealthServicer
    metrics: ServerMetrics | None = None
    metrics_port: int = 0  # the bound /metrics port when metrics_listen is set

    async def stop(self, grace: float = 5.0) -> None:
        await mark_not_serving(self._health)
        await self.server.stop(grace)
        if self.metrics is not None:
            await asyncio.to_thread(self.metrics.close)
        await self.engine.close()


def _read_tls(cfg: ServerConfig) -> tuple[bytes, bytes] | None:
    if not (cfg.tls_cert_file or cfg.tls_key_file):
        return None
    if not (cfg.tls_cert_file and cfg.tls_key_file):
        raise ValueError("TLS needs both tls_cert_file and tls_key_file")
    return Path(cfg.tls_cert_file).read_bytes(), Path(cfg.tls_key_file).read_bytes()


def _read_client_ca(cfg: ServerConfig) -> bytes | None:
    return Path(cfg.tls_client_ca_file).read_bytes() if cfg.tls_client_ca_file else None


def _auth_hooks(cfg: ServerConfig, engine: Engine) -> list[CallHook]:
    """The auth hook when authentication is on (none when off: a call then costs nothing
    for it, and every caller is the local admin of a loopback-only server)."""
    auth = cfg.auth
    if not auth.enabled:
        return []
    if auth.bootstrap_admin_key_file:
        path = Path(auth.bootstrap_admin_key_file)
        secret, made = read_bootstrap_secret(path)
        key = engine.apikeys.ensure(secret)
        if made:
            log.warning("bootstrap_admin_key_created", file=str(path), key=key.name,
                        note="an admin API key of tenant 'default': read it from the file, keep the file private")
        elif key.revoke_time is not None:
            log.warning("bootstrap_admin_key_revoked", file=str(path), key=key.name)
    hook = AuthHook(auth, engine.apikeys,
                    required_roles(file.services_by_name[name] for _, _, file, name in SERVICES))
    if hook.jwt is not None and auth.jwt is not None and auth.jwt.jwks_file:
        hook.jwt.source.load_file()  # a bad JWKS file stops the start, not the first call
    log.info("auth_on", jwt=bool(auth.jwt), mtls=bool(cfg.tls_client_ca_file), rules=len(auth.rules))
    return [hook]


async def start(cfg: ServerConfig, *, tracer_provider: TracerProvider | None = None,
                hooks: Sequence[CallHook] = (), workers: WorkerPool | None = None) -> RunningServer:
    """Start a server (inside a running loop); tests use this with listen 127.0.0.1:0.
    Spans go to ``tracer_provider`` (default: the global one, a no-op unless set up);
    ``hooks`` run after the built-in ones (tracing, metrics) on every call. ``workers``:
    a worker pool to share (tests); otherwise the server makes its own from
    ``cfg.workers`` and closes it when it stops."""
    for warning in check_exposure(cfg):  # refuses (ValueError) to expose an unprotected server
        log.warning("insecure", message=warning)
    tls = _read_tls(cfg)
    client_ca = _read_client_ca(cfg)
    backends = BackendRegistry.discover(cfg.default_backend, cfg.backends)
    own_pool: WorkerPool | None = None
    if workers is None and cfg.workers != 0:
        workers = own_pool = WorkerPool(max(0, cfg.workers), backends=cfg.backends)
    try:
        engine = Engine(Path(cfg.data_dir), backends, cfg.limits, workers, cfg.gdbremote_allow, quotas=cfg.quotas)
    except BaseException:
        if own_pool is not None:
            await own_pool.close()
        raise
    engine.own_workers = own_pool is not None
    engine.gdb.bind_allow = cfg.gdb_bridge_bind_allow
    engine.coverage.source_roots = cfg.coverage_source_roots
    engine.configure_jobs(cfg.job_engine, cfg.job_concurrency, ray_address=cfg.ray_address,
                          ray_num_cpus=cfg.ray_num_cpus, default_backend=cfg.default_backend,
                          enabled_backends=cfg.backends)
    if own_pool is not None:
        own_pool.prewarm()
    await engine.start()
    metrics: ServerMetrics | None = None
    try:
        metrics_port = 0
        if cfg.metrics_listen:
            metrics = ServerMetrics(engine)
            metrics_port = metrics.serve(cfg.metrics_listen,
                                         allow_nonloopback=cfg.metrics_allow_nonloopback or cfg.insecure)
        # authentication first: the first hook with a before() (tracing, quotas see the caller)
        chain: list[CallHook] = [*_auth_hooks(cfg, engine),
                                 *([TracingHook(tracer_provider)] if tracing_configured(tracer_provider) else []),
                                 *([metrics] if metrics else []), *hooks]
        server, port, health_servicer = await build_server(engine, cfg.listen, chain, tls=tls, client_ca=client_ca)
        await server.start()
    except BaseException:
        if metrics is not None:
            metrics.close()
        await engine.close()
        raise
    return RunningServer(server, port, engine, health_servicer, metrics, metrics_port)


def _write_port_file(path: str, port: int) -> None:
    """Atomically, so a reader never sees a half-written number."""
    tmp = Path(path + ".tmp")
    tmp.write_text(str(port))
    tmp.replace(path)


async def serve(cfg: ServerConfig) -> None:
    running = await start(cfg)
    # what start-up allocated (modules, the catalog) stays for the process's life: out of
    # the collector's generations, so a full collection pauses the loop ~1 ms, not ~30 ms
    gc.freeze()
    host = cfg.listen.rsplit(":", 1)[0]
    log.info("serving", version=__version__, address=f"{host}:{running.port}",
             data_dir=str(cfg.data_dir), backends=running.engine.backends.names(),
             metrics=f"http://{cfg.metrics_listen.rsplit(':', 1)[0]}:{running.metrics_port}/metrics"
             if running.metrics_port else "off")
    if cfg.port_file:
        _write_port_file(cfg.port_file, running.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stopping", grace_seconds=cfg.grace_seconds)
    await running.stop(cfg.grace_seconds)
    log.info("stopped")


def main(argv: list[str] | None = None) -> None:
    try:
        cfg = load(argv)
    except (ValueError, OSError) as exc:
        print(f"machineserver: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    configure(cfg.log_format, cfg.log_level)
    try:
        asyncio.run(serve(cfg))
    except (OSError, ValueError, DataDirLocked) as exc:
        print(f"machineserver: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
