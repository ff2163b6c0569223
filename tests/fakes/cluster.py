"""Real process clusters for integration tests (real machined processes, real mTLS).

Not a fake of anything: it drives the ``process`` provisioner and hands tests a client
factory. Each test module picks its own loopback base address so modules never clash.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from basalt.machinery.api import resource_pb2
from basalt.machinery.client.client import Client
from basalt.machinery.client.config import Context
from basalt.machinery.config import Patch, parse_patch
from basalt.machinery.images.keys import trust_document
from basalt.machinery.pki import CertificateAndKey
from basalt.provision.process import ClusterRequest, create, destroy, load_context, node_ready
from basalt.provision.state import ClusterRecord

T = TypeVar("T")

FAST = ("--announce-interval", "1", "--member-ttl", "10")


def run(coro: Awaitable[T]) -> T:
    return asyncio.run(coro)  # type: ignore[arg-type]


@dataclass
class LiveCluster:
    record: ClusterRecord
    context: Context
    secrets: dict[str, Any]

    @property
    def controlplanes(self) -> list[str]:
        return [n.address for n in self.record.nodes if n.type == "controlplane"]

    @property
    def workers(self) -> list[str]:
        return [n.address for n in self.record.nodes if n.type == "worker"]

    @property
    def os_ca(self) -> CertificateAndKey:
        os_ca = self.secrets["certs"]["os"]
        return CertificateAndKey(os_ca["crt"], os_ca["key"])

    def node_dir(self, address: str) -> Path:
        return Path(next(n.node_dir for n in self.record.nodes if n.address == address))

    def config_text(self, kind: str) -> str:
        return (Path(self.record.state_dir) / f"{kind}.yaml").read_text()

    async def client(
        self,
        endpoint: str | None = None,
        *,
        nodes: Sequence[str] = (),
        crt: str | None = None,
        key: str | None = None,
        ca: str | None = None,
    ) -> Client:
        return await Client.connect(
            endpoint or self.controlplanes[0],
            ca=ca or self.context.ca,
            crt=crt or self.context.crt,
            key=key or self.context.key,
            nodes=nodes,
        )

    async def wait_ready(self, address: str, timeout: float = 60.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            try:
                if await node_ready(self.context, address):
                    return
            except Exception:
                pass
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"{address} not ready after {timeout}s")
            await asyncio.sleep(0.2)

    async def resource(self, address: str, type_: str, id_: str) -> dict[str, Any]:
        client = await self.client(address)
        try:
            answer = await client.resources.Get(
                resource_pb2.ResourceGetRequest(type=type_, id=id_), timeout=10
            )
            return dict(json.loads(answer.messages[0].resource.spec_json))
        finally:
            await client.close()


def start_cluster(
    tmp: Path,
    name: str,
    base: str,
    *,
    controlplanes: int = 1,
    workers: int = 1,
    machined_args: tuple[str, ...] = (),
    patches: tuple[Patch, ...] = (),
) -> LiveCluster:
    import yaml

    request = ClusterRequest(
        name=name,
        controlplanes=controlplanes,
        workers=workers,
        base_address=base,
        version_contract="0.1",
        machined_args=FAST + machined_args,
        patches=patches,
    )
    state_dir = tmp / name
    record = run(create(request, state_dir, lambda node, stage: None))
    config = load_context(record)
    _, context = config.current()
    secrets = yaml.safe_load((state_dir / "secrets.yaml").read_text())
    return LiveCluster(record, context, secrets)


def upgradable_cluster(
    tmp: Path,
    name: str,
    base: str,
    *,
    trusted_key: str,
    key_name: str,
    gates_timeout: int,
    controlplanes: int = 1,
    workers: int = 1,
    patches: Sequence[Any] = (),
) -> LiveCluster:
    """:func:`start_cluster` for upgrade tests: the nodes trust ``trusted_key`` (a public
    PEM) for bundles, through an ImageVerificationConfig patch, and a slot on trial has
    ``gates_timeout`` seconds to pass its health gates."""
    patch = parse_patch(trust_document(trusted_key, key_name), f"trust-{key_name}")
    return start_cluster(
        tmp,
        name,
        base,
        controlplanes=controlplanes,
        workers=workers,
        machined_args=("--boot-assessment-timeout", str(gates_timeout)),
        patches=(patch, *patches),
    )


def stop_cluster(cluster: LiveCluster) -> None:
    run(destroy(cluster.record))


Callback = Callable[[], Awaitable[None]]
