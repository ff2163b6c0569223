"""The fleet's machine RPC (FleetLink.Connect) refuses every caller but an enrolled
machine with the certificate its enrolment issued.

A fleet in-process with its real link server on 127.0.0.145; callers: no client
certificate, a certificate of another CA, the fleet's own replica certificate, an
enrolled machine saying another UUID, an enrolled machine (welcomed), the same machine
after removal.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import grpc.aio
import pytest

from basalt.fleet import service
from basalt.fleet.auth import Caller, FleetRole
from basalt.fleet.core import Fleet, FleetOptions
from basalt.fleet.server import start_link_server
from basalt.machinery.api import fleet_pb2, fleet_pb2_grpc
from basalt.machinery.pki import generate_ca, generate_private_key, issue_certificate

pytestmark = pytest.mark.integration

HOST = "127.0.0.145"
ADMIN = Caller("admin", FleetRole.ADMIN)


def enrolled(fleet: Fleet) -> tuple[str, str, str]:
    """(uuid, certificate, key) of a machine enrolled with a fresh join token."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    from basalt.machinery.pki import private_key_pem

    machine = str(uuid.uuid4())
    key = generate_private_key()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, machine)]))
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
        .decode()
    )
    with fleet.database.session() as session:
        _, token = service.create_join_token(session, ADMIN, ttl=None, uses=1, labels={})
    with fleet.database.session() as session:
        crt = service.enrol(
            session, fleet.ca, token=token, machine_uuid=machine, hostname="m", csr=csr
        )
    return machine, crt, private_key_pem(key)


async def connect(
    fleet: Fleet, hello_uuid: str, crt: str | None, key: str | None, ca: str | None = None
) -> fleet_pb2.FleetMessage:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=(ca or fleet.ca.crt).encode(),
        private_key=key.encode() if key else None,
        certificate_chain=crt.encode() if crt else None,
    )
    options = [("grpc.ssl_target_name_override", "basalt-fleet")]
    target = f"{HOST}:{fleet.options.effective_link_port}"
    async with grpc.aio.secure_channel(target, credentials, options=options) as channel:
        stub = fleet_pb2_grpc.FleetLinkStub(channel)

        async def messages() -> AsyncIterator[fleet_pb2.MachineMessage]:
            yield fleet_pb2.MachineMessage(hello=fleet_pb2.Hello(machine_uuid=hello_uuid))
            await asyncio.sleep(5)

        call = stub.Connect(messages(), timeout=10)
        async for message in call:
            return message
    raise AssertionError("the stream ended without a message")


def test_only_an_enrolled_machine_with_its_certificate_may_link(tmp_path: Path) -> None:
    fleet = Fleet(FleetOptions(data_dir=tmp_path / "fleet", host=HOST, port=18900))
    machine, crt, key = enrolled(fleet)

    async def scenario() -> None:
        server = await start_link_server(fleet)
        try:
            # No client certificate: the TLS handshake fails.
            with pytest.raises(grpc.aio.AioRpcError) as none:
                await connect(fleet, machine, None, None)
            assert none.value.code() == grpc.StatusCode.UNAVAILABLE
            # A certificate of another CA: the handshake fails too.
            other = generate_ca("someone-else")
            stranger = issue_certificate(other, machine, client=True)
            with pytest.raises(grpc.aio.AioRpcError) as foreign:
                await connect(fleet, machine, stranger.crt, stranger.key)
            assert foreign.value.code() == grpc.StatusCode.UNAVAILABLE
            # The fleet's own replica certificate names no enrolled machine.
            assert fleet.server_cert.key is not None
            with pytest.raises(grpc.aio.AioRpcError) as replica:
                await connect(fleet, "basalt-fleet", fleet.server_cert.crt, fleet.server_cert.key)
            assert replica.value.code() == grpc.StatusCode.PERMISSION_DENIED
            # An enrolled machine's certificate with another machine's UUID in its Hello.
            with pytest.raises(grpc.aio.AioRpcError) as mismatch:
                await connect(fleet, str(uuid.uuid4()), crt, key)
            assert mismatch.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            # The machine itself is welcomed.
            welcome = await connect(fleet, machine, crt, key)
            assert welcome.WhichOneof("kind") == "welcome"
            # Removed: refused, by name.
            with fleet.database.session() as session:
                service.remove_machine(session, ADMIN, machine)
            with pytest.raises(grpc.aio.AioRpcError) as removed:
                await connect(fleet, machine, crt, key)
            assert removed.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "removed" in (removed.value.details() or "")
        finally:
            await server.stop(None)
            fleet.close()

    asyncio.run(scenario())
