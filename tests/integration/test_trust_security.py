"""What a join-token holder and a reader can do to a live 1+1 cluster's trust and routing.

The token is in every worker.yaml. With it: no certificate for the control plane's own
names, no member entry that is not what its certificate says, so no admin request is ever
routed to an impostor. Forwarding reaches members only: a `-n` that is not one is refused
without a connection (no port scanner), and many such targets cost nothing.
"""

from __future__ import annotations

import socket
import threading
from typing import Any

import grpc
import grpc.aio
import psutil
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from basalt.machinery.api import TRUST_PORT, common_pb2, trust_pb2, trust_pb2_grpc
from basalt.machinery.client.config import issue_client_context
from basalt.machinery.pki import generate_private_key, san_entries
from basalt.machinery.roles import Role
from tests.fakes.cluster import LiveCluster, run, start_cluster, stop_cluster

pytestmark = pytest.mark.integration
BASE = "127.0.0.171"
OUTSIDER = "127.0.0.178"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Any:
    live = start_cluster(tmp_path_factory.mktemp("trustsec"), "tsec", BASE)
    yield live
    stop_cluster(live)


def _token(cluster: LiveCluster) -> str:
    worker = next(d for d in yaml.safe_load_all(cluster.config_text("worker")) if d)
    return str(worker["token"])


def _csr(name: str, sans: list[str]) -> bytes:
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, name)]))
        .add_extension(x509.SubjectAlternativeName(san_entries(sans)), critical=False)
        .sign(generate_private_key(), hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


async def _trust(cluster: LiveCluster, call: str, request: Any) -> Any:
    credentials = grpc.ssl_channel_credentials(root_certificates=cluster.context.ca.encode())
    target = f"{cluster.controlplanes[0]}:{TRUST_PORT}"
    async with grpc.aio.secure_channel(target, credentials) as channel:
        stub = trust_pb2_grpc.TrustServiceStub(channel)
        try:
            return await getattr(stub, call)(request, timeout=10)
        except grpc.aio.AioRpcError as exc:
            return exc


def test_a_token_holder_gets_no_certificate_for_the_control_planes_names(
    cluster: LiveCluster,
) -> None:
    cp = cluster.controlplanes[0]
    for name, sans in (("tsec-controlplane-1", [cp]), ("intruder", [cp, "tsec-controlplane-1"])):
        request = trust_pb2.CertificateRequest(csr=_csr(name, sans), token=_token(cluster))
        answer = run(_trust(cluster, "Certificate", request))
        assert isinstance(answer, grpc.aio.AioRpcError), f"signed {sans} for a token holder"
        assert answer.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "used by control plane tsec-controlplane-1" in (answer.details() or "")


def test_a_token_holder_cannot_announce_itself_as_the_control_plane(
    cluster: LiveCluster,
) -> None:
    cp = cluster.controlplanes[0]
    request = trust_pb2.CertificateRequest(csr=_csr("intruder", [OUTSIDER]), token=_token(cluster))
    issued = run(_trust(cluster, "Certificate", request))
    assert not isinstance(issued, grpc.aio.AioRpcError), issued
    forged = [
        trust_pb2.Member(id=cp, hostname=cp, machine_type="worker", addresses=[OUTSIDER]),
        trust_pb2.Member(id="intruder", hostname="intruder", machine_type="worker", addresses=[cp]),
        trust_pb2.Member(
            id="tsec-worker-1", hostname="tsec-worker-1", machine_type="worker", addresses=[]
        ),
    ]
    for member in forged:
        answer = run(
            _trust(
                cluster,
                "Announce",
                trust_pb2.AnnounceRequest(
                    token=_token(cluster), member=member, certificate=issued.crt
                ),
            )
        )
        assert isinstance(answer, grpc.aio.AioRpcError), f"admitted {member.id}"
        assert answer.code() == grpc.StatusCode.PERMISSION_DENIED


class _Listener:
    """A TCP listener on an address that is no member: counts connections made to it."""

    def __init__(self, address: str, port: int) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((address, port))
        self.sock.listen()
        self.sock.settimeout(0.2)
        self.accepted = 0
        self.stopped = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopped:
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        self.stopped = True
        self.thread.join()
        self.sock.close()


def test_forwarding_reaches_members_only_and_never_dials_anything_else(
    cluster: LiveCluster,
) -> None:
    reader = issue_client_context(cluster.os_ca, endpoints=[], roles=[Role.READER])
    listener = _Listener(OUTSIDER, 50000)
    # (loopback only: on a node without the fix these would be dialled)
    targets = [OUTSIDER, f"{OUTSIDER}:50000", f"{OUTSIDER}:80", "no-such-node"]

    async def versions(nodes: list[str]) -> list[tuple[str, int, str]]:
        client = await cluster.client(crt=reader.crt, key=reader.key)
        try:
            answer = await client.machine.Version(
                common_pb2.Empty(), metadata=client.metadata(nodes), timeout=20
            )
            return [(m.metadata.node, m.metadata.code, m.metadata.error) for m in answer.messages]
        finally:
            await client.close()

    try:
        answers = run(versions(targets))
        assert listener.accepted == 0
    finally:
        listener.close()
    assert [a[0] for a in answers] == targets
    for _, code, error in answers:
        assert code == grpc.StatusCode.NOT_FOUND.value[0]
        assert "not a member of this cluster" in error
        assert "Connection refused" not in error and "Tls" not in error
    members = run(versions(["tsec-worker-1", cluster.workers[0]]))
    assert [code for _, code, _ in members] == [0, 0]


def test_thousands_of_targets_cost_no_memory(cluster: LiveCluster) -> None:
    pid = int((cluster.node_dir(cluster.controlplanes[0]) / "machined.pid").read_text())
    before = psutil.Process(pid).memory_info().rss

    async def spray() -> int:
        client = await cluster.client()
        try:
            refused = 0
            for batch in range(10):
                nodes = [f"127.{batch + 1}.{i // 250}.{i % 250 + 1}" for i in range(300)]
                answer = await client.machine.Version(
                    common_pb2.Empty(), metadata=client.metadata(nodes), timeout=30
                )
                refused += sum(1 for m in answer.messages if m.metadata.error)
            return refused
        finally:
            await client.close()

    assert run(spray()) == 3000
    grown = psutil.Process(pid).memory_info().rss - before
    assert grown < 40 * 1024 * 1024, f"machined grew {grown / 2**20:.0f} MiB"
