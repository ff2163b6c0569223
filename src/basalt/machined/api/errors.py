"""Basalt errors -> gRPC status codes. The API layer is the only place that maps them."""

from __future__ import annotations

import grpc

from basalt.machinery.errors import (
    AccessDeniedError,
    AlreadyExistsError,
    BasaltError,
    ConfigValidationError,
    ErrorKind,
    InvalidRequestError,
    NotFoundError,
    OutputExistsError,
    UnavailableError,
)

#: Each error class says what kind of refusal it is (``BasaltError.kind``); this is the
#: gRPC status code of each kind.
_CODES: dict[ErrorKind, grpc.StatusCode] = {
    ErrorKind.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorKind.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorKind.ALREADY_EXISTS: grpc.StatusCode.ALREADY_EXISTS,
    ErrorKind.PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
    ErrorKind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorKind.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.ABORTED: grpc.StatusCode.ABORTED,
}


def status_for(exc: BaseException) -> grpc.StatusCode:
    """The status code of a refusal: its class's kind; any other error is a state problem."""
    if isinstance(exc, BasaltError):
        return _CODES[exc.kind]
    return grpc.StatusCode.FAILED_PRECONDITION


def details_for(exc: BasaltError) -> str:
    """The status details: the full rendering (every config problem, the hint)."""
    if isinstance(exc, ConfigValidationError):
        return exc.render()
    return exc.render()


__all__ = [
    "AccessDeniedError",
    "AlreadyExistsError",
    "InvalidRequestError",
    "NotFoundError",
    "OutputExistsError",
    "UnavailableError",
    "details_for",
    "status_for",
]
