#!/usr/bin/env python3
"""Health check of a MachineServer on this host: grpc.health.v1.Health/Check on the
server's overall status (""), exit 0 when SERVING, 1 otherwise, with one line saying why.

Used by the container image's HEALTHCHECK. It finds the port and TLS settings in the same
config the server reads (--config or MACHINESERVER_CONFIG): with tls_cert_file it speaks
TLS, trusting MACHINESERVER_HEALTH_CA (PEM) or else the server's own certificate chain, and
checks the name in the certificate (its first DNS name) rather than 127.0.0.1. Health
needs no credentials (the server keeps it open for probes).

    machineserver-healthcheck [--target 127.0.0.1:50051] [--config FILE] [--timeout 3]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc


def _tls_name(chain: bytes) -> str | None:
    """The first DNS name (else the common name) of the chain's first certificate."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    cert = x509.load_pem_x509_certificates(chain)[0]
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = names.get_values_for_type(x509.DNSName)
        if dns:
            return str(dns[0])
    except x509.ExtensionNotFound:
        pass
    common = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(common[0].value) if common else None


def check(target: str, config: dict[str, object], timeout: float) -> tuple[bool, str]:
    cert_file = str(config.get("tls_cert_file") or "")
    if cert_file:
        chain = Path(cert_file).read_bytes()
        ca_file = os.environ.get("MACHINESERVER_HEALTH_CA")
        roots = Path(ca_file).read_bytes() if ca_file else chain
        name = _tls_name(chain)
        options = [("grpc.ssl_target_name_override", name)] if name else []
        channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(roots), options)
    else:
        channel = grpc.insecure_channel(target)
    with channel:
        try:
            resp = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""),
                                                             timeout=timeout)
        except grpc.RpcError as exc:
            return False, f"{target}: {exc.code().name}: {exc.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    return resp.status == health_pb2.HealthCheckResponse.SERVING, f"{target}: {status}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="machineserver-healthcheck", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=os.environ.get("MACHINESERVER_CONFIG"),
                        help="the server's config file (env MACHINESERVER_CONFIG)")
    parser.add_argument("--target", help="host:port (default: 127.0.0.1 and the port of the config's listen, "
                        "else 50051)")
    parser.add_argument("--timeout", type=float, default=3.0)
    args = parser.parse_args(argv)
    config: dict[str, object] = {}
    if args.config and Path(args.config).exists():
        loaded = yaml.safe_load(Path(args.config).read_text()) or {}
        config = loaded if isinstance(loaded, dict) else {}
    target = args.target
    if not target:
        listen = str(os.environ.get("MACHINESERVER_LISTEN") or config.get("listen") or "")
        port = listen.rpartition(":")[2] if ":" in listen else "50051"
        target = f"127.0.0.1:{port}"
    try:
        ok, why = check(target, config, args.timeout)
    except (OSError, ValueError) as exc:
        ok, why = False, f"{target}: {exc}"
    print(("healthy: " if ok else "unhealthy: ") + why)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
