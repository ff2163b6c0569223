"""The node's client of a discovery service: publish, delete, list and watch affiliates.

Everything it sends is sealed with the cluster's keys and carries a fresh proof; every
record it receives is opened with them. A record that does not open (changed ciphertext,
another secret) is skipped, counted in ``undecryptable`` and logged once per affiliate.

    keys = ClusterKeys.from_config(cluster.id, cluster.secret)
    client = DiscoveryClient("grpcs://discovery.example.com:3000", keys)
    await client.update("node-1", Affiliate(...), ttl=1800)
    async for event in client.watch():
        use(event.affiliates)                 # the whole decrypted view after each change

``watch`` ends with a DiscoveryError when the stream breaks (the service restarted, the
watcher was too slow and was dropped); the caller watches again after a pause, and the
snapshot that starts the new stream replaces its view.
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncGenerator, Iterable
from dataclasses import dataclass, field
from typing import Literal

import grpc
import grpc.aio

from ..api import discovery_pb2, discovery_pb2_grpc
from .crypto import ClusterKeys, Proof, check_affiliate_id, update_digest
from .errors import (
    DiscoveryAuthError,
    DiscoveryDataError,
    DiscoveryError,
    DiscoveryLimitError,
    DiscoveryRequestError,
    DiscoveryTargetError,
)
from .model import Affiliate

log = logging.getLogger("basalt.discovery.client")

#: The largest message the client accepts (a List of a full cluster is ~2 MiB).
MAX_MESSAGE = 16 << 20
_TARGET = re.compile(r"^(grpcs?)://(\[[0-9a-fA-F:.]+\]|[^\s/:\[\]]+):(\d{1,5})/?$")

WatchKind = Literal["snapshot", "update", "delete"]


@dataclass(frozen=True)
class DiscoveryTarget:
    """Where a discovery service listens: ``grpc://HOST:PORT`` (plaintext; loopback and
    tests) or ``grpcs://HOST:PORT`` (TLS)."""

    tls: bool
    host: str
    port: int

    @property
    def address(self) -> str:
        """``HOST:PORT`` as gRPC dials it (an IPv6 host in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def __str__(self) -> str:
        return f"{'grpcs' if self.tls else 'grpc'}://{self.address}"


def parse_target(text: str, where: str = "discovery endpoint") -> DiscoveryTarget:
    """Parse ``grpc://HOST:PORT`` or ``grpcs://HOST:PORT``; ``where`` names the source."""
    match = _TARGET.match(text.strip())
    hint = "e.g. grpcs://discovery.example.com:3000, or grpc://127.0.0.1:3000 on loopback"
    if not match:
        raise DiscoveryTargetError(
            f"{where}: {text!r} is not grpc://HOST:PORT or grpcs://HOST:PORT", hint=hint
        )
    scheme, host, port = match.group(1), match.group(2).strip("[]"), int(match.group(3))
    if not 0 < port < 65536:
        raise DiscoveryTargetError(f"{where}: port {port} is out of range", hint=hint)
    return DiscoveryTarget(scheme == "grpcs", host, port)


@dataclass(frozen=True)
class WatchEvent:
    """One step of a watch: what happened (``snapshot`` first; ``delete`` also when a
    record expired), which affiliate ('' for a snapshot), and the whole decrypted view of
    the cluster after it."""

    kind: WatchKind
    affiliates: dict[str, Affiliate]
    affiliate_id: str = ""
    expired: bool = field(default=False)


def _proof_pb(proof: Proof) -> discovery_pb2.Proof:
    return discovery_pb2.Proof(
        public_key=proof.public_key,
        timestamp=proof.timestamp,
        nonce=proof.nonce,
        signature=proof.signature,
    )


def error_from_rpc(exc: grpc.aio.AioRpcError, target: str) -> DiscoveryError:
    """The DiscoveryError for a refused call: the service's text, prefixed by where."""
    code = exc.code()
    text = f"discovery service {target}: {exc.details() or code.name}"
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return DiscoveryRequestError(text)
    if code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
        return DiscoveryAuthError(
            text,
            hint="check that this node has the cluster's id and secret and a synchronised clock",
        )
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return DiscoveryLimitError(text, hint="the service's limits are in docs/discovery.md")
    return DiscoveryError(
        f"discovery service {target}: {code.name}: {exc.details() or 'no details'}",
        hint="the service may be down or restarting; the node retries",
    )


class DiscoveryClient:
    """A client of one discovery service for one cluster (see the module docstring)."""

    def __init__(
        self,
        target: str,
        keys: ClusterKeys,
        *,
        ca_pem: bytes | str | None = None,
        timeout: float = 10.0,
    ) -> None:
        self.target = parse_target(target)
        self.keys = keys
        self.timeout = timeout
        self._ca = ca_pem.encode() if isinstance(ca_pem, str) else ca_pem
        self._channel: grpc.aio.Channel | None = None
        self._stub: discovery_pb2_grpc.DiscoveryAsyncStub | None = None
        #: How many records (or endpoints) did not open with the cluster's keys.
        self.undecryptable = 0
        self._logged: set[str] = set()

    def _discovery(self) -> discovery_pb2_grpc.DiscoveryAsyncStub:
        if self._stub is None:
            options = [
                ("grpc.max_receive_message_length", MAX_MESSAGE),
                ("grpc.max_send_message_length", MAX_MESSAGE),
            ]
            channel: grpc.aio.Channel
            if self.target.tls:
                credentials = grpc.ssl_channel_credentials(root_certificates=self._ca)
                channel = grpc.aio.secure_channel(self.target.address, credentials, options=options)
            else:
                channel = grpc.aio.insecure_channel(self.target.address, options=options)
            self._channel = channel
            self._stub = discovery_pb2_grpc.DiscoveryStub(channel)
        return self._stub

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close(None)
        self._channel = None
        self._stub = None

    async def __aenter__(self) -> DiscoveryClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- writes ----------------------------------------------------------------------------
    async def update(self, affiliate_id: str, affiliate: Affiliate, ttl: float = 1800.0) -> None:
        """Publish (or replace) this node's record; it expires after ``ttl`` seconds unless
        updated again (refresh at about a third of it)."""
        check_affiliate_id(affiliate_id)
        ttl_seconds = max(1, round(ttl))
        data = self.keys.seal_data(affiliate_id, affiliate.to_json())
        endpoints = sorted({self.keys.seal_endpoint(a) for a in affiliate.addresses})
        digest = update_digest(data, endpoints, ttl_seconds)
        proof = self.keys.proof("AffiliateUpdate", affiliate_id, digest)
        request = discovery_pb2.AffiliateUpdateRequest(
            cluster_id=self.keys.wire_id,
            affiliate_id=affiliate_id,
            data=data,
            endpoints=endpoints,
            ttl_seconds=ttl_seconds,
            proof=_proof_pb(proof),
        )
        try:
            await self._discovery().AffiliateUpdate(request, timeout=self.timeout)
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc, str(self.target)) from None

    async def delete(self, affiliate_id: str) -> None:
        """Remove this node's record (deleting a record that is gone is not an error)."""
        check_affiliate_id(affiliate_id)
        proof = self.keys.proof("AffiliateDelete", affiliate_id)
        request = discovery_pb2.AffiliateDeleteRequest(
            cluster_id=self.keys.wire_id, affiliate_id=affiliate_id, proof=_proof_pb(proof)
        )
        try:
            await self._discovery().AffiliateDelete(request, timeout=self.timeout)
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc, str(self.target)) from None

    # -- reads -----------------------------------------------------------------------------
    async def list(self) -> list[tuple[str, Affiliate]]:
        """Every live affiliate that opens with the cluster's keys, sorted by id."""
        request = discovery_pb2.ListRequest(
            cluster_id=self.keys.wire_id, proof=_proof_pb(self.keys.proof("List"))
        )
        try:
            response = await self._discovery().List(request, timeout=self.timeout)
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc, str(self.target)) from None
        opened = self._open_all(response.affiliates)
        return sorted(opened.items())

    async def watch(self) -> AsyncGenerator[WatchEvent, None]:
        """A snapshot event, then one event per change that alters the decrypted view.
        ``aclose()`` it (or leave the ``async for``) to close the stream."""
        request = discovery_pb2.WatchRequest(
            cluster_id=self.keys.wire_id, proof=_proof_pb(self.keys.proof("Watch"))
        )
        call = self._discovery().Watch(request)
        view: dict[str, Affiliate] = {}
        kinds = discovery_pb2.WatchResponse
        try:
            async for message in call:
                if message.kind == kinds.KIND_SNAPSHOT:
                    view = self._open_all(message.affiliates)
                    yield WatchEvent("snapshot", dict(view))
                    continue
                for record in message.affiliates:
                    if message.kind == kinds.KIND_UPDATE:
                        affiliate = self._open(record)
                        if affiliate is None:
                            changed = view.pop(record.id, None) is not None
                            kind: WatchKind = "delete"
                        else:
                            changed = view.get(record.id) != affiliate
                            view[record.id] = affiliate
                            kind = "update"
                    else:
                        changed = view.pop(record.id, None) is not None
                        kind = "delete"
                    if changed:
                        expired = message.kind == kinds.KIND_EXPIRED
                        yield WatchEvent(kind, dict(view), record.id, expired)
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc, str(self.target)) from None
        finally:
            call.cancel()
        raise DiscoveryError(
            f"discovery service {self.target}: the watch stream ended",
            hint="watch again; the service may be restarting",
        )

    # -- opening records -------------------------------------------------------------------
    def _open_all(self, records: Iterable[discovery_pb2.Affiliate]) -> dict[str, Affiliate]:
        opened: dict[str, Affiliate] = {}
        for record in records:
            affiliate = self._open(record)
            if affiliate is not None:
                opened[record.id] = affiliate
        return opened

    def _open(self, record: discovery_pb2.Affiliate) -> Affiliate | None:
        """The record in clear, its endpoints merged into its addresses; None (counted,
        logged once per affiliate) when it does not open."""
        try:
            affiliate = Affiliate.from_json(
                self.keys.open_data(record.id, record.data), f"affiliate {record.id!r}"
            )
        except DiscoveryDataError as exc:
            self._skipped(record.id, exc)
            return None
        addresses = list(affiliate.addresses)
        for blob in record.endpoints:
            try:
                address = self.keys.open_endpoint(blob)
            except DiscoveryDataError as exc:
                self._skipped(record.id, exc)
                continue
            if address not in addresses:
                addresses.append(address)
        if len(addresses) == len(affiliate.addresses):
            return affiliate
        return Affiliate(
            node_id=affiliate.node_id,
            hostname=affiliate.hostname,
            machine_type=affiliate.machine_type,
            addresses=tuple(addresses),
            version=affiliate.version,
            etcd_peer_url=affiliate.etcd_peer_url,
            extra=affiliate.extra,
        )

    def _skipped(self, affiliate_id: str, exc: DiscoveryDataError) -> None:
        self.undecryptable += 1
        if affiliate_id not in self._logged and len(self._logged) < 1024:
            self._logged.add(affiliate_id)
            log.warning("%s", exc.one_line())


__all__ = [
    "DiscoveryClient",
    "DiscoveryTarget",
    "WatchEvent",
    "WatchKind",
    "error_from_rpc",
    "parse_target",
]
