"""The gRPC servicer: admit, check, verify the proof, then act on the registry.

Every request goes through the same steps, in an order that makes a stranger cheap to
refuse and tells them nothing:

1. **admit** — the client address's token bucket (``client_rate``/``client_burst``);
2. **shape** — the wire id's form, the affiliate id, a proof present;
3. **proof** — the signature over the request (:func:`verify_proof`), then its nonce
   (:class:`NonceCache`) — only a verified proof may take a place in the cache;
4. **act** — the registry, whose limits need the cluster (affiliates in it, its watches).

A refused proof is PERMISSION_DENIED with the same text whether or not the cluster has
records; a cluster never seen answers a verified List with nothing. This module is the
one place where discovery's errors become gRPC status codes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import NoReturn

import grpc
import grpc.aio

from basalt.machinery.api import discovery_pb2, discovery_pb2_grpc
from basalt.machinery.api.status import GRPC_STATUS
from basalt.machinery.discovery.crypto import (
    EMPTY_DIGEST,
    Method,
    NonceCache,
    Proof,
    ProofRefused,
    check_affiliate_id,
    is_wire_id,
    update_digest,
    verify_proof,
)
from basalt.machinery.discovery.errors import DiscoveryAuthError, DiscoveryRequestError
from basalt.machinery.errors import BasaltError

from .limits import LimitReached, TokenBucket, TooLarge
from .metrics import Metrics
from .state import Change, Record, Registry

log = logging.getLogger("basalt.discovery")


_KIND = discovery_pb2.WatchResponse
_CHANGE_KINDS = {
    "update": _KIND.KIND_UPDATE,
    "delete": _KIND.KIND_DELETE,
    "expired": _KIND.KIND_EXPIRED,
}


def status_of(exc: BasaltError) -> grpc.StatusCode:
    """The gRPC status code of a refusal (its class's kind)."""
    return GRPC_STATUS[exc.kind]


def peer_address(peer: str) -> str:
    """The client's address without its port: ``ipv4:10.0.0.1:5000`` -> ``10.0.0.1``."""
    scheme, _, rest = peer.partition(":")
    if scheme in ("ipv4", "ipv6"):
        host = rest.rsplit(":", 1)[0]
        return host.replace("%5B", "[").replace("%5D", "]").strip("[]")
    return peer


def _affiliate_pb(affiliate_id: str, record: Record) -> discovery_pb2.Affiliate:
    return discovery_pb2.Affiliate(
        id=affiliate_id, data=record.data, endpoints=list(record.endpoints)
    )


def _proof(message: discovery_pb2.Proof) -> Proof:
    return Proof(message.public_key, message.timestamp, message.nonce, message.signature)


class DiscoveryService(discovery_pb2_grpc.DiscoveryServicer):
    """The Discovery API over a :class:`Registry` (see the module docstring)."""

    def __init__(
        self,
        registry: Registry,
        *,
        nonces: NonceCache | None = None,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.registry = registry
        self.limits = registry.limits
        self.nonces = nonces if nonces is not None else NonceCache()
        self.metrics = metrics or Metrics()
        self.clock = clock
        self._buckets: dict[str, TokenBucket] = {}
        self._client_watches: Counter[str] = Counter()

    # -- the steps -------------------------------------------------------------------------
    def _admit(self, context: grpc.aio.ServicerContext[object, object]) -> str:
        client = peer_address(context.peer() or "unknown")
        now = time.monotonic()
        bucket = self._buckets.get(client)
        if bucket is None:
            bucket = self._buckets[client] = TokenBucket(
                self.limits.client_rate, self.limits.client_burst, now
            )
        if not bucket.take(now):
            raise LimitReached(
                "client_rate",
                self.limits.client_rate,
                f"client {client} sends more than {self.limits.client_rate:g} requests a "
                f"second (burst {self.limits.client_burst})",
            )
        return client

    def _authorise(
        self,
        method: Method,
        cluster_id: str,
        proof: discovery_pb2.Proof | None,
        affiliate_id: str = "",
        digest: bytes = EMPTY_DIGEST,
    ) -> None:
        if not is_wire_id(cluster_id):
            raise DiscoveryRequestError(
                "cluster_id must be 64 lower-case hex digits (sha256 of the cluster's public key)"
            )
        if affiliate_id or method in ("AffiliateUpdate", "AffiliateDelete"):
            check_affiliate_id(affiliate_id)
        if proof is None:
            raise DiscoveryAuthError("the request carries no proof of the cluster secret")
        now = self.clock()
        verified = _proof(proof)
        verify_proof(
            verified,
            method=method,
            cluster_id=cluster_id,
            affiliate_id=affiliate_id,
            digest=digest,
            now=now,
        )
        self.nonces.check(cluster_id, verified, now)

    async def _refuse(
        self, context: grpc.aio.ServicerContext[object, object], method: str, exc: BasaltError
    ) -> NoReturn:
        code = status_of(exc)
        self.metrics.request(method, code.name)
        if isinstance(exc, ProofRefused):
            self.metrics.refusal(f"proof_{exc.reason}")
        elif isinstance(exc, LimitReached | TooLarge):
            self.metrics.refusal(exc.limit)
        elif isinstance(exc, DiscoveryAuthError):
            self.metrics.refusal("proof_missing")
        log.debug("%s from %s refused: %s", method, context.peer(), exc.one_line())
        await context.abort(code, exc.one_line())
        raise AssertionError("abort returned")  # pragma: no cover

    # -- unary calls -----------------------------------------------------------------------
    async def AffiliateUpdate(
        self,
        request: discovery_pb2.AffiliateUpdateRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> discovery_pb2.AffiliateUpdateResponse:
        method: Method = "AffiliateUpdate"
        try:
            self._admit(context)
            digest = update_digest(request.data, request.endpoints, request.ttl_seconds)
            proof = request.proof if request.HasField("proof") else None
            self._authorise(method, request.cluster_id, proof, request.affiliate_id, digest)
            self.registry.update(
                request.cluster_id,
                request.affiliate_id,
                request.data,
                request.endpoints,
                request.ttl_seconds,
                self.clock(),
            )
        except BasaltError as exc:
            await self._refuse(context, method, exc)
        self.metrics.request(method, "OK")
        return discovery_pb2.AffiliateUpdateResponse()

    async def AffiliateDelete(
        self,
        request: discovery_pb2.AffiliateDeleteRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> discovery_pb2.AffiliateDeleteResponse:
        method: Method = "AffiliateDelete"
        try:
            self._admit(context)
            proof = request.proof if request.HasField("proof") else None
            self._authorise(method, request.cluster_id, proof, request.affiliate_id)
            self.registry.delete(request.cluster_id, request.affiliate_id, self.clock())
        except BasaltError as exc:
            await self._refuse(context, method, exc)
        self.metrics.request(method, "OK")
        return discovery_pb2.AffiliateDeleteResponse()

    async def List(
        self, request: discovery_pb2.ListRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> discovery_pb2.ListResponse:
        method: Method = "List"
        try:
            self._admit(context)
            proof = request.proof if request.HasField("proof") else None
            self._authorise(method, request.cluster_id, proof)
        except BasaltError as exc:
            await self._refuse(context, method, exc)
        records = self.registry.affiliates(request.cluster_id)
        self.metrics.request(method, "OK")
        return discovery_pb2.ListResponse(
            affiliates=[_affiliate_pb(a, r) for a, r in sorted(records.items())]
        )

    # -- the watch -------------------------------------------------------------------------
    async def Watch(
        self, request: discovery_pb2.WatchRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> AsyncIterator[discovery_pb2.WatchResponse]:
        method: Method = "Watch"
        try:
            client = self._admit(context)
            proof = request.proof if request.HasField("proof") else None
            self._authorise(method, request.cluster_id, proof)
            if self._client_watches[client] >= self.limits.watches_per_client:
                raise LimitReached(
                    "watches_per_client",
                    self.limits.watches_per_client,
                    f"client {client} has {self._client_watches[client]} open watches",
                )
            watch, snapshot = self.registry.watch(request.cluster_id)
        except BasaltError as exc:
            await self._refuse(context, method, exc)
        self.metrics.request(method, "OK")
        self._client_watches[client] += 1
        try:
            yield discovery_pb2.WatchResponse(
                kind=_KIND.KIND_SNAPSHOT,
                affiliates=[_affiliate_pb(a, r) for a, r in sorted(snapshot.items())],
            )
            while True:
                change = await watch.queue.get()
                if change is None:
                    dropped = LimitReached("watch_queue", self.limits.watch_queue, watch.dropped)
                    self.metrics.refusal(dropped.limit)
                    await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, dropped.one_line())
                    return
                yield self._change_pb(change)
        finally:
            self._client_watches[client] -= 1
            if self._client_watches[client] <= 0:
                del self._client_watches[client]
            self.registry.unwatch(watch)

    def _change_pb(self, change: Change) -> discovery_pb2.WatchResponse:
        if change.at:
            self.metrics.delivered(max(0.0, self.clock() - change.at))
        kind = _CHANGE_KINDS[change.kind]
        if change.record is None:
            return discovery_pb2.WatchResponse(
                kind=kind, affiliates=[discovery_pb2.Affiliate(id=change.affiliate_id)]
            )
        return discovery_pb2.WatchResponse(
            kind=kind, affiliates=[_affiliate_pb(change.affiliate_id, change.record)]
        )

    # -- upkeep ----------------------------------------------------------------------------
    def sweep(self) -> int:
        """Expire records and forget idle clients' buckets; the records removed."""
        removed = self.registry.expire(self.clock())
        now = time.monotonic()
        for client in [c for c, b in self._buckets.items() if b.full(now)]:
            del self._buckets[client]
        return len(removed)

    async def sweep_loop(self, interval: float = 1.0) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                self.sweep()
            except Exception:
                log.exception("discovery: the expiry sweep failed")


def add_to_server(service: DiscoveryService, server: grpc.aio.Server) -> None:
    """Serve the Discovery API on ``server`` (standalone, or beside the fleet's)."""
    discovery_pb2_grpc.add_DiscoveryServicer_to_server(service, server)
