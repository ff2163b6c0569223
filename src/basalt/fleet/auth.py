"""People and their tokens: roles, scopes, and how a request proves who it is.

API tokens and join tokens are random (``bft_``/``bfj_`` + 32 bytes, URL-safe) and only
their SHA-256 is stored: a token is shown once, when it is made. The random part is
long enough that a plain hash is the right tool (no password stretching needed).
"""

from __future__ import annotations

import enum
import hashlib
import secrets
from dataclasses import dataclass, field

ADMIN_TOKEN_FILE = "admin-token"


class FleetRole(enum.StrEnum):
    ADMIN = "fleet:admin"
    OPERATOR = "fleet:operator"
    READER = "fleet:reader"
    #: Takes and gives back reboot slots (FleetLock) and nothing else: what a node's
    #: updater, or another FleetLock client, is given.
    REBOOT = "fleet:reboot"

    @property
    def rank(self) -> int:
        return {"fleet:reboot": 0, "fleet:reader": 1, "fleet:operator": 2, "fleet:admin": 3}[
            self.value
        ]

    def allows(self, needed: FleetRole) -> bool:
        if needed is FleetRole.REBOOT:  # not a reader's right: operators and admins may
            return self in (FleetRole.REBOOT, FleetRole.OPERATOR, FleetRole.ADMIN)
        return self.rank >= needed.rank


def new_token(prefix: str) -> str:
    return f"{prefix}_{secrets.token_urlsafe(32)}"


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Scope:
    """The clusters a user may act on: by name or by label; both empty means all."""

    clusters: tuple[str, ...] = ()
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def unlimited(self) -> bool:
        return not self.clusters and not self.labels

    def covers(self, cluster: str, labels: dict[str, str]) -> bool:
        if self.unlimited:
            return True
        if cluster in self.clusters:
            return True
        return bool(self.labels) and all(labels.get(k) == v for k, v in self.labels.items())

    def to_json(self) -> dict[str, object]:
        return {"clusters": list(self.clusters), "labels": dict(self.labels)}

    @classmethod
    def from_json(cls, data: dict[str, object]) -> Scope:
        clusters = data.get("clusters") or []
        labels = data.get("labels") or {}
        assert isinstance(clusters, list) and isinstance(labels, dict)
        return cls(tuple(str(c) for c in clusters), {str(k): str(v) for k, v in labels.items()})


@dataclass(frozen=True)
class Caller:
    """Who made a request: a user with a role, or a machine (enrolment, the link)."""

    name: str
    role: FleetRole
    scope: Scope = field(default_factory=Scope)
