"""The one command path: every operation a client asks for, on every transport, passes
through one hook chain before it reaches the core.

Transports:

* ``rpc``: a unary or streaming RPC (the gRPC interceptor opens the call);
* ``attach``: one command on a DebugService.Attach stream (each command is its own call,
  named after the unary RPC it mirrors, e.g. ``/machineserver.v1.DebugService/Step``, with
  its own request id derived from the stream's);
* ``gdb``: one packet on a GDB bridge connection that reads or changes the target (named
  after the RPC with the same effect: ``m`` is ReadMemory, ``Z0`` SetBreakpoint, ``c``
  Continue, ...). Pure protocol chatter (qSupported, target.xml) is not a call.

The hooks (request-id logging, tracing, metrics, and auth, audit and quota as they come)
see the same :class:`CallInfo` whatever the transport, so a per-method rule holds for the
GDB bridge as it does for the RPC, and no transport is a second front door. A hook that
only observes how calls end derives from :class:`AfterOnlyHook`: its ``before`` is not
awaited (a chain of such hooks costs a call nothing before it runs).

Log lines name the call they belong to: :func:`add_call_context` (a structlog processor)
adds the request id and rpc of the current call, so nothing is bound per call.

Codes are the gRPC status code *names* (``"OK"``, ``"INVALID_ARGUMENT"``, ...); which
error means which code is the API layer's one table, handed in as ``classify``.
"""

from __future__ import annotations

import asyncio
import contextvars
import enum
import itertools
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import structlog

if TYPE_CHECKING:
    from machineserver.server.core.identity import Identity

log = structlog.get_logger("machineserver.calls")

T = TypeVar("T")

# the gRPC status codes by name (the numbers are the protocol's)
STATUS_NUMBERS = {
    "OK": 0, "CANCELLED": 1, "UNKNOWN": 2, "INVALID_ARGUMENT": 3, "DEADLINE_EXCEEDED": 4,
    "NOT_FOUND": 5, "ALREADY_EXISTS": 6, "PERMISSION_DENIED": 7, "RESOURCE_EXHAUSTED": 8,
    "FAILED_PRECONDITION": 9, "ABORTED": 10, "OUT_OF_RANGE": 11, "UNIMPLEMENTED": 12,
    "INTERNAL": 13, "UNAVAILABLE": 14, "DATA_LOSS": 15, "UNAUTHENTICATED": 16,
}

# request ids: a random per-process prefix and a counter (unique, and cheaper per call
# than drawing random bytes each time)
_ID_PREFIX = secrets.token_hex(4) + "-"
_ID_COUNTER = itertools.count(1)


def new_request_id() -> str:
    return f"{_ID_PREFIX}{next(_ID_COUNTER):x}"


class Transport(enum.StrEnum):
    RPC = "rpc"
    ATTACH = "attach"
    GDB = "gdb"


class CallInfo:
    """One command on its way through the chain. ``peer`` may be given as a function that
    asks the transport: it is asked once, when first read (most calls never read it)."""

    # the TLS facts of the peer (grpc's auth_context(): x509_common_name, x509_subject,
    # ...), as the transport's function; set by the API boundary only when some hook has a
    # before() (the auth hook reads it for client certificates), None otherwise
    auth_context: Callable[[], Mapping[str, Iterable[bytes]]] | None = None

    def __init__(self, method: str, request_id: str, metadata: Mapping[str, str],
                 transport: Transport = Transport.RPC, peer: str | Callable[[], str] = "") -> None:
        self.method = method  # "/machineserver.v1.SessionService/CreateSession"
        self.request_id = request_id
        self.metadata = metadata
        self.transport = transport
        self._peer = peer
        self.started = time.perf_counter()
        self.code = "OK"  # the final status code's name
        self.hooks_entered = 0  # how many hooks' before() ran: only those get after()
        # who is calling (set by the auth hook; None: auth is off, the caller is the local
        # admin: identity.current() says so)
        self.identity: Identity | None = None
        # what the audit log records beside the call (resource, address, length), filled in
        # by the core as it serves the command
        self.audit: dict[str, object] = {}

    def __repr__(self) -> str:
        return (f"CallInfo({self.method!r}, request_id={self.request_id!r}, transport={self.transport.value}, "
                f"code={self.code!r})")

    @property
    def peer(self) -> str:
        peer = self._peer
        if not isinstance(peer, str):
            peer = self._peer = peer()
        return peer

    @property
    def service(self) -> str:
        return self.method.rsplit("/", 2)[-2] if self.method.count("/") >= 2 else ""

    @property
    def rpc(self) -> str:
        return self.method.rsplit("/", 1)[-1]

    @property
    def code_number(self) -> int:
        return STATUS_NUMBERS.get(self.code, 2)

    @property
    def elapsed_ms(self) -> float:
        return (time.perf_counter() - self.started) * 1000


class CallHook(Protocol):
    """One link of the chain. ``before`` may refuse a call by raising a MachineServerError
    (e.g. Unauthenticated); ``after`` sees the final status code."""

    async def before(self, call: CallInfo) -> None: ...

    def after(self, call: CallInfo) -> None: ...


class AfterOnlyHook:
    """A hook that only sees how calls end (access log, metrics): the chain does not
    await its ``before``."""

    async def before(self, call: CallInfo) -> None:
        return None

    def after(self, call: CallInfo) -> None:
        return None


# the RPC being served in this task (set by the API layer when it opens one): what a
# transport started from an RPC (a GDB bridge, an Attach stream) inherits its caller from
CURRENT: contextvars.ContextVar[CallInfo | None] = contextvars.ContextVar("machineserver_call", default=None)


def add_call_context(logger: object, method_name: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: a log line written while a call is served carries its
    ``request_id`` and ``rpc`` (unless the line, or context bound around it, names them)."""
    call = CURRENT.get()
    if call is not None:
        event_dict.setdefault("request_id", call.request_id)
        event_dict.setdefault("rpc", call.rpc)
    return event_dict


def current_metadata() -> dict[str, str]:
    call = CURRENT.get()
    return dict(call.metadata) if call is not None else {}


def _unclassified(exc: BaseException) -> str:
    return "UNKNOWN"


class CallChain:
    """The hooks, in order, and how errors map to codes. One per engine; the API layer
    configures it at start (``configure``) with its hooks and its error table."""

    def __init__(self) -> None:
        self.hooks: list[CallHook] = []
        self.classify: Callable[[BaseException], str] = _unclassified
        self.observe_only = True  # no hook has a before() to await
        self._entering: list[tuple[CallHook, bool]] = []  # each hook, and whether its before() runs
        self._leaving: list[CallHook] = []  # the hooks, last first

    def configure(self, hooks: Sequence[CallHook], classify: Callable[[BaseException], str]) -> None:
        self.hooks = list(hooks)
        self.classify = classify
        self._entering = [(h, not isinstance(h, AfterOnlyHook) or type(h).before is not AfterOnlyHook.before)
                          for h in self.hooks]
        self._leaving = self.hooks[::-1]
        self.observe_only = not any(needed for _, needed in self._entering)

    def open(self, method: str, metadata: Mapping[str, str] | None = None, *,
             transport: Transport = Transport.RPC, peer: str = "", request_id: str = "") -> CallInfo:
        """A command within the current call (an Attach command within its stream, a GDB
        packet within the bridge's connection): it runs as the same identity unless a hook
        says otherwise."""
        md = dict(metadata or {})
        call = CallInfo(method, request_id or md.get("x-request-id") or new_request_id(), md, transport, peer)
        parent = CURRENT.get()
        if parent is not None:
            call.identity = parent.identity
        return call

    async def enter(self, call: CallInfo) -> None:
        """Run the hooks' before() in order; one that refuses the call (raises) ends the
        chain, and the ones that ran still see after() (from :meth:`leave`)."""
        for hook, needed in self._entering:
            call.hooks_entered += 1
            if needed:
                await hook.before(call)

    def fail(self, call: CallInfo, exc: BaseException) -> None:
        """Record how the call ended when it raised."""
        if isinstance(exc, asyncio.CancelledError | GeneratorExit):
            call.code = "CANCELLED"
        else:
            call.code = self.classify(exc)

    def leave(self, call: CallInfo) -> None:
        entered = call.hooks_entered
        hooks = self._leaving if entered == len(self._leaving) else self._leaving[len(self._leaving) - entered:]
        for hook in hooks:
            try:
                hook.after(call)
            except Exception:  # a broken hook must not break the call
                log.exception("hook_failed", hook=type(hook).__name__)

    async def run(self, call: CallInfo, operation: Callable[[], Awaitable[T]]) -> T:
        """The whole path for one command: hooks, the operation, the code, the hooks' end
        (log lines in between carry the command's request id and rpc). While it runs the
        command is the current call (:data:`CURRENT`)."""
        token = CURRENT.set(call)
        with structlog.contextvars.bound_contextvars(request_id=call.request_id, rpc=call.rpc):
            try:
                await self.enter(call)
                return await operation()
            except BaseException as exc:
                self.fail(call, exc)
                raise
            finally:
                self.leave(call)
                CURRENT.reset(token)

    def record(self, call: CallInfo) -> None:
        """An event that is not a command (a GDB bridge connection opening or closing):
        nothing to refuse or run, so only the hooks' after() see it (the audit log)."""
        call.hooks_entered = len(self.hooks)
        self.leave(call)
