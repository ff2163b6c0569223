"""The upgrade's cordon of this node: taken before the drain, given back after the reboot.

Before an upgrade reboots a node whose kubelet runs, :meth:`NodeCordon.drain_for_upgrade`
cordons the Node and drains it (:mod:`.drain`). Whether the node must be uncordoned
later is recorded on STATE (:mod:`.intent`) *before* the cordon; a node an admin had
cordoned already gets no record and stays cordoned.

The record outlives the reboot. Once the node runs a good slot again (the new one after
its health gates pass, or the old one after a fallback or rollback), :meth:`resume`
uncordons it in the background, with bounded retries, and removes the record; a
failure is an event, never a failed boot. A refused or failed upgrade gives the cordon
back at once in the same way.

Credentials: a control plane's ``admin.conf`` (rendered by Basalt), else the kubelet's
own ``kubelet.conf`` (written by the kubelet after TLS bootstrap). The Node's name is
the kubelet's: its ``--hostname-override``, lowercased as the kubelet does.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from basalt.machinery.errors import BasaltError
from basalt.machinery.kubernetes import paths

from .client import KubeApiError, KubeClient, KubeconfigError, load_kubeconfig
from .drain import Drainer, DrainError, DrainTimings, no_drain_hint
from .intent import UncordonIntent, clear_intent, read_intent, write_intent

if TYPE_CHECKING:
    from ..node import Node

log = logging.getLogger(__name__)

#: Kubeconfigs tried in order (node view): cluster-admin on control planes, else kubelet's.
KUBECONFIGS = (paths.ADMIN_KUBECONFIG, paths.KUBELET_KUBECONFIG)
_MAX_UNCORDON_WAIT = 60.0


def kubelet_node_name(node: Node) -> str:
    """The Node the kubelet registers: ``--hostname-override`` (extraArgs win), lowercased."""
    machine = node.machine
    override = machine.kubelet.extra_args.get("hostname-override") if machine else None
    return str(override or node.hostname).strip().lower()


def kubeconfig_for(node: Node) -> tuple[Path, str] | None:
    """(path on the host, path in the node view) of the first kubeconfig that exists."""
    for view in KUBECONFIGS:
        host = node.paths.root / view.lstrip("/")
        if host.is_file():
            return host, view
    return None


class NodeCordon:
    """Cordon and drain before an upgrade; uncordon after it (or after a refusal)."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self._retry: asyncio.Task[None] | None = None

    @property
    def state_dir(self) -> Path:
        return self.node.paths.state

    def pending(self) -> UncordonIntent | None:
        return read_intent(self.state_dir)

    def _event(self, message: str, node_name: str) -> None:
        self.node.events.publish("kubernetes", message, actor="drain", node=node_name)
        log.info("%s", message)

    async def client(self) -> KubeClient:
        """A client from this node's kubeconfig; DrainError when there is none to use."""
        found = kubeconfig_for(self.node)
        if found is None:
            raise DrainError(
                "the kubelet runs on this node, but no kubeconfig reaches the Kubernetes API: "
                f"neither {' nor '.join(KUBECONFIGS)} exists (the kubelet has not finished "
                "its TLS bootstrap)",
                hint="wait until the node is registered (kubectl get nodes), or upgrade with "
                "--no-drain",
            )
        host, view = found
        try:
            credentials = await asyncio.to_thread(load_kubeconfig, host, view)
            return KubeClient(credentials, timeout=self.node.tuning.kube_request_timeout)
        except KubeconfigError as exc:
            raise DrainError(str(exc), hint=exc.hint) from None

    def _drainer(self, client: KubeClient, name: str) -> Drainer:
        tuning = self.node.tuning
        timings = DrainTimings(
            timeout=tuning.drain_timeout, backoff=tuning.drain_backoff, poll=tuning.drain_poll
        )
        return Drainer(client, name, timings)

    # -- before the upgrade --------------------------------------------------------------
    async def drain_for_upgrade(self, purpose: str = "upgrade") -> list[str]:
        """Cordon and drain before the reboot of an upgrade (or a rollback: ``purpose``);
        the steps done. DrainError (nothing changed) when it cannot."""
        await self._stop_retry()  # a pending uncordon must not undo this cordon
        ours = self.pending() is not None  # an earlier upgrade's cordon, not given back yet
        name = kubelet_node_name(self.node)
        try:
            drainer = self._drainer(await self.client(), name)
            cordoned = await drainer.unschedulable()
        except (DrainError, KubeApiError) as exc:
            if ours:
                self.give_back_later("an earlier upgrade cordoned it")
            if isinstance(exc, DrainError):
                raise
            raise _refused(purpose, name, exc, "the node was not changed") from None
        steps: list[str] = []
        if cordoned and not ours:
            steps.append(f"node {name} was already cordoned; it stays cordoned after the {purpose}")
        else:
            try:
                if not ours:
                    await asyncio.to_thread(write_intent, self.state_dir, UncordonIntent(name))
                await drainer.set_unschedulable(True)  # also when ours: idempotent
            except BaseException as exc:
                raise await self._undo(name, exc, purpose) from None
            steps.append(
                f"node {name} is still cordoned by an earlier upgrade"
                if cordoned
                else f"cordoned node {name}"
            )
            self._event(f"{purpose}: cordoned node {name}", name)
        try:
            result = await drainer.drain()
        except BaseException as exc:
            raise await self._undo(name, exc, purpose, mine=not cordoned or ours) from None
        steps.append(result.summary())
        self._event(f"{purpose}: drained node {name}: {result.summary()}", name)
        return steps

    async def _undo(
        self, name: str, exc: BaseException, purpose: str, *, mine: bool = True
    ) -> BaseException:
        """Give the cordon back after ``exc``; the error to raise (DrainError, or ``exc``
        itself when it is not a drain failure: a cancellation, a bug)."""
        if not isinstance(exc, DrainError | KubeApiError | OSError):
            if mine:
                self.give_back_later(f"the {purpose} was cancelled")
            return exc
        if not mine:
            return _refused(purpose, name, exc, f"node {name} stays cordoned, as it was")
        note = await self.give_back(f"the {purpose} was refused")
        return _refused(purpose, name, exc, note)

    async def give_back(self, why: str) -> str:
        """Uncordon now if this upgrade's cordon is pending; else retry in the background.
        What happened, in words."""
        intent = self.pending()
        if intent is None:
            return "the node was not changed"
        try:
            await self._uncordon(intent)
        except (BasaltError, OSError) as exc:
            self.give_back_later(why)
            return (
                f"node {intent.node} stays cordoned for now: uncordoning failed ({exc}); "
                "machined retries in the background (basaltctl events)"
            )
        self._event(f"uncordoned node {intent.node}: {why}", intent.node)
        return f"node {intent.node} uncordoned again"

    # -- after the reboot ----------------------------------------------------------------
    def resume(self, why: str) -> None:
        """Boot: the node runs a good slot; uncordon it if an upgrade cordoned it."""
        if self.pending() is not None:
            self.give_back_later(why, wait_running=True)

    def give_back_later(self, why: str, *, wait_running: bool = False) -> None:
        if self._retry is not None and not self._retry.done():
            return
        self._retry = self.node.background(
            self._uncordon_with_retries(why, wait_running), name="uncordon"
        )

    async def _stop_retry(self) -> None:
        task, self._retry = self._retry, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _uncordon_with_retries(self, why: str, wait_running: bool) -> None:
        tuning = self.node.tuning
        while wait_running and self.node.stage != "running":
            await asyncio.sleep(0.5)
        intent = self.pending()
        if intent is None:
            return
        delay = tuning.uncordon_backoff
        problem = ""
        for attempt in range(1, tuning.uncordon_attempts + 1):
            try:
                found = await self._uncordon(intent)
            except (BasaltError, OSError) as exc:
                problem = str(exc)
                if attempt == 1:
                    self._event(
                        f"uncordoning node {intent.node} failed: {problem}; retrying up to "
                        f"{tuning.uncordon_attempts - 1} more times",
                        intent.node,
                    )
                if attempt < tuning.uncordon_attempts:
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, _MAX_UNCORDON_WAIT)
                continue
            if found:
                self._event(f"uncordoned node {intent.node}: {why}", intent.node)
            else:
                self._event(
                    f"nothing to uncordon: node {intent.node} is no longer registered ({why})",
                    intent.node,
                )
            return
        await asyncio.to_thread(clear_intent, self.state_dir)
        self._event(
            f"gave up uncordoning node {intent.node} after {tuning.uncordon_attempts} "
            f"attempts: {problem}; uncordon it yourself: kubectl uncordon {intent.node}",
            intent.node,
        )

    async def _uncordon(self, intent: UncordonIntent) -> bool:
        """Uncordon and clear the record; False when the Node does not exist any more."""
        drainer = self._drainer(await self.client(), intent.node)
        found = await drainer.set_unschedulable(False)
        await asyncio.to_thread(clear_intent, self.state_dir)
        return found


def _refused(purpose: str, name: str, exc: BaseException, note: str) -> DrainError:
    return DrainError(
        f"{purpose} refused: cannot cordon and drain node {name}: {exc}; {note}",
        hint=no_drain_hint(purpose),
    )
