"""Basalt's sequences, each readable on one screen. Tasks are ``async f(node, request)``."""

from __future__ import annotations

import asyncio
import logging
import shutil
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from basalt.machinery.api.machine_pb2 import WipeMode
from basalt.machinery.errors import BasaltError

from .sequencer import Sequence, sequence

if TYPE_CHECKING:
    from ..node import Node

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResetRequest:
    graceful: bool
    wipe: WipeMode.ValueType
    reboot: bool
    force: bool = False


# -- boot ---------------------------------------------------------------------------------------


async def prepare_platform(node: Node, request: Any) -> None:
    """Mounts and generated /etc files on metal (before anything writes below them)."""
    await asyncio.to_thread(node.platform.prepare)


async def prepare_paths(node: Node, request: Any) -> None:
    node.paths.create()


async def start_controllers(node: Node, request: Any) -> None:
    from ..controllers import start_engine

    start_engine(node)


async def load_config(node: Node, request: Any) -> None:
    """Load the committed config (after promoting a staged one); none -> maintenance."""
    if node.configs.promote_staged():
        node.events.publish("config", "staged config is now committed", actor="boot")
    text = node.configs.committed()
    if text is None:
        return
    try:
        node.use_config(node.load_text(text, "STATE/config.yaml"))
    except BasaltError as exc:
        # Never lose the stored config: keep the file, wait in maintenance for a new one.
        node.events.publish("config", f"stored config is unusable: {exc}", actor="boot")
        log.error("stored config is unusable, entering maintenance mode: %s", exc)


def no_config(node: Node, request: Any) -> bool:
    return node.config is None


async def maintenance(node: Node, request: Any) -> None:
    """Serve the maintenance API until a config is applied."""
    from ..api.server import ApiServer

    node.set_stage("maintenance")
    server = ApiServer(node, maintenance=True)
    await server.start()
    try:
        await node.config_arrived.wait()
    finally:
        await server.stop(grace=1.0)
    node.set_stage("booting")


def address_unknown(node: Node, request: Any) -> bool:
    return not node.platform.address_known


async def wait_for_address(node: Node, request: Any) -> None:
    """metal without --address: the node's address is the first one its network set up."""
    from ..controllers.network import wait_for_address as first_address

    node.address = node.platform.address = await first_address(node)
    node.events.publish("network", f"node address is {node.address}", actor="boot")


async def establish_identity(node: Node, request: Any) -> None:
    from ..certificates import establish

    await establish(node)


async def start_services(node: Node, request: Any) -> None:
    from ..system_services import register_system_services

    register_system_services(node)
    await node.supervisor.start_all()


async def mark_running(node: Node, request: Any) -> None:
    node.set_stage("running")


boot: Sequence[Node] = (
    sequence("boot")
    .then("platform", prepare_platform)
    .then("prepare", prepare_paths, start_controllers)
    .then("config", load_config)
    .then("maintenance", maintenance, when=no_config)
    .then("address", wait_for_address, when=address_unknown)
    .then("identity", establish_identity)
    .then("services", start_services)
    .then("running", mark_running)
)


# -- apply-config -------------------------------------------------------------------------------


async def apply_config(node: Node, request: Any) -> None:
    from ..apply import apply

    request.result = await apply(node, request.apply)


apply_config_sequence: Sequence[Node] = sequence("apply-config").then("apply", apply_config)


# -- reboot, shutdown, reset ---------------------------------------------------------------------


async def stop_services(node: Node, request: Any) -> None:
    await asyncio.sleep(0.2)  # let the RPC that asked for this answer first
    await node.supervisor.stop_all()


def _stage(stage: str) -> Any:
    async def set_stage(node: Node, request: Any) -> None:
        node.set_stage(stage)  # type: ignore[arg-type]

    set_stage.__name__ = f"stage_{stage}"
    return set_stage


async def finish_reboot(node: Node, request: Any) -> None:
    node.finish("reboot")


async def finish_shutdown(node: Node, request: Any) -> None:
    node.finish("shutdown")


async def wipe(node: Node, request: ResetRequest) -> None:
    wipe_state = request.wipe in (WipeMode.ALL, WipeMode.STATE)
    wipe_ephemeral = request.wipe in (WipeMode.ALL, WipeMode.EPHEMERAL)
    if wipe_state:
        node.configs.wipe()
        # Keys issued for this node (etcd, Kubernetes) go with its state.
        secrets = node.paths.root / "system" / "secrets"
        await asyncio.to_thread(shutil.rmtree, secrets, True)
    if wipe_ephemeral and node.paths.ephemeral.exists():
        await asyncio.to_thread(shutil.rmtree, node.paths.ephemeral, True)
    node.events.publish(
        "machine",
        "reset: wiped "
        + ", ".join(n for n, w in (("STATE", wipe_state), ("EPHEMERAL", wipe_ephemeral)) if w),
        actor="reset",
    )


async def finish_reset(node: Node, request: ResetRequest) -> None:
    node.finish("reboot" if request.reboot else "shutdown")


def graceful(node: Node, request: ResetRequest) -> bool:
    return request.graceful


async def leave_cluster(node: Node, request: ResetRequest) -> None:
    """A graceful reset leaves etcd first (quorum was checked when the reset was asked)."""
    node.events.publish("machine", "reset: leaving the cluster", actor="reset")
    if node.etcd is not None and node.etcd.running():
        try:
            await node.etcd.leave(force=True)
        except Exception as exc:  # the reset goes on: the quorum check passed when asked
            node.events.publish("machine", f"reset: leaving etcd failed: {exc}", actor="reset")
            log.warning("reset: leaving etcd failed: %s", exc)


reboot: Sequence[Node] = (
    sequence("reboot")
    .then("stage", _stage("rebooting"))
    .then("stop", stop_services)
    .then("reboot", finish_reboot)
)

shutdown: Sequence[Node] = (
    sequence("shutdown")
    .then("stage", _stage("shuttingDown"))
    .then("stop", stop_services)
    .then("shutdown", finish_shutdown)
)

reset: Sequence[Node] = (
    sequence("reset")
    .then("stage", _stage("resetting"))
    .then("leave", leave_cluster, when=graceful)
    .then("stop", stop_services)
    .then("wipe", wipe)
    .then("finish", finish_reset)
)
