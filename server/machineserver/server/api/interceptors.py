"""The server's interceptor: request ids, per-call context, the hook chain (where auth,
audit and metrics plug in) and the error boundary, wrapped once around every handler of
every service, unary and streaming alike. The chain itself is the core's
(:mod:`machineserver.server.core.calls`), which the Attach stream and the GDB bridge use
for each of their commands too."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, cast

import grpc
import structlog
from grpc import aio

from machineserver.server.api.errors import code_name, internal_status, status_for
from machineserver.server.core.calls import CURRENT, CallChain, CallHook, CallInfo
from machineserver.server.core.errors import MachineServerError

log = structlog.get_logger("machineserver.rpc")

REQUEST_ID_KEY = "x-request-id"
STATUS_DETAILS_KEY = "grpc-status-details-bin"

# grpc's type stubs describe RpcMethodHandler's behaviours as the sync server runs them;
# under grpc.aio they are coroutine functions (unary responses) or async generators
# (streams; or coroutines that write with context.write) taking an aio.ServicerContext.
AioUnaryBehaviour = Callable[[Any, aio.ServicerContext[Any, Any]], Awaitable[Any]]
AioStreamBehaviour = Callable[[Any, aio.ServicerContext[Any, Any]], AsyncIterable[Any] | Awaitable[None]]

__all__ = ["AccessLog", "CallHook", "CallInfo", "ServerInterceptor"]


class AccessLog:
    """One structlog line per call: rpc, code, duration, request id."""

    quiet_methods = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})

    async def before(self, call: CallInfo) -> None:
        return None

    def after(self, call: CallInfo) -> None:
        if call.method in self.quiet_methods:
            return
        log.info("rpc", code=call.code, ms=round(call.elapsed_ms, 3), transport=call.transport.value)


class ServerInterceptor(aio.ServerInterceptor):
    def __init__(self, chain: CallChain | Sequence[CallHook] = ()) -> None:
        if not isinstance(chain, CallChain):
            hooks, chain = list(chain), CallChain()
            chain.configure(hooks, code_name)
        self.chain = chain
        # Handlers are wrapped once per method (grpc hands back the same handler each
        # time); per-call data comes from the context.
        self._wrapped: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}

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

    def _open(self, method: str, context: aio.ServicerContext[Any, Any]) -> CallInfo:
        md = {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
        peer = context.peer() if hasattr(context, "peer") else ""
        call = self.chain.open(method, md, peer=peer)
        CURRENT.set(call)
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=call.request_id, rpc=call.rpc)
        context.set_trailing_metadata(((REQUEST_ID_KEY, call.request_id),))
        return call

    async def _fail_unless_abort(self, call: CallInfo, exc: Exception, context: aio.ServicerContext[Any, Any]) -> None:
        """Answer the error with its status (context.abort raises AbortError, which must
        pass through untouched; cancellation and GeneratorExit are not Exceptions)."""
        if not isinstance(exc, aio.AbortError):
            await self._fail(call, exc, context)

    async def _fail(self, call: CallInfo, exc: BaseException, context: aio.ServicerContext[Any, Any]) -> None:
        rid = call.request_id
        if isinstance(exc, MachineServerError):
            code, status = status_for(exc, rid)
        else:
            log.error("rpc_internal_error", exc_info=exc)
            code, status = internal_status(rid)
        call.code = code.name
        md = ((STATUS_DETAILS_KEY, status.SerializeToString()), (REQUEST_ID_KEY, rid))
        await context.abort(code, status.message, trailing_metadata=md)

    def _end(self, call: CallInfo, context: aio.ServicerContext[Any, Any], *, finished: bool) -> None:
        """The hooks' after(), with the final code: a handler that did not finish (its
        task was cancelled, or the client went away from a stream) ended CANCELLED."""
        if call.code == "OK":
            if not finished:
                call.code = "CANCELLED"
            else:
                code = context.code() if hasattr(context, "code") else None
                if isinstance(code, grpc.StatusCode):
                    call.code = code.name
        self.chain.leave(call)


def _wrap(handler: grpc.RpcMethodHandler[Any, Any], method: str, ic: ServerInterceptor) -> grpc.RpcMethodHandler[Any, Any]:
    if handler.unary_unary or handler.stream_unary:
        inner = cast(AioUnaryBehaviour, handler.unary_unary or handler.stream_unary)

        async def unary_result(request_or_iterator: Any, context: aio.ServicerContext[Any, Any]) -> Any:
            call = ic._open(method, context)
            finished = False
            try:
                await ic.chain.enter(call)
                result = await inner(request_or_iterator, context)
                finished = True
                return result
            except Exception as exc:
                finished = True
                await ic._fail_unless_abort(call, exc, context)
                raise
            finally:
                ic._end(call, context, finished=finished)

        make = grpc.unary_unary_rpc_method_handler if handler.unary_unary else grpc.stream_unary_rpc_method_handler
        return make(unary_result, request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer)

    inner_stream = cast(AioStreamBehaviour, handler.unary_stream or handler.stream_stream)

    async def stream_result(request_or_iterator: Any, context: aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        call = ic._open(method, context)
        finished = False
        try:
            await ic.chain.enter(call)
            result = inner_stream(request_or_iterator, context)
            if isinstance(result, AsyncIterable):
                async for item in result:
                    yield item
            else:  # a handler that writes with context.write and returns a coroutine
                await result
            finished = True
        except Exception as exc:
            finished = True
            await ic._fail_unless_abort(call, exc, context)
            raise
        finally:
            ic._end(call, context, finished=finished)

    make_stream = grpc.unary_stream_rpc_method_handler if handler.unary_stream else grpc.stream_stream_rpc_method_handler
    return make_stream(stream_result, request_deserializer=handler.request_deserializer,
                       response_serializer=handler.response_serializer)
