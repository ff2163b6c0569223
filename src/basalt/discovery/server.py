"""One discovery service: its registry, servicer, upkeep tasks and snapshot, started on a
gRPC server of its own — by ``basalt-discovery serve``, or by ``basalt-fleet serve
--discovery-port N`` with the fleet's server certificate."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import grpc.aio

from basalt.machinery.discovery.crypto import NonceCache
from basalt.machinery.errors import BasaltError

from . import snapshot
from .limits import Limits
from .metrics import Metrics, serve_metrics
from .service import DiscoveryService, add_to_server
from .state import Registry

log = logging.getLogger("basalt.discovery")

#: The largest request the server reads at all; the limits (data_size, ...) refuse less
#: with clearer errors.
MAX_REQUEST = 256 * 1024


class ListenError(BasaltError):
    """The service cannot listen where it was asked to."""


@dataclass
class ServerOptions:
    host: str = "127.0.0.1"
    port: int = 3000
    #: ``HOST:PORT`` of /metrics ('' for none).
    metrics: str = ""
    #: Where the snapshot lives (None: in memory only).
    state_dir: Path | None = None
    snapshot_interval: float = 30.0
    #: PEM certificate chain and key (both or neither: TLS, else plaintext).
    tls_cert: bytes | None = None
    tls_key: bytes | None = None
    limits: Limits = field(default_factory=Limits)


class DiscoveryServer:
    """Start with :meth:`start`, stop with :meth:`stop` (which writes a last snapshot)."""

    def __init__(self, options: ServerOptions) -> None:
        self.options = options
        self.registry = Registry(options.limits)
        self.nonces = NonceCache()
        self.metrics = Metrics()
        self.service = DiscoveryService(self.registry, nonces=self.nonces, metrics=self.metrics)
        self.port = 0
        self.metrics_port = 0
        self._server: grpc.aio.Server | None = None
        self._metrics_server: asyncio.Server | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._saved_generation = -1

    @property
    def snapshot_path(self) -> Path | None:
        directory = self.options.state_dir
        return directory / snapshot.NAME if directory is not None else None

    def render_metrics(self) -> str:
        registry = self.registry
        return self.metrics.render(
            {
                "basalt_discovery_clusters": ("Clusters held.", len(registry.clusters)),
                "basalt_discovery_affiliates": ("Live affiliates.", registry.affiliate_count),
                "basalt_discovery_watches": ("Open watches.", registry.watch_count),
                "basalt_discovery_watches_dropped": (
                    "Watches dropped as too slow since the start.",
                    registry.dropped_watches,
                ),
                "basalt_discovery_replay_cache": ("Nonces held against replays.", len(self.nonces)),
                "basalt_discovery_bytes": ("Bytes of sealed records held.", registry.size),
            }
        )

    async def start(self) -> None:
        path = self.snapshot_path
        if path is not None:
            kept, expired = await asyncio.to_thread(
                snapshot.load, path, self.registry, self.nonces, time.time()
            )
            self._saved_generation = self.registry.generation
            if kept or expired:
                log.info("discovery: %d records from %s (%d had expired)", kept, path, expired)
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", MAX_REQUEST),
                ("grpc.max_concurrent_streams", 100_000),
                # Calls that arrived but that the event loop has not taken up yet: after a
                # restart every node's watch comes back at once, and gRPC's defaults
                # (1,000 soft, 3,000 hard) cancel the rest.
                ("grpc.server.max_pending_requests", 100_000),
                ("grpc.server.max_pending_requests_hard_limit", 100_000),
                ("grpc.keepalive_time_ms", 60_000),
                ("grpc.keepalive_timeout_ms", 20_000),
                ("grpc.so_reuseport", 0),
            ]
        )
        add_to_server(self.service, server)
        self.port = self._listen(server)
        await server.start()
        self._server = server
        if self.options.metrics:
            host, _, port = self.options.metrics.rpartition(":")
            try:
                self._metrics_server = await serve_metrics(
                    host.strip("[]") or "127.0.0.1", int(port), self.render_metrics
                )
            except (OSError, ValueError) as exc:
                await server.stop(None)
                raise ListenError(
                    f"cannot serve /metrics on {self.options.metrics}: {exc}",
                    hint="pick another with --metrics-listen HOST:PORT",
                ) from None
            self.metrics_port = self._metrics_server.sockets[0].getsockname()[1]
        self._tasks = [asyncio.create_task(self.service.sweep_loop(), name="discovery-expiry")]
        if path is not None:
            self._tasks.append(asyncio.create_task(self._snapshot_loop(), name="discovery-snap"))

    def _listen(self, server: grpc.aio.Server) -> int:
        options = self.options
        address = f"[{options.host}]" if ":" in options.host else options.host
        target = f"{address}:{options.port}"
        try:
            if options.tls_cert and options.tls_key:
                credentials = grpc.ssl_server_credentials([(options.tls_key, options.tls_cert)])
                port = server.add_secure_port(target, credentials)
            else:
                port = server.add_insecure_port(target)
        except RuntimeError:
            port = 0
        if not port:
            raise ListenError(
                f"cannot serve discovery on {options.host}:{options.port}: the port is in use "
                "or the address is not this host's",
                hint="pick another with --listen HOST:PORT (or --discovery-port in the fleet)",
            )
        return port

    async def _snapshot_loop(self) -> None:
        while True:
            await asyncio.sleep(self.options.snapshot_interval)
            try:
                await self.save()
            except (OSError, BasaltError) as exc:
                log.warning("discovery: cannot write the snapshot: %s", exc)

    async def save(self) -> bool:
        """Write the snapshot if anything changed since the last one; whether it wrote."""
        path = self.snapshot_path
        generation = self.registry.generation
        if path is None or generation == self._saved_generation:
            return False
        state = snapshot.capture(self.registry, self.nonces, time.time())
        data = await asyncio.to_thread(snapshot.encode, state)
        await asyncio.to_thread(snapshot.save, path, data)
        self._saved_generation = generation
        return True

    async def stop(self, grace: float | None = 2.0) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        if self._metrics_server is not None:
            self._metrics_server.close()
            self._metrics_server = None
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        try:
            await self.save()
        except (OSError, BasaltError) as exc:
            log.error("discovery: cannot write the last snapshot: %s", exc)
