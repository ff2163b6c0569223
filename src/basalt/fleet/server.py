"""``basalt-fleet serve``: the REST API (uvicorn) and the link service (grpc.aio) in one
event loop, both with TLS from the fleet's CA."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import ssl
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from basalt.discovery.server import DiscoveryServer, ServerOptions
from basalt.factory.errors import ListenError
from basalt.factory.main import listen_socket
from basalt.machinery.api import fleet_pb2_grpc

from .core import Fleet

log = logging.getLogger("basalt.fleet")


async def start_link_server(fleet: Fleet) -> grpc.aio.Server:
    server = grpc.aio.server(
        options=[
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ("grpc.max_concurrent_streams", 100_000),
            # Two replicas on one host must not share a port silently.
            ("grpc.so_reuseport", 0),
        ]
    )
    fleet_pb2_grpc.add_FleetLinkServicer_to_server(fleet.links, server)
    assert fleet.server_cert.key is not None
    credentials = grpc.ssl_server_credentials(
        [(fleet.server_cert.key.encode(), (fleet.server_cert.crt + fleet.ca.crt).encode())],
        root_certificates=fleet.ca.crt.encode(),
        require_client_auth=True,
    )
    host = fleet.options.host
    address = f"[{host}]" if ":" in host else host
    try:
        port = server.add_secure_port(f"{address}:{fleet.options.effective_link_port}", credentials)
    except RuntimeError:
        port = 0
    if not port:
        raise ListenError(
            f"cannot serve machine links on {host}:{fleet.options.effective_link_port}: "
            "the port is in use or the address is not this host's",
            hint="pick another with --link-port",
        )
    await server.start()
    return server


async def start_discovery(fleet: Fleet) -> DiscoveryServer | None:
    """The discovery service on ``--discovery-port`` with the fleet's server certificate
    (nodes prove the cluster secret in each request; no client certificate), or None."""
    if not fleet.options.discovery_port:
        return None
    key = fleet.server_cert.key
    assert key is not None
    server = DiscoveryServer(
        ServerOptions(
            host=fleet.options.host,
            port=fleet.options.discovery_port,
            state_dir=fleet.options.data_dir / "discovery",
            tls_cert=(fleet.server_cert.crt + fleet.ca.crt).encode(),
            tls_key=key.encode(),
        )
    )
    await server.start()
    return server


async def _start_grpc(fleet: Fleet) -> tuple[grpc.aio.Server, DiscoveryServer | None]:
    link_server = await start_link_server(fleet)
    try:
        return link_server, await start_discovery(fleet)
    except BaseException:
        await link_server.stop(None)
        raise


async def _stop_grpc(
    link_server: grpc.aio.Server, discovery: DiscoveryServer | None, grace: float | None
) -> None:
    await link_server.stop(grace)
    if discovery is not None:
        await discovery.stop(grace)


def _quiet_server_class() -> type[Any]:
    import uvicorn

    class QuietServer(uvicorn.Server):
        """uvicorn's server without its signal handlers: ``serve`` owns SIGTERM/SIGINT
        (they stop the link service too)."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    return QuietServer


async def serve(fleet: Fleet, ready: asyncio.Event | None = None) -> None:
    import uvicorn

    from .rest import make_app

    _QuietServer = _quiet_server_class()

    app = make_app(fleet)
    rest_socket = listen_socket(
        fleet.options.host, fleet.options.port, what="the REST API", backlog=1024
    )
    try:
        link_server, discovery = await _start_grpc(fleet)
    except BaseException:
        rest_socket.close()
        raise
    await asyncio.to_thread(app.state.replicas.forget_others)
    flusher = asyncio.create_task(fleet.links.flush_loop(), name="last-seen")
    with tempfile.TemporaryDirectory(prefix="basalt-fleet-tls-") as tmp:
        certfile, keyfile, _ca = fleet.write_tls(Path(tmp))
        config = uvicorn.Config(
            app,
            host=fleet.options.host,
            port=fleet.options.port,
            ssl_certfile=certfile,
            ssl_keyfile=keyfile,
            ssl_version=ssl.PROTOCOL_TLS_SERVER,
            log_level="warning",
            access_log=False,
            lifespan="off",
        )
        server = _QuietServer(config)
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(signum, stop.set)
        web = asyncio.create_task(server.serve(sockets=[rest_socket]), name="rest")
        while not server.started and not web.done():
            await asyncio.sleep(0.05)
        # uvicorn has read the key: it need not lie on disk while the fleet runs.
        for leftover in Path(tmp).iterdir():
            leftover.unlink(missing_ok=True)
        if web.done():
            flusher.cancel()
            await _stop_grpc(link_server, discovery, None)
            with contextlib.suppress(BaseException):
                web.result()
            raise ListenError(
                f"cannot serve the REST API on {fleet.options.host}:{fleet.options.port} "
                "(see the error above: is the port in use?)",
                hint="pick another with --listen HOST:PORT",
            )
        log.info(
            "basalt-fleet %s: REST on https://%s:%d, machine links on port %d",
            fleet.replica,
            fleet.options.host,
            fleet.options.port,
            fleet.options.effective_link_port,
        )
        replicas = app.state.replicas
        await replicas.serve()
        background = [
            asyncio.create_task(replicas.presence(), name="presence"),
            asyncio.create_task(replicas.elect(), name="election"),
        ]
        if ready is not None:
            ready.set()
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait({web, stopper}, return_when=asyncio.FIRST_COMPLETED)
        server.should_exit = True
        for task in (flusher, *background):
            task.cancel()
        await app.state.rollouts.stop()
        await app.state.reconciler.stop()
        await replicas.close()
        fleet.links.close_all()
        await _stop_grpc(link_server, discovery, 2)
        with contextlib.suppress(Exception):
            await web
        with contextlib.suppress(Exception):
            await asyncio.to_thread(fleet.links.flush_seen)
        fleet.close()
