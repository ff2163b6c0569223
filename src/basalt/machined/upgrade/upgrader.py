"""The upgrader: a node's A/B slots and boot state, the boot assessment, and the steps
of upgrades and rollbacks that the sequences call (each refuses before it changes
anything). Receiving bundles (:mod:`.receive`), draining (:mod:`.drain`) and finding
the slot storage (:mod:`.slots`) are their own modules.

The boot-state model (:mod:`basalt.machinery.boot`) and the metal slots are imported
where they are used: a first boot from memory has no slots, and opens its maintenance
API without them."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, TypeGuard

from basalt.machinery.errors import BasaltError
from basalt.machinery.resources import BootStatusSpec

from .drain import UpgradeDrain
from .jobs import (
    BOOTED_SLOT_ENV,
    MAX_BUNDLE_BYTES,
    UPLOAD_DIR,
    DowngradeRefusedError,
    UpgradeRefusedError,
)
from .receive import receive_bundle, verify_file
from .slots import mount_efivarfs, slot_storage

if TYPE_CHECKING:
    from basalt.machinery.boot import BootState, Event, Outcome, SlotName
    from basalt.machinery.boot.slots import SlotDirectories
    from basalt.machinery.images import VerificationKey, VerifiedBundle

    from ..boot.metal_slots import MetalSlots
    from ..node import Node

log = logging.getLogger(__name__)


class Upgrader:
    """The node's slots, its boot state, the upgrade steps and the boot assessment."""

    def __init__(self, node: Node) -> None:
        self.node = node
        # Metal finds its slots once the platform is prepared (/proc, /sys): in on_boot.
        self.slots: SlotDirectories | MetalSlots | None = None
        if node.platform.mode.in_container:
            from basalt.machinery.boot.slots import SlotDirectories

            self.slots = SlotDirectories.of_node(node.paths.root)
        self.lock = asyncio.Lock()
        self.assessment: asyncio.Task[None] | None = None
        self.drain = UpgradeDrain(node)

    # -- the boot state ------------------------------------------------------------------
    def require_slots(self) -> SlotDirectories | MetalSlots:
        if self.slots is None:
            raise UpgradeRefusedError(
                "this node has no A/B slots: it did not boot from an installed Basalt disk "
                "(no basalt.slot= on the kernel command line, or no EFI/META partitions)",
                hint="boot it from Basalt's disk image and install (apply-config with "
                "install.disk), then upgrade",
            )
        return self.slots

    async def load_state(self) -> BootState:
        slots = self.require_slots()
        try:
            state = await asyncio.to_thread(slots.load)
        except BasaltError as exc:
            raise UpgradeRefusedError(str(exc), hint=exc.hint) from None
        if state is None or state.booted is None:
            raise UpgradeRefusedError(
                f"no boot state in {slots.where}: this node was not started by the "
                "slot-aware launcher or booted from a Basalt disk",
                hint="start nodes with basaltctl cluster create, or install to disk",
            )
        return state

    async def _save(self, state: BootState) -> None:
        await asyncio.to_thread(self.require_slots().save, state)
        self.publish_status(state)

    def publish_status(self, state: BootState) -> None:
        from basalt.machinery.boot import boot_status

        status = boot_status(state)
        if status is None or state.booted is None:
            return
        self.node.store.put(
            "BootStatuses",
            "boot",
            BootStatusSpec(
                slot=status.current,
                version=status.current_version,
                on_trial=status.on_trial,
                tries_left=state.slot(state.booted).tries_left,
                previous_slot=status.previous or "",
                previous_version=status.previous_version or "",
                fell_back_from=status.fell_back_from or "",
                reason=status.reason or "",
                summary=status.summary(),
            ),
            owner="boot",
        )

    def _event(self, message: str, **fields: str) -> None:
        self.node.events.publish("boot", message, actor="boot", **fields)
        log.info("%s", message)

    async def repair_esp(self, thorough: bool = True) -> None:
        """Metal: repair what a power cut left on the ESP (MetalSlots.repair); each repair,
        and each problem left alone, is an event naming the file."""
        if not _metal(self.slots):
            return
        try:
            done = await asyncio.to_thread(self.slots.repair, thorough)
        except (BasaltError, OSError) as exc:
            self._event(f"ESP check failed (it runs again at the next boot): {exc}")
            return
        for removal in done.removals:  # esp_check logged each one
            self.node.events.publish(
                "boot", f"ESP repaired: {removal.message()}", actor="boot", path=removal.path
            )
        for problem in done.left:
            self.node.events.publish("boot", f"ESP check: {problem}", actor="boot")

    # -- at boot -------------------------------------------------------------------------
    async def on_boot(self) -> None:
        """Repair the ESP after a power cut (metal); publish which slot booted (and any
        fallback); start the gates on a slot on trial."""
        if self.slots is None and not self.node.platform.mode.in_container:
            self.slots = await asyncio.to_thread(slot_storage, self.node)
            if _metal(self.slots):
                await asyncio.to_thread(mount_efivarfs)
                await self.repair_esp(thorough=False)  # an install checks every chain
        if self.slots is None:
            return
        import shutil  # with slots only (it brings the compression modules)

        from basalt.machinery.boot import SlotHealth, boot_status
        from basalt.machinery.boot.slots import SlotDirectories

        await asyncio.to_thread(
            shutil.rmtree, self.node.paths.ephemeral / UPLOAD_DIR, True
        )  # uploads a crash left behind
        try:
            state = await asyncio.to_thread(self.slots.load)
        except BasaltError as exc:
            self._event(f"boot state unusable: {exc}")
            return
        if state is None or state.booted is None:
            return
        told = os.environ.get(BOOTED_SLOT_ENV) if isinstance(self.slots, SlotDirectories) else None
        if told and told != state.booted.value:
            self._event(f"launcher said slot {told}, boot state says slot {state.booted}")
        self.publish_status(state)
        running = state.slot(state.booted)
        status = boot_status(state)
        assert status is not None
        if running.health is SlotHealth.GOOD:
            self._event(f"booted {running.label}", slot=running.name.value)
            self.drain.uncordon(f"the node runs {running.label} again")
        else:
            total = (running.tries_left or 0) + running.tries_done
            self._event(
                f"booted {running.label} on trial (try {running.tries_done} of {total}): "
                "marked good once its health gates pass",
                slot=running.name.value,
            )
            self.assessment = self.node.background(self._assess(), name="boot-assessment")
        if status.fell_back_from:
            self._event(
                f"fell back from slot {status.fell_back_from} ({status.previous_version}) "
                f"because {status.reason}",
                slot=running.name.value,
                fellBackFrom=status.fell_back_from,
            )

    async def _assess(self) -> None:
        from basalt.machinery.boot import GatesFailed

        from ..gates import run_gates

        try:
            result: Event = await run_gates(self.node, self.node.tuning.boot_assessment_timeout)
        except Exception as exc:  # a slot whose gates crash is not good: it counts as a try
            log.exception("health gates crashed")
            result = GatesFailed(f"the health gates crashed: {type(exc).__name__}: {exc}")
        await self.record(result)

    async def record(self, event: Event) -> None:
        """Apply a gate result to the stored state; reboot when the model says so."""
        from basalt.machinery.boot import Action, GatesPassed, apply

        async with self.lock:
            state = await self.load_state()
            outcome = apply(state, event)
            if outcome.refused:
                self._event(f"boot assessment: {outcome.message}")
                return
            await self._save(outcome.state)
        self._event(outcome.message)
        if outcome.action is Action.REBOOT:
            self._reboot()
        elif isinstance(event, GatesPassed) and outcome.state.booted is not None:
            self.drain.uncordon(
                f"{outcome.state.slot(outcome.state.booted).label} passed its gates"
            )

    def _reboot(self) -> None:
        from ..runtime import SequenceConflictError

        try:
            self.node.sequencer.start("reboot")
        except SequenceConflictError:
            self.node.finish("reboot")

    def _stop_assessment(self) -> None:
        if self.assessment is not None and not self.assessment.done():
            self.assessment.cancel()

    # -- upgrade steps (the ``upgrade`` sequence calls these) --------------------------------
    async def receive(
        self,
        chunks: AsyncIterator[bytes],
        label: str = "uploaded bundle",
        limit: int = MAX_BUNDLE_BYTES,
        *,
        delta_index: str = "",
    ) -> tuple[Path, VerifiedBundle]:
        """Receive and verify a bundle (:func:`.receive.receive_bundle`) against the keys
        the config trusts as it starts; the ``upgrade`` sequence checks again that its key
        is still trusted (:meth:`check_trust`). With ``delta_index`` (the sha256 of the
        running slot's chunk index it was made against) the upload is a delta stream."""
        slots = self.require_slots()
        holding = None
        if delta_index:
            if not _metal(slots):
                raise UpgradeRefusedError(
                    "this node keeps no chunk index of its slots: a delta upload cannot be "
                    "assembled here",
                    hint="upload the bundle whole (basaltctl upgrade --full-upload)",
                )
            holding = functools.partial(slots.holding, delta_index)
        keys = self.trusted_keys()
        return await receive_bundle(self.node, chunks, keys, label, limit, holding)

    async def running_index(self) -> bytes | None:
        """The running slot's chunk index (what a delta upload may leave out), or None."""
        slots = self.require_slots()
        return await asyncio.to_thread(slots.running_index) if _metal(slots) else None

    async def verify(self, path: Path, label: str = "uploaded bundle") -> VerifiedBundle:
        """A bundle file on the node, verified against the config's trusted keys."""
        return await verify_file(self.node, path, self.trusted_keys(), label)

    def check_trust(self, verified: VerifiedBundle, label: str) -> None:
        """The key that signed ``verified`` is still trusted by the config (an apply-config
        may have changed the keys while the bundle was arriving)."""
        from basalt.machinery.images import UnknownSigningKeyError

        keys = sorted(key.key_id for key in self.trusted_keys())
        if verified.key.key_id not in keys:
            raise UnknownSigningKeyError(label, verified.key.key_id, keys)

    async def check_version(self, verified: VerifiedBundle, allow_downgrade: bool) -> str | None:
        """DowngradeRefusedError when ``verified`` is older than the running version and
        the admin did not ask for it; the step to report when they did."""
        from basalt.machinery.images.versions import is_downgrade

        state = await self.load_state()
        assert state.booted is not None  # load_state refuses a state that never booted
        running = state.slot(state.booted).version
        if running is None or not is_downgrade(running, verified.version):
            return None
        if not allow_downgrade:
            raise DowngradeRefusedError(
                f"bundle {verified.version} is older than the running version {running}: "
                "downgrade refused, nothing changed",
                hint=f"to go back to {verified.version} on purpose, upgrade again with "
                "--allow-downgrade (UpgradeOptions.allow_downgrade)",
            )
        return f"downgrading from {running} to {verified.version} (allowed by --allow-downgrade)"

    def trusted_keys(self) -> list[VerificationKey]:
        """The bundle signing keys the running config trusts (none without a config)."""
        from basalt.machinery.images import trusted_keys_from_config

        config = self.node.config
        return trusted_keys_from_config(config) if config is not None else []

    async def check_quorum(self, force: bool) -> str | None:
        """Control planes: refuse (QuorumError) when going down would put etcd at risk."""
        import grpc.aio

        from ..etcd.manager import QuorumError, manager_of
        from ..etcd.quorum import check_reboot

        manager = manager_of(self.node)
        if manager is None or not self.node.is_controlplane:
            return None
        if force:
            return "etcd quorum pre-check skipped (--force)"
        try:
            return await check_reboot(manager)
        except grpc.aio.AioRpcError as exc:
            raise QuorumError(
                f"cannot check etcd quorum: the local etcd answered {exc.code().name}: "
                f"{exc.details()}",
                hint="check 'basaltctl etcd status', or pass --force",
            ) from None

    async def cordon_drain(self, no_drain: bool, purpose: str = "upgrade") -> list[str]:
        """Cordon and drain when the kubelet runs (:mod:`.drain`); the steps."""
        return await self.drain.cordon_drain(no_drain, purpose)

    def check_drain(self, no_drain: bool) -> str | None:
        return self.drain.check_drain(no_drain)

    async def give_back_cordon(self, why: str) -> None:
        await self.drain.give_back_cordon(why)

    async def install(self, verified: VerifiedBundle) -> tuple[SlotName, str]:
        """Write the inactive slot and record the install; refused before anything changes."""
        from basalt.machinery.boot import Install, Slot, apply

        async with self.lock:
            slots = self.require_slots()
            await self.repair_esp()  # a cut since boot may have left a second entry name
            state = await self.load_state()
            outcome = apply(state, Install(verified.version))
            if outcome.refused or outcome.slot is None:
                raise UpgradeRefusedError(outcome.message, hint="see basaltctl get bootstatus")
            target = outcome.slot
            # Like removing a boot entry first on metal: a half-written slot never boots.
            if state.slot(target).version is not None:
                await asyncio.to_thread(slots.save, state.with_slot(Slot(target)))
            await asyncio.to_thread(slots.write, target, verified)
            self._stop_assessment()
            await self._save(outcome.state)
        self._event(outcome.message, slot=target.value, version=verified.version)
        return target, outcome.message

    async def stage(self, upload: Path) -> None:
        await asyncio.to_thread(self.require_slots().stage, upload)

    async def install_staged(self) -> bool:
        """Boot: install a bundle staged by ``upgrade --stage``; True when the node must reboot."""
        slots = self.slots
        path = slots.staged() if slots is not None else None
        if slots is None or path is None:
            return False
        try:
            verified = await self.verify(path, label="staged bundle")
            _, message = await self.install(verified)
        except BasaltError as exc:
            self._event(f"staged upgrade refused: {exc}")
            return False
        finally:
            await asyncio.to_thread(slots.clear_staged)
        self._event(f"staged upgrade: {message}; rebooting into it")
        return True

    async def check_rollback(self) -> None:
        """UpgradeRefusedError when a rollback would be refused (before draining for it)."""
        async with self.lock:
            await self._rollback_outcome()

    async def _rollback_outcome(self) -> Outcome:
        from basalt.machinery.boot import Rollback, apply

        slots = self.require_slots()
        state = await self.load_state()
        outcome = apply(state, Rollback())
        if outcome.refused or outcome.slot is None:
            raise UpgradeRefusedError(outcome.message, hint="see basaltctl get bootstatus")
        other = state.slot(outcome.slot)
        missing = await asyncio.to_thread(slots.missing, other)
        if missing is not None:
            raise UpgradeRefusedError(f"rollback refused: {other.label}: {missing}")
        return outcome

    async def rollback(self) -> str:
        """Boot the other slot next, if it holds a good image; refused with the reason."""
        async with self.lock:
            outcome = await self._rollback_outcome()
            assert outcome.slot is not None
            self._stop_assessment()
            await self._save(outcome.state)
        self._event(outcome.message, slot=outcome.slot.value)
        return outcome.message

    def prepare_kexec(self) -> str:
        """Make the coming reboot a kexec into what the firmware would boot next (metal,
        as PID 1); what the reboot does, in words for its event. When kexec cannot be
        prepared, nothing changed and the reboot goes through the firmware, which boots
        (and counts) the same entry."""
        from ..sys.kexec import KexecError

        slots = self.slots
        if not _metal(slots):
            return "rebooting: the launcher starts the slot the boot state chooses"
        if os.getpid() != 1:
            return "rebooting through the firmware: only PID 1 can kexec"
        try:
            entry = slots.prepare_kexec()
        except (KexecError, BasaltError, OSError) as exc:
            log.warning("kexec not prepared: %s", exc)
            return f"rebooting through the firmware: kexec not prepared: {exc}"
        except Exception as exc:  # a bug here must not keep the node from rebooting
            log.exception("kexec not prepared")
            return f"rebooting through the firmware: kexec not prepared: {exc!r}"
        return f"rebooting by kexec into {entry}"


def _metal(slots: object) -> TypeGuard[MetalSlots]:
    """Whether ``slots`` are a metal disk's (imports the metal slots only when there are
    slots to look at)."""
    if slots is None:
        return False
    from ..boot.metal_slots import MetalSlots

    return isinstance(slots, MetalSlots)
