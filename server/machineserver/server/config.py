"""Server configuration: defaults, then a YAML file, then MACHINESERVER_* environment
variables, then command-line flags (each overriding the one before).

Secure by default (:func:`check_exposure`, run when the server starts): without
authentication the server listens on loopback only; a ``listen`` beyond loopback needs
``auth.enabled`` and TLS, or ``--insecure`` (served with a loud warning). The metrics port
binds beyond loopback only with ``metrics_allow_nonloopback`` (or ``--insecure``), GDB
bridges only on the addresses ``gdb_bridge_bind_allow`` lists."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from machineserver.server.api.auth import AuthSettings
from machineserver.server.api.auth import parse_settings as parse_auth
from machineserver.server.core.engine import Limits
from machineserver.server.core.netpolicy import check_networks, is_loopback, listen_host
from machineserver.server.core.quotas import QuotaConfig
from machineserver.server.core.quotas import parse_config as parse_quotas
from machineserver.server.core.remote_targets import DEFAULT_REMOTE_ALLOW

ENV_PREFIX = "MACHINESERVER_"


@dataclass(frozen=True)
class ServerConfig:
    listen: str = "127.0.0.1:50051"
    data_dir: Path = Path(".machineserver")
    default_backend: str = "unicorn"
    backends: tuple[str, ...] | None = None  # None: every installed driver
    log_format: str = "console"  # "console" | "json"
    log_level: str = "info"
    grace_seconds: float = 5.0
    port_file: str = ""  # write the bound port here once serving (for scripts and tests)
    tls_cert_file: str = ""  # PEM certificate chain; with tls_key_file, serve TLS instead of plaintext
    tls_key_file: str = ""
    # PEM CA certificates: with TLS, every client must present a certificate one of them
    # signed (mTLS); its common name maps to an identity through auth.mtls_identities
    tls_client_ca_file: str = ""
    # serve beyond loopback without authentication and TLS (logged as a warning at start)
    insecure: bool = False
    # host:port of the Prometheus /metrics endpoint ("" = off; port 0 picks a free one,
    # RunningServer.metrics_port says which), e.g. "127.0.0.1:9464"
    metrics_listen: str = ""
    # /metrics has neither authentication nor TLS: beyond loopback only when set (or --insecure)
    metrics_allow_nonloopback: bool = False
    # worker processes that run the emulation: -1 one per core (the default), 0 none (every
    # machine in the server's own process), N exactly N
    workers: int = -1
    # the endpoints gdbremote sessions may reach (fnmatch patterns over "tcp:HOST:PORT",
    # "unix:/path", "serial:/dev/x"): by default TCP to this host only; a unix socket or a
    # serial device must be allowed explicitly
    gdbremote_allow: tuple[str, ...] = DEFAULT_REMOTE_ALLOW
    # where StartGdbServer may bind beyond loopback: addresses or networks ("10.0.0.0/8"),
    # "0.0.0.0" / "::" for every interface, "any"; empty (the default): loopback only
    gdb_bridge_bind_allow: tuple[str, ...] = ()
    # folders whose files a coverage HTML export may show when a program's debug info names
    # them (read only if their real path lies inside one); empty: the server reads none
    # and HTML shows only sources the client sent
    coverage_source_roots: tuple[str, ...] = ()
    # the Ray cluster jobs run on with the ray engine: "" starts an embedded local Ray runtime
    # on first use; "HOST:PORT" (or "auto") joins one set up with `ray start --head`
    ray_address: str = ""
    # CPUs the embedded Ray runtime offers (0: one per core); unused when joining a cluster
    ray_num_cpus: int = 0
    # where a job's runs execute: "ray" (the default: an embedded Ray runtime started on the
    # first job, or the cluster at ray_address) or "local" (this server's own backends and
    # workers, no Ray processes at all)
    job_engine: str = "ray"
    # runs at once with the local engine (0: the worker pool's size, else one per core)
    job_concurrency: int = 0
    limits: Limits = field(default_factory=Limits)
    # per-tenant quotas (core/quotas.py): {default: {LIMIT: N}, tenants: {T: {LIMIT: N}}}, 0 = unlimited
    quotas: QuotaConfig = field(default_factory=QuotaConfig)
    # who may call and what (api/auth.py): API keys, JWT, mTLS identities, rules; off by default
    auth: AuthSettings = field(default_factory=AuthSettings)


_SCALARS = {f.name for f in fields(ServerConfig)} - {"limits"}
_LIMITS = {f.name for f in fields(Limits)}


def _coerce(name: str, value: Any, target: Any) -> Any:
    if name == "gdb_bridge_bind_allow":
        items = value.split(",") if isinstance(value, str) else list(value)
        return check_networks(tuple(str(s).strip() for s in items if str(s).strip()), name)
    if name in ("gdbremote_allow", "coverage_source_roots"):
        items = value.split(",") if isinstance(value, str) else list(value)
        return tuple(s.strip() for s in items if s.strip())
    if name == "backends":
        if value in (None, "", "all"):
            return None
        items = value.split(",") if isinstance(value, str) else list(value)
        return tuple(s.strip() for s in items if s.strip())
    if isinstance(target, Path):
        return Path(value)
    if isinstance(target, bool):
        return str(value).lower() in ("1", "true", "yes", "on")
    if isinstance(target, int):
        return int(value)
    if isinstance(target, float):
        return float(value)
    return str(value)


def _apply(cfg: ServerConfig, values: dict[str, Any], source: str) -> ServerConfig:
    top: dict[str, Any] = {}
    limits: dict[str, Any] = {}
    for key, value in values.items():
        if value is None:
            continue
        if key == "limits" and isinstance(value, dict):
            for k, v in value.items():
                if k not in _LIMITS:
                    raise ValueError(f"{source}: unknown limit {k!r}")
                limits[k] = _coerce(k, v, getattr(cfg.limits, k))
        elif key == "capsules" and isinstance(value, dict):  # capsules: {max_age_s, max_count, max_bytes}
            for k, v in value.items():
                if f"capsule_{k}" not in _LIMITS:
                    raise ValueError(f"{source}: unknown capsules setting {k!r}")
                limits[f"capsule_{k}"] = _coerce(k, v, getattr(cfg.limits, f"capsule_{k}"))
        elif key == "auth":
            top[key] = parse_auth(value, source)
        elif key == "quotas":
            top[key] = parse_quotas(value, source)
        elif key in _SCALARS:
            top[key] = _coerce(key, value, getattr(cfg, key))
        elif key in _LIMITS:
            limits[key] = _coerce(key, value, getattr(cfg.limits, key))
        else:
            raise ValueError(f"{source}: unknown setting {key!r}")
    return replace(cfg, **top, limits=replace(cfg.limits, **limits))


def load(argv: list[str] | None = None) -> ServerConfig:
    parser = argparse.ArgumentParser(prog="machineserver", description="MachineServer gRPC server")
    parser.add_argument("--config", help="YAML config file (env MACHINESERVER_CONFIG)")
    parser.add_argument("--listen", help="host:port to bind (port 0 picks a free one)")
    parser.add_argument("--data-dir", dest="data_dir", help="where records and blobs live")
    parser.add_argument("--default-backend", dest="default_backend")
    parser.add_argument("--backends", help="comma-separated drivers to enable (default: all)")
    parser.add_argument("--log-format", dest="log_format", choices=["console", "json"])
    parser.add_argument("--log-level", dest="log_level")
    parser.add_argument("--max-sessions", dest="max_sessions", type=int)
    parser.add_argument("--port-file", dest="port_file", help="write the bound port here once serving")
    parser.add_argument("--tls-cert-file", dest="tls_cert_file", help="PEM certificate chain (serve TLS)")
    parser.add_argument("--tls-key-file", dest="tls_key_file", help="PEM private key (serve TLS)")
    parser.add_argument("--workers", type=int,
                        help="worker processes for emulation (-1: one per core, the default; 0: in-process)")
    parser.add_argument("--metrics-listen", dest="metrics_listen",
                        help="host:port for Prometheus /metrics (default off; port 0 picks a free one)")
    parser.add_argument("--gdbremote-allow", dest="gdbremote_allow",
                        help="comma-separated patterns of the endpoints gdbremote sessions may reach, over "
                             "tcp:HOST:PORT, unix:/path, serial:/dev/x (default: TCP to this host only)")
    parser.add_argument("--tls-client-ca-file", dest="tls_client_ca_file",
                        help="PEM CA certificates: clients must present a certificate they signed (mTLS)")
    parser.add_argument("--insecure", action="store_true", default=None,
                        help="allow --listen beyond loopback without authentication and TLS (unsafe)")
    parser.add_argument("--gdb-bridge-bind-allow", dest="gdb_bridge_bind_allow",
                        help="comma-separated addresses or networks GDB bridges may bind beyond loopback")
    parser.add_argument("--job-engine", dest="job_engine", choices=["local", "ray"],
                        help="where jobs' runs execute: ray (the default: embedded on first use, or --ray-address) "
                             "or local (this server's own workers, no Ray)")
    parser.add_argument("--ray-address", dest="ray_address",
                        help="join this Ray cluster (HOST:PORT of `ray start --head`) for jobs; "
                             "default: an embedded local Ray runtime started on first use")
    args = parser.parse_args(argv)
    cfg = ServerConfig()
    path = args.config or os.environ.get(ENV_PREFIX + "CONFIG")
    if path:
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: the config must be a mapping")
        cfg = _apply(cfg, data, path)
    env = {
        key[len(ENV_PREFIX):].lower(): value
        for key, value in os.environ.items()
        if key.startswith(ENV_PREFIX) and key != ENV_PREFIX + "CONFIG"
    }
    cfg = _apply(cfg, env, "environment")
    flags = {k: v for k, v in vars(args).items() if k != "config"}
    return _apply(cfg, flags, "flags")


def check_exposure(cfg: ServerConfig) -> list[str]:
    """Refuses (ValueError, saying what to configure) a config that would expose the
    server unprotected; returns the warnings to log for one that does so on purpose
    (``insecure``)."""
    warnings: list[str] = []
    auth = cfg.auth
    tls = bool(cfg.tls_cert_file and cfg.tls_key_file)
    if cfg.job_engine not in ("local", "ray"):
        raise ValueError(f"job_engine: {cfg.job_engine!r} is not an engine (local, ray)")
    if cfg.tls_client_ca_file and not tls:
        raise ValueError("tls_client_ca_file (mTLS) needs TLS: set tls_cert_file and tls_key_file")
    if not auth.enabled:
        given = [name for name, value in (("auth.jwt", auth.jwt), ("auth.mtls_identities", auth.mtls_identities),
                                          ("auth.bootstrap_admin_key_file", auth.bootstrap_admin_key_file),
                                          ("auth.rules", auth.rules)) if value]
        if given:
            raise ValueError(f"{given[0]} is set but authentication is off: set auth.enabled: true")
    elif auth.mtls_identities and not cfg.tls_client_ca_file:
        raise ValueError("auth.mtls_identities needs tls_client_ca_file (the CA of the client certificates)")
    host = listen_host(cfg.listen)
    if not is_loopback(host):
        if cfg.insecure:
            if not (auth.enabled and tls):
                warnings.append(f"INSECURE: serving {cfg.listen} beyond loopback without "
                                f"{'authentication' if not auth.enabled else 'TLS'} (--insecure): anyone who "
                                "reaches this port can drive, read and delete every session")
        elif not auth.enabled or not tls:
            missing = " and ".join(m for m, ok in (("authentication (auth.enabled)", auth.enabled),
                                                  ("TLS (tls_cert_file, tls_key_file)", tls)) if not ok)
            raise ValueError(f"refusing to listen on {cfg.listen}: beyond loopback the server needs {missing}; "
                             "listen on 127.0.0.1, configure them, or pass --insecure to serve unprotected")
    if cfg.metrics_listen:
        metrics_host = cfg.metrics_listen.rpartition(":")[0].strip("[]") or "0.0.0.0"
        if not is_loopback(metrics_host):
            if not (cfg.metrics_allow_nonloopback or cfg.insecure):
                raise ValueError(f"refusing to serve metrics on {cfg.metrics_listen}: /metrics has no "
                                 "authentication; set metrics_allow_nonloopback: true to serve it beyond loopback")
            if not cfg.metrics_allow_nonloopback:
                warnings.append(f"INSECURE: serving /metrics on {cfg.metrics_listen} beyond loopback (--insecure)")
    return warnings
