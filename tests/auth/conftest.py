"""A real server with authentication on, and the credentials to call it: the bootstrap
admin key, API keys it creates, JWTs signed with a key whose JWKS the server reads from a
file, and (for mTLS) a CA with server and client certificates made here."""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from joserfc import jwt
from joserfc.jwk import KeySet, RSAKey

from machineserver.sdk import AsyncClient
from machineserver.server.api.auth import parse_settings
from machineserver.server.app import RunningServer, start
from machineserver.server.config import ServerConfig

ISSUER = "https://idp.test"
AUDIENCE = "machineserver"


class Pki:
    """A CA and certificates it signs (EC P-256), written as PEM files under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.ca_key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "machineserver test CA")])
        self.ca_cert = self._build(name, name, self.ca_key.public_key(), self.ca_key, ca=True)
        self.ca_file = self._write("ca.pem", self.ca_cert.public_bytes(serialization.Encoding.PEM))

    def _build(self, subject: x509.Name, issuer: x509.Name, public: Any, signer: Any, *, ca: bool = False,
               san: Iterable[x509.GeneralName] = ()) -> x509.Certificate:
        now = datetime.datetime.now(datetime.UTC)
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public)
                   .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        san = list(san)
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return builder.sign(signer, hashes.SHA256())

    def _write(self, name: str, data: bytes) -> Path:
        path = self.root / name
        path.write_bytes(data)
        return path

    def issue(self, common_name: str, *, server: bool = False, signer: Pki | None = None) -> tuple[Path, Path]:
        """(certificate, key) files for ``common_name``, signed by this CA (or ``signer``)."""
        ca = signer or self
        key = ec.generate_private_key(ec.SECP256R1())
        san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))] if server else []
        cert = self._build(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]), ca.ca_cert.subject,
                           key.public_key(), ca.ca_key, san=san)
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        return (self._write(f"{common_name}.crt", cert.public_bytes(serialization.Encoding.PEM)),
                self._write(f"{common_name}.key", key_pem))


class Tokens:
    """JWTs signed with an RSA key; its public JWKS is in ``jwks_file``."""

    def __init__(self, root: Path, kid: str = "k1") -> None:
        self.key = RSAKey.generate_key(2048, parameters={"kid": kid})
        self.jwks_file = root / "jwks.json"
        self.jwks_file.write_text(json.dumps(KeySet([self.key]).as_dict(private=False)))

    def mint(self, sub: str = "alice", *, tenant: str | None = "default", roles: Any = ("operator",),
             iss: str = ISSUER, aud: str | list[str] = AUDIENCE, exp_in: float = 600, key: RSAKey | None = None,
             **extra: Any) -> str:
        now = int(time.time())
        claims: dict[str, Any] = {"iss": iss, "aud": aud, "sub": sub, "iat": now, "exp": int(now + exp_in), **extra}
        if tenant is not None:
            claims["tenant"] = tenant
        if roles is not None:
            claims["roles"] = list(roles)
        signing = key or self.key
        return jwt.encode({"alg": "RS256", "kid": signing.kid or "k1"}, claims, signing)


def auth_config(tmp_path: Path, tokens: Tokens, **auth: Any) -> ServerConfig:
    settings = {"enabled": True, "bootstrap_admin_key_file": str(tmp_path / "admin.key"),
                "jwt": {"issuer": ISSUER, "audience": AUDIENCE, "jwks_file": str(tokens.jwks_file),
                        "leeway_seconds": 5},
                **auth}
    return ServerConfig(listen="127.0.0.1:0", data_dir=tmp_path / "data", log_level="warning", workers=0, job_engine="local",
                        auth=parse_settings(settings, "test"))


@dataclass
class AuthServer:
    running: RunningServer
    config: ServerConfig
    admin_secret: str
    tokens: Tokens

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.running.port}"

    async def client(self, **options: Any) -> AsyncClient:
        return await AsyncClient.connect(self.target, timeout=20, retries=False, **options)

    async def key(self, roles: Iterable[str], tenant: str = "default", name: str = "k", **fields: Any) -> str:
        """A new API key's secret (created by the bootstrap admin)."""
        async with await self.client(api_key=self.admin_secret) as admin:
            resp = await admin.access.create_api_key(display_name=name, tenant=tenant,
                                                     roles=[f"ROLE_{r.upper()}" for r in roles], **fields)
            return resp.secret


@pytest.fixture
def tokens(tmp_path: Path) -> Tokens:
    return Tokens(tmp_path)


@contextlib.asynccontextmanager
async def serving_with_auth(tmp_path: Path, tokens: Tokens) -> AsyncIterator[AuthServer]:
    """A server with auth on (API keys, JWT) and its bootstrap admin key."""
    cfg = auth_config(tmp_path, tokens)
    running = await start(cfg)
    try:
        yield AuthServer(running, cfg, (tmp_path / "admin.key").read_text().strip(), tokens)
    finally:
        await running.stop(0.5)


@pytest.fixture
async def auth_server(tmp_path: Path, tokens: Tokens) -> AsyncIterator[AuthServer]:
    async with serving_with_auth(tmp_path, tokens) as server:
        yield server


def with_rules(cfg: ServerConfig, rules: list[dict[str, Any]], tmp_path: Path, tokens: Tokens) -> ServerConfig:
    return replace(cfg, auth=auth_config(tmp_path, tokens, rules=rules).auth)
