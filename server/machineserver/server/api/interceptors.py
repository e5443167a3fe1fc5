"""The server's interceptor: request ids, per-call context, the hook chain (where auth,
audit and metrics plug in) and the error boundary, wrapped once around every handler of
every service, unary and streaming alike."""

from __future__ import annotations

import itertools
import secrets
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import grpc
import structlog
from grpc import aio

from machineserver.server.api.errors import internal_status, status_for
from machineserver.server.core.errors import MachineServerError

log = structlog.get_logger("machineserver.rpc")

REQUEST_ID_KEY = "x-request-id"
# request ids: a random per-process prefix and a counter (unique, and cheaper per call
# than drawing random bytes each time)
_ID_PREFIX = secrets.token_hex(4) + "-"
_ID_COUNTER = itertools.count(1)
STATUS_DETAILS_KEY = "grpc-status-details-bin"

# grpc's type stubs describe RpcMethodHandler's behaviours as the sync server runs them;
# under grpc.aio they are coroutine functions (unary responses) or async generators
# (streams; or coroutines that write with context.write) taking an aio.ServicerContext.
AioUnaryBehaviour = Callable[[Any, aio.ServicerContext[Any, Any]], Awaitable[Any]]
AioStreamBehaviour = Callable[[Any, aio.ServicerContext[Any, Any]], AsyncIterable[Any] | Awaitable[None]]


@dataclass
class CallInfo:
    method: str  # "/machineserver.v1.SessionService/CreateSession"
    request_id: str
    metadata: dict[str, str]
    started: float = field(default_factory=time.perf_counter)
    code: grpc.StatusCode = grpc.StatusCode.OK
    hooks_entered: int = 0  # how many hooks' before() ran: only those get after()

    @property
    def service(self) -> str:
        return self.method.rsplit("/", 2)[-2] if self.method.count("/") >= 2 else ""

    @property
    def rpc(self) -> str:
        return self.method.rsplit("/", 1)[-1]

    @property
    def elapsed_ms(self) -> float:
        return (time.perf_counter() - self.started) * 1000


class CallHook(Protocol):
    """One link of the chain. ``before`` may refuse a call by raising a MachineServerError
    (e.g. Unauthenticated); ``after`` sees the final status code."""

    async def before(self, call: CallInfo) -> None: ...

    def after(self, call: CallInfo) -> None: ...


class AccessLog:
    """One structlog line per call: rpc, code, duration, request id."""

    quiet_methods = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})

    async def before(self, call: CallInfo) -> None:
        return None

    def after(self, call: CallInfo) -> None:
        if call.method in self.quiet_methods:
            return
        log.info("rpc", code=call.code.name, ms=round(call.elapsed_ms, 3))


class ServerInterceptor(aio.ServerInterceptor):
    def __init__(self, hooks: Sequence[CallHook] = ()) -> None:
        self._hooks = list(hooks)
        # Handlers are wrapped once per method (grpc hands back the same handler each
        # time); per-call data comes from the context.
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        method = details.method
        wrapped = self._wrapped.get(method)
        if wrapped is None:
            handler = await continuation(details)
            if handler is None:
                return handler
            wrapped = self._wrapped[method] = _wrap(handler, method, self)
        return wrapped

    # ------------------------------------------------------------------ the boundary

    def _open(self, method: str, context: aio.ServicerContext) -> CallInfo:
        md = {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
        rid = md.get(REQUEST_ID_KEY) or f"{_ID_PREFIX}{next(_ID_COUNTER):x}"
        call = CallInfo(method, rid, md)
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=rid, rpc=call.rpc)
        context.set_trailing_metadata(((REQUEST_ID_KEY, rid),))
        return call

    async def _before(self, call: CallInfo) -> None:
        """Run the hooks in order; one that refuses the call (raises) ends the chain, and
        the ones that ran still see after()."""
        for hook in self._hooks:
            call.hooks_entered += 1
            await hook.before(call)

    async def _fail_unless_abort(self, call: CallInfo, exc: Exception, context: aio.ServicerContext) -> None:
        """Answer the error with its status (context.abort raises AbortError, which must
        pass through untouched; cancellation and GeneratorExit are not Exceptions)."""
        if not isinstance(exc, aio.AbortError):
            await self._fail(call, exc, context)

    async def _fail(self, call: CallInfo, exc: BaseException, context: aio.ServicerContext) -> None:
        rid = call.request_id
        if isinstance(exc, MachineServerError):
            code, status = status_for(exc, rid)
        else:
            log.error("rpc_internal_error", exc_info=exc)
            code, status = internal_status(rid)
        call.code = code
        md = ((STATUS_DETAILS_KEY, status.SerializeToString()), (REQUEST_ID_KEY, rid))
        await context.abort(code, status.message, trailing_metadata=md)

    def _end(self, call: CallInfo, context: aio.ServicerContext) -> None:
        if call.code is grpc.StatusCode.OK:
            code = context.code() if hasattr(context, "code") else None
            if isinstance(code, grpc.StatusCode):
                call.code = code
        for hook in reversed(self._hooks[: call.hooks_entered]):
            try:
                hook.after(call)
            except Exception:  # a broken hook must not break the call
                log.exception("hook_failed")


def _wrap(handler: grpc.RpcMethodHandler, method: str, ic: ServerInterceptor) -> grpc.RpcMethodHandler:
    if handler.unary_unary or handler.stream_unary:
        inner = cast(AioUnaryBehaviour, handler.unary_unary or handler.stream_unary)

        async def unary_result(request_or_iterator: Any, context: aio.ServicerContext) -> Any:
            call = ic._open(method, context)
            try:
                await ic._before(call)
                return await inner(request_or_iterator, context)
            except Exception as exc:
                await ic._fail_unless_abort(call, exc, context)
                raise
            finally:
                ic._end(call, context)

        make = grpc.unary_unary_rpc_method_handler if handler.unary_unary else grpc.stream_unary_rpc_method_handler
        return make(unary_result, request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer)

    inner_stream = cast(AioStreamBehaviour, handler.unary_stream or handler.stream_stream)

    async def stream_result(request_or_iterator: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
        call = ic._open(method, context)
        try:
            await ic._before(call)
            result = inner_stream(request_or_iterator, context)
            if isinstance(result, AsyncIterable):
                async for item in result:
                    yield item
            else:  # a handler that writes with context.write and returns a coroutine
                await result
        except Exception as exc:
            await ic._fail_unless_abort(call, exc, context)
            raise
        finally:
            ic._end(call, context)

    make_stream = grpc.unary_stream_rpc_method_handler if handler.unary_stream else grpc.stream_stream_rpc_method_handler
    return make_stream(stream_result, request_deserializer=handler.request_deserializer,
                       response_serializer=handler.response_serializer)
