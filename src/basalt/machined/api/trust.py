"""The trust service: signs worker certificates for holders of the join token, and
keeps the member list that every node announces itself to.

It signs server certificates only — never a certificate with an Organization, so a
node can never obtain API roles through it — for the public key and names in the CSR.
"""

from __future__ import annotations

import datetime as dt
import hmac
import ipaddress
import logging
import time
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from basalt.machinery.api import trust_pb2, trust_pb2_grpc
from basalt.machinery.pki import load_certificate, load_private_key

if TYPE_CHECKING:
    from ..node import Node

log = logging.getLogger(__name__)
MAX_SANS = 32
MAX_MEMBERS = 1024


class TrustServicer(trust_pb2_grpc.TrustServiceServicer):
    def __init__(self, node: Node) -> None:
        self.node = node

    async def _check_token(self, token: str, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        machine = self.node.machine
        if machine is None or not hmac.compare_digest(token.encode(), machine.token.encode()):
            peer = context.peer()
            self.node.events.publish(
                "trust", f"refused a request with a wrong join token from {peer}", actor="trustd"
            )
            log.warning("trust: wrong join token from %s", peer)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "wrong join token")

    async def Certificate(
        self, request: trust_pb2.CertificateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> trust_pb2.CertificateResponse:
        await self._check_token(request.token, context)
        try:
            csr = x509.load_pem_x509_csr(request.csr)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"CSR does not parse: {exc}")
            raise
        if not csr.is_signature_valid:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "CSR signature is invalid")
        crt = self._sign(csr)
        machine = self.node.machine
        assert machine is not None
        self.node.events.publish(
            "trust",
            f"signed a node certificate for {_cn(csr)}",
            actor="trustd",
            peer=context.peer(),
        )
        return trust_pb2.CertificateResponse(ca=machine.ca.crt.encode(), crt=crt.encode())

    def _sign(self, csr: x509.CertificateSigningRequest) -> str:
        machine = self.node.machine
        assert machine is not None and machine.ca.key is not None
        ca_cert = load_certificate(machine.ca.crt)
        ca_key = load_private_key(machine.ca.key)
        names: list[x509.GeneralName] = []
        try:
            requested = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            for name in list(requested)[:MAX_SANS]:
                if isinstance(name, x509.IPAddress | x509.DNSName):
                    names.append(name)
        except x509.ExtensionNotFound:
            pass
        now = dt.datetime.now(dt.UTC)
        subject = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, _cn(csr))])
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(ca_cert.subject)
            .public_key(csr.public_key())  # type: ignore[arg-type]
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(min(now + self.node.tuning.cert_validity, ca_cert.not_valid_after_utc))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
            )
        )
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
        return cert.public_bytes(serialization.Encoding.PEM).decode()

    async def Announce(
        self, request: trust_pb2.AnnounceRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> trust_pb2.AnnounceResponse:
        await self._check_token(request.token, context)
        registry = self.node.trust_members
        now = time.time()
        member = trust_pb2.Member()
        member.CopyFrom(request.member)
        member.last_seen = now
        for address in member.addresses:
            try:
                ipaddress.ip_address(address)
            except ValueError:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad address {address!r}")
        if member.id and (member.id in registry or len(registry) < MAX_MEMBERS):
            registry[member.id] = member
        ttl = self.node.tuning.member_ttl
        for key in [k for k, m in registry.items() if now - m.last_seen > ttl]:
            del registry[key]
        members = sorted(registry.values(), key=lambda m: m.id)
        if self.node.engine is not None:  # a control plane sees its registry at once
            from ..controllers.members import publish_members

            publish_members(self.node, members)
        return trust_pb2.AnnounceResponse(members=members)


def _cn(csr: x509.CertificateSigningRequest) -> str:
    values = csr.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    text = str(values[0].value) if values else "node"
    return "".join(c for c in text if c.isalnum() or c in "-._")[:64] or "node"
