"""Who is calling: the identity every command runs as, on every transport.

The auth hook (API layer) authenticates a call and sets :attr:`CallInfo.identity`; the core
asks :func:`current` (the identity of the command being served, inherited by a GDB bridge
or an Attach stream from the RPC that opened it). Without authentication configured the
server listens on loopback only and every caller is :data:`LOCAL_ADMIN`.

Tenancy: every record carries the tenant of the identity that created it; an identity sees
the records of its own tenant (admins see every tenant's), and a record it does not see is
NOT_FOUND, never PERMISSION_DENIED, so ids do not leak across tenants.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from machineserver.server.core.calls import CURRENT, CallInfo

DEFAULT_TENANT = "default"
ANONYMOUS = "anonymous"


class Role(enum.IntEnum):
    """Ordered: each role includes the ones below it (the numbers are the proto's)."""

    VIEWER = 1
    OPERATOR = 2
    ADMIN = 3


class AuthMethod(enum.IntEnum):
    """How the caller proved who it is (the numbers are the proto's)."""

    NONE = 1
    API_KEY = 2
    JWT = 3
    MTLS = 4


@dataclass(frozen=True)
class Identity:
    principal: str  # "apikey:NAME", "jwt:ISSUER#SUBJECT", "mtls:DN", "anonymous"
    tenant: str
    roles: frozenset[Role]
    auth_method: AuthMethod = AuthMethod.NONE

    @property
    def role(self) -> Role | None:
        """The highest role held (None: none)."""
        return max(self.roles) if self.roles else None

    def has(self, role: Role) -> bool:
        held = self.role
        return held is not None and held >= role

    @property
    def is_admin(self) -> bool:
        return self.has(Role.ADMIN)

    def sees(self, tenant: str) -> bool:
        """Whether records of ``tenant`` exist for this identity."""
        return self.is_admin or tenant == self.tenant


# auth off: the server listens on loopback only and every caller is this
LOCAL_ADMIN = Identity(ANONYMOUS, DEFAULT_TENANT, frozenset({Role.ADMIN}), AuthMethod.NONE)


def of_call(call: CallInfo | None) -> Identity:
    identity = call.identity if call is not None else None
    return identity if identity is not None else LOCAL_ADMIN


def current() -> Identity:
    """The identity of the command being served (LOCAL_ADMIN outside any call: the
    server's own work, e.g. restoring sessions at start)."""
    return of_call(CURRENT.get())
