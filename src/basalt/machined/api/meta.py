"""The MetaRead, MetaWrite, MetaDelete and WipeDisk RPCs of MachineService
(a mixin of MachineServicer). Both need a metal node: META is a partition of the
installed disk (:mod:`..boot.meta`); a container-mode node has neither META nor disks
of its own, and says so."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio

from basalt.machinery.api import common_pb2, machine_pb2
from basalt.machinery.errors import BasaltError

from .errors import NotFoundError

if TYPE_CHECKING:
    from ..boot.meta import Meta
    from ..node import Node
    from ..storage.wipe import WipeMethod

Context = grpc.aio.ServicerContext[Any, Any]
log = logging.getLogger(__name__)
#: How often a long wipe logs its progress.
PROGRESS_EVERY = 10.0


class NoMetaError(BasaltError):
    """This node has no META partition (container mode, or not booted from its disk)."""


class NoDisksError(BasaltError):
    """A container-mode node has no disks of its own to wipe."""


class MetaMethods:
    node: Node

    def meta(self) -> common_pb2.Metadata:
        raise NotImplementedError

    def action(self, message: str) -> common_pb2.ActionResponse:
        raise NotImplementedError

    def _meta_partition(self) -> Meta:
        from ..boot.metal_slots import MetalSlots

        if self.node.platform.mode.in_container:
            raise NoMetaError(
                "this node has no META partition (container mode): its boot state is a "
                "file of the launcher's, and it holds no keys",
                hint="META keys exist on metal nodes installed to disk",
            )
        slots = self.node.upgrader.slots
        if not isinstance(slots, MetalSlots):
            raise NoMetaError(
                "this node has no META partition: it did not boot from an installed Basalt "
                "disk (no basalt.slot= on the kernel command line, or no META partition)",
                hint="install it to disk (apply-config with install.disk) and boot from it",
            )
        return slots.meta

    async def MetaRead(self, request: machine_pb2.MetaReadRequest, context: Context) -> Any:
        from ..boot.meta import check_key

        if request.key:
            check_key(request.key)  # a bad request is refused as such on any node
        meta = self._meta_partition()
        record = await asyncio.to_thread(meta.read)
        keys = record.keys
        if request.key:
            if request.key not in keys:
                raise NotFoundError(
                    f"META has no key {request.key!r}",
                    hint="list the keys with 'basaltctl meta read'",
                )
            keys = {request.key: keys[request.key]}
        entries = [machine_pb2.MetaEntry(key=k, value=v) for k, v in sorted(keys.items())]
        answer = machine_pb2.MetaRead(metadata=self.meta(), entries=entries)
        return machine_pb2.MetaReadResponse(messages=[answer])

    async def MetaWrite(self, request: machine_pb2.MetaWriteRequest, context: Context) -> Any:
        from ..boot.meta import check_key, check_value

        check_key(request.key)
        check_value(request.key, request.value)
        meta = self._meta_partition()
        record = await asyncio.to_thread(meta.set_key, request.key, request.value)
        log.info("META key %s written (sequence %d)", request.key, record.sequence)
        return self.action(f"META key {request.key!r} written")

    async def MetaDelete(self, request: machine_pb2.MetaDeleteRequest, context: Context) -> Any:
        from ..boot.meta import check_key

        check_key(request.key)
        meta = self._meta_partition()
        if not await asyncio.to_thread(meta.delete_key, request.key):
            raise NotFoundError(
                f"META has no key {request.key!r}: nothing deleted",
                hint="list the keys with 'basaltctl meta read'",
            )
        log.info("META key %s deleted", request.key)
        return self.action(f"META key {request.key!r} deleted")

    async def WipeDisk(self, request: machine_pb2.WipeDiskRequest, context: Context) -> Any:
        from ..storage.wipe import Host, check_wipe, device_name

        device_name(request.device)  # a bad request is refused as such on any node
        if self.node.platform.mode.in_container:
            raise NoDisksError(
                "this node has no disks of its own (container mode): nothing is wiped",
                hint="wipe disks of metal nodes; a container node's storage is its directory",
            )
        method: WipeMethod = "zeroes" if request.method == machine_pb2.ZEROES else "fast"
        device = await asyncio.to_thread(check_wipe, request.device, Host())
        log.info("wiping /dev/%s (%s)", device.name, method)
        result = await asyncio.to_thread(_wipe, device.name, method, not device.partition)
        log.info("%s", result)
        return self.action(result)


def _wipe(name: str, method: WipeMethod, whole_disk: bool) -> str:
    from pathlib import Path

    from ..storage.wipe import wipe

    last = [time.monotonic()]

    def progress(done: int, total: int) -> None:
        now = time.monotonic()
        if now - last[0] >= PROGRESS_EVERY or done == total:
            last[0] = now
            log.info("wiping /dev/%s: %d%% (%d of %d MiB)", name, done * 100 // max(total, 1),
                     done >> 20, total >> 20)  # fmt: skip

    result = wipe(Path("/dev") / name, method, whole_disk=whole_disk, progress=progress)
    return f"{result.summary(name)} in {result.seconds:.1f} s"
