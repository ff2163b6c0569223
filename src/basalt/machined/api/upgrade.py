"""The upgrade RPCs of MachineService (a mixin of MachineServicer): Upgrade, Rollback, and
UpdateCheck (the updater checks its channel now).

``Upgrade`` is client-streaming (options first, then the bundle in chunks, or no chunks
when the options name a URL the node fetches itself), so it is never forwarded: clients
dial the node itself. Nothing on the node changes unless the
bundle verifies and every pre-check passes; then the inactive slot is written and the
node reboots into it, on trial (see :mod:`basalt.machined.upgrade`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc.aio

from basalt.machinery.api import common_pb2, machine_pb2

from .errors import InvalidRequestError

if TYPE_CHECKING:
    from ..node import Node
    from ..upgrade import UpgradeOptions

Context = grpc.aio.ServicerContext[Any, Any]


async def _options_then_data(
    requests: AsyncIterator[machine_pb2.UpgradeRequest],
) -> tuple[UpgradeOptions, AsyncIterator[bytes], str, str]:
    """The options, the bundle's data (from the stream, or fetched from options.url), what
    to call the bundle, and the index a delta stream was made against ("": whole)."""
    from ..fetch import check_url, fetch
    from ..upgrade import UpgradeOptions

    stream = aiter(requests)
    first = await anext(stream, None)
    if first is None or first.WhichOneof("part") != "options":
        raise InvalidRequestError(
            "an Upgrade stream starts with its options, then the bundle's data",
            hint="use basaltctl upgrade --image BUNDLE.tar",
        )
    options = UpgradeOptions(
        stage=first.options.stage,
        force=first.options.force,
        no_drain=first.options.no_drain,
        kexec=first.options.reboot_mode == machine_pb2.KEXEC,
        allow_downgrade=first.options.allow_downgrade,
    )
    delta = first.options.delta_index
    if delta and (len(delta) != 64 or delta.strip("0123456789abcdef")):
        raise InvalidRequestError(
            "options.delta_index is not the sha256 (64 lowercase hex digits) of the node's "
            "chunk index",
            hint="basaltctl upgrade takes it from UpgradeIndex",
        )
    if first.options.url:
        if delta:
            raise InvalidRequestError(
                "an Upgrade with a URL fetches the bundle whole: it has no delta_index",
                hint="give either --image URL or --image FILE",
            )
        url = check_url(first.options.url)
        if await anext(stream, None) is not None:
            raise InvalidRequestError(
                "an Upgrade with a URL carries no bundle data: the node fetches it",
                hint="give either --image URL or --image FILE",
            )
        return options, fetch(url), f"bundle from {url}", ""

    async def data() -> AsyncIterator[bytes]:
        async for request in stream:
            if request.WhichOneof("part") != "data":
                raise InvalidRequestError("options may only come first in an Upgrade stream")
            yield request.data

    return options, data(), "uploaded bundle" + (" (delta)" if delta else ""), delta


class UpgradeMethods:
    node: Node

    def meta(self) -> common_pb2.Metadata:
        raise NotImplementedError

    def action(self, message: str) -> common_pb2.ActionResponse:
        raise NotImplementedError

    async def Upgrade(
        self, requests: AsyncIterator[machine_pb2.UpgradeRequest], context: Context
    ) -> Any:
        from ..sequencer.sequences import RebootPlan
        from ..upgrade import UpgradeJob

        upgrader = self.node.upgrader
        upgrader.require_slots()  # refuse before receiving anything
        options, chunks, label, delta = await _options_then_data(requests)
        upload, verified = await upgrader.receive(chunks, label, delta_index=delta)
        job = UpgradeJob(options, upload, label, verified=verified)
        try:
            await self.node.sequencer.start("upgrade", job)
        finally:
            upload.unlink(missing_ok=True)
        # A staged bundle is installed early in the next boot, which the firmware starts.
        self.node.sequencer.start("reboot", RebootPlan(kexec=options.kexec and not options.stage))
        assert job.verified is not None
        job.steps.append("rebooting")
        answer = machine_pb2.Upgrade(
            metadata=self.meta(),
            message=f"{job.message}; rebooting",
            version=job.verified.version,
            slot=job.slot.value if job.slot is not None else "",
            steps=job.steps,
        )
        return machine_pb2.UpgradeResponse(messages=[answer])

    async def UpgradeIndex(self, request: common_pb2.Empty, context: Context) -> Any:
        import hashlib

        index = await self.node.upgrader.running_index() or b""
        answer = machine_pb2.UpgradeIndex(
            metadata=self.meta(),
            index=index,
            sha256=hashlib.sha256(index).hexdigest() if index else "",
        )
        return machine_pb2.UpgradeIndexResponse(messages=[answer])

    async def Rollback(self, request: machine_pb2.RollbackRequest, context: Context) -> Any:
        from ..sequencer.sequences import RebootPlan

        self.node.upgrader.require_slots()
        job = RollbackJob(no_drain=request.no_drain)
        await self.node.sequencer.start("rollback", job)
        kexec = request.reboot_mode == machine_pb2.KEXEC
        self.node.sequencer.start("reboot", RebootPlan(kexec=kexec))
        return self.action("; ".join([*job.steps, job.message, "rebooting"]))

    async def UpdateCheck(self, request: machine_pb2.UpdateCheckRequest, context: Context) -> Any:
        from ..upgrade import UpgradeRefusedError

        updates = self.node.updates
        if updates is None:
            raise UpgradeRefusedError("this node runs no updater")
        return self.action(await updates.check(request.apply))


@dataclass
class RollbackJob:
    """One rollback request as it goes through the ``rollback`` sequence."""

    no_drain: bool = False
    steps: list[str] = field(default_factory=list)
    message: str = ""
