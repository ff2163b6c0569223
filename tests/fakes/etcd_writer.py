"""A load generator for etcd during rolling upgrades: writes a key every 50 ms through any
control plane that answers (in turn, with failover), and records when each write
succeeded and how many found no member. Real etcd, real TLS; not a fake of anything."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Sequence

import grpc.aio

from basalt.machined.etcd.client import EtcdClient, client_url
from basalt.machinery.pki import CertificateAndKey, issue_certificate


class EtcdWriter(threading.Thread):
    def __init__(
        self, ca_crt: str, ca_key: str, addresses: Sequence[str], prefix: str = ""
    ) -> None:
        super().__init__(daemon=True)
        self.ca = CertificateAndKey(ca_crt, ca_key)
        self.addresses = list(addresses)
        self.prefix = prefix or "/rolling"
        self.stopping = threading.Event()
        self.succeeded: list[float] = []
        self.failed = 0

    def run(self) -> None:
        asyncio.run(self._write_forever())

    async def _write_forever(self) -> None:
        cert = issue_certificate(self.ca, "writer", client=True)
        clients = [EtcdClient(client_url(a), self.ca.crt, cert, timeout=2) for a in self.addresses]
        index = 0
        while not self.stopping.is_set():
            for attempt in range(len(clients)):
                client = clients[(index + attempt) % len(clients)]
                try:
                    await client.put(f"{self.prefix}/{index}".encode(), b"x")
                except (grpc.aio.AioRpcError, TimeoutError):
                    continue
                self.succeeded.append(time.monotonic())
                break
            else:
                self.failed += 1
            index += 1
            await asyncio.sleep(0.05)
        for client in clients:
            await client.close()

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=30)

    def longest_gap(self) -> float:
        times = self.succeeded
        return max((b - a for a, b in itertools.pairwise(times)), default=0.0)

    def report(self) -> str:
        return (
            f"{len(self.succeeded)} writes, {self.failed} failed, "
            f"longest gap {self.longest_gap():.2f} s"
        )
