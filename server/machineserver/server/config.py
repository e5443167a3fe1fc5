"""Server configuration: defaults, then a YAML file, then MACHINESERVER_* environment
variables, then command-line flags (each overriding the one before)."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from machineserver.server.core.engine import Limits
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
    # host:port of the Prometheus /metrics endpoint ("" = off; port 0 picks a free one,
    # RunningServer.metrics_port says which), e.g. "127.0.0.1:9464"
    metrics_listen: str = ""
    # worker processes that run the emulation: -1 one per core (the default), 0 none (every
    # machine in the server's own process), N exactly N
    workers: int = -1
    # the endpoints gdbremote sessions may reach (fnmatch patterns over "tcp:HOST:PORT",
    # "unix:/path", "serial:/dev/x"): by default TCP to this host only; a unix socket or a
    # serial device must be allowed explicitly
    gdbremote_allow: tuple[str, ...] = DEFAULT_REMOTE_ALLOW
    # folders whose files a coverage HTML export may show when a program's debug info names
    # them (read only if their real path lies inside one); empty: the server reads none
    # and HTML shows only sources the client sent
    coverage_source_roots: tuple[str, ...] = ()
    limits: Limits = field(default_factory=Limits)
    # per-tenant quotas (core/quotas.py): {default: {LIMIT: N}, tenants: {T: {LIMIT: N}}}, 0 = unlimited
    quotas: QuotaConfig = field(default_factory=QuotaConfig)


_SCALARS = {f.name for f in fields(ServerConfig)} - {"limits"}
_LIMITS = {f.name for f in fields(Limits)}


def _coerce(name: str, value: Any, target: Any) -> Any:
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
