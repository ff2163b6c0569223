"""The errors of discovery, on the node's side and the service's.

Each names what was refused and which cluster (by its wire id, never by a key), and says
what to do. The service raises them; its API layer turns their ``kind`` into a gRPC
status code, and the client turns a status back into the same class.
"""

from __future__ import annotations

from ..errors import BasaltError, ErrorKind


class DiscoveryError(BasaltError):
    """Discovery failed in a way that is not one of the cases below (the service cannot
    be reached, an unexpected status); try again later."""

    kind = ErrorKind.UNAVAILABLE


class DiscoveryDataError(DiscoveryError):
    """A record could not be opened with the cluster's keys: its ciphertext was changed,
    or it was written by someone holding another secret. The record is not used."""

    kind = ErrorKind.INVALID_ARGUMENT


class DiscoveryTargetError(DiscoveryError):
    """A discovery service address is not ``grpc://HOST:PORT`` or ``grpcs://HOST:PORT``."""

    kind = ErrorKind.INVALID_ARGUMENT


class DiscoveryRequestError(DiscoveryError):
    """The service refused a malformed request (a field out of range, too large)."""

    kind = ErrorKind.INVALID_ARGUMENT


class DiscoveryAuthError(DiscoveryError):
    """The request's proof of the cluster secret was missing, wrong, stale or replayed.
    A node with the right secret sees this only when its clock is far off."""

    kind = ErrorKind.PERMISSION_DENIED


class DiscoveryLimitError(DiscoveryError):
    """A limit of the service was reached (affiliates per cluster, request rate, watches);
    the message names the limit and its value."""

    kind = ErrorKind.RESOURCE_EXHAUSTED


__all__ = [
    "DiscoveryAuthError",
    "DiscoveryDataError",
    "DiscoveryError",
    "DiscoveryLimitError",
    "DiscoveryRequestError",
    "DiscoveryTargetError",
]
