"""The trust service over real TLS (signing worker certificates, the member list) and the
node identity helpers (local signing, CSRs, renewal time).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import ipaddress
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import grpc
import grpc.aio
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from basalt.machined.api import trust as trust_module
from basalt.machined.api.tls import mtls_credentials
from basalt.machined.api.trust import TrustServicer
from basalt.machined.api.trust_policy import WORKER_UNIT
from basalt.machined.identity import (
    NodeIdentity,
    certificate_request,
    node_sans,
    request_from_trust_service,
    sign_locally,
)
from basalt.machined.runtime import ControllerEngine
from basalt.machinery.api import TRUST_PORT, trust_pb2, trust_pb2_grpc
from basalt.machinery.pki import (
    CertificateAndKey,
    certificate_organizations,
    generate_private_key,
    issue_certificate,
    load_certificate,
    san_entries,
    verify_issued_by,
)
from basalt.machinery.resources import MemberSpec
from basalt.machinery.roles import Role
from tests.fakes.trust import TrustNode, controlplane_node

T = TypeVar("T")
ADDRESS = "127.0.0.229"


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 10))


@functools.cache
def server_identity(address: str = ADDRESS) -> NodeIdentity:
    """The trust server's own certificate, signed with the generated config's OS CA."""
    return sign_locally(
        controlplane_node().os_ca, "cp-1", [address, "localhost"], dt.timedelta(hours=1)
    )


async def serve(
    node: TrustNode, body: Callable[[trust_pb2_grpc.TrustServiceStub], Awaitable[T]]
) -> T:
    """Run ``body`` with a stub for a real trust server on ADDRESS (a free port)."""
    server = grpc.aio.server()
    trust_pb2_grpc.add_TrustServiceServicer_to_server(TrustServicer(node), server)  # type: ignore[arg-type]
    port = server.add_secure_port(f"{ADDRESS}:0", _tls(server_identity()))
    await server.start()
    try:
        credentials = grpc.ssl_channel_credentials(root_certificates=node.os_ca.crt.encode())
        async with grpc.aio.secure_channel(f"{ADDRESS}:{port}", credentials) as channel:
            return await body(trust_pb2_grpc.TrustServiceStub(channel))
    finally:
        await server.stop(None)


def token_of(node: TrustNode) -> str:
    assert node.machine is not None
    return node.machine.token


def csr_pem(
    common_name: str = "w-1",
    sans: list[x509.GeneralName] | None = None,
    *,
    organization: str | None = None,
    ask_for_ca: bool = False,
) -> bytes:
    """A CSR that asks for more than it may get (an Organization, a CA flag, client auth)."""
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if organization:
        attrs.insert(0, x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(attrs))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    if ask_for_ca:
        builder = builder.add_extension(
            x509.BasicConstraints(ca=True, path_length=None), critical=True
        ).add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH]
            ),
            critical=False,
        )
    csr = builder.sign(generate_private_key(), hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM)


async def rpc_error(call: Awaitable[Any]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


# -- Certificate -----------------------------------------------------------------------------


def test_a_csr_with_the_token_gets_a_server_only_certificate() -> None:
    node = controlplane_node()
    sans: list[x509.GeneralName] = [
        x509.IPAddress(ipaddress.ip_address("192.0.2.5")),
        x509.DNSName("w-1.example.org"),
    ]
    request = trust_pb2.CertificateRequest(
        csr=csr_pem("w-1", sans, organization=Role.ADMIN.value, ask_for_ca=True),
        token=token_of(node),
    )

    async def body(stub: trust_pb2_grpc.TrustServiceStub) -> trust_pb2.CertificateResponse:
        return await stub.Certificate(request, timeout=5)

    before = dt.datetime.now(dt.UTC)
    answer = run(serve(node, body))
    after = dt.datetime.now(dt.UTC)

    crt = answer.crt.decode()
    cert = load_certificate(crt)
    assert answer.ca.decode() == node.os_ca.crt
    assert verify_issued_by(crt, node.os_ca.crt)
    # Server auth only, no Organization (so no API roles), never a CA.
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert certificate_organizations(crt) == []
    assert cert.subject.rfc4514_string() == f"OU={WORKER_UNIT},CN=w-1"
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    # The names come from the CSR, and the host name it announces.
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("192.0.2.5")]
    assert san.get_values_for_type(x509.DNSName) == ["w-1", "w-1.example.org"]
    # Lifetime: the node's configured validity.
    validity = node.tuning.cert_validity
    assert before + validity - dt.timedelta(seconds=2) <= cert.not_valid_after_utc
    assert cert.not_valid_after_utc <= after + validity
    assert cert.not_valid_before_utc <= before
    # The CSR's public key, not a new one.
    csr = x509.load_pem_x509_csr(request.csr)
    assert cert.public_key() == csr.public_key()
    # Signing is recorded.
    messages = [e.message for e in node.events.history() if e.type == "trust"]
    assert messages == ["signed a node certificate for w-1 (w-1, 192.0.2.5, w-1.example.org)"]
    issued = node.store.get("IssuedCertificates", "w-1")
    assert issued is not None and issued.spec.names == ["w-1", "192.0.2.5", "w-1.example.org"]


def test_sans_are_capped_and_only_names_and_addresses_are_kept() -> None:
    node = controlplane_node()
    many: list[x509.GeneralName] = [x509.DNSName(f"n{i}.example.org") for i in range(40)]
    many.insert(0, x509.UniformResourceIdentifier("spiffe://cluster/admin"))
    many.insert(1, x509.RFC822Name("root@example.org"))

    async def body(stub: trust_pb2_grpc.TrustServiceStub) -> trust_pb2.CertificateResponse:
        request = trust_pb2.CertificateRequest(csr=csr_pem("w-2", many), token=token_of(node))
        return await stub.Certificate(request, timeout=5)

    cert = load_certificate(run(serve(node, body)).crt.decode())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert all(isinstance(name, x509.DNSName) for name in san)
    assert len(san) <= trust_module.MAX_SANS + 1  # the requested ones, and the host name


def test_a_hostile_common_name_is_sanitised() -> None:
    node = controlplane_node()

    async def body(stub: trust_pb2_grpc.TrustServiceStub) -> trust_pb2.CertificateResponse:
        request = trust_pb2.CertificateRequest(
            csr=csr_pem("w-1,O=os:admin\n"), token=token_of(node)
        )
        return await stub.Certificate(request, timeout=5)

    cert = load_certificate(run(serve(node, body)).crt.decode())
    assert cert.subject.rfc4514_string() == f"OU={WORKER_UNIT},CN=w-1Oosadmin"


@pytest.mark.parametrize("token", ["", "wrong.token", "x" * 1000])
def test_a_wrong_token_is_refused_and_reported(token: str) -> None:
    node = controlplane_node()

    async def body(stub: trust_pb2_grpc.TrustServiceStub) -> grpc.aio.AioRpcError:
        request = trust_pb2.CertificateRequest(csr=csr_pem(), token=token)
        return await rpc_error(stub.Certificate(request, timeout=5))

    error = run(serve(node, body))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error.details() == "wrong join token"
    events = node.events.history()
    assert [e.type for e in events] == ["trust"]
    assert "wrong join token" in events[0].message
    assert "from 127.0.0.1 " in events[0].message  # names the peer


def test_a_node_without_config_refuses_everyone() -> None:
    node = TrustNode(machine=None)

    async def body(stub: trust_pb2_grpc.TrustServiceStub) -> grpc.aio.AioRpcError:
        request = trust_pb2.CertificateRequest(csr=csr_pem(), token="")
        return await rpc_error(stub.Certificate(request, timeout=5))

    assert run(serve_with_ca(node, body)).code() == grpc.StatusCode.PERMISSION_DENIED


async def serve_with_ca(node: TrustNode, body: Any) -> Any:
    """``serve`` for a node without config: the client still trusts the test OS CA."""
    configured = controlplane_node()
    server = grpc.aio.server()
    trust_pb2_grpc.add_TrustServiceServicer_to_server(TrustServicer(node), server)  # type: ignore[arg-type]
    port = server.add_secure_port(f"{ADDRESS}:0", _tls(server_identity()))
    await server.start()
    try:
        credentials = grpc.ssl_channel_credentials(root_certificates=configured.os_ca.crt.encode())
        async with grpc.aio.secure_channel(f"{ADDRESS}:{port}", credentials) as channel:
            return await body(trust_pb2_grpc.TrustServiceStub(channel))
    finally:
        await server.stop(None)


def _tampered_csr() -> bytes:
    """A CSR whose signed content was changed after signing."""
    pem = csr_pem("w-1")
    der = x509.load_pem_x509_csr(pem).public_bytes(serialization.Encoding.DER)
    forged = x509.load_der_x509_csr(der.replace(b"w-1", b"w-2"))
    return forged.public_bytes(serialization.Encoding.PEM)


@pytest.mark.parametrize(
    ("csr", "details"),
    [
        (b"not a csr", "CSR does not parse"),
        (b"", "CSR does not parse"),
        (b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n", "CSR"),
        (_tampered_csr(), "CSR signature is invalid"),
    ],
    ids=["garbage", "empty", "bad-der", "tampered"],
)
def test_a_bad_csr_is_an_invalid_argument(csr: bytes, details: str) -> None:
    node = controlplane_node()

    async def body(stub: trust_pb2_grpc.TrustServiceStub) -> grpc.aio.AioRpcError:
        request = trust_pb2.CertificateRequest(csr=csr, token=token_of(node))
        return await rpc_error(stub.Certificate(request, timeout=5))

    error = run(serve(node, body))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details in error.details()
    assert node.events.history() == []  # nothing signed


def test_a_worker_gets_its_identity_from_the_trust_service() -> None:
    """identity.request_from_trust_service against a real trust server on TRUST_PORT."""
    node = controlplane_node()

    async def scenario() -> NodeIdentity:
        # The port is fixed; take the first of our addresses where it is free (another
        # test run may hold one).
        for last in range(221, 230):
            address = f"127.0.0.{last}"
            server = grpc.aio.server()
            trust_pb2_grpc.add_TrustServiceServicer_to_server(TrustServicer(node), server)  # type: ignore[arg-type]
            credentials = _tls(server_identity(address))
            try:
                server.add_secure_port(f"{address}:{TRUST_PORT}", credentials)
            except RuntimeError:
                continue
            await server.start()
            try:
                return await request_from_trust_service(
                    f"{address}:6443", node.os_ca.crt, token_of(node), "w-9", ["192.0.2.9"]
                )
            finally:
                await server.stop(None)
        pytest.skip(f"port {TRUST_PORT} is taken on every test address")

    identity = run(scenario())
    assert identity.ca == node.os_ca.crt
    assert identity.client is None
    assert identity.server.key is not None
    cert = load_certificate(identity.server.crt)
    assert cert.subject.rfc4514_string() == f"OU={WORKER_UNIT},CN=w-9"
    assert verify_issued_by(identity.server.crt, node.os_ca.crt)
    # The key the worker kept belongs to the certificate it got.
    from basalt.machinery.pki import key_matches_certificate

    assert key_matches_certificate(identity.server.crt, identity.server.key)


# -- Announce --------------------------------------------------------------------------------


def member(id_: str, *addresses: str, hostname: str = "") -> trust_pb2.Member:
    return trust_pb2.Member(
        id=id_,
        hostname=hostname or id_,
        machine_type="worker",
        addresses=list(addresses),
        version="v0.1.0",
        last_seen=1.0,  # the server sets its own time
    )


def node_certificate(node: TrustNode, name: str, addresses: list[str]) -> bytes:
    """A certificate of the cluster's OS CA for ``name`` with these addresses (what a
    control plane signs for itself)."""
    sans = [a for a in addresses if a] or ["192.0.2.250"]
    try:
        issued = issue_certificate(node.os_ca, name or "x", server=True, sans=sans)
    except ValueError:  # an address that is not one: the announcement carries it anyway
        issued = issue_certificate(node.os_ca, name or "x", server=True, sans=["192.0.2.250"])
    return issued.crt.encode()


def announce(
    node: TrustNode,
    m: trust_pb2.Member,
    token: str | None = None,
    certificate: bytes | None = None,
) -> Any:
    if certificate is None:
        certificate = node_certificate(node, m.id, list(m.addresses))
    request = trust_pb2.AnnounceRequest(
        token=token_of(node) if token is None else token, member=m, certificate=certificate
    )

    async def call(stub: trust_pb2_grpc.TrustServiceStub) -> trust_pb2.AnnounceResponse:
        return await stub.Announce(request, timeout=5)

    return call


def test_announce_registers_members_and_returns_them_sorted() -> None:
    node = controlplane_node()

    async def body(stub: trust_pb2_grpc.TrustServiceStub) -> list[list[str]]:
        seen = []
        for m in (member("m-c", "192.0.2.3"), member("m-a", "192.0.2.1"), member("m-b")):
            answer = await announce(node, m)(stub)
            seen.append([x.id for x in answer.members])
        return seen

    before = time.time()
    seen = run(serve(node, body))
    assert seen == [["m-c"], ["m-a", "m-c"], ["m-a", "m-b", "m-c"]]
    assert set(node.trust_members) == {"m-a", "m-b", "m-c"}
    stored = node.trust_members["m-c"]
    assert list(stored.addresses) == ["192.0.2.3"]
    assert stored.last_seen >= before  # the server's clock, not the client's


def test_announce_again_updates_a_member() -> None:
    node = controlplane_node()

    async def body(stub: trust_pb2_grpc.TrustServiceStub) -> trust_pb2.AnnounceResponse:
        await announce(node, member("m-a", "192.0.2.1"))(stub)
        return await announce(node, member("m-a", "192.0.2.7"))(stub)

    answer = run(serve(node, body))
    assert [(m.id, m.hostname, list(m.addresses)) for m in answer.members] == [
        ("m-a", "m-a", ["192.0.2.7"])
    ]


def test_members_expire_after_the_ttl() -> None:
    node = controlplane_node()

    async def body(stub: trust_pb2_grpc.TrustServiceStub) -> list[str]:
        await announce(node, member("old"))(stub)
        await announce(node, member("recent"))(stub)
        node.trust_members["old"].last_seen = time.time() - node.tuning.member_ttl - 1
        node.trust_members["recent"].last_seen = time.time() - node.tuning.member_ttl + 30
        answer = await announce(node, member("new"))(stub)
        return [m.id for m in answer.members]

    assert run(serve(node, body)) == ["new", "recent"]
    assert set(node.trust_members) == {"new", "recent"}


@pytest.mark.parametrize("address", ["not-an-ip", "192.0.2.300", "192.0.2.0/24", ""])
def test_announce_rejects_bad_addresses(address: str) -> None:
    node = controlplane_node()

    async def body(stub: trust_pb2_grpc.TrustServiceStub) -> grpc.aio.AioRpcError:
        return await rpc_error(announce(node, member("m-x", "192.0.2.1", address))(stub))

    error = run(serve(node, body))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert repr(address) in error.details()
    assert node.trust_members == {}


def test_announce_accepts_ipv6_addresses() -> None:
    node = controlplane_node()

    async def body(stub: trust_pb2_grpc.TrustServiceStub) -> trust_pb2.AnnounceResponse:
        return await announce(node, member("m-6", "2001:db8::5", "192.0.2.5"))(stub)

    assert list(run(serve(node, body)).members[0].addresses) == ["2001:db8::5", "192.0.2.5"]


def test_announce_with_a_wrong_token_registers_nothing() -> None:
    node = controlplane_node()

    async def body(stub: trust_pb2_grpc.TrustServiceStub) -> grpc.aio.AioRpcError:
        return await rpc_error(announce(node, member("m-a"), token="nope")(stub))

    assert run(serve(node, body)).code() == grpc.StatusCode.PERMISSION_DENIED
    assert node.trust_members == {}
    assert [e.type for e in node.events.history()] == ["trust"]


def test_a_member_without_id_is_not_registered() -> None:
    node = controlplane_node()

    async def body(stub: trust_pb2_grpc.TrustServiceStub) -> grpc.aio.AioRpcError:
        await announce(node, member("m-a"))(stub)
        return await rpc_error(announce(node, member(""))(stub))

    assert run(serve(node, body)).code() == grpc.StatusCode.PERMISSION_DENIED
    assert list(node.trust_members) == ["m-a"]


def test_the_member_list_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trust_module, "MAX_MEMBERS", 2)
    node = controlplane_node()

    async def body(stub: trust_pb2_grpc.TrustServiceStub) -> list[str]:
        for id_ in ("m-a", "m-b", "m-c"):
            await announce(node, member(id_))(stub)
        answer = await announce(node, member("m-a", "192.0.2.1"))(stub)  # known: updated
        return [f"{m.id}:{','.join(m.addresses)}" for m in answer.members]

    assert run(serve(node, body)) == ["m-a:192.0.2.1", "m-b:"]


# -- identity --------------------------------------------------------------------------------


def test_sign_locally_gives_a_server_and_an_impersonator_certificate() -> None:
    os_ca = controlplane_node().os_ca
    identity = sign_locally(
        os_ca, "cp-1", ["192.0.2.10", "cp-1", "localhost"], dt.timedelta(hours=3)
    )
    assert identity.ca == os_ca.crt

    server = load_certificate(identity.server.crt)
    assert verify_issued_by(identity.server.crt, os_ca.crt)
    assert list(server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH
    ]
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("192.0.2.10")]
    assert san.get_values_for_type(x509.DNSName) == ["cp-1", "localhost"]
    assert certificate_organizations(identity.server.crt) == []

    assert identity.client is not None
    client = load_certificate(identity.client.crt)
    assert verify_issued_by(identity.client.crt, os_ca.crt)
    assert certificate_organizations(identity.client.crt) == [Role.IMPERSONATOR.value]
    assert list(client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH
    ]


@pytest.mark.parametrize("hours", [3, 24, 240])
def test_renew_at_is_two_thirds_into_the_lifetime(hours: int) -> None:
    identity = sign_locally(controlplane_node().os_ca, "cp-1", ["cp-1"], dt.timedelta(hours=hours))
    cert = load_certificate(identity.server.crt)
    # Measured from when the node got it: the certificate is back-dated a few minutes for
    # clock skew, and that must not count as lifetime already used.
    start, end = identity.obtained, cert.not_valid_after_utc
    assert cert.not_valid_before_utc < start
    assert identity.renew_at() == start + (end - start) * 2 / 3
    assert start < identity.renew_at() < end


def test_certificate_request_carries_the_names() -> None:
    csr_text, key = certificate_request("w-3", ["192.0.2.3", "w-3.example.org"])
    csr = x509.load_pem_x509_csr(csr_text.encode())
    assert csr.is_signature_valid
    assert csr.subject.rfc4514_string() == "CN=w-3"
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("192.0.2.3")]
    assert san.get_values_for_type(x509.DNSName) == ["w-3.example.org"]
    assert "PRIVATE KEY" in key


def test_node_sans_are_unique_and_in_order() -> None:
    assert node_sans("192.0.2.1", "cp-1", ["cp-1", "api.example.org", "", "192.0.2.1"]) == [
        "192.0.2.1",
        "cp-1",
        "localhost",
        "127.0.0.1",
        "api.example.org",
    ]
    assert node_sans("", "", []) == ["localhost", "127.0.0.1"]


def test_the_stand_in_node_uses_the_configs_ca() -> None:
    node = controlplane_node()
    assert isinstance(node.os_ca, CertificateAndKey)
    assert node.os_ca.key is not None


def test_a_running_control_plane_publishes_members_as_resources() -> None:
    node = controlplane_node()
    node.engine = ControllerEngine(node.store, [])

    async def body(stub: trust_pb2_grpc.TrustServiceStub) -> None:
        await announce(node, member("m-b", "192.0.2.2"))(stub)
        await announce(node, member("m-a", "192.0.2.1"))(stub)
        node.trust_members["m-b"].last_seen = time.time() - node.tuning.member_ttl - 1
        await announce(node, member("m-a", "192.0.2.1"))(stub)

    run(serve(node, body))
    resources = node.store.list("Members")
    assert [r.meta.id for r in resources] == ["m-a"]  # the expired member is gone too
    assert resources[0].spec == MemberSpec(
        hostname="m-a",
        machine_type="worker",
        addresses=["192.0.2.1"],
        version="v0.1.0",
        last_seen=node.trust_members["m-a"].last_seen,
    )
    assert set(node.members) == {"m-a"}


def _tls(identity: NodeIdentity) -> grpc.ServerCredentials:
    """What the trust service serves with: the node certificate, no client certificate."""
    return mtls_credentials(
        lambda: (identity.ca, identity.server), require_client_certificate=False
    )


# -- names that belong to someone else (a join token buys no one else's names) -------------


def _certificate_for(node: TrustNode, name: str, sans: list[str]) -> Any:
    names = san_entries(sans)

    async def body(stub: trust_pb2_grpc.TrustServiceStub) -> Any:
        request = trust_pb2.CertificateRequest(csr=csr_pem(name, names), token=token_of(node))
        try:
            return await stub.Certificate(request, timeout=5)
        except grpc.aio.AioRpcError as exc:
            return exc

    return body


@pytest.mark.parametrize(
    ("name", "sans", "owner"),
    [
        ("w-1", ["127.0.0.229"], "address 127.0.0.229 is used by control plane cp-1"),
        ("cp-1", ["192.0.2.77"], "name cp-1 is used by control plane cp-1"),
        ("w-1", ["cp-1"], "name cp-1 is used by control plane cp-1"),
        ("w-1", ["192.0.2.10"], "address 192.0.2.10 is used by the cluster endpoint"),
        ("w-1", ["localhost"], "name localhost is used by control plane cp-1"),
        ("w-1", ["127.0.0.1"], "address 127.0.0.1 cannot belong to one node"),
        ("w-1", ["169.254.169.254"], "cannot belong to one node"),
    ],
    ids=["cp-address", "cp-hostname", "cp-name-as-san", "endpoint", "localhost", "loopback", "ll"],
)
def test_a_certificate_for_a_control_planes_names_is_refused(
    name: str, sans: list[str], owner: str
) -> None:
    node = controlplane_node()
    node.identity = server_identity()  # its certificate names: address, localhost, 127.0.0.1
    error = run(serve(node, _certificate_for(node, name, sans)))
    assert isinstance(error, grpc.aio.AioRpcError), "signed a name that is not the requester's"
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert owner in (error.details() or "")
    assert node.store.list("IssuedCertificates") == []
    assert any("refused" in e.message for e in node.events.history())


def test_a_members_names_are_its_own_and_renewal_keeps_them() -> None:
    node = controlplane_node()

    async def body(stub: trust_pb2_grpc.TrustServiceStub) -> list[Any]:
        first = await _certificate_for(node, "w-1", ["192.0.2.21"])(stub)
        renewed = await _certificate_for(node, "w-1", ["192.0.2.21"])(stub)
        stolen_name = await _certificate_for(node, "w-1", ["192.0.2.99"])(stub)
        stolen_address = await _certificate_for(node, "w-2", ["192.0.2.21"])(stub)
        return [first, renewed, stolen_name, stolen_address]

    first, renewed, stolen_name, stolen_address = run(serve(node, body))
    assert not isinstance(first, grpc.aio.AioRpcError)
    assert not isinstance(renewed, grpc.aio.AioRpcError)
    assert isinstance(stolen_address, grpc.aio.AioRpcError)
    assert "address 192.0.2.21 is used by node w-1" in (stolen_address.details() or "")
    # the same host name asking for another free address: still w-1's own request
    assert not isinstance(stolen_name, grpc.aio.AioRpcError)


def test_an_announcement_is_what_its_certificate_says() -> None:
    """A join-token holder's certificate cannot announce the control plane's address, an
    id that is not its own, or a control plane."""
    node = controlplane_node()

    async def body(stub: trust_pb2_grpc.TrustServiceStub) -> list[Any]:
        got = await _certificate_for(node, "evil", ["192.0.2.66"])(stub)
        cert = got.crt
        outcomes = []
        cases = [
            member("127.0.0.229", "127.0.0.229"),  # the CP's own address as an id
            member("evil", "127.0.0.229"),  # the CP's address
            member("w-1", "192.0.2.66"),  # someone else's id
            trust_pb2.Member(id="evil", hostname="evil", machine_type="controlplane"),
        ]
        for m in cases:
            try:
                await announce(node, m, certificate=cert)(stub)
                outcomes.append("accepted")
            except grpc.aio.AioRpcError as exc:
                outcomes.append(exc.details() or "")
        await announce(node, member("evil", "192.0.2.66"), certificate=cert)(stub)
        return outcomes

    outcomes = run(serve(node, body))
    assert "accepted" not in outcomes, outcomes
    assert "presents the certificate of 'evil'" in outcomes[0]
    assert "not in its certificate" in outcomes[1]
    assert "holds a worker certificate" in outcomes[3]
    assert list(node.trust_members) == ["evil"]  # as its certificate says, nothing more


def test_an_announcement_without_a_certificate_of_this_cluster_is_refused() -> None:
    node = controlplane_node()
    other = sign_locally(
        CertificateAndKey(*_other_ca()), "m-a", ["192.0.2.1"], dt.timedelta(hours=1)
    )

    async def body(stub: trust_pb2_grpc.TrustServiceStub) -> list[str]:
        details = []
        for cert in (b"", b"garbage", other.server.crt.encode()):
            error = await rpc_error(
                announce(node, member("m-a", "192.0.2.1"), certificate=cert)(stub)
            )
            details.append(error.details() or "")
        return details

    none, garbage, foreign = run(serve(node, body))
    assert "no certificate presented" in none
    assert "does not parse" in garbage
    assert "not a current one of this cluster's OS CA" in foreign
    assert node.trust_members == {}


def _other_ca() -> tuple[str, str]:
    from basalt.machinery.pki import generate_ca

    ca = generate_ca("other")
    assert ca.key is not None
    return ca.crt, ca.key


def test_a_wrong_token_flood_is_limited_and_keeps_the_event_history() -> None:
    node = controlplane_node()
    node.events.publish("config", "an event that must survive", actor="test")

    async def body(stub: trust_pb2_grpc.TrustServiceStub) -> list[grpc.StatusCode]:
        codes = []
        for _ in range(60):
            request = trust_pb2.CertificateRequest(csr=csr_pem(), token="wrong.token")
            codes.append((await rpc_error(stub.Certificate(request, timeout=5))).code())
        return codes

    codes = run(serve(node, body))
    assert codes[0] == grpc.StatusCode.PERMISSION_DENIED
    assert codes[-1] == grpc.StatusCode.RESOURCE_EXHAUSTED
    trust_events = [e for e in node.events.history() if e.type == "trust"]
    assert len(trust_events) == 1  # reported once per window, not once per call
    assert any(e.message == "an event that must survive" for e in node.events.history())


def test_one_peer_cannot_fill_the_member_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trust_module, "MAX_MEMBERS_PER_PEER", 3)
    node = controlplane_node()

    async def body(stub: trust_pb2_grpc.TrustServiceStub) -> int:
        for i in range(6):
            await announce(node, member(f"fake-{i}", f"192.0.2.{100 + i}"))(stub)
        return len(node.trust_members)

    assert run(serve(node, body)) == 3


# -- forwarding reaches members only; its channels are bounded ------------------------------


class _Members:
    """The parts of a node the resolver reads."""

    def __init__(self, members: dict[str, trust_pb2.Member]) -> None:
        self.address = "127.0.0.229"
        self.hostname = "cp-1"
        self.members = members


def test_forwarding_resolves_members_only() -> None:
    from basalt.machined.api.proxy import UnknownTargetError, member_resolver

    node = _Members({"w-1": member("w-1", "192.0.2.21")})
    resolve = member_resolver(node)  # type: ignore[arg-type]
    assert resolve("w-1") == resolve("192.0.2.21") == "192.0.2.21"
    assert resolve("cp-1") == resolve("127.0.0.229") == "127.0.0.229"
    for outsider in ("192.0.2.99", "169.254.169.254:80", "127.0.0.229:22", "w-2", ""):
        with pytest.raises(UnknownTargetError, match="not a member of this cluster"):
            resolve(outsider)
    assert member_resolver(node, empty_is_self=True)("") == "127.0.0.229"  # type: ignore[arg-type]


def test_channels_follow_membership_and_are_bounded() -> None:
    from basalt.machined.api import proxy as proxy_module
    from basalt.machined.api.proxy import Proxy, member_resolver
    from basalt.machined.api.server import member_addresses

    identity = server_identity()
    members = {f"w-{i}": member(f"w-{i}", f"192.0.2.{i}") for i in range(1, 101)}
    node = _Members(members)

    async def scenario() -> tuple[int, int, int]:
        proxy = Proxy(
            lambda: (identity.ca, identity.client),  # type: ignore[arg-type,return-value]
            member_resolver(node),  # type: ignore[arg-type]
            lambda: member_addresses(node),  # type: ignore[arg-type]
        )
        for i in range(1, 101):
            proxy.channel(f"w-{i}")
        bounded = proxy.open_channels
        for i in range(1, 96):
            del members[f"w-{i}"]
        proxy.channel("w-100")
        after = proxy.open_channels
        for _ in range(50):
            with pytest.raises(ValueError):
                proxy.channel("192.0.2.250")
        refused = proxy.open_channels
        await proxy.close()
        return bounded, after, refused

    bounded, after, refused = run(scenario())
    assert bounded == proxy_module.MAX_CHANNELS
    assert after <= 5 and refused == after
