"""API roles. A client's roles travel in its certificate's Organization field."""

from __future__ import annotations

from enum import StrEnum


class Role(StrEnum):
    """What a client may do. ``admin`` may do everything, including read secrets."""

    ADMIN = "os:admin"
    OPERATOR = "os:operator"
    READER = "os:reader"
    ETCD_BACKUP = "os:etcd:backup"


ALL_ROLES = tuple(Role)


def parse_roles(values: list[str] | tuple[str, ...]) -> set[Role]:
    """Known roles among ``values`` (unknown organizations carry no rights)."""
    known = {r.value: r for r in Role}
    return {known[v] for v in values if v in known}
