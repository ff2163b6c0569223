"""The trust service: signs worker certificates for holders of the join token, and
keeps the member list that every node announces itself to.

It signs server certificates only — never one with an Organization, so a node can never
obtain API roles through it — and only for names that belong to the requester
(:mod:`.trust_policy`). Every certificate it signs is recorded (an event and an
``IssuedCertificates`` resource). A member is admitted to the list only as the
certificate it presents says. Wrong join tokens are rate-limited per peer, and reported
once a minute per peer so that a flood cannot push other events out of the history.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import ipaddress
import logging
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import grpc
import grpc.aio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from basalt.machinery.api import trust_pb2, trust_pb2_grpc
from basalt.machinery.pki import (
    PKIError,
    load_certificate,
    load_private_key,
    san_entries,
    verify_issued_by,
)
from basalt.machinery.resources.specs import IssuedCertificateSpec

from .trust_policy import (
    WORKER_UNIT,
    FailureLimiter,
    Presented,
    TrustRefusal,
    check_announcement,
    names_to_sign,
    normalise,
    taken_names,
)

if TYPE_CHECKING:
    from ..node import Node

log = logging.getLogger(__name__)
MAX_SANS = 32
MAX_MEMBERS = 1024
#: Members whose certificates one peer address presented: a NAT gateway carries many
#: workers, a token holder must not fill the list.
MAX_MEMBERS_PER_PEER = 64
#: Seconds a newly signed node holds its names before it has announced them.
ISSUE_GRACE = 120.0
Context = grpc.aio.ServicerContext[Any, Any]


def peer_host(context: Context) -> str:
    """The caller's address (``ipv4:1.2.3.4:5`` / ``ipv6:[::1]:5`` -> the address)."""
    peer = context.peer() or ""
    kind, _, rest = peer.partition(":")
    if kind == "ipv6":
        return rest.rpartition("]")[0].lstrip("[")
    return rest.rpartition(":")[0] if kind == "ipv4" else peer


class TrustServicer(trust_pb2_grpc.TrustServiceServicer):
    def __init__(self, node: Node) -> None:
        self.node = node
        self.limiter = FailureLimiter()
        #: Host name -> the names signed for it and when, until that node announces them.
        self.pending: dict[str, tuple[list[str], float]] = {}
        #: Member id -> the peer address that announced it.
        self.announced_from: dict[str, str] = {}

    async def _check_token(self, token: str, context: Context) -> None:
        peer = peer_host(context)
        wait = self.limiter.blocked(peer)
        if wait:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"too many requests with a wrong join token from {peer}; try again in {wait:.0f}s",
            )
        machine = self.node.machine
        if machine is None or not hmac.compare_digest(token.encode(), machine.token.encode()):
            count = self.limiter.failed(peer)
            if count is not None:
                self.node.events.publish(
                    "trust",
                    f"refused {count} request(s) with a wrong join token from {peer} in the "
                    f"last {self.limiter.window:.0f}s",
                    actor="trustd",
                )
                log.warning("trust: wrong join token from %s", peer)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "wrong join token")

    async def _refuse(self, context: Context, what: str, reason: str) -> None:
        message = f"{what} refused: {reason}"
        self.node.events.publish("trust", message, actor="trustd", peer=peer_host(context))
        log.warning("trust: %s", message)
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, message)

    # -- certificates ----------------------------------------------------------------------
    async def Certificate(
        self, request: trust_pb2.CertificateRequest, context: Context
    ) -> trust_pb2.CertificateResponse:
        await self._check_token(request.token, context)
        try:
            csr = x509.load_pem_x509_csr(request.csr)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"CSR does not parse: {exc}")
            raise
        if not csr.is_signature_valid:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "CSR signature is invalid")
        hostname = _cn(csr)
        try:
            names = names_to_sign(hostname, _requested(csr), self._taken(hostname))
        except TrustRefusal as exc:
            await self._refuse(context, f"certificate for {hostname}", str(exc))
            raise
        crt, serial, fingerprint = self._sign(csr, hostname, names)
        self._record(hostname, names, serial, fingerprint, peer_host(context))
        machine = self.node.machine
        assert machine is not None
        return trust_pb2.CertificateResponse(ca=machine.ca.crt.encode(), crt=crt.encode())

    def _taken(self, requester: str) -> dict[str, Any]:
        node, machine = self.node, self.node.machine
        assert machine is not None
        own = [node.address, *machine.cert_sans]
        identity = node.identity
        if identity is not None:
            own += _certificate_names(load_certificate(identity.server.crt))
        from basalt.machinery.config import ClusterConfig

        cluster = node.config.first(ClusterConfig) if node.config is not None else None
        endpoint = urlsplit(cluster.control_plane.endpoint).hostname if cluster else ""
        members = {
            member_id: list(member.addresses)
            for member_id, member in node.trust_members.items()
            if member_id != node.hostname
        }
        # A node signed for holds its names until it announces them (for at most
        # ISSUE_GRACE); then its member entry does, until it stops announcing: a renamed
        # node gets its address again once its old name has expired from the list.
        now = time.time()
        recent = {h: names for h, (names, at) in self.pending.items() if now - at < ISSUE_GRACE}
        return taken_names(node.hostname, own, endpoint or "", members, recent)

    def _sign(
        self, csr: x509.CertificateSigningRequest, hostname: str, names: list[str]
    ) -> tuple[str, int, str]:
        machine = self.node.machine
        assert machine is not None and machine.ca.key is not None
        ca_cert = load_certificate(machine.ca.crt)
        ca_key = load_private_key(machine.ca.key)
        now = dt.datetime.now(dt.UTC)
        subject = x509.Name(
            [
                x509.NameAttribute(x509.NameOID.COMMON_NAME, hostname),
                x509.NameAttribute(x509.NameOID.ORGANIZATIONAL_UNIT_NAME, WORKER_UNIT),
            ]
        )
        serial = x509.random_serial_number()
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(ca_cert.subject)
            .public_key(csr.public_key())
            .serial_number(serial)
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(min(now + self.node.tuning.cert_validity, ca_cert.not_valid_after_utc))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
            )
            .add_extension(x509.SubjectAlternativeName(san_entries(names)), critical=False)
        )
        cert = builder.sign(ca_key, hashes.SHA256())
        der = cert.public_bytes(serialization.Encoding.DER)
        pem = cert.public_bytes(serialization.Encoding.PEM).decode()
        return pem, serial, hashlib.sha256(der).hexdigest()

    def _record(
        self, hostname: str, names: list[str], serial: int, fingerprint: str, peer: str
    ) -> None:
        earlier = self.pending.get(hostname, ([], 0.0))[0]
        self.pending[hostname] = (list(dict.fromkeys([*earlier, *names])), time.time())
        self.node.store.put(
            "IssuedCertificates",
            hostname,
            IssuedCertificateSpec(
                names=names,
                serial=f"{serial:x}",
                sha256=fingerprint,
                requested_from=peer,
                issued=time.time(),
            ),
            owner="trustd",
        )
        self.node.events.publish(
            "trust",
            f"signed a node certificate for {hostname} ({', '.join(names)})",
            actor="trustd",
            peer=peer,
            serial=f"{serial:x}",
        )

    # -- members ---------------------------------------------------------------------------
    async def Announce(
        self, request: trust_pb2.AnnounceRequest, context: Context
    ) -> trust_pb2.AnnounceResponse:
        await self._check_token(request.token, context)
        member = trust_pb2.Member()
        member.CopyFrom(request.member)
        member.last_seen = time.time()
        for address in member.addresses:
            try:
                ipaddress.ip_address(address)
            except ValueError:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad address {address!r}")
        try:
            presented = self._presented(request.certificate)
            check_announcement(
                member.id, member.hostname, member.machine_type, member.addresses, presented
            )
        except TrustRefusal as exc:
            await self._refuse(context, f"announcement of {member.id!r}", str(exc))
            raise
        self._admit(member, peer_host(context))
        members = sorted(self.node.trust_members.values(), key=lambda m: m.id)
        if self.node.engine is not None:  # a control plane sees its registry at once
            from ..controllers.members import publish_members

            publish_members(self.node, members)
        return trust_pb2.AnnounceResponse(members=members)

    def _presented(self, pem: bytes) -> Presented:
        machine = self.node.machine
        assert machine is not None
        if not pem:
            raise TrustRefusal("no certificate presented (upgrade the node)")
        try:
            text = pem.decode()
            cert = load_certificate(text)
            trusted = any(
                verify_issued_by(text, ca) for ca in (machine.ca.crt, *machine.accepted_cas)
            )
        except (PKIError, UnicodeDecodeError, ValueError) as exc:
            raise TrustRefusal(f"its certificate does not parse: {exc}") from None
        now = dt.datetime.now(dt.UTC)
        if not trusted or not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise TrustRefusal("its certificate is not a current one of this cluster's OS CA")
        names = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        units = cert.subject.get_attributes_for_oid(x509.NameOID.ORGANIZATIONAL_UNIT_NAME)
        ips = frozenset(
            normalise(n) for n in _certificate_names(cert) if _ip_or_none(n) is not None
        )
        return Presented(
            str(names[0].value) if names else "",
            ips,
            any(u.value == WORKER_UNIT for u in units),
        )

    def _admit(self, member: trust_pb2.Member, peer: str) -> None:
        registry = self.node.trust_members
        now = time.time()
        ttl = self.node.tuning.member_ttl
        for key in [k for k, m in registry.items() if now - m.last_seen > ttl]:
            del registry[key]
            self.announced_from.pop(key, None)
        if member.id not in registry:
            same_peer = sum(1 for k in registry if self.announced_from.get(k) == peer)
            if len(registry) >= MAX_MEMBERS or same_peer >= MAX_MEMBERS_PER_PEER:
                log.warning("trust: member list full; %s from %s not added", member.id, peer)
                return
        registry[member.id] = member
        self.announced_from[member.id] = peer
        self.pending.pop(member.id, None)


def _ip_or_none(name: str) -> Any:
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None


def _certificate_names(cert: x509.Certificate) -> list[str]:
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(n) for n in sans.get_values_for_type(x509.IPAddress)] + list(
        sans.get_values_for_type(x509.DNSName)
    )


def _requested(csr: x509.CertificateSigningRequest) -> list[str]:
    try:
        sans = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    names = [str(n) for n in sans.get_values_for_type(x509.IPAddress)]
    names += list(sans.get_values_for_type(x509.DNSName))
    return names[:MAX_SANS]


def _cn(csr: x509.CertificateSigningRequest) -> str:
    values = csr.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    text = str(values[0].value) if values else "node"
    return "".join(c for c in text if c.isalnum() or c in "-._")[:64] or "node"
