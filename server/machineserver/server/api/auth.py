"""Authentication and authorization: the first hook of the call chain that has a
``before`` (so it covers unary RPCs, streams, each Attach command and each GDB-bridge
packet, which all pass through the chain).

Who is calling (:meth:`AuthHook.before` sets ``call.identity``), from the first of:

* an API key: ``authorization: ApiKey <secret>`` or ``x-api-key: <secret>`` (a
  ``Bearer`` value that is one of our secrets, ``msk_...``, counts as a key too);
* a JWT: ``authorization: Bearer <jwt>``, verified against the configured JWKS (a file or
  a URL, fetched with a timeout and cached) with issuer, audience, expiry and leeway;
  the tenant and roles come from claims (``tenant_claim``, ``roles_claim``);
* the TLS client certificate (``tls_client_ca_file``: the server then requires one),
  mapped by its common name through ``auth.mtls_identities``.

A command that inherits its caller (an Attach stream's commands, a GDB bridge's packets:
they run as the identity that opened the stream or started the bridge) is not
authenticated again, but a revoked API key or an expired token stops it there too.

What a caller may call: each RPC needs a role (:func:`required_roles`, built from the
service descriptors by method-name prefix with a table of exceptions, so a new RPC always
gets one), and the configured rules (``auth.rules``, keyed by principal, tenant, auth
method, JWT issuer or claims; the Android emulator's gRPC allowlist is the model) may
grant roles, restrict a caller to the methods they ``allow`` and refuse the ones they
``deny`` (globs over the full method name). PERMISSION_DENIED names the method and the
missing role (or the rule).

Health checks and reflection stay open: a load balancer must be able to probe, and
reflection describes only the public API.
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import re
import time
import urllib.request
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from google.protobuf.descriptor import ServiceDescriptor
from joserfc import errors as jose_errors
from joserfc import jwt
from joserfc.jwk import KeySet

from machineserver.server.core.apikeys import SECRET_PREFIX, TENANT_PATTERN, ApiKeyStore
from machineserver.server.core.calls import CallInfo
from machineserver.server.core.errors import PermissionDenied, Unauthenticated
from machineserver.server.core.identity import ANONYMOUS, AuthMethod, Identity, Role

log = structlog.get_logger("machineserver.auth")

# methods anyone may call, authenticated or not: health (load balancers probe it) and
# reflection (it describes the public API only)
OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/",
                 "/grpc.reflection.v1.ServerReflection/")
# what a reader needs: methods whose name starts with one of these read and change nothing
VIEWER_PREFIXES = ("Get", "List", "Stream", "Export", "Watch", "Read", "Resolve", "Disassemble", "Backtrace")
# the exceptions to the prefixes ("Service/Method" -> the role; None: any authenticated
# caller); every other method changes state and needs OPERATOR
ROLE_EXCEPTIONS: dict[str, Role | None] = {
    "AccessService/GetCallerIdentity": None,
    "AccessService/CreateApiKey": Role.ADMIN,
    "AccessService/ListApiKeys": Role.ADMIN,
    "AccessService/RevokeApiKey": Role.ADMIN,
    "AuditService/ListAuditEvents": Role.ADMIN,
    "AuditService/StreamAuditEvents": Role.ADMIN,
    "CapabilitiesService/CreateBoardTemplate": Role.ADMIN,
    "CapabilitiesService/UpdateBoardTemplate": Role.ADMIN,
    "CapabilitiesService/DeleteBoardTemplate": Role.ADMIN,
    # observing a session; each command on the stream is checked as the RPC it mirrors
    "DebugService/Attach": Role.VIEWER,
    # waits on the console; changes nothing
    "SessionService/ExpectConsole": Role.VIEWER,
}
ROLE_NAMES = {r.name.lower(): r for r in Role}
# a caller of an open method: no tenant, no role
NOBODY = Identity(ANONYMOUS, "", frozenset(), AuthMethod.NONE)
# a caller whose credentials were missing or refused: what the audit log records for it
# (never the local admin that an unset identity would read as)
UNAUTHENTICATED = Identity("unauthenticated", "", frozenset(), AuthMethod.NONE)
MAX_CACHED_TOKENS = 1024
MAX_CREDENTIAL_CHARS = 8192


def role_name(role: Role | None) -> str:
    return role.name.lower() if role is not None else "none"


def parse_roles(values: Iterable[object], setting: str) -> frozenset[Role]:
    """Role names ("viewer", "OPERATOR", "ROLE_ADMIN") or the proto's numbers."""
    roles = set()
    for value in values:
        if isinstance(value, int) and not isinstance(value, bool) and value in Role._value2member_map_:
            roles.add(Role(value))
            continue
        name = str(value).lower().removeprefix("role_")
        if name not in ROLE_NAMES:
            raise ValueError(f"{setting}: {value!r} is not a role (viewer, operator, admin)")
        roles.add(ROLE_NAMES[name])
    return frozenset(roles)


def required_roles(services: Iterable[ServiceDescriptor]) -> dict[str, Role | None]:
    """The role each method of ``services`` needs, by full method name."""
    table: dict[str, Role | None] = {}
    for svc in services:
        for method in svc.methods:
            short = f"{svc.name}/{method.name}"
            if short in ROLE_EXCEPTIONS:
                role = ROLE_EXCEPTIONS[short]
            else:
                role = Role.VIEWER if method.name.startswith(VIEWER_PREFIXES) else Role.OPERATOR
            table[f"/{svc.full_name}/{method.name}"] = role
    return table


# ---------------------------------------------------------------------- settings


@dataclass(frozen=True)
class JwtSettings:
    issuer: str
    audience: str
    jwks_file: str = ""
    jwks_url: str = ""
    leeway_seconds: int = 30
    tenant_claim: str = "tenant"
    roles_claim: str = "roles"
    algorithms: tuple[str, ...] = ("RS256", "RS384", "RS512", "PS256", "ES256", "ES384", "EdDSA")
    jwks_timeout_seconds: float = 5.0
    jwks_cache_seconds: float = 300.0


@dataclass(frozen=True)
class MtlsIdentity:
    tenant: str
    roles: frozenset[Role]


@dataclass(frozen=True)
class RuleMatch:
    """Which callers a rule applies to: every key given must match (globs for principal
    and tenant; claims: each named claim equals the value, or is a list holding it)."""

    principal: str = ""
    tenant: str = ""
    auth_method: str = ""  # "api_key", "jwt", "mtls"
    issuer: str = ""
    claims: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class AccessRule:
    match: RuleMatch
    allow: tuple[str, ...] = ()  # when given: only these methods (globs over "/pkg.Service/Method")
    deny: tuple[str, ...] = ()  # never these methods
    roles: frozenset[Role] = frozenset()  # roles granted to the callers the rule matches


@dataclass(frozen=True)
class AuthSettings:
    enabled: bool = False
    bootstrap_admin_key_file: str = ""
    jwt: JwtSettings | None = None
    mtls_identities: Mapping[str, MtlsIdentity] = field(default_factory=dict)
    rules: tuple[AccessRule, ...] = ()


_SETTING_KEYS = {"enabled", "bootstrap_admin_key_file", "jwt", "mtls_identities", "rules"}
_JWT_KEYS = {"issuer", "audience", "jwks_file", "jwks_url", "leeway_seconds", "tenant_claim", "roles_claim",
             "algorithms", "jwks_timeout_seconds", "jwks_cache_seconds"}
_MATCH_KEYS = {"principal", "tenant", "auth_method", "issuer", "claims"}
_RULE_KEYS = {"match", "allow", "deny", "roles"}
_AUTH_METHODS = {"api_key": AuthMethod.API_KEY, "jwt": AuthMethod.JWT, "mtls": AuthMethod.MTLS}


def _mapping(value: object, setting: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ValueError(f"{setting}: must be a mapping")
    return value


def _strings(value: object, setting: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{setting}: must be a list of strings")
    return tuple(value)


def _known(data: Mapping[str, Any], keys: set[str], setting: str) -> None:
    unknown = sorted(set(data) - keys)
    if unknown:
        raise ValueError(f"{setting}: unknown setting {unknown[0]!r} (known: {', '.join(sorted(keys))})")


def parse_settings(value: object, source: str) -> AuthSettings:
    """The ``auth`` section of the config, checked (ValueError naming the setting)."""
    data = _mapping(value, f"{source}: auth")
    _known(data, _SETTING_KEYS, f"{source}: auth")
    jwt_settings = None
    if data.get("jwt"):
        j = _mapping(data["jwt"], f"{source}: auth.jwt")
        _known(j, _JWT_KEYS, f"{source}: auth.jwt")
        for required in ("issuer", "audience"):
            if not j.get(required):
                raise ValueError(f"{source}: auth.jwt.{required} is required")
        if bool(j.get("jwks_file")) == bool(j.get("jwks_url")):
            raise ValueError(f"{source}: auth.jwt needs one of jwks_file or jwks_url")
        values: dict[str, Any] = {k: v for k, v in j.items() if k != "algorithms"}
        if "algorithms" in j:
            values["algorithms"] = _strings(j["algorithms"], f"{source}: auth.jwt.algorithms")
        try:
            jwt_settings = JwtSettings(**values)
            if jwt_settings.leeway_seconds < 0 or jwt_settings.jwks_timeout_seconds <= 0:
                raise ValueError("leeway_seconds must be >= 0 and jwks_timeout_seconds > 0")
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{source}: auth.jwt: {exc}") from None
    identities: dict[str, MtlsIdentity] = {}
    for cn, entry in _mapping(data.get("mtls_identities") or {}, f"{source}: auth.mtls_identities").items():
        setting = f"{source}: auth.mtls_identities.{cn}"
        e = _mapping(entry, setting)
        _known(e, {"tenant", "roles"}, setting)
        tenant = str(e.get("tenant") or "")
        if not TENANT_PATTERN.fullmatch(tenant):
            raise ValueError(f"{setting}.tenant: required (letters, digits, '-', '_', '.')")
        identities[str(cn)] = MtlsIdentity(tenant, parse_roles(_strings(e.get("roles") or [], setting),
                                                               f"{setting}.roles"))
    rules = []
    for i, entry in enumerate(data.get("rules") or []):
        setting = f"{source}: auth.rules[{i}]"
        r = _mapping(entry, setting)
        _known(r, _RULE_KEYS, setting)
        m = _mapping(r.get("match") or {}, f"{setting}.match")
        _known(m, _MATCH_KEYS, f"{setting}.match")
        method = str(m.get("auth_method") or "")
        if method and method not in _AUTH_METHODS:
            raise ValueError(f"{setting}.match.auth_method: one of {', '.join(_AUTH_METHODS)}")
        claims = tuple((str(k), str(v)) for k, v in _mapping(m.get("claims") or {}, f"{setting}.match.claims").items())
        match = RuleMatch(str(m.get("principal") or ""), str(m.get("tenant") or ""), method,
                          str(m.get("issuer") or ""), claims)
        rules.append(AccessRule(match, _strings(r.get("allow") or [], f"{setting}.allow"),
                                _strings(r.get("deny") or [], f"{setting}.deny"),
                                parse_roles(_strings(r.get("roles") or [], f"{setting}.roles"), f"{setting}.roles")))
    return AuthSettings(enabled=bool(data.get("enabled", False)),
                        bootstrap_admin_key_file=str(data.get("bootstrap_admin_key_file") or ""),
                        jwt=jwt_settings, mtls_identities=identities, rules=tuple(rules))


# ---------------------------------------------------------------------- callers


class MethodAccess:
    """What the rules that matched a caller say about methods: allowlists (a method must
    be in each) and denials; decisions are remembered per method."""

    __slots__ = ("_allow", "_decided", "_deny")

    def __init__(self, allow: Sequence[tuple[int, re.Pattern[str]]] = (),
                 deny: Sequence[tuple[int, re.Pattern[str]]] = ()) -> None:
        self._allow = list(allow)
        self._deny = list(deny)
        self._decided: dict[str, str] = {}

    def refusal(self, method: str) -> str:
        """Why the rules refuse ``method`` ("" when they do not)."""
        if not self._allow and not self._deny:
            return ""
        why = self._decided.get(method)
        if why is None:
            why = ""
            for index, pattern in self._deny:
                if pattern.fullmatch(method):
                    why = f"auth.rules[{index}] denies it"
                    break
            else:
                for index, pattern in self._allow:
                    if not pattern.fullmatch(method):
                        why = f"it is not in the allowlist of auth.rules[{index}]"
                        break
            if len(self._decided) < 4096:
                self._decided[method] = why
        return why


UNRESTRICTED = MethodAccess()


@dataclass(frozen=True)
class Caller(Identity):
    """An authenticated identity, with what the rules allow it and what must still hold
    for commands that inherit it (the key not revoked, the token not expired)."""

    access: MethodAccess = field(default=UNRESTRICTED, compare=False, repr=False)
    key_id: str = ""  # the API key's id, re-checked for inherited commands
    expires: float = 0.0  # the token's expiry plus leeway (0: none)


def _glob(pattern: str) -> re.Pattern[str]:
    return re.compile(fnmatch.translate(pattern))


class Rules:
    def __init__(self, rules: Sequence[AccessRule]) -> None:
        self.rules = list(rules)
        self._allow = [[_glob(p) for p in r.allow] for r in self.rules]
        self._deny = [[_glob(p) for p in r.deny] for r in self.rules]

    def apply(self, principal: str, tenant: str, roles: frozenset[Role], method: AuthMethod, *,
              issuer: str = "", claims: Mapping[str, Any] | None = None, key_id: str = "",
              expires: float = 0.0) -> Caller:
        allow: list[tuple[int, re.Pattern[str]]] = []
        deny: list[tuple[int, re.Pattern[str]]] = []
        granted = set(roles)
        for i, rule in enumerate(self.rules):
            if not self._matches(rule.match, principal, tenant, method, issuer, claims or {}):
                continue
            granted |= rule.roles
            if rule.allow:
                # one pattern per rule: the union of its globs
                allow.append((i, re.compile("|".join(f"(?:{p.pattern})" for p in self._allow[i]))))
            deny += [(i, p) for p in self._deny[i]]
        access = MethodAccess(allow, deny) if allow or deny else UNRESTRICTED
        return Caller(principal, tenant, frozenset(granted), method, access, key_id, expires)

    @staticmethod
    def _matches(m: RuleMatch, principal: str, tenant: str, method: AuthMethod, issuer: str,
                 claims: Mapping[str, Any]) -> bool:
        if m.principal and not fnmatch.fnmatchcase(principal, m.principal):
            return False
        if m.tenant and not fnmatch.fnmatchcase(tenant, m.tenant):
            return False
        if m.auth_method and _AUTH_METHODS[m.auth_method] != method:
            return False
        if m.issuer and (method != AuthMethod.JWT or not fnmatch.fnmatchcase(issuer, m.issuer)):
            return False
        for name, want in m.claims:
            have = claims.get(name)
            if isinstance(have, list):
                if want not in [str(v) for v in have]:
                    return False
            elif have is None or str(have) != want:
                return False
        return True


# ---------------------------------------------------------------------- JWT


class JwksSource:
    """The key set tokens are checked against: a file (re-read when it changes) or a URL
    (fetched with a timeout, kept ``jwks_cache_seconds``, fetched again sooner, at most
    every 10 s, when a token names a key it lacks)."""

    MIN_REFETCH_SECONDS = 10.0

    def __init__(self, settings: JwtSettings, fetch: Callable[[str, float], bytes] | None = None) -> None:
        self.settings = settings
        self._fetch = fetch or _http_get
        self._keys: KeySet | None = None
        self._loaded = 0.0  # monotonic time of the last load
        self._mtime = 0.0
        self._lock = asyncio.Lock()

    @staticmethod
    def parse(data: bytes, where: str) -> KeySet:
        try:
            doc = json.loads(data)
            if isinstance(doc, dict) and "keys" not in doc and "kty" in doc:
                doc = {"keys": [doc]}
            return KeySet.import_key_set(doc)
        except (ValueError, TypeError, KeyError, jose_errors.JoseError) as exc:
            raise ValueError(f"{where}: not a JWKS ({exc})") from None

    def load_file(self) -> KeySet:
        path = Path(self.settings.jwks_file)
        mtime = path.stat().st_mtime
        if self._keys is None or mtime != self._mtime:
            self._keys = self.parse(path.read_bytes(), str(path))
            self._mtime = mtime
        return self._keys

    async def keys(self, refresh: bool = False) -> KeySet:
        if self.settings.jwks_file:
            try:
                return self.load_file()
            except (OSError, ValueError) as exc:
                log.error("jwks_unreadable", error=str(exc))
                if self._keys is not None:
                    return self._keys
                raise Unauthenticated("the server cannot read its JWKS to check tokens") from None
        async with self._lock:
            age = time.monotonic() - self._loaded
            stale = self._keys is None or age > self.settings.jwks_cache_seconds
            if stale or (refresh and age > self.MIN_REFETCH_SECONDS):
                url = self.settings.jwks_url
                try:
                    data = await asyncio.to_thread(self._fetch, url, self.settings.jwks_timeout_seconds)
                    self._keys = self.parse(data, url)
                except (OSError, ValueError) as exc:
                    log.error("jwks_fetch_failed", url=url, error=str(exc))
                    if self._keys is None:
                        raise Unauthenticated(f"the server cannot fetch its JWKS from {url}") from None
                self._loaded = time.monotonic()
            assert self._keys is not None
            return self._keys


def _http_get(url: str, timeout: float) -> bytes:
    if not url.startswith(("https://", "http://")):
        raise ValueError(f"{url}: only http(s) URLs are fetched")
    with urllib.request.urlopen(url, timeout=timeout) as response:  # the scheme is checked above
        data: bytes = response.read(1 << 20)
        return data


class JwtVerifier:
    def __init__(self, settings: JwtSettings, rules: Rules, source: JwksSource | None = None) -> None:
        self.settings = settings
        self.rules = rules
        self.source = source or JwksSource(settings)
        self._claims = jwt.JWTClaimsRegistry(
            leeway=settings.leeway_seconds,
            iss={"essential": True, "value": settings.issuer},
            aud={"essential": True, "value": settings.audience},
            exp={"essential": True},
            sub={"essential": True},
        )
        self._verified: OrderedDict[str, Caller] = OrderedDict()  # token -> caller, until it expires

    async def verify(self, token: str) -> Caller:
        cached = self._verified.get(token)
        if cached is not None:
            if time.time() < cached.expires:
                return cached
            del self._verified[token]
            raise Unauthenticated("token expired")
        keys = await self.source.keys()
        try:
            try:
                decoded = jwt.decode(token, keys, algorithms=list(self.settings.algorithms))
            except jose_errors.InvalidKeyIdError:
                decoded = jwt.decode(token, await self.source.keys(refresh=True),
                                     algorithms=list(self.settings.algorithms))
            claims = decoded.claims
            self._claims.validate(claims)
        except jose_errors.ExpiredTokenError:
            raise Unauthenticated("token expired") from None
        except jose_errors.InvalidClaimError as exc:
            claim = exc.claim if hasattr(exc, "claim") else ""
            raise Unauthenticated(_claim_reason(str(claim), self.settings)) from None
        except jose_errors.MissingClaimError as exc:
            raise Unauthenticated(f"token lacks a required claim ({exc.description})") from None
        except jose_errors.BadSignatureError:
            raise Unauthenticated("token signature does not verify") from None
        except jose_errors.InvalidKeyIdError:
            raise Unauthenticated("token is signed with a key the JWKS does not hold") from None
        except jose_errors.UnsupportedAlgorithmError:
            raise Unauthenticated(f"token algorithm not allowed (allowed: {', '.join(self.settings.algorithms)})"
                                  ) from None
        except (jose_errors.JoseError, ValueError, TypeError) as exc:
            raise Unauthenticated(f"not a valid JWT ({type(exc).__name__})") from None
        return self._remember(token, self._caller(claims))

    def _caller(self, claims: Mapping[str, Any]) -> Caller:
        s = self.settings
        tenant = claims.get(s.tenant_claim)
        if not isinstance(tenant, str) or not TENANT_PATTERN.fullmatch(tenant):
            raise Unauthenticated(f"token has no valid {s.tenant_claim!r} claim (the tenant)")
        raw = claims.get(s.roles_claim, [])
        names = raw.split() if isinstance(raw, str) else raw if isinstance(raw, list) else []
        roles = frozenset(ROLE_NAMES[n.lower().removeprefix("role_")] for n in names
                          if isinstance(n, str) and n.lower().removeprefix("role_") in ROLE_NAMES)
        issuer, subject = str(claims["iss"]), str(claims["sub"])
        expires = float(claims["exp"]) + s.leeway_seconds
        return self.rules.apply(f"jwt:{issuer}#{subject}", tenant, roles, AuthMethod.JWT, issuer=issuer,
                                claims=claims, expires=expires)

    def _remember(self, token: str, caller: Caller) -> Caller:
        self._verified[token] = caller
        if len(self._verified) > MAX_CACHED_TOKENS:
            self._verified.popitem(last=False)
        return caller


def _claim_reason(claim: str, s: JwtSettings) -> str:
    if claim == "iss":
        return f"token issuer is not {s.issuer}"
    if claim == "aud":
        return f"token audience does not include {s.audience}"
    return f"token claim {claim!r} is not valid now" if claim else "token claims are not valid"


# ---------------------------------------------------------------------- the hook


class AuthHook:
    """The call chain's authentication and authorization (see the module docstring)."""

    def __init__(self, settings: AuthSettings, apikeys: ApiKeyStore, required: Mapping[str, Role | None],
                 jwt_verifier: JwtVerifier | None = None) -> None:
        self.settings = settings
        self.apikeys = apikeys
        self.required = dict(required)
        self.rules = Rules(settings.rules)
        self.jwt = jwt_verifier
        if settings.jwt is not None and jwt_verifier is None:
            self.jwt = JwtVerifier(settings.jwt, self.rules)
        self._key_callers: dict[str, Caller] = {}  # API key id -> its caller (rules applied once)

    async def before(self, call: CallInfo) -> None:
        method = call.method
        if method.startswith(OPEN_PREFIXES):
            call.identity = NOBODY
            return
        who = call.identity
        if who is None:
            call.identity = UNAUTHENTICATED  # until the credentials are proved
            who = call.identity = await self.authenticate(call)
        elif isinstance(who, Caller):  # inherited: what the caller proved must still hold
            self._still_valid(who)
        self.authorize(who, method)

    def after(self, call: CallInfo) -> None:
        return None

    # ------------------------------------------------------------------ who

    async def authenticate(self, call: CallInfo) -> Caller:
        md = call.metadata
        header = md.get("authorization", "")
        if header:
            scheme, _, value = header.strip().partition(" ")
            value = value.strip()
            scheme = scheme.lower()
            if not value or len(value) > MAX_CREDENTIAL_CHARS:
                raise Unauthenticated("malformed authorization header (ApiKey <secret> or Bearer <jwt>)")
            if scheme == "apikey" or (scheme == "bearer" and value.startswith(SECRET_PREFIX)):
                return self._api_key(value)
            if scheme == "bearer":
                if self.jwt is None:
                    raise Unauthenticated("bearer tokens are not accepted here (no auth.jwt configured)")
                return await self.jwt.verify(value)
            raise Unauthenticated(f"authorization scheme {scheme!r} is not supported (ApiKey or Bearer)")
        key = md.get("x-api-key", "")
        if key:
            if len(key) > MAX_CREDENTIAL_CHARS:
                raise Unauthenticated("malformed x-api-key")
            return self._api_key(key.strip())
        certificate = self._certificate(call)
        if certificate is not None:
            return certificate
        raise Unauthenticated("no credentials: send 'authorization: ApiKey <secret>', "
                              "'authorization: Bearer <jwt>' or a client certificate")

    def _api_key(self, secret: str) -> Caller:
        record = self.apikeys.authenticate(secret)
        caller = self._key_callers.get(record.id)
        if caller is None:
            caller = self.rules.apply(record.principal, record.tenant, record.roles, AuthMethod.API_KEY,
                                      key_id=record.id)
            if len(self._key_callers) > 4096:
                self._key_callers.clear()
            self._key_callers[record.id] = caller
        return caller

    def _certificate(self, call: CallInfo) -> Caller | None:
        auth_context = call.auth_context
        if auth_context is None:
            return None
        context = auth_context()
        first_name = next(iter(context.get("x509_common_name") or ()), None)
        if first_name is None:
            return None
        cn = _text(first_name)
        mapped = self.settings.mtls_identities.get(cn)
        if mapped is None:
            raise Unauthenticated(f"client certificate CN={cn} is not mapped to an identity (auth.mtls_identities)")
        subject = next(iter(context.get("x509_subject") or ()), None)
        principal = "mtls:" + (_text(subject) if subject is not None else f"CN={cn}")
        return self.rules.apply(principal, mapped.tenant, mapped.roles, AuthMethod.MTLS)

    def _still_valid(self, who: Caller) -> None:
        if who.key_id:
            why = self.apikeys.refusal(who.key_id)
            if why:
                raise Unauthenticated(why)
        if who.expires and time.time() >= who.expires:
            raise Unauthenticated("token expired")

    # ------------------------------------------------------------------ may it

    def authorize(self, who: Identity, method: str) -> None:
        needed = self.required.get(method, Role.ADMIN)  # a method not in the table: admins only
        if needed is not None and not who.has(needed):
            held = ", ".join(role_name(r) for r in sorted(who.roles)) or "no role"
            raise PermissionDenied(method, role_name(needed),
                                   f"{method} needs the {role_name(needed)} role; {who.principal} "
                                   f"(tenant {who.tenant}) holds {held}")
        if isinstance(who, Caller):
            why = who.access.refusal(method)
            if why:
                raise PermissionDenied(method, "", f"{method} is not allowed for {who.principal}: {why}")


def _text(value: object) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
