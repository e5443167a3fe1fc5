"""The error boundary: the one table from the core's errors to gRPC status codes, with
google.rpc details (BadRequest, ErrorInfo, PreconditionFailure, QuotaFailure,
ResourceInfo) in ``grpc-status-details-bin`` as grpcio-status writes them. No traceback
ever reaches a client: anything unexpected is logged here and answered INTERNAL with
the request id to quote."""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2

from machineserver.server.core import errors as core
from machineserver.server.core.console import OffsetOutOfRange

DOMAIN = "machineserver.dev"

CODE_TABLE: dict[type[core.MachineServerError], grpc.StatusCode] = {
    core.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    core.NotFound: grpc.StatusCode.NOT_FOUND,
    core.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    core.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    core.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    core.Unimplemented: grpc.StatusCode.UNIMPLEMENTED,
    core.Unavailable: grpc.StatusCode.UNAVAILABLE,
    core.Aborted: grpc.StatusCode.ABORTED,
    core.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    core.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    core.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    OffsetOutOfRange: grpc.StatusCode.OUT_OF_RANGE,
}


def code_for(exc: core.MachineServerError) -> grpc.StatusCode:
    for cls in type(exc).__mro__:
        if cls in CODE_TABLE:
            return CODE_TABLE[cls]
    return grpc.StatusCode.UNKNOWN


def code_name(exc: BaseException) -> str:
    """The status code name an exception ends a call with (the core's call chain asks)."""
    if isinstance(exc, core.MachineServerError):
        return code_for(exc).name
    return "INTERNAL"


def _pack(msg: Message) -> any_pb2.Any:
    a = any_pb2.Any()
    a.Pack(msg)
    return a


def status_for(exc: core.MachineServerError, request_id: str = "") -> tuple[grpc.StatusCode, status_pb2.Status]:
    code = code_for(exc)
    details: list[any_pb2.Any] = []
    if isinstance(exc, core.InvalidArgument):
        details.append(_pack(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=exc.field, description=exc.reason)
        ])))
    elif isinstance(exc, core.NotFound | core.AlreadyExists):
        details.append(_pack(error_details_pb2.ResourceInfo(
            resource_type=exc.resource_type, resource_name=exc.name, description=exc.message
        )))
    elif isinstance(exc, core.FailedPrecondition):
        details.append(_pack(error_details_pb2.PreconditionFailure(violations=[
            error_details_pb2.PreconditionFailure.Violation(
                type="STATE", subject=exc.required or "", description=exc.message
            )
        ])))
    elif isinstance(exc, core.ResourceExhausted):
        details.append(_pack(error_details_pb2.QuotaFailure(violations=[
            error_details_pb2.QuotaFailure.Violation(subject=exc.subject, description=exc.message)
        ])))
    metadata = {"request_id": request_id} if request_id else {}
    if isinstance(exc, core.Unimplemented):
        metadata["feature"] = exc.feature
    elif isinstance(exc, core.PermissionDenied):
        metadata["method"] = exc.method
        if exc.required_role:
            metadata["required_role"] = exc.required_role
    elif isinstance(exc, core.Unauthenticated):
        metadata["why"] = exc.reason
    elif isinstance(exc, core.QuotaExceeded):
        metadata["quota"] = exc.limit
    details.append(_pack(error_details_pb2.ErrorInfo(
        reason=code.name, domain=DOMAIN, metadata=metadata
    )))
    return code, status_pb2.Status(code=code.value[0], message=exc.message, details=details)


def internal_status(request_id: str) -> tuple[grpc.StatusCode, status_pb2.Status]:
    message = f"internal error; quote request id {request_id} to the operator"
    info = _pack(error_details_pb2.ErrorInfo(reason="INTERNAL", domain=DOMAIN,
                                             metadata={"request_id": request_id}))
    return grpc.StatusCode.INTERNAL, status_pb2.Status(
        code=code_pb2.INTERNAL, message=message, details=[info]
    )
