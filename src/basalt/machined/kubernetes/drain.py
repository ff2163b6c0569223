"""Cordon, drain and uncordon one node through the Kubernetes API.

Cordon is a JSON merge patch of the Node's ``spec.unschedulable``. Drain lists the
pods bound to the node (``fieldSelector=spec.nodeName=NODE``) and decides for each
(:func:`plan`, pure):

- mirror pods (annotation ``kubernetes.io/config.mirror``: static pods the kubelet runs
  from files) and pods a DaemonSet controls are left alone, as ``kubectl drain`` does;
  the reboot stops them;
- finished pods (phase Succeeded or Failed) are deleted: nothing runs in them and no
  disruption budget counts them;
- every other pod is evicted through the policy/v1 Eviction subresource, so that
  PodDisruptionBudgets and grace periods hold. Bare pods and pods with emptyDir volumes
  are evicted too: the reboot that follows would stop them anyway.

An eviction answered 429 (a PodDisruptionBudget does not allow it now) is retried with
backoff; 404 means the pod is gone already. Then the drain waits until none of those
pods is listed on the node any more (a pod of the same name with another uid is a new
pod). Everything is bounded by one deadline; past it, :class:`DrainError` names the
pods still on the node and why.
"""

from __future__ import annotations

import asyncio
import urllib.parse
from collections import Counter
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from basalt.machinery.errors import BasaltError

from .client import KubeApiError, KubeClient

__all__ = [
    "MIRROR_ANNOTATION",
    "DrainError",
    "DrainResult",
    "DrainTimings",
    "Drainer",
    "PodAction",
    "PodRef",
    "plan",
]

MIRROR_ANNOTATION = "kubernetes.io/config.mirror"
FINISHED_PHASES = ("Succeeded", "Failed")


def no_drain_hint(verb: str = "upgrade") -> str:
    """What to do when a drain before ``verb`` (upgrade, rollback) cannot finish."""
    return (
        f"fix what blocks the drain and {verb} again, or drain the node yourself "
        f"(kubectl drain) and {verb} with --no-drain"
    )


NO_DRAIN_HINT = no_drain_hint()


class DrainError(BasaltError):
    """The node could not be cordoned or drained; the upgrade is refused and the node is
    left as it was (uncordoned again if the drain cordoned it)."""


class PodAction(StrEnum):
    EVICT = "evict"
    DELETE = "delete"  # finished
    SKIP_MIRROR = "mirror pod"
    SKIP_DAEMONSET = "DaemonSet"

    @property
    def skipped(self) -> bool:
        return self in (PodAction.SKIP_MIRROR, PodAction.SKIP_DAEMONSET)


@dataclass(frozen=True)
class PodRef:
    namespace: str
    name: str
    uid: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def path(self) -> str:
        namespace = urllib.parse.quote(self.namespace, safe="")
        return f"/api/v1/namespaces/{namespace}/pods/{urllib.parse.quote(self.name, safe='')}"

    @classmethod
    def of(cls, pod: dict[str, Any]) -> PodRef:
        meta = pod.get("metadata") or {}
        return cls(str(meta.get("namespace", "")), str(meta.get("name", "")), str(meta.get("uid")))


def plan(pod: dict[str, Any]) -> PodAction:
    """What the drain does with ``pod`` (a Pod object as the API returns it)."""
    meta = pod.get("metadata") or {}
    if MIRROR_ANNOTATION in (meta.get("annotations") or {}):
        return PodAction.SKIP_MIRROR
    for owner in meta.get("ownerReferences") or []:
        if owner.get("controller") and owner.get("kind") == "DaemonSet":
            return PodAction.SKIP_DAEMONSET
    if (pod.get("status") or {}).get("phase") in FINISHED_PHASES:
        return PodAction.DELETE
    return PodAction.EVICT


def _pods(count: int) -> str:
    return f"{count} pod" if count == 1 else f"{count} pods"


@dataclass
class DrainResult:
    evicted: list[PodRef] = field(default_factory=list)
    deleted: list[PodRef] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)
    #: Evictions a PodDisruptionBudget refused (429) before they went through.
    refusals: int = 0

    def summary(self) -> str:
        """``evicted 3 pods (2 skipped: DaemonSet)``, and the other parts when they apply."""
        parts = [f"evicted {_pods(len(self.evicted))}"]
        if self.deleted:
            parts.append(f"deleted {len(self.deleted)} finished")
        text = ", ".join(parts)
        if self.refusals:
            text += f" after {self.refusals} disruption-budget refusals"
        if self.skipped:
            reasons = ", ".join(
                f"{n} {reason}" if len(self.skipped) > 1 else reason
                for reason, n in sorted(self.skipped.items())
            )
            text += f" ({sum(self.skipped.values())} skipped: {reasons})"
        return text


@dataclass(frozen=True)
class DrainTimings:
    """How long a drain may take, and how it waits."""

    timeout: float = 300.0
    #: First wait after a 429; doubled after each refusal, up to ``backoff_max``.
    backoff: float = 1.0
    backoff_max: float = 10.0
    #: How often the node's pods are listed while evicted pods terminate.
    poll: float = 1.0


class _Deadline(Exception):
    """Internal: the drain timeout ran out."""


class Drainer:
    """Cordon, drain and uncordon the node ``node_name`` through ``client``."""

    def __init__(
        self, client: KubeClient, node_name: str, timings: DrainTimings | None = None
    ) -> None:
        self.client = client
        self.node_name = node_name
        self.timings = timings or DrainTimings()
        self._node_path = f"/api/v1/nodes/{urllib.parse.quote(node_name, safe='')}"
        #: Why each pod not yet evicted is still there (the last answer).
        self._waiting: dict[PodRef, str] = {}

    # -- cordon ----------------------------------------------------------------------------
    async def unschedulable(self) -> bool:
        """Whether the Node is cordoned now; DrainError when it is not registered."""
        answer = await self.client.get(self._node_path)
        if answer.status == 404:
            raise DrainError(
                f"node {self.node_name} is not registered with the Kubernetes API server at "
                f"{self.client.server}, though its kubelet runs",
                hint="check 'kubectl get nodes' (the kubelet registers under its "
                "--hostname-override), or upgrade with --no-drain",
            )
        self._check(answer.status, answer.message, f"reading node {self.node_name}")
        return bool((answer.body.get("spec") or {}).get("unschedulable"))

    async def set_unschedulable(self, value: bool) -> bool:
        """Cordon (True) or uncordon (False); False when the Node does not exist (any more)."""
        answer = await self.client.patch(self._node_path, {"spec": {"unschedulable": value}})
        if answer.status == 404:
            return False
        what = "cordoning" if value else "uncordoning"
        self._check(answer.status, answer.message, f"{what} node {self.node_name}")
        return True

    # -- drain -----------------------------------------------------------------------------
    async def list_pods(self) -> list[dict[str, Any]]:
        selector = urllib.parse.quote(f"spec.nodeName={self.node_name}", safe="")
        answer = await self.client.get(f"/api/v1/pods?fieldSelector={selector}")
        self._check(answer.status, answer.message, f"listing the pods on {self.node_name}")
        items = answer.body.get("items")
        return [p for p in items if isinstance(p, dict)] if isinstance(items, list) else []

    async def drain(self) -> DrainResult:
        """Evict (or delete) what must go and wait until it is gone; DrainError past the
        timeout, naming the pods still on the node."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timings.timeout
        result = DrainResult()
        to_evict: list[PodRef] = []
        for pod in await self.list_pods():
            action = plan(pod)
            ref = PodRef.of(pod)
            if action.skipped:
                result.skipped[action.value] += 1
            elif action is PodAction.DELETE:
                result.deleted.append(ref)
            else:
                to_evict.append(ref)
        self._waiting = dict.fromkeys(to_evict, "eviction not answered yet")
        self._waiting |= dict.fromkeys(result.deleted, "finished; deletion not answered yet")
        try:
            async with asyncio.timeout_at(deadline):
                for ref in result.deleted:
                    await self._delete(ref)
                result.refusals = await self._evict_all(to_evict)
                result.evicted = to_evict
                await self._wait_gone(set(to_evict) | set(result.deleted))
        except TimeoutError:
            await self._forget_gone()
            raise self._timed_out() from None
        return result

    async def _forget_gone(self) -> None:
        """Past the deadline: one last look, so the error names only pods still there."""
        try:
            async with asyncio.timeout(self.client.timeout):
                listed = {PodRef.of(p) for p in await self.list_pods()}
        except (KubeApiError, TimeoutError):
            return
        self._waiting = {ref: why for ref, why in self._waiting.items() if ref in listed}

    async def _evict_all(self, refs: list[PodRef]) -> int:
        """Evict every pod at once (one blocked by a budget holds up no other); the first
        hard failure stops the rest."""
        tasks = [asyncio.ensure_future(self._evict(ref)) for ref in refs]
        try:
            return sum(await asyncio.gather(*tasks))
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _delete(self, ref: PodRef) -> None:
        """Delete a finished pod: this one (its uid), not a new pod of the same name."""
        options = {
            "apiVersion": "v1",
            "kind": "DeleteOptions",
            "gracePeriodSeconds": 0,
            "preconditions": {"uid": ref.uid},
        }
        answer = await self.client.delete(ref.path, options)
        if answer.status not in (404, 409):  # gone, or replaced (the uid precondition)
            self._check(answer.status, answer.message, f"deleting finished pod {ref}")
        self._waiting[ref] = "finished; deleted, still listed"

    async def _evict(self, ref: PodRef) -> int:
        """Evict ``ref``, retrying while a disruption budget refuses; the refusal count."""
        body = {
            "apiVersion": "policy/v1",
            "kind": "Eviction",
            "metadata": {"name": ref.name, "namespace": ref.namespace},
        }
        wait = self.timings.backoff
        refusals = 0
        while True:
            answer = await self.client.post(f"{ref.path}/eviction", body)
            if answer.ok or answer.status == 404:
                self._waiting[ref] = "evicted, still terminating"
                return refusals
            if answer.status != 429:
                self._check(answer.status, answer.message, f"evicting pod {ref}")
            refusals += 1
            self._waiting[ref] = f"eviction refused {refusals} times: {answer.message}"
            pause = wait if answer.retry_after is None else min(answer.retry_after, 30.0)
            await asyncio.sleep(pause)
            wait = min(wait * 2, self.timings.backoff_max)

    async def _wait_gone(self, refs: set[PodRef]) -> None:
        while refs:
            listed = {PodRef.of(p) for p in await self.list_pods()}
            refs &= listed  # a pod of the same name with another uid is a new pod
            for ref in list(self._waiting):
                if ref not in refs:
                    del self._waiting[ref]
            if refs:
                await asyncio.sleep(self.timings.poll)

    def _timed_out(self) -> DrainError:
        still = "; ".join(f"{ref} ({why})" for ref, why in sorted(self._waiting.items(), key=str))
        return DrainError(
            f"draining node {self.node_name} did not finish within "
            f"{self.timings.timeout:g} s; still on the node: {still or 'nothing listed'}",
            hint=NO_DRAIN_HINT,
        )

    def _check(self, status: int, message: str, doing: str) -> None:
        if 200 <= status < 300:
            return
        if status in (401, 403):
            raise KubeApiError(
                f"the Kubernetes API server at {self.client.server} refused {doing} "
                f"(HTTP {status}): {message}; credentials from {self.client.credentials.source}",
                status=status,
                hint="these credentials may not cordon, list or evict pods on this node",
            )
        raise KubeApiError(
            f"{doing}: the Kubernetes API server at {self.client.server} answered HTTP "
            f"{status}: {message}",
            status=status,
        )
