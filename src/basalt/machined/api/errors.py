"""Basalt errors -> gRPC status codes. The API layer is the only place that maps them."""

from __future__ import annotations

import grpc

from basalt.machinery.api.status import GRPC_STATUS
from basalt.machinery.errors import (
    AccessDeniedError,
    AlreadyExistsError,
    BasaltError,
    ConfigValidationError,
    InvalidRequestError,
    NotFoundError,
    OutputExistsError,
    UnavailableError,
)


def status_for(exc: BaseException) -> grpc.StatusCode:
    """The status code of a refusal: its class's kind; any other error is a state problem."""
    if isinstance(exc, BasaltError):
        return GRPC_STATUS[exc.kind]
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
