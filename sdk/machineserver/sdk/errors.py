"""Typed errors of the MachineServer SDK. Users never catch ``grpc.RpcError``.

MachineServerError
 +-- InvalidArgument (ValueError)         a bad field; .field_violations says which
 +-- NotFound (LookupError)
 +-- AlreadyExists
 +-- FailedPrecondition                  wrong state; .precondition_violations
 +-- ResourceExhausted                   a quota or size limit; .quota_violations
 +-- Unimplemented                       the backend lacks the feature; .feature
 +-- Unauthenticated / PermissionDenied (PermissionError)
 +-- Unavailable (ConnectionError)       server or backend unreachable
 +-- DeadlineExceeded (TimeoutError)
 +-- Aborted, OutOfRange, Cancelled, Internal, Unknown

Each keeps ``.code`` (grpc.StatusCode), ``.message``, ``.request_id`` and the parsed
google.rpc ``.details`` (messages: BadRequest, ErrorInfo, ...; a detail of a type this
module does not know stays a ``google.protobuf.Any``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar

import grpc
from google.protobuf.message import DecodeError, Message
from google.rpc import error_details_pb2, status_pb2
from grpc import aio

STATUS_DETAILS_KEY = "grpc-status-details-bin"
REQUEST_ID_KEY = "x-request-id"

D = TypeVar("D", bound=Message)

_DETAIL_TYPES: dict[str, type[Message]] = {
    "google.rpc.BadRequest": error_details_pb2.BadRequest,
    "google.rpc.ErrorInfo": error_details_pb2.ErrorInfo,
    "google.rpc.PreconditionFailure": error_details_pb2.PreconditionFailure,
    "google.rpc.QuotaFailure": error_details_pb2.QuotaFailure,
    "google.rpc.ResourceInfo": error_details_pb2.ResourceInfo,
    "google.rpc.RetryInfo": error_details_pb2.RetryInfo,
    "google.rpc.DebugInfo": error_details_pb2.DebugInfo,
}


class MachineServerError(Exception):
    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, *, code: grpc.StatusCode | None = None,
                 details: Iterable[Message] = (), request_id: str = "") -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.details = list(details)
        self.request_id = request_id

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"

    def detail(self, cls: type[D]) -> D | None:
        """The first detail of a google.rpc type (e.g. ``error_details_pb2.RetryInfo``)."""
        return next((d for d in self.details if isinstance(d, cls)), None)

    @property
    def field_violations(self) -> list[tuple[str, str]]:
        br = self.detail(error_details_pb2.BadRequest)
        return [(v.field, v.description) for v in br.field_violations] if br else []

    @property
    def error_info(self) -> error_details_pb2.ErrorInfo | None:
        return self.detail(error_details_pb2.ErrorInfo)

    @property
    def precondition_violations(self) -> list[str]:
        pf = self.detail(error_details_pb2.PreconditionFailure)
        return [v.description for v in pf.violations] if pf else []

    @property
    def quota_violations(self) -> list[tuple[str, str]]:
        qf = self.detail(error_details_pb2.QuotaFailure)
        return [(v.subject, v.description) for v in qf.violations] if qf else []


class InvalidArgument(MachineServerError, ValueError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(MachineServerError, LookupError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(MachineServerError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(MachineServerError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(MachineServerError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unimplemented(MachineServerError):
    code = grpc.StatusCode.UNIMPLEMENTED

    @property
    def feature(self) -> str:
        info = self.error_info
        return info.metadata.get("feature", "") if info else ""


class Unauthenticated(MachineServerError, PermissionError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(MachineServerError, PermissionError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Unavailable(MachineServerError, ConnectionError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(MachineServerError, TimeoutError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Aborted(MachineServerError):
    code = grpc.StatusCode.ABORTED


class OutOfRange(MachineServerError, IndexError):
    code = grpc.StatusCode.OUT_OF_RANGE


class Cancelled(MachineServerError):
    code = grpc.StatusCode.CANCELLED


class Internal(MachineServerError):
    code = grpc.StatusCode.INTERNAL


class Unknown(MachineServerError):
    code = grpc.StatusCode.UNKNOWN


_BY_CODE: dict[grpc.StatusCode, type[MachineServerError]] = {
    cls.code: cls
    for cls in (InvalidArgument, NotFound, AlreadyExists, FailedPrecondition, ResourceExhausted,
                Unimplemented, Unauthenticated, PermissionDenied, Unavailable, DeadlineExceeded,
                Aborted, OutOfRange, Cancelled, Internal, Unknown)
}
_BY_CODE[grpc.StatusCode.DATA_LOSS] = Internal


def _parse_details(trailing: Iterable[tuple[str, str | bytes]]) -> tuple[list[Message], str]:
    details: list[Message] = []
    request_id = ""
    for key, value in trailing:
        if key == REQUEST_ID_KEY:
            request_id = value if isinstance(value, str) else value.decode(errors="replace")
        elif key == STATUS_DETAILS_KEY and isinstance(value, bytes):
            try:
                status = status_pb2.Status.FromString(value)
            except DecodeError:
                continue
            for any_msg in status.details:
                cls = _DETAIL_TYPES.get(any_msg.TypeName())
                if cls is None:
                    details.append(any_msg)
                    continue
                msg = cls()
                any_msg.Unpack(msg)
                details.append(msg)
    return details, request_id


def _trailing_metadata(exc: grpc.RpcError) -> list[tuple[str, str | bytes]]:
    """The call's trailing metadata as (key, value) pairs: grpc.aio keeps it in a
    Metadata collection, the sync API in a tuple of (key, value) named tuples."""
    if isinstance(exc, aio.AioRpcError):
        return list(exc.trailing_metadata() or ())
    return [(m.key, m.value) for m in exc.trailing_metadata() or ()]


def from_rpc_error(exc: grpc.RpcError) -> MachineServerError:
    """The typed error for a failed call (sync or aio)."""
    if not hasattr(exc, "code"):  # a bare grpc.RpcError, raised outside any call: no status
        return Unknown(str(exc) or "UNKNOWN", code=grpc.StatusCode.UNKNOWN)
    code = exc.code()
    details, request_id = _parse_details(_trailing_metadata(exc))
    cls = _BY_CODE.get(code, Unknown)
    return cls(exc.details() or code.name, code=code, details=details, request_id=request_id)
