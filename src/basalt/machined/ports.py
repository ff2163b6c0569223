"""The narrow interfaces a node's lower layers are handed by the composition root
(:mod:`basalt.machined.assemble`), so that they never import the layers above them.

The node (:mod:`.node`) holds one object of each; the sequences and the API call them.
Each Protocol lists exactly what its callers use, nothing more.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from basalt.machinery.boot import SlotName
    from basalt.machinery.images import VerifiedBundle


class Server(Protocol):
    """A gRPC server the node runs (the maintenance API, apid, trustd)."""

    async def start(self) -> None: ...

    async def stop(self, grace: float = 1.0) -> None: ...


class Wiring(Protocol):
    """What the boot sequence asks of the composition root: parts it may not build itself."""

    def start_controllers(self) -> None:
        """Build the node's controllers and start their engine (once)."""
        ...

    def maintenance_api(self) -> Server:
        """The maintenance API server (not started) of a node waiting for its config."""
        ...

    def register_services(self) -> None:
        """Register the services a configured node runs (apid, trustd, etcd, containerd,
        kubelet, the extensions' services) with the supervisor."""
        ...


class StagedSlots(Protocol):
    """A/B slot storage, as far as the boot sequence looks at it."""

    def staged(self) -> Path | None: ...


class Updates(Protocol):
    """The node's updater (:class:`basalt.machined.updater.UpdateController`), as the API
    asks it to check its channel now."""

    async def check(self, apply: bool) -> str: ...


class Upgrades(Protocol):
    """The node's A/B slots, upgrades, rollbacks and boot assessment
    (:class:`basalt.machined.upgrade.Upgrader`), as the sequences and the API use them."""

    @property
    def slots(self) -> StagedSlots | None: ...

    def require_slots(self) -> StagedSlots: ...

    async def on_boot(self) -> None: ...

    async def install_staged(self) -> bool: ...

    async def receive(
        self, chunks: AsyncIterator[bytes], label: str = ..., *, delta_index: str = ...
    ) -> tuple[Path, VerifiedBundle]: ...

    async def running_index(self) -> bytes | None: ...

    def check_trust(self, verified: VerifiedBundle, label: str) -> None: ...

    async def verify(self, path: Path, label: str = ...) -> VerifiedBundle: ...

    async def check_version(
        self, verified: VerifiedBundle, allow_downgrade: bool
    ) -> str | None: ...

    async def check_quorum(self, force: bool) -> str | None: ...

    async def cordon_drain(self, no_drain: bool, purpose: str = ...) -> list[str]: ...

    async def give_back_cordon(self, why: str) -> None: ...

    async def stage(self, upload: Path) -> None: ...

    async def install(self, verified: VerifiedBundle) -> tuple[SlotName, str]: ...

    async def check_rollback(self) -> None: ...

    async def rollback(self) -> str: ...

    def prepare_kexec(self) -> str: ...


class EtcdMember(Protocol):
    """This control plane's etcd member (:class:`basalt.machined.etcd.manager.EtcdManager`),
    as the reset sequence and the API's reset check use it."""

    def running(self) -> bool: ...

    async def check_leave(self, force: bool, destroy_last_member: bool = False) -> None: ...

    async def leave(self, force: bool, destroy_last_member: bool = False) -> str: ...
