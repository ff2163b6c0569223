"""Upgrades and rollbacks of a node's A/B slots, in container mode and on metal.

An upgrade is boring on purpose, and refuses before it changes anything::

    receive the bundle into EPHEMERAL (bounded) -> verify it (signature by a trusted key,
    architecture, every payload file, the payload this platform needs) -> on control
    planes, the etcd quorum pre-check -> cordon/drain through the Kubernetes API when
    the kubelet runs (:mod:`.kubernetes`), or say why not -> write the inactive slot and
    record Install -> reboot into it, on trial -> once a slot is good again (gates passed,
    or a fallback), uncordon what the upgrade cordoned

On the first boot of a slot on trial, the health gates (:mod:`.gates`) decide: passed
marks it good; failed or timed out reboots, and once its tries run out the launcher
boots the previous slot. The decisions are :mod:`.boot.assessment`'s; this module is the
I/O around them: the slot storage, events, the ``BootStatus`` resource. Container mode
keeps slots in ``<node-dir>/slots`` (:mod:`.boot.slots`) and its launcher plays the
firmware; a metal node booted from a Basalt disk keeps them in its ``BASALT-A``/``-B``
partitions, the ESP's systemd-boot entries and META (:mod:`.boot.metal_slots`), and
systemd-boot is the firmware.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING

from basalt.machinery.boot import (
    Action,
    BootState,
    Event,
    GatesPassed,
    Install,
    Outcome,
    Rollback,
    Slot,
    SlotHealth,
    SlotName,
    apply,
    boot_status,
)
from basalt.machinery.boot.slots import SlotDirectories
from basalt.machinery.errors import BasaltError, ErrorKind
from basalt.machinery.resources import BootStatusSpec

from .boot.metal_slots import MetalSlots

if TYPE_CHECKING:
    from basalt.machinery.images import VerificationKey, VerifiedBundle

    from .chunk_pipe import ChunkPipe
    from .kubernetes.cordon import NodeCordon
    from .node import Node

log = logging.getLogger(__name__)

#: Bundles larger than this are refused while they are being received.
MAX_BUNDLE_BYTES = 2 << 30
#: Where uploads land (EPHEMERAL: node-owned storage, so the verified file cannot change).
UPLOAD_DIR = "upgrade"
#: What the launcher tells machined (see basalt.provision.launcher).
BOOTED_SLOT_ENV = "BASALT_BOOTED_SLOT"
NO_KUBERNETES = "Kubernetes not running on this node; skipping cordon/drain"


class UpgradeRefusedError(BasaltError):
    """The node cannot upgrade or roll back now; the message says why, nothing changed."""


class DowngradeRefusedError(UpgradeRefusedError):
    """The bundle is older than the running version, and no admin asked for a downgrade."""


class BundleUploadError(BasaltError):
    """The upload itself is unusable (no options first, empty, or too large)."""

    kind = ErrorKind.INVALID_ARGUMENT


@dataclass(frozen=True)
class UpgradeOptions:
    stage: bool = False
    force: bool = False
    no_drain: bool = False
    #: kexec into the new slot when able; False: reboot through the firmware.
    kexec: bool = False
    #: Install a bundle older than the running version (refused otherwise).
    allow_downgrade: bool = False


@dataclass
class UpgradeJob:
    """One upgrade request as it goes through the ``upgrade`` sequence."""

    options: UpgradeOptions
    upload: Path
    #: What verification errors call the bundle: where it came from.
    label: str = "uploaded bundle"
    steps: list[str] = field(default_factory=list)
    verified: VerifiedBundle | None = None
    slot: SlotName | None = None
    message: str = ""


class Upgrader:
    """The node's slots, its boot state, the upgrade steps and the boot assessment."""

    def __init__(self, node: Node) -> None:
        self.node = node
        # Metal finds its slots once the platform is prepared (/proc, /sys): in on_boot.
        self.slots: SlotDirectories | MetalSlots | None = (
            SlotDirectories.of_node(node.paths.root) if node.platform.mode.in_container else None
        )
        self.lock = asyncio.Lock()
        self.assessment: asyncio.Task[None] | None = None
        self._cordon: NodeCordon | None = None

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
        if not isinstance(self.slots, MetalSlots):
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
            self.slots = await asyncio.to_thread(_slot_storage, self.node)
            if isinstance(self.slots, MetalSlots):
                await asyncio.to_thread(_mount_efivarfs)
                await self.repair_esp(thorough=False)  # an install checks every chain
        if self.slots is None:
            return
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
            self._uncordon(f"the node runs {running.label} again")
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

        from .gates import run_gates

        try:
            result: Event = await run_gates(self.node, self.node.tuning.boot_assessment_timeout)
        except Exception as exc:  # a slot whose gates crash is not good: it counts as a try
            log.exception("health gates crashed")
            result = GatesFailed(f"the health gates crashed: {type(exc).__name__}: {exc}")
        await self.record(result)

    async def record(self, event: Event) -> None:
        """Apply a gate result to the stored state; reboot when the model says so."""
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
            self._uncordon(f"{outcome.state.slot(outcome.state.booted).label} passed its gates")

    def _reboot(self) -> None:
        from .runtime import SequenceConflictError

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
    ) -> tuple[Path, VerifiedBundle]:
        """Stream an upload (or a download) into a temp file in EPHEMERAL, verifying it on
        the way in: a thread checks and hashes what arrived while the next chunks come
        (:func:`~basalt.machinery.images.verify_tar_stream`). Refused as soon as a check
        fails or the bundle passes ``limit``; the temp file is removed then. The bundle is
        checked against the trusted keys of the config at its start; the ``upgrade``
        sequence checks again that the key is still trusted (:meth:`check_trust`)."""
        from basalt.machinery.images import required_payload, verify_tar_stream

        from .chunk_pipe import ChunkPipe

        self.require_slots()
        directory = self.node.paths.ephemeral / UPLOAD_DIR
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        keys = self.trusted_keys()
        platform = self.node.platform
        required = required_payload(platform.mode.value)
        fd, name = tempfile.mkstemp(prefix="bundle-", suffix=".tar", dir=directory)
        path = Path(name)
        pipe = ChunkPipe()
        timing = _ReceiveTiming()

        def verify(out: IO[bytes]) -> VerifiedBundle:
            begun = time.thread_time()  # a pool thread: its clock counts its earlier work
            try:
                return verify_tar_stream(
                    pipe, out, path, keys, platform.arch, required=required, label=label
                )
            finally:
                timing.verifier_cpu = time.thread_time() - begun
                pipe.stop()

        try:
            with os.fdopen(fd, "wb") as out:
                verifying = asyncio.ensure_future(asyncio.to_thread(verify, out))
                try:
                    timing.size = await _send(chunks, pipe, limit, timing)
                except BaseException as exc:
                    await pipe.abort(str(exc) or type(exc).__name__)
                    with contextlib.suppress(BaseException):
                        await verifying
                    raise
                verified = await verifying
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        log.info("received %s: %s", label, timing.done())
        return path, verified

    async def verify(self, path: Path, label: str = "uploaded bundle") -> VerifiedBundle:
        """verify_bundle against the config's trusted keys and this node's architecture."""
        from basalt.machinery.images import required_payload, verify_bundle

        platform = self.node.platform
        return await asyncio.to_thread(
            verify_bundle,
            path,
            self.trusted_keys(),
            platform.arch,
            required=required_payload(platform.mode.value),
            label=label,
        )

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

        from .etcd.manager import QuorumError, manager_of
        from .etcd.quorum import check_reboot

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

    def check_drain(self, no_drain: bool) -> str | None:
        """Why there is nothing to cordon/drain (no kubelet, ``--no-drain``); None when the
        kubelet runs and the node must be drained."""
        try:
            kubelet = self.node.supervisor.status("kubelet")
        except BasaltError:
            return NO_KUBERNETES
        if str(kubelet.state) in ("skipped", "waiting", "finished", "failed"):
            return NO_KUBERNETES
        if no_drain:
            return "cordon/drain skipped (--no-drain)"
        return None

    async def cordon_drain(self, no_drain: bool, purpose: str = "upgrade") -> list[str]:
        """Cordon and drain through the Kubernetes API when the kubelet runs; the steps.
        DrainError (FailedPrecondition) when it cannot: the node is left as it was."""
        skipped = self.check_drain(no_drain)
        if skipped is not None:
            return [skipped]
        return await self.cordon.drain_for_upgrade(purpose)

    async def give_back_cordon(self, why: str) -> None:
        """A step after the drain failed: uncordon now (or retry in the background)."""
        from .kubernetes.intent import read_intent

        if read_intent(self.node.paths.state) is not None:
            note = await self.cordon.give_back(why)
            log.info("%s", note)

    @property
    def cordon(self) -> NodeCordon:
        """The upgrade's cordon of this node (:mod:`.kubernetes.cordon`), made on first use."""
        if self._cordon is None:
            from .kubernetes.cordon import NodeCordon

            self._cordon = NodeCordon(self.node)
        return self._cordon

    def _uncordon(self, why: str) -> None:
        """The node runs a good slot: uncordon it if an upgrade cordoned it (in the
        background, once the node is running; failures are events)."""
        from .kubernetes.intent import read_intent

        if read_intent(self.node.paths.state) is not None:
            self.cordon.resume(why)

    async def install(self, verified: VerifiedBundle) -> tuple[SlotName, str]:
        """Write the inactive slot and record the install; refused before anything changes."""
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
        from .sys.kexec import KexecError

        slots = self.slots
        if not isinstance(slots, MetalSlots):
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


@dataclass
class _ReceiveTiming:
    """Where the time of one receive went, for the log line that ends it."""

    started: float = field(default_factory=time.monotonic)
    cpu_started: float = field(default_factory=time.process_time)
    first: float | None = None
    last: float | None = None
    size: int = 0
    verifier_cpu: float = 0.0

    def done(self) -> str:
        now = time.monotonic()
        first = self.first if self.first is not None else now
        last = self.last if self.last is not None else now
        streaming = last - first
        rate = self.size / streaming / 1e6 if streaming > 0 else 0.0
        cpu = time.process_time() - self.cpu_started
        return (
            f"{self.size / 1e6:.1f} MB in {streaming:.1f} s ({rate:.1f} MB/s) after "
            f"{first - self.started:.1f} s waiting for the first bytes; verified and "
            f"flushed {now - last:.1f} s after the last; CPU {cpu:.1f} s (verifying thread "
            f"{self.verifier_cpu:.1f} s)"
        )


async def _send(
    chunks: AsyncIterator[bytes], pipe: ChunkPipe, limit: int, timing: _ReceiveTiming
) -> int:
    """Hand the chunks to the verifying thread until the end, or until it stops (it
    failed: its own error says why); the bytes handed. BundleUploadError when there is
    nothing, or too much."""
    total = 0
    async for chunk in chunks:
        if timing.first is None:
            timing.first = time.monotonic()
        total += len(chunk)
        if total > limit:
            raise BundleUploadError(
                f"the bundle is larger than {limit} bytes; refused while uploading",
                hint="container bundles hold the Basalt source tree: a few MiB",
            )
        if not await pipe.put(chunk):
            return total
    timing.last = time.monotonic()
    if total == 0:
        raise BundleUploadError("no bundle data was sent", hint="give --image BUNDLE.tar")
    await pipe.close()
    return total


def _slot_storage(node: Node) -> SlotDirectories | MetalSlots | None:
    """Slot directories in container mode; on metal, the disk's slots when machined is
    PID 1 booted from an installed Basalt disk; else None (upgrades are refused)."""
    from .platform.metal import MetalPlatform

    platform = node.platform
    if platform.mode.in_container:
        return SlotDirectories.of_node(node.paths.root)
    if not isinstance(platform, MetalPlatform) or not platform.init:
        return None
    if platform.system_root != Path("/"):
        return None
    from .boot.metal_slots import of_machine

    return of_machine(platform.system_root, node.paths.ephemeral)


def _mount_efivarfs() -> None:
    from .sys.efivars import mount_efivarfs
    from .sys.mount import MountError

    try:
        mount_efivarfs()
    except MountError as exc:
        log.warning("efivarfs not mounted (%s): LoaderBootCountPath cannot be read", exc)
