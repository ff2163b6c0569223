"""Basalt's sequences, each readable on one screen. Tasks are ``async f(node, request)``."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from basalt.machinery.api.machine_pb2 import WipeMode
from basalt.machinery.errors import BasaltError
from basalt.machinery.resources.specs import Stage

from ..runtime.sequencer import Sequence, SequenceName, Task, sequence

if TYPE_CHECKING:
    from ..node import Node

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResetRequest:
    graceful: bool
    wipe: WipeMode.ValueType
    reboot: bool
    force: bool = False
    destroy_last_member: bool = False


# -- boot ---------------------------------------------------------------------------------------


async def prepare_platform(node: Node, request: Any) -> None:
    """Mounts and generated /etc files on metal (before anything writes below them)."""
    await asyncio.to_thread(node.platform.prepare)


async def prepare_paths(node: Node, request: Any) -> None:
    node.paths.create()


async def start_controllers(node: Node, request: Any) -> None:
    if node.platform.mode.manages_network and node.configs.committed() is None:
        node.api_first.clear()  # a maintenance API comes: the network waits for it to open
    node.wiring.start_controllers()


async def assess_slot(node: Node, request: Any) -> None:
    """Which A/B slot booted (BootStatus); a slot on trial starts its health gates now."""
    await node.upgrader.on_boot()


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
        return
    node.api_first.set()  # no maintenance API: the network goes first


async def link_fleet(node: Node, request: Any) -> None:
    """basalt.fleet= (or --fleet, or FleetConfig): enrol and link in the background, so a
    machine in maintenance mode is manageable from its fleet before it has any config."""
    from .. import fleet

    fleet.start(node)


def no_config(node: Node, request: Any) -> bool:
    return node.config is None


def upgrade_staged(node: Node, request: Any) -> bool:
    slots = node.upgrader.slots
    return node.config is not None and slots is not None and slots.staged() is not None


async def install_staged(node: Node, request: Any) -> None:
    """``upgrade --stage``: install the staged bundle before anything starts, then reboot."""
    if await node.upgrader.install_staged():
        node.finish("reboot")
        await asyncio.Future()  # the node restarts; nothing else of this boot runs


async def maintenance(node: Node, request: Any) -> None:
    """Serve the maintenance API until a config is applied."""
    node.set_stage("maintenance")
    from ..config_url import start_config_fetch

    server = node.wiring.maintenance_api()
    try:
        await server.start()
    finally:
        node.api_first.set()  # the network may import what it needs now
    fetch = start_config_fetch(node)  # basalt.config=URL on the kernel command line
    try:
        await node.config_arrived.wait()
    finally:
        if fetch is not None:
            fetch.cancel()
        await server.stop(grace=1.0)
    node.set_stage("booting")


def installs_to_disk(node: Node, request: Any) -> bool:
    return node.platform.mode.requires_install


async def install(node: Node, request: Any) -> None:
    """metal: reboot into the disk maintenance mode just installed; nothing when running
    installed; a warning when not booted from a Basalt disk (running from RAM)."""
    from ..install import boot_phase

    await boot_phase(node)


def address_unknown(node: Node, request: Any) -> bool:
    return not node.platform.address_known


async def wait_for_address(node: Node, request: Any) -> None:
    """metal without --address: the node's address is the first one its network set up."""
    from ..controllers.network import wait_for_address as first_address

    node.address = node.platform.address = await first_address(node)
    node.events.publish("network", f"node address is {node.address}", actor="boot")


def syncs_time(node: Node, request: Any) -> bool:
    from basalt.machinery.config import TimeSyncConfig

    config = node.config.first(TimeSyncConfig) if node.config else None
    return bool(node.platform.mode.manages_kernel and config and config.enabled and config.servers)


async def wait_for_time(node: Node, request: Any) -> None:
    """Certificates and etcd need a sane clock: wait for the first SNTP sync, at most
    TimeSyncConfig.bootTimeoutSeconds, then go on either way (and say so)."""
    from basalt.machinery.config import TimeSyncConfig

    from ..controllers.timesync import wait_for_sync

    config = node.config.first(TimeSyncConfig) if node.config else None
    timeout = float(config.boot_timeout_seconds if config else 0)
    if await wait_for_sync(node, timeout):
        return
    message = f"clock not in sync after {timeout:g} s; booting on (see 'basaltctl get time')"
    log.warning("%s", message)
    node.events.publish("time", message, actor="boot")


async def establish_identity(node: Node, request: Any) -> None:
    from ..certificates import establish

    await establish(node)


async def start_services(node: Node, request: Any) -> None:
    node.wiring.register_services()
    await node.supervisor.start_all()


async def mark_running(node: Node, request: Any) -> None:
    node.set_stage("running")


boot: Sequence[Node] = (
    sequence("boot")
    .then("platform", prepare_platform)
    .then("prepare", prepare_paths, start_controllers)
    .then("slot", assess_slot)
    .then("config", load_config)
    .then("fleet", link_fleet)
    .then("staged upgrade", install_staged, when=upgrade_staged)
    .then("maintenance", maintenance, when=no_config)
    .then("install", install, when=installs_to_disk)
    .then("address", wait_for_address, when=address_unknown)
    .then("time", wait_for_time, when=syncs_time)
    .then("identity", establish_identity)
    .then("services", start_services)
    .then("running", mark_running)
)


# -- apply-config -------------------------------------------------------------------------------


async def apply_config(node: Node, request: Any) -> None:
    from ..apply import apply

    request.result = await apply(node, request.apply)


apply_config_sequence: Sequence[Node] = sequence("apply-config").then("apply", apply_config)


# -- upgrade, rollback ---------------------------------------------------------------------------
# Each ends with the slot written (or the bundle staged); the RPC then starts ``reboot``.


async def verify_upload(node: Node, job: Any) -> None:
    """Verified as it arrived (``Upgrader.receive``): check that its key is still trusted."""
    verified = job.verified
    assert verified is not None, "the Upgrade RPC verifies the bundle while receiving it"
    node.upgrader.check_trust(verified, job.label)
    job.steps.append(
        f"verified bundle {verified.version} ({verified.architecture}), "
        f"signed by {verified.key.label}"
    )
    # Before the drain, for an install and a stage alike.
    note = await node.upgrader.check_version(verified, job.options.allow_downgrade)
    if note:
        job.steps.append(note)


async def check_quorum(node: Node, job: Any) -> None:
    note = await node.upgrader.check_quorum(job.options.force)
    if note:
        job.steps.append(note)


async def cordon_drain(node: Node, job: Any) -> None:
    """Cordon and drain when the kubelet runs (uncordoned once a good slot runs again)."""
    job.steps.extend(await node.upgrader.cordon_drain(job.options.no_drain))


def staging(node: Node, job: Any) -> bool:
    return bool(job.options.stage)


def installing(node: Node, job: Any) -> bool:
    return not job.options.stage


async def stage_bundle(node: Node, job: Any) -> None:
    try:
        await node.upgrader.stage(job.upload)
    except BaseException:
        await node.upgrader.give_back_cordon("staging the upgrade failed")
        raise
    job.message = f"staged {job.verified.version}: it is installed early in the next boot"
    job.steps.append(job.message)


async def install_image(node: Node, job: Any) -> None:
    previous = node.stage
    node.set_stage("upgrading")
    try:
        job.slot, job.message = await node.upgrader.install(job.verified)
    except BaseException:
        node.set_stage(previous)
        await node.upgrader.give_back_cordon("installing the upgrade failed")
        raise
    job.steps.append(job.message)


async def check_rollback(node: Node, job: Any) -> None:
    """Refused before the drain when there is no good slot to go back to."""
    await node.upgrader.check_rollback()


async def drain_for_rollback(node: Node, job: Any) -> None:
    """A rollback reboots the node like an upgrade: cordon and drain it first."""
    job.steps.extend(await node.upgrader.cordon_drain(job.no_drain, purpose="rollback"))


async def roll_back(node: Node, job: Any) -> None:
    try:
        job.message = await node.upgrader.rollback()
    except BaseException:
        await node.upgrader.give_back_cordon("the rollback failed")
        raise


upgrade: Sequence[Node] = (
    sequence("upgrade")
    .then("verify", verify_upload)
    .then("quorum", check_quorum)
    .then("drain", cordon_drain)
    .then("stage", stage_bundle, when=staging)
    .then("install", install_image, when=installing)
)

rollback: Sequence[Node] = (
    sequence("rollback")
    .then("check", check_rollback)
    .then("drain", drain_for_rollback)
    .then("rollback", roll_back)
)


# -- reboot, shutdown, reset ---------------------------------------------------------------------


async def stop_services(node: Node, request: Any) -> None:
    await asyncio.sleep(0.2)  # let the RPC that asked for this answer first
    await node.supervisor.stop_all()


def _stage(stage: Stage) -> Task[Node]:
    async def set_stage(node: Node, request: Any) -> None:
        node.set_stage(stage)

    set_stage.__name__ = f"stage_{stage}"
    return set_stage


@dataclass(frozen=True)
class RebootPlan:
    """The ``reboot`` sequence's request. ``kexec``: an upgrade or a rollback may skip the
    firmware (:meth:`~basalt.machined.upgrade.Upgrader.prepare_kexec`); any other reboot
    (asked for, a failed health gate) resets through the firmware."""

    kexec: bool = False


def kexec_asked(node: Node, request: Any) -> bool:
    return isinstance(request, RebootPlan) and request.kexec


async def load_kexec(node: Node, request: Any) -> None:
    """Last, with every service stopped: load the next kernel, count its try."""
    message = await asyncio.to_thread(node.upgrader.prepare_kexec)
    log.info("%s", message)
    node.events.publish("machine", message, actor="reboot")


async def finish_reboot(node: Node, request: Any) -> None:
    node.finish("reboot")


async def finish_shutdown(node: Node, request: Any) -> None:
    node.finish("shutdown")


async def wipe(node: Node, request: ResetRequest) -> None:
    import shutil  # a reset's: not the start-up's (it brings the compression modules)

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
            await node.etcd.leave(True, request.destroy_last_member)
        except Exception as exc:  # the reset goes on: the quorum check passed when asked
            node.events.publish("machine", f"reset: leaving etcd failed: {exc}", actor="reset")
            log.warning("reset: leaving etcd failed: %s", exc)


reboot: Sequence[Node] = (
    sequence("reboot")
    .then("stage", _stage("rebooting"))
    .then("stop", stop_services)
    .then("kexec", load_kexec, when=kexec_asked)
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

#: Every sequence, by the name it is started by (``node.sequencer.start("reboot")``).
SEQUENCES: dict[SequenceName, Sequence[Node]] = {
    "boot": boot,
    "apply-config": apply_config_sequence,
    "upgrade": upgrade,
    "rollback": rollback,
    "reboot": reboot,
    "shutdown": shutdown,
    "reset": reset,
}
