"""etcd's certificates on a control plane, issued from the etcd CA in the config.

They live under the node's secrets directory and are issued once per boot (etcd is
restarted with the node, so a restart picks up new ones).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from basalt.machinery.fileio import write_atomic
from basalt.machinery.pki import CertificateAndKey, issue_certificate

SECRETS = Path("system") / "secrets" / "etcd"


@dataclass(frozen=True)
class EtcdFiles:
    ca: Path
    server_crt: Path
    server_key: Path
    peer_crt: Path
    peer_key: Path
    client_crt: Path
    client_key: Path


def files_under(root: Path) -> EtcdFiles:
    base = root / SECRETS
    return EtcdFiles(
        ca=base / "ca.crt",
        server_crt=base / "server.crt",
        server_key=base / "server.key",
        peer_crt=base / "peer.crt",
        peer_key=base / "peer.key",
        client_crt=base / "machined-client.crt",
        client_key=base / "machined-client.key",
    )


@dataclass(frozen=True)
class EtcdCertificates:
    ca: str
    server: CertificateAndKey
    peer: CertificateAndKey
    #: machined's own client certificate for managing etcd.
    client: CertificateAndKey


def issue(ca: CertificateAndKey, hostname: str, address: str) -> EtcdCertificates:
    names = list(dict.fromkeys([address, hostname, "localhost", "127.0.0.1"]))
    server = issue_certificate(ca, hostname, server=True, client=True, sans=names)
    peer = issue_certificate(ca, hostname, server=True, client=True, sans=names)
    client = issue_certificate(ca, "basalt-machined", client=True)
    return EtcdCertificates(ca.crt, server, peer, client)


def write(root: Path, certs: EtcdCertificates) -> EtcdFiles:
    files = files_under(root)
    pairs = (
        (files.server_crt, files.server_key, certs.server),
        (files.peer_crt, files.peer_key, certs.peer),
        (files.client_crt, files.client_key, certs.client),
    )
    write_atomic(files.ca, certs.ca, mode=0o644)
    for crt, key, pair in pairs:
        assert pair.key is not None
        write_atomic(crt, pair.crt, mode=0o644)
        write_atomic(key, pair.key, mode=0o600)
    return files
