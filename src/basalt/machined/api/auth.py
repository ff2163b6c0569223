"""Who is calling: roles from the client certificate, or from a forwarding control plane.

A request forwarded by a control plane arrives with that node's certificate, whose
Organization is ``os:impersonator``; only then are the client's roles taken from the
``basalt-roles`` metadata the forwarding node set. Any client that sends that metadata
itself is ignored: its roles come from its own certificate, always.
"""

from __future__ import annotations

import contextvars
import functools
from dataclasses import dataclass, field
from typing import Any

from basalt.machinery.api import common_pb2
from basalt.machinery.roles import Role, parse_roles

ROLES_METADATA = "basalt-roles"
NODE_METADATA = "basalt-node"


@dataclass(frozen=True)
class Principal:
    """The caller of one request."""

    roles: frozenset[Role]
    subject: str = ""
    #: Set when a control plane forwarded the request: that node's certificate subject.
    forwarded_by: str = ""
    #: The name the client used for this node (for answers' metadata), when forwarded.
    node_name: str = ""
    maintenance: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


class AuthenticationError(Exception):
    pass


@functools.lru_cache(maxsize=256)
def _certificate_identity(pem: bytes) -> tuple[str, frozenset[Role]]:
    # Imported at the first mTLS request: a maintenance API never needs cryptography.
    from basalt.machinery.pki import PKIError, certificate_organizations, load_certificate

    text = pem.decode()
    try:
        cert = load_certificate(text)
    except PKIError as exc:
        raise AuthenticationError(str(exc)) from None
    return cert.subject.rfc4514_string(), frozenset(parse_roles(certificate_organizations(text)))


def authenticate(auth_context: dict[str, list[bytes]], metadata: dict[str, str]) -> Principal:
    """The principal of an mTLS request; raises AuthenticationError without a client cert."""
    pem = (auth_context.get("x509_pem_cert") or [b""])[0]
    if not pem:
        raise AuthenticationError("no client certificate")
    subject, roles = _certificate_identity(pem)
    if Role.IMPERSONATOR in roles:
        forwarded = parse_roles(metadata.get(ROLES_METADATA, "").split(","))
        forwarded.discard(Role.IMPERSONATOR)
        return Principal(
            frozenset(forwarded),
            subject=metadata.get("basalt-subject", ""),
            forwarded_by=subject,
            node_name=metadata.get(NODE_METADATA, ""),
        )
    return Principal(roles, subject=subject)


#: The principal of the request being served (set by the dispatcher).
current_principal: contextvars.ContextVar[Principal] = contextvars.ContextVar("principal")


def answer_metadata(own_address: str) -> common_pb2.Metadata:
    """The metadata of an answer: the node's name as the client used it when forwarded."""
    principal = current_principal.get(None)
    name = principal.node_name if principal and principal.node_name else own_address
    return common_pb2.Metadata(node=name)
