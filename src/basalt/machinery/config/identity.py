"""A node's identity in its config, and the refusal of a config that would change it.

What makes a node the member of one cluster: its machine type, the OS API CA its clients
and peers trust, the cluster id and secret, the etcd and Kubernetes CAs and the
service-account key. A config generated from another cluster's secrets (picking the wrong
directory when you run two clusters) changes all of them at once; applied, it locks every
existing admin out. A configured node refuses it, naming each field, unless an admin
explicitly asks to replace the identity.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import BasaltError
from .bundle import ConfigBundle, document_to_raw


@dataclass(frozen=True)
class IdentityField:
    """One part of a node's identity: where it is in the config, what it is, and what
    a client loses when it changes."""

    kind: str
    path: tuple[str, ...]
    what: str
    loss: str

    @property
    def where(self) -> str:
        return ".".join((self.kind, *self.path))


IDENTITY: tuple[IdentityField, ...] = (
    IdentityField(
        "MachineConfig",
        ("type",),
        "the machine type",
        "the node changes role (a control plane leaves etcd; a worker holds no CA keys)",
    ),
    IdentityField(
        "MachineConfig",
        ("ca", "crt"),
        "the OS API CA",
        "every client config issued by the current OS CA, yours included, stops working "
        "with this node, and so do the other nodes' certificates",
    ),
    IdentityField(
        "ClusterConfig",
        ("id",),
        "the cluster id",
        "the node leaves this cluster for another one",
    ),
    IdentityField(
        "ClusterConfig",
        ("secret",),
        "the cluster secret",
        "the node leaves this cluster for another one",
    ),
    IdentityField(
        "ClusterConfig",
        ("etcd", "ca", "crt"),
        "the etcd CA",
        "its etcd member can no longer reach the other members, and keeps its data under "
        "a CA they do not trust",
    ),
    IdentityField(
        "ClusterConfig",
        ("kubernetes", "ca", "crt"),
        "the Kubernetes CA",
        "kubelets and clients holding certificates of the current Kubernetes CA stop working",
    ),
    IdentityField(
        "ClusterConfig",
        ("kubernetes", "aggregatorCA", "crt"),
        "the Kubernetes front-proxy CA",
        "aggregated API servers stop trusting the API server",
    ),
    IdentityField(
        "ClusterConfig",
        ("kubernetes", "serviceAccountKey", "key"),
        "the service-account signing key",
        "every service-account token issued so far stops being valid",
    ),
)


class IdentityChangeError(BasaltError):
    """The config would change the node's identity (it was generated from other secrets).
    Nothing was applied; the message names every changed field."""


def _value(raw: dict[str, dict[str, Any]], field: IdentityField) -> Any:
    node: Any = raw.get(field.kind)
    for part in field.path:
        node = node.get(part) if isinstance(node, dict) else None
    return node


#: The OS API CA among the identity fields: a rotation step may change it.
_OS_CA = next(f for f in IDENTITY if f.kind == "MachineConfig" and f.path == ("ca", "crt"))


def _rotation_step(before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]]) -> bool:
    """The OS CA changes as one step of a rotation (``rotate-ca``): the new CA was
    accepted before (``acceptedCAs``) and the old one stays accepted after it, so no
    client and no peer loses access."""
    old, new = before.get("MachineConfig", {}), after.get("MachineConfig", {})
    old_ca, new_ca = _value(before, _OS_CA), _value(after, _OS_CA)
    if not isinstance(old_ca, str) or not isinstance(new_ca, str):
        return False
    accepted_before = {str(a).strip() for a in old.get("acceptedCAs") or []}
    accepted_after = {str(a).strip() for a in new.get("acceptedCAs") or []}
    return new_ca.strip() in accepted_before and old_ca.strip() in accepted_after


def identity_changes(current: ConfigBundle, new: ConfigBundle) -> list[IdentityField]:
    """The identity fields whose values differ between ``current`` and ``new`` (a field
    that one has and the other lacks differs too). The OS CA changing as a step of a
    rotation (see :func:`_rotation_step`) does not count."""
    before = {d.kind_name(): document_to_raw(d) for d in current.documents}
    after = {d.kind_name(): document_to_raw(d) for d in new.documents}
    changed = [f for f in IDENTITY if _value(before, f) != _value(after, f)]
    if _OS_CA in changed and _rotation_step(before, after):
        changed.remove(_OS_CA)
    return changed


def describe_loss(changed: list[IdentityField]) -> str:
    """What a client loses when these fields change, one clause each, deduplicated."""
    losses = list(dict.fromkeys(f.loss for f in changed))
    return "; ".join(losses)


def check_identity(current: ConfigBundle, new: ConfigBundle, *, allow: bool) -> str | None:
    """Refuse ``new`` when it changes ``current``'s identity, unless ``allow``: then the
    warning that says what changes and what the client loses. None when nothing changes."""
    changed = identity_changes(current, new)
    if not changed:
        return None
    listing = ", ".join(f"{f.where} ({f.what})" for f in changed)
    if allow:
        return (
            f"identity replaced on request (--allow-identity-change): {listing}; "
            f"{describe_loss(changed)}"
        )
    raise IdentityChangeError(
        f"this config would change the node's identity: {listing}. It was generated from "
        "other secrets than the ones this node runs with (another cluster's?); nothing "
        "was applied",
        hint="generate the config from this cluster's secrets bundle (basaltctl gen config "
        "--with-secrets SECRETS.yaml) and apply that; rotate the OS CA with 'basaltctl "
        "rotate-ca'; to replace the identity on purpose, an os:admin applies with "
        f"--allow-identity-change, and then: {describe_loss(changed)}",
    )
