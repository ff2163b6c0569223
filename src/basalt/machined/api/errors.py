"""Basalt errors -> gRPC status codes. The API layer is the only place that maps them."""

from __future__ import annotations

import grpc

from basalt.machinery.errors import (
    BasaltError,
    ConfigError,
    ConfigValidationError,
    OutputExistsError,
)

#: Error class name -> status code; looked up along the exception's MRO.
_CODES: dict[str, grpc.StatusCode] = {
    "ConfigValidationError": grpc.StatusCode.INVALID_ARGUMENT,
    "ConfigSyntaxError": grpc.StatusCode.INVALID_ARGUMENT,
    "PatchError": grpc.StatusCode.INVALID_ARGUMENT,
    "ContractError": grpc.StatusCode.INVALID_ARGUMENT,
    "InvalidRequestError": grpc.StatusCode.INVALID_ARGUMENT,
    "InvalidApplyError": grpc.StatusCode.INVALID_ARGUMENT,
    "RequestTooLargeError": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "SequenceConflictError": grpc.StatusCode.FAILED_PRECONDITION,
    "RebootRequiredError": grpc.StatusCode.FAILED_PRECONDITION,
    "IdentityChangeError": grpc.StatusCode.FAILED_PRECONDITION,
    "QuorumError": grpc.StatusCode.FAILED_PRECONDITION,
    "EtcdStateError": grpc.StatusCode.FAILED_PRECONDITION,
    "AlreadyBootstrappedError": grpc.StatusCode.ALREADY_EXISTS,
    "UnknownServiceError": grpc.StatusCode.NOT_FOUND,
    "UnknownResourceTypeError": grpc.StatusCode.NOT_FOUND,
    "NotFoundError": grpc.StatusCode.NOT_FOUND,
    "AccessDeniedError": grpc.StatusCode.PERMISSION_DENIED,
    "UnavailableError": grpc.StatusCode.UNAVAILABLE,
    "OutputExistsError": grpc.StatusCode.ALREADY_EXISTS,
    "AlreadyExistsError": grpc.StatusCode.ALREADY_EXISTS,
    # Upgrades: a refused bundle is a bad argument; a refused upgrade a state problem.
    "ImageVerificationError": grpc.StatusCode.INVALID_ARGUMENT,
    "BundleUploadError": grpc.StatusCode.INVALID_ARGUMENT,
    "UpgradeRefusedError": grpc.StatusCode.FAILED_PRECONDITION,
    "DrainError": grpc.StatusCode.FAILED_PRECONDITION,
    "SlotWriteError": grpc.StatusCode.ABORTED,
    "BundleURLError": grpc.StatusCode.INVALID_ARGUMENT,
    "BundleFetchError": grpc.StatusCode.UNAVAILABLE,
}


class InvalidRequestError(BasaltError):
    """The request itself is malformed (a bad argument)."""


class NotFoundError(BasaltError):
    """The thing the request names does not exist on this node."""


class AccessDeniedError(BasaltError):
    """The caller's roles do not allow this (e.g. a sensitive resource)."""


class UnavailableError(BasaltError):
    """The node cannot serve this now (e.g. the kernel log is not readable)."""


class AlreadyExistsError(BasaltError):
    """The request would create something that exists already."""


def status_for(exc: BaseException) -> grpc.StatusCode:
    for cls in type(exc).__mro__:
        code = _CODES.get(cls.__name__)
        if code is not None:
            return code
    if isinstance(exc, ConfigError):
        return grpc.StatusCode.INVALID_ARGUMENT
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
