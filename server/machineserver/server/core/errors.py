"""Domain errors of the core. The API layer maps each to one gRPC status code in one
table (``machineserver.server.api.errors``); nothing else in the server picks codes.

MachineServerError
 +-- InvalidArgument      bad input; names the field                  INVALID_ARGUMENT
 +-- NotFound             a named resource does not exist             NOT_FOUND
 +-- AlreadyExists        a resource with that name exists            ALREADY_EXISTS
 +-- FailedPrecondition   the resource is not in the state needed     FAILED_PRECONDITION
 +-- ResourceExhausted    a quota or size limit                       RESOURCE_EXHAUSTED
 |    +-- QuotaExceeded    a tenant's quota (core/quotas.py)           RESOURCE_EXHAUSTED
 +-- Unimplemented        the backend (or server) lacks the feature   UNIMPLEMENTED
 +-- Unavailable          a backend died or is not installed          UNAVAILABLE
 +-- Aborted              a concurrent change won (e.g. etag mismatch) ABORTED
 +-- DeadlineExceeded     a backend did not answer in time            DEADLINE_EXCEEDED
 +-- Unauthenticated      no credentials, or ones that do not hold    UNAUTHENTICATED
 +-- PermissionDenied     the caller lacks the role a method needs    PERMISSION_DENIED
"""

from __future__ import annotations


class MachineServerError(Exception):
    """Root of every error the core raises on purpose."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(MachineServerError):
    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}" if field else reason)
        self.field = field
        self.reason = reason


class NotFound(MachineServerError):
    def __init__(self, resource_type: str, name: str) -> None:
        super().__init__(f"{resource_type} {name!r} not found")
        self.resource_type = resource_type
        self.name = name


class AlreadyExists(MachineServerError):
    def __init__(self, resource_type: str, name: str) -> None:
        super().__init__(f"{resource_type} {name!r} already exists")
        self.resource_type = resource_type
        self.name = name


class FailedPrecondition(MachineServerError):
    def __init__(self, message: str, *, state: str = "", required: str = "") -> None:
        super().__init__(message)
        self.state = state
        self.required = required


class ResourceExhausted(MachineServerError):
    def __init__(self, subject: str, message: str) -> None:
        super().__init__(message)
        self.subject = subject


class QuotaExceeded(ResourceExhausted):
    """A tenant hit one of its quotas: the subject is ``tenant:T`` and the message names
    the limit (``live_sessions: 5 of 5 in use``)."""

    def __init__(self, limit: str, tenant: str, used: int, maximum: int, detail: str = "") -> None:
        super().__init__(f"tenant:{tenant}", f"{limit}: {used} of {maximum} in use" + (f"; {detail}" if detail else ""))
        self.limit = limit
        self.tenant = tenant
        self.used = used
        self.maximum = maximum


class Unimplemented(MachineServerError):
    def __init__(self, feature: str, message: str) -> None:
        super().__init__(message)
        self.feature = feature


class Unavailable(MachineServerError):
    pass


class Aborted(MachineServerError):
    pass


class DeadlineExceeded(MachineServerError):
    pass


class Unauthenticated(MachineServerError):
    """The call carries no credentials, or ones that do not hold (``reason`` says which:
    unknown key, expired token, wrong issuer, ...)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class PermissionDenied(MachineServerError):
    """The caller is known but may not call ``method``: it lacks ``required_role`` (or a
    configured allowlist rule refuses the method: ``required_role`` is then empty)."""

    def __init__(self, method: str, required_role: str, message: str) -> None:
        super().__init__(message)
        self.method = method
        self.required_role = required_role
