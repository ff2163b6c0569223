"""The node updater: follow a release channel (``UpdateConfig``) and, in ``auto`` mode,
upgrade through the existing A/B path inside maintenance windows, holding a reboot slot.

One loop per config, every ``interval`` plus up to 10% jitter::

    refresh the channel (python-tuf, from the pinned root) -> next hop (graph: newest
    usable release, through its ``via`` releases; yanked and refused ones skipped)
    -> notify: report -> auto, inside a window: download (TUF checks length and hashes)
    -> verify the bundle signature (the node's trusted keys) -> take a reboot slot
    (FleetLock) -> remember the attempt -> the ``upgrade`` sequence -> reboot

After the reboot the attempt is settled once the boot assessment is over: the new
version passed its gates (give the slot back: only now, not at start-up), or the node
fell back (the release goes to ``refused`` and is never taken again here; the slot is
given back too). The attempt, the held slot and the refused releases live in STATE, so
they survive the reboots in between. Status: the ``UpdateStatuses`` resource.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from basalt.machinery.errors import BasaltError
from basalt.machinery.fileio import write_atomic
from basalt.machinery.resources import UpdateStatusSpec

from .runtime import Controller, ResourceStore

if TYPE_CHECKING:
    from basalt.machinery.config import UpdateConfig
    from basalt.machinery.releases.repository import Release

    from .node import Node

log = logging.getLogger(__name__)

#: How soon to ask again when the reboot coordinator said "not now".
SLOT_RETRY = 10.0
#: How long to wait for a slot on trial to finish its assessment before looking again.
TRIAL_POLL = 1.0


def _iso(when: dt.datetime | None) -> str:
    return when.astimezone(dt.UTC).isoformat(timespec="seconds") if when else ""


@dataclass
class UpdateState:
    """What the updater keeps in STATE across reboots."""

    attempt: str = ""  # the version being upgraded to
    attempt_from: str = ""
    slot_held: str = ""  # the coordinator URL a slot is held at
    refused: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, path: Path) -> UpdateState:
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            return cls()
        except (OSError, ValueError) as exc:
            log.warning("updater state %s unreadable, starting afresh: %s", path, exc)
            return cls()
        return cls(
            attempt=str(raw.get("attempt", "")),
            attempt_from=str(raw.get("attemptFrom", "")),
            slot_held=str(raw.get("slotHeld", "")),
            refused=[str(v) for v in raw.get("refused", [])],
        )

    def save(self, path: Path) -> None:
        data = {
            "attempt": self.attempt,
            "attemptFrom": self.attempt_from,
            "slotHeld": self.slot_held,
            "refused": self.refused,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(data, indent=1).encode(), mode=0o600)


class NodeUpdater:
    """The loop of one UpdateConfig; a new config makes a new one."""

    def __init__(
        self,
        node: Node,
        config: UpdateConfig,
        *,
        now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        self.node = node
        self.config = config
        self.now = now
        self.directory = node.paths.state / "update"
        self.state_path = self.directory / "state.json"
        self.state = UpdateState.load(self.state_path)
        self.status: dict[str, Any] = {
            "mode": config.mode,
            "channel": f"{config.channel} (pinned {config.version})"
            if config.version
            else config.channel,
            "state": "checking",
        }
        self.wake = asyncio.Event()
        self.lock = asyncio.Lock()
        self._announced = ""

    # -- status --------------------------------------------------------------------------
    def publish(self, **changes: Any) -> None:
        self.status.update(changes)
        coordinator = self.config.reboot_coordinator
        held = self.state.slot_held
        spec = UpdateStatusSpec(
            **self.status,
            current=self.node.version,
            refused=list(self.state.refused),
            slot_held=f"{coordinator.group} at {held}" if held and coordinator else "",
        )
        self.node.store.put("UpdateStatuses", "node", spec, owner="updater")

    def event(self, message: str, **fields: str) -> None:
        self.node.events.publish("update", message, actor="updater", **fields)
        log.info("%s", message)

    def _save(self) -> None:
        self.state.save(self.state_path)

    # -- the coordinator -----------------------------------------------------------------
    def _coordinator(self) -> Any:
        from basalt.machinery.releases.fleetlock import Coordinator

        settings = self.config.reboot_coordinator
        if settings is None:
            return None
        return Coordinator(settings.url, settings.group, settings.token, settings.ca)

    async def _give_back(self) -> None:
        coordinator = self._coordinator()
        if not self.state.slot_held:
            return
        if coordinator is not None:
            await asyncio.to_thread(coordinator.give_back, self.node.platform.machine_uuid())
            self.event(f"reboot slot given back to {coordinator.url}")
        self.state.slot_held = ""
        self._save()

    # -- after a reboot ------------------------------------------------------------------
    async def settle(self) -> None:
        """Finish what an upgrade before the reboot started: wait for the assessment,
        then record success or the fallback, and give the slot back."""
        boot = await self._assessed_boot()
        if boot is not None and boot.fell_back_from and boot.previous_version:
            self._refuse(boot.previous_version, f"it fell back: {boot.reason}")
        if self.state.attempt:
            wanted = self.state.attempt
            if self.node.version == wanted:
                self.event(f"upgraded to {wanted}: its health gates passed", version=wanted)
            elif wanted not in self.state.refused:
                self.event(
                    f"the upgrade to {wanted} did not happen (still {self.node.version})",
                    version=wanted,
                )
            self.state.attempt = self.state.attempt_from = ""
            self._save()
        while self.state.slot_held:
            try:
                await self._give_back()
            except BasaltError as exc:
                self.publish(state="error", last_error=exc.one_line())
                await asyncio.sleep(SLOT_RETRY)

    async def _assessed_boot(self) -> Any:
        """The BootStatus once the running slot is no longer on trial (None: no slots)."""
        while True:
            found = self.node.store.get("BootStatuses", "boot")
            if found is None:
                if self.node.upgrader.slots is None or not self.state.attempt:
                    return None
            elif not getattr(found.spec, "on_trial", True):
                return found.spec
            self.publish(state="on-trial")
            await asyncio.sleep(TRIAL_POLL)

    def _refuse(self, version: str, why: str) -> None:
        if version in self.state.refused:
            return
        self.state.refused.append(version)
        self._save()
        self.event(f"release {version} is never taken again by this node: {why}", version=version)

    # -- the loop ------------------------------------------------------------------------
    async def run(self) -> None:
        await self.settle()
        if self.config.mode == "manual":
            self.publish(state="manual", next_check="")
            return  # checks only when asked (check_now)
        while True:
            async with self.lock:
                delay = await self.check_once()
            self.publish(next_check=_iso(self.now() + dt.timedelta(seconds=delay)))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), delay)
            self.wake.clear()

    def _interval(self) -> float:
        import random  # with an UpdateConfig: not the start-up's

        interval = self.config.interval_seconds()
        return interval + random.uniform(0, interval / 10)

    async def check_now(self, apply: bool) -> str:
        """Check the channel now (the UpdateCheck RPC); with ``apply``, take the next hop
        now, whatever the mode and the windows. What happened, in words; a refusal raises."""
        from .upgrade import UpgradeRefusedError

        async with self.lock:
            await self.check_once(apply=apply)
        status = self.status
        hop, path = status.get("next_hop", ""), " -> ".join(status.get("path", []))
        state = status.get("state")
        if state in {"error", "waiting-slot", "waiting"}:
            raise UpgradeRefusedError(
                str(status.get("last_error")), hint="see basaltctl get updatestatus"
            )
        if state == "up-to-date":
            return (
                f"up to date: {self.node.version} is the newest release of "
                f"{self.config.channel} this node takes"
            )
        if state == "upgrading":
            return f"upgrading to {hop} from {self.config.channel}; rebooting"
        if state == "waiting-window":
            opens = status.get("next_window")
            return f"{hop} waits for the next window ({opens}); --apply takes it now"
        return f"{hop} is available (path: {path}); --apply takes it now"

    async def check_once(self, apply: bool = False) -> float:
        """One check (in auto mode, or with ``apply``, maybe an upgrade); seconds until
        the next."""
        from basalt.machinery.releases.client import ChannelReader

        reader = ChannelReader(
            self.config.repository,
            self.config.root.encode(),
            self.directory / "tuf",
            self.config.channel,
        )
        self.publish(state="checking")
        try:
            releases = await asyncio.to_thread(reader.releases)
            hop, newest, path = self._plan(releases)
        except BasaltError as exc:
            self.publish(state="error", last_error=exc.one_line(), last_check=_iso(self.now()))
            log.warning("update check failed: %s", exc.one_line())
            return self._interval()
        self.publish(
            last_check=_iso(self.now()),
            available=newest,
            next_hop=hop.version if hop else "",
            path=path,
            last_error="",
        )
        if hop is None:
            self.publish(state="up-to-date", next_window="")
            return self._interval()
        if self.config.mode != "auto" and not apply:
            if self._announced != hop.version:
                self._announced = hop.version
                self.event(
                    f"release {hop.version} is available (path: {' -> '.join(path)})",
                    version=hop.version,
                )
            self.publish(state="available")
            return self._interval()
        return await self._auto(reader, hop, anytime=apply)

    def _plan(self, releases: list[Release]) -> tuple[Release | None, str, list[str]]:
        from basalt.machinery.images.versions import version_key
        from basalt.machinery.releases.graph import next_hop, path, pinned_hop

        arch = self.node.platform.arch
        refused = self.state.refused
        current = self.node.version
        usable = [
            r for r in releases if r.arch == arch and not r.yanked and r.version not in refused
        ]
        newest = max((r.version for r in usable), key=version_key, default="")
        if self.config.version:
            hop = pinned_hop(current, releases, self.config.version, arch=arch, refused=refused)
            wanted = [
                r for r in releases if version_key(r.version) <= version_key(self.config.version)
            ]
            return hop, newest, path(current, wanted, arch=arch, refused=refused)
        return (
            next_hop(current, releases, arch=arch, refused=refused),
            newest,
            path(current, releases, arch=arch, refused=refused),
        )

    async def _auto(self, reader: Any, hop: Release, anytime: bool = False) -> float:
        from basalt.machinery.releases.fleetlock import SlotRefusedError
        from basalt.machinery.windows import Window, next_opening, open_now

        if self.node.stage != "running":
            self.publish(state="waiting", last_error=f"the node is {self.node.stage}")
            return SLOT_RETRY
        # Downloaded and verified ahead of the window (kept in EPHEMERAL while it waits):
        # the window is spent on the reboot, not on the download.
        self.publish(state="downloading", next_window="")
        staging = self.node.paths.ephemeral / "update"
        try:
            bundle = await asyncio.to_thread(
                reader.download, hop, staging / f"basalt-{hop.version}.tar"
            )
            for old in staging.glob("basalt-*.tar"):
                if old != bundle:
                    old.unlink(missing_ok=True)  # a release no longer next
            label = f"release {hop.version} from {self.config.repository}"
            verified = await self.node.upgrader.verify(bundle, label=label)
            if verified.version != hop.version:
                raise BasaltError(
                    f"{label}: the bundle says version {verified.version}, the channel "
                    f"says {hop.version}: refused"
                )
        except BasaltError as exc:
            self.publish(state="error", last_error=exc.one_line())
            self.event(f"update to {hop.version} refused: {exc.one_line()}", version=hop.version)
            return self._interval()
        windows = [Window(w.cron, w.seconds(), w.timezone) for w in self.config.windows]
        now = self.now()
        if not anytime and not open_now(windows, now):
            opens = next_opening(windows, now)
            self.publish(state="waiting-window", next_window=_iso(opens))
            until = (opens - now).total_seconds() if opens else self._interval()
            return max(1.0, min(self._interval(), until + 1))
        self.publish(next_window="")
        coordinator = self._coordinator()
        if coordinator is not None:
            try:
                await asyncio.to_thread(coordinator.take, self.node.platform.machine_uuid())
            except SlotRefusedError as exc:
                self.publish(state="waiting-slot", last_error=exc.one_line())
                return SLOT_RETRY
            except BasaltError as exc:
                self.publish(state="error", last_error=exc.one_line())
                return SLOT_RETRY
            self.state.slot_held = coordinator.url
            self.event(f"reboot slot taken at {coordinator.url} for {hop.version}")
        self.state.attempt, self.state.attempt_from = hop.version, self.node.version
        self._save()
        self.publish(state="upgrading", last_error="")
        try:
            await self._upgrade(bundle, verified, label)
        except BasaltError as exc:
            self.state.attempt = self.state.attempt_from = ""
            self._save()
            self.publish(state="error", last_error=exc.one_line())
            self.event(f"upgrade to {hop.version} refused: {exc.one_line()}", version=hop.version)
            try:
                await self._give_back()
            except BasaltError as again:
                log.warning("could not give the reboot slot back: %s", again.one_line())
            return self._interval()
        return 3600.0  # the reboot comes first

    async def _upgrade(self, bundle: Path, verified: Any, label: str) -> None:
        from .runtime import SequenceConflictError
        from .sequencer.sequences import RebootPlan
        from .upgrade import UpgradeJob, UpgradeOptions

        job = UpgradeJob(UpgradeOptions(), bundle, label, verified=verified)
        try:
            task = self.node.sequencer.start("upgrade", job)
        except SequenceConflictError as exc:
            raise BasaltError(f"another operation runs ({exc}); trying again later") from None
        try:
            await task
        finally:
            bundle.unlink(missing_ok=True)
        self.event(f"{job.message}; rebooting into it", version=verified.version)
        self.node.sequencer.start("reboot", RebootPlan())


class UpdateController(Controller):
    """Starts, restarts and stops the updater as the UpdateConfig comes and goes; answers
    the UpdateCheck RPC (``node.updates``)."""

    name = "update"
    outputs = ("UpdateStatuses",)

    def __init__(self, node: Node) -> None:
        self.node = node
        node.updates = self
        self.config: UpdateConfig | None = None
        self.task: asyncio.Task[None] | None = None
        self.updater: NodeUpdater | None = None

    async def reconcile(self, store: ResourceStore) -> None:
        config = None
        if self.node.config is not None:  # the config models are loaded by then, not before
            from basalt.machinery.config import UpdateConfig

            config = self.node.config.first(UpdateConfig)
        if config == self.config and (config is None or self.task is not None):
            return
        self.config = config
        if self.task is not None:
            self.task.cancel()
            self.task = None
        if config is None:
            self.updater = None
            store.put(
                "UpdateStatuses",
                "node",
                UpdateStatusSpec(current=self.node.version),
                owner="updater",
            )
            return
        self.updater = NodeUpdater(self.node, config)
        self.task = self.node.background(self._run(self.updater), name="updater")

    async def check(self, apply: bool) -> str:
        from .upgrade import UpgradeRefusedError

        if self.updater is None:
            raise UpgradeRefusedError(
                "this node has no UpdateConfig: it follows no release channel",
                hint="add an UpdateConfig document (docs/releases.md), or upgrade with "
                "basaltctl upgrade --image",
            )
        return await self.updater.check_now(apply)

    async def _run(self, updater: NodeUpdater) -> None:
        try:
            await updater.run()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug here must not take machined down
            log.exception("the updater stopped")
            updater.publish(state="error", last_error=f"the updater stopped: {exc!r}")
