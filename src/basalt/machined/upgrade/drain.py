"""The Kubernetes side of an upgrade or a rollback: cordon and drain the node when its
kubelet runs (or say why not), and uncordon it once a good slot runs again."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from basalt.machinery.errors import BasaltError

from .jobs import NO_KUBERNETES

if TYPE_CHECKING:
    from ..kubernetes.cordon import NodeCordon
    from ..node import Node

log = logging.getLogger(__name__)


class UpgradeDrain:
    """The upgrade's cordon of one node; made once, by the upgrader."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self._cordon: NodeCordon | None = None

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
        from ..kubernetes.intent import read_intent

        if read_intent(self.node.paths.state) is not None:
            note = await self.cordon.give_back(why)
            log.info("%s", note)

    @property
    def cordon(self) -> NodeCordon:
        """The upgrade's cordon of this node (:mod:`.kubernetes.cordon`), made on first use."""
        if self._cordon is None:
            from ..kubernetes.cordon import NodeCordon

            self._cordon = NodeCordon(self.node)
        return self._cordon

    def uncordon(self, why: str) -> None:
        """The node runs a good slot: uncordon it if an upgrade cordoned it (in the
        background, once the node is running; failures are events)."""
        from ..kubernetes.intent import read_intent

        if read_intent(self.node.paths.state) is not None:
            self.cordon.resume(why)
