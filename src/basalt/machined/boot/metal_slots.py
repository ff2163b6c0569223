"""Metal storage for A/B slots: the ESP's boot entries, the slot partitions and META.

The boot state *is* the ``basalt-*.conf`` names in ``loader/entries`` on the ESP
(:func:`.codecs.state_from_entries`): systemd-boot counts tries by renaming them, and
boots the first in its order (no ``default`` line). Which slot runs comes from
``basalt.slot=`` on the kernel command line (the entry passed it; the initramfs mounted
that slot's partition). Reasons (why a slot stopped booting) and the pending upgrade
live in META (:mod:`.meta`, two checksummed copies).

A slot is its partition ``BASALT-<SLOT>`` (the squashfs root, raw) and its kernel and
initrd in ``/EFI/basalt/<SLOT>/`` on the ESP. Writing one follows the order of
:func:`.codecs.entry_changes`: the slot's old entry is removed first (so a half-written
slot never boots), the files are written and synced (copied from where verification
found them in the bundle, which must be unchanged since: see
:class:`~basalt.machinery.images.verify.TarLayout`), and only then is the new entry
(``+3``, newest generation: it sorts first) created. Marking good renames the entry
that booted, which systemd-boot names in ``LoaderBootCountPath``.

An upgrade or a rollback may skip the firmware (:meth:`MetalSlots.prepare_kexec`, ADR
0007): machined loads the kernel of the entry systemd-boot would boot first, with that
entry's options, and counts the try as systemd-boot would (the same rename). The kernel
command line then names the entry as counted (``basalt.entry=``), because the
``LoaderBootCountPath`` left in the firmware's memory is the previous boot's.

The ESP is mounted (vfat, ``dirsync``) only while it is read or written, and unmounted
afterwards: an unmount flushes everything, and a power cut finds it clean most of the
time. What a cut in the middle of a FAT rename or write leaves (two names for one entry,
a temporary file, a name whose clusters are free) is repaired at boot by :meth:`repair`
(:mod:`.esp_repair` decides, :mod:`.esp_check` reads the device and carries it out).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from basalt.machinery.boot.assessment import BootState, Slot, SlotHealth, SlotName
from basalt.machinery.boot.codecs import EntryChange, entry_changes, state_from_entries
from basalt.machinery.boot.entries import BasaltEntry, LoaderEntry, loader_order
from basalt.machinery.boot.esp import (
    INITRD_NAME,
    KERNEL_NAME,
    Esp,
    EspError,
    entry_boot,
    entry_options,
    entry_text,
)
from basalt.machinery.boot.esp import slot_dir as esp_slot_dir
from basalt.machinery.boot.slots import SlotWriteError, keep_copy, unchanged
from basalt.machinery.fileio import copy_range
from basalt.machinery.images.payload import CHUNKS_NAME, INITRAMFS, KERNEL, ROOTFS

from ..sys import kexec
from ..sys.cmdline import CMDLINE, kernel_arg
from .esp_check import repair_device, repair_directory
from .esp_repair import EspPlan
from .meta import Meta, MetaRecord, PendingUpgrade

if TYPE_CHECKING:
    from basalt.machinery.images import Extent, VerifiedBundle
    from basalt.machinery.images.chunks import ChunkIndex
    from basalt.machinery.images.delta import Held

log = logging.getLogger(__name__)

STAGED_BUNDLE = "bundle.tar"
#: Kernel argument naming the entry a kexec booted (as counted): LoaderBootCountPath's role.
KEXEC_ENTRY_ARG = "basalt.entry"
#: Where each payload file goes: the ESP (a path below the slot's directory) or the partition.
_ESP_PAYLOAD = {KERNEL: KERNEL_NAME, INITRAMFS: INITRD_NAME}


@dataclass(frozen=True)
class MetalDevices:
    """Where a metal node's slots live. ``esp_device`` None: ``esp_dir`` is used as it is
    (tests, or an ESP mounted by someone else)."""

    esp_dir: Path
    meta: Path
    partitions: dict[SlotName, Path]
    efivars: Path
    staged_dir: Path
    esp_device: str | None = None
    cmdline: Path = CMDLINE


class MetalSlots:
    """The A/B slots of a metal node booted from a Basalt disk."""

    def __init__(
        self,
        devices: MetalDevices,
        booted: SlotName,
        mounter: Callable[[str, Path], contextlib.AbstractContextManager[object]] | None = None,
    ) -> None:
        self.devices = devices
        self.booted = booted
        self.meta = Meta(devices.meta)
        self._mounter = mounter
        self._lock = threading.Lock()

    @property
    def where(self) -> str:
        return f"the ESP's loader/entries and META ({self.devices.meta})"

    @contextlib.contextmanager
    def esp(self) -> Iterator[Esp]:
        """The ESP, mounted for the duration of the block (one user at a time)."""
        with self._lock:
            device = self.devices.esp_device
            if device is None or self._mounter is None:
                yield Esp(self.devices.esp_dir)
                return
            with self._mounter(device, self.devices.esp_dir):
                yield Esp(self.devices.esp_dir)

    def repair(self, thorough: bool = True) -> EspPlan:
        """Repair what a power cut left on the ESP (:mod:`.esp_repair`): a second name for
        a slot's entry, temporary files, names whose clusters are free. Not ``thorough``
        (at boot), the chains of kernels and initrds are followed only next to a leftover
        temporary file. Raises EspError (or FatError) when the ESP cannot be checked."""
        with self._lock:
            device = self.devices.esp_device
            if device is None or self._mounter is None:
                return repair_directory(self.devices.esp_dir, self.booted)
            mounter, target = self._mounter, self.devices.esp_dir
            return repair_device(
                device, self.booted, lambda: mounter(device, target), target, thorough
            )

    # -- the boot state ----------------------------------------------------------------------
    def _state(self, esp: Esp, record: MetaRecord) -> BootState | None:
        names = _one_per_slot(esp.entries())
        if not names:
            return None
        return state_from_entries(names, self.booted, record.reasons)

    def load(self) -> BootState | None:
        """The state the entries describe (None when there are none); BootEntryError when
        they are not Basalt's or inconsistent."""
        record = self.meta.read()
        with self.esp() as esp:
            return self._state(esp, record)

    def save(self, state: BootState) -> None:
        """Make the ESP's entries and META say ``state``."""
        record = self.meta.read()
        with self.esp() as esp:
            current = self._state(esp, record)
            if current is None:
                raise SlotWriteError(f"no boot entries on the ESP ({esp.entries_dir})")
            for change in entry_changes(current, state):
                self._apply(esp, change, state)
        pending = next(
            (
                PendingUpgrade(s.name, s.version, s.generation)
                for s in state.slots
                if s.health is SlotHealth.PENDING and s.version is not None
            ),
            None,
        )
        reasons = {s.name: s.reason for s in state.slots if s.reason}
        if (reasons, pending) != (record.reasons, record.pending):
            self.meta.write(MetaRecord(reasons, pending))

    def _apply(self, esp: Esp, change: EntryChange, state: BootState) -> None:
        if change.old is not None and change.new is not None:
            old = change.old
            if change.slot is self.booted:
                old = self._booted_entry_file(old)
            esp.rename_entry(old, change.new)
            log.info("boot entry %s renamed to %s", old, change.new)
        elif change.old is not None:
            esp.remove_entry(change.old)
            log.info("boot entry %s removed", change.old)
        elif change.new is not None:
            slot = state.slot(change.slot)
            assert slot.version is not None
            missing = esp.missing_files(change.slot.value)
            if missing:
                raise SlotWriteError(
                    f"slot {change.slot} has no {', '.join(missing)} on the ESP: "
                    "its entry is not created"
                )
            text = entry_text(slot.version, change.slot.value, self._options(esp, state))
            esp.write_entry(change.new, text)
            log.info("boot entry %s created", change.new)

    def _booted_entry_file(self, expected: str) -> str:
        """The running slot's entry file: systemd-boot's LoaderBootCountPath when it set
        one (the counted entry it booted, after counting), checked against the ESP."""
        from ..sys.efivars import boot_count_entry

        counted = kexec_entry(self.devices.cmdline)
        if counted is None:  # booted by the firmware, which said what it counted
            counted = boot_count_entry(self.devices.efivars)
        elif LoaderEntry.parse(counted).tries_left is None:
            counted = None  # kexec into an entry without a counter
        if counted is None or counted.lower() == expected.lower():
            return counted or expected
        log.warning(
            "the boot names entry %s, the ESP holds %s for slot %s: renaming the latter",
            counted,
            expected,
            self.booted,
        )
        return expected

    def _options(self, esp: Esp, state: BootState) -> str:
        """The running slot's kernel options (the image's, and any the entry gained)."""
        running = state.slot(self.booted)
        entry = running.entry()
        names = {BasaltEntry.parse(n).slot: n for n in esp.entries()}
        name = names.get(self.booted.value) or (entry.filename if entry else None)
        if name is None:
            raise EspError(f"the running slot {self.booted} has no boot entry to copy options from")
        return entry_options(esp.read_entry(name))

    # -- kexec -------------------------------------------------------------------------------
    def prepare_kexec(
        self,
        load: Callable[[Path, Path | None, str], None] | None = None,
        unload: Callable[[], None] | None = None,
    ) -> str:
        """Load, for a kexec reboot, what the firmware would boot next: the first entry in
        systemd-boot's order, its kernel and initrd, its options plus ``basalt.entry=``;
        then count its try as systemd-boot would. Returns the entry's name as counted.

        Raises KexecError or EspError (and BasaltError for entries that are not
        Basalt's); then no entry was renamed and nothing stays loaded, and the node
        reboots through the firmware, which chooses the same entry."""
        load = load or kexec.load
        unload = unload or kexec.unload
        with self.esp() as esp:
            names = esp.entries()
            if not names:
                raise EspError(f"no boot entries on the ESP ({esp.entries_dir})")
            first = LoaderEntry.parse(loader_order(names)[0])
            if first.tries_left == 0:
                raise kexec.KexecError(
                    f"{first.filename} has no tries left: the firmware chooses what boots"
                )
            BasaltEntry.parse(first.filename)  # only Basalt's entries are booted this way
            counted = first.next_name()
            kernel, initrd, options = entry_boot(esp.read_entry(first.filename))
            cmdline = f"{options} {KEXEC_ENTRY_ARG}={counted}".strip()
            load(esp.path(kernel), esp.path(initrd) if initrd else None, cmdline)
            if counted != first.filename:
                try:
                    esp.rename_entry(first.filename, counted)
                except OSError as exc:
                    unload()
                    raise EspError(
                        f"counting the try of {first.filename} failed: {exc.strerror}"
                    ) from None
                log.info(
                    "boot entry %s renamed to %s (kexec counts its try)", first.filename, counted
                )
        return counted

    # -- slot contents -----------------------------------------------------------------------
    def missing(self, slot: Slot) -> str | None:
        """Why ``slot``'s image cannot boot (its files are gone), or None."""
        partition = self.devices.partitions.get(slot.name)
        if partition is None or not partition.exists():
            return f"its partition BASALT-{slot.name.value.upper()} is missing"
        with self.esp() as esp:
            gone = esp.missing_files(slot.name.value)
        return f"{', '.join(gone)} missing from the ESP" if gone else None

    def write(self, name: SlotName, bundle: VerifiedBundle) -> None:
        """Write a verified tar bundle to slot ``name``: the root to its partition, kernel
        and initrd to the ESP. The bytes are copied from where verification found them,
        without hashing them again, once the file's seal shows it unchanged since."""
        if name is self.booted:
            raise SlotWriteError(f"slot {name} is running: it cannot be written")
        layout = bundle.layout
        if bundle.form != "tar" or layout is None:
            raise SlotWriteError(f"{bundle.source}: only tar bundles can be written to a slot")
        partition = self.devices.partitions.get(name)
        if partition is None:
            raise SlotWriteError(f"this disk has no partition BASALT-{name.value.upper()}")
        rootfs = layout.extents[ROOTFS]  # verify_bundle(required=...) checked it is there
        room = _device_size(partition)
        if rootfs.size > room:
            raise SlotWriteError(
                f"{ROOTFS} is {rootfs.size} bytes; partition BASALT-{name.value.upper()} "
                f"holds {room}",
                hint="build a smaller image, or reinstall with a newer layout",
            )
        with self.esp() as esp:
            left = [n for n in esp.entries() if BasaltEntry.parse(n).slot == name.value]
            if left:
                raise SlotWriteError(
                    f"slot {name} still has a boot entry ({', '.join(left)}): it must be "
                    "removed before the slot is written",
                    hint="an interrupted rename leaves a second name for one entry: machined "
                    "removes it at boot (see the node's boot events); reboot the node",
                )
            # The slot's chunk index goes first and comes back last: one that is there
            # always describes the bytes in the slot.
            index = esp.root / esp_slot_dir(name.value) / CHUNKS_NAME
            index.unlink(missing_ok=True)
            with open(bundle.source, "rb") as source:
                unchanged(bundle, source.fileno())
                _write_partition(partition, source.fileno(), rootfs)
                for payload, file_name in _ESP_PAYLOAD.items():
                    target = esp.root / esp_slot_dir(name.value) / file_name
                    _write_esp_file(esp, target, source.fileno(), layout.extents[payload])
                if CHUNKS_NAME in layout.extents:
                    _write_esp_file(esp, index, source.fileno(), layout.extents[CHUNKS_NAME])
                unchanged(bundle, source.fileno())  # and not while it was copied

    # -- what a delta upload may leave out (docs/adr/0026) -------------------------------------
    def running_index(self) -> bytes | None:
        """The chunk index of the running slot (``chunks.json`` beside its kernel), or None
        when it has none, or one that does not fit what the slot holds."""
        with self.esp() as esp:
            found = self._running_index(esp)
        return None if found is None else found[0]

    def _running_index(self, esp: Esp) -> tuple[bytes, ChunkIndex] | None:
        """The running slot's index as stored and as parsed, when it fits the slot."""
        from basalt.machinery.images.chunks import ChunkIndexError, parse_index

        where = esp.root / esp_slot_dir(self.booted.value)
        try:
            data = (where / CHUNKS_NAME).read_bytes()
            index = parse_index(data)
        except FileNotFoundError:
            return None
        except (OSError, ChunkIndexError) as exc:
            log.warning(
                "slot %s's chunk index is not usable (%s): uploads go whole", self.booted, exc
            )
            return None
        sizes = {
            p: (where / f).stat().st_size for p, f in _ESP_PAYLOAD.items() if (where / f).exists()
        }
        partition = self.devices.partitions.get(self.booted)
        if partition is not None and ROOTFS in index.files:
            sizes[ROOTFS] = _device_size(partition)
        for payload in index.files:
            size = sizes.get(payload)
            if (
                size is None
                or index.size_of(payload) > size
                or (payload != ROOTFS and index.size_of(payload) != size)
            ):
                log.warning(
                    "slot %s's chunk index does not fit its %s: uploads go whole",
                    self.booted,
                    payload,
                )
                return None
        return data, index

    @contextlib.contextmanager
    def holding(self, index_sha256: str) -> Iterator[Held]:
        """Where each chunk of the running slot lies (its partition, its kernel and initrd
        on the ESP, kept mounted for the block), when its index is the one whose sha256
        a delta was made against; SlotWriteError when it is not."""
        import hashlib

        from basalt.machinery.images.delta import held_chunks

        with self.esp() as esp, contextlib.ExitStack() as stack:
            found = self._running_index(esp)
            if found is None or hashlib.sha256(found[0]).hexdigest() != index_sha256:
                raise SlotWriteError(
                    f"the delta upload was made against a chunk index that the running slot "
                    f"{self.booted} does not have ("
                    + ("it has none" if found is None else "it has another")
                    + ")",
                    hint="upgrade again (basaltctl asks the node for its index), or upload the "
                    "bundle whole with --full-upload",
                )
            where = esp.root / esp_slot_dir(self.booted.value)
            paths = {p: where / f for p, f in _ESP_PAYLOAD.items()}
            paths[ROOTFS] = self.devices.partitions[self.booted]
            index = found[1]
            fds = {
                name: stack.enter_context(open(paths[name], "rb", buffering=0)).fileno()
                for name in index.files
            }
            yield held_chunks(index, fds)

    # -- staged upgrades ---------------------------------------------------------------------
    @property
    def staged_bundle(self) -> Path:
        return self.devices.staged_dir / STAGED_BUNDLE

    def stage(self, upload: Path) -> None:
        """Keep an uploaded bundle (on EPHEMERAL) for the next boot."""
        keep_copy(upload, self.staged_bundle)

    def staged(self) -> Path | None:
        return self.staged_bundle if self.staged_bundle.is_file() else None

    def clear_staged(self) -> None:
        shutil.rmtree(self.devices.staged_dir, ignore_errors=True)


def kexec_entry(cmdline: Path = CMDLINE) -> str | None:
    """The entry file a kexec booted (``basalt.entry=``), None after a firmware boot."""
    return kernel_arg(KEXEC_ENTRY_ARG, cmdline) or None


def _one_per_slot(names: list[str]) -> list[str]:
    """One entry per slot. A power cut in the middle of a FAT rename can leave the old and
    the new name; :meth:`MetalSlots.repair` removes one at boot. Until then (it could not
    run), the name systemd-boot boots first is the slot's state."""
    by_slot: dict[str, list[str]] = {}
    for name in loader_order(names):
        by_slot.setdefault(BasaltEntry.parse(name).slot, []).append(name)
    for slot, found in by_slot.items():
        if len(found) > 1:
            log.warning(
                "slot %s has %d boot entries (%s): an interrupted rename; using %s",
                slot,
                len(found),
                ", ".join(found),
                found[0],
            )
    return sorted(found[0] for found in by_slot.values())


def _device_size(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def _write_partition(partition: Path, source: int, extent: Extent) -> None:
    """Write the root image to the start of ``partition`` and fsync."""
    try:
        with open(partition, "r+b", buffering=0) as out:
            copy_range(source, extent.offset, extent.size, out.fileno())
            os.fsync(out.fileno())
    except EOFError as exc:
        raise SlotWriteError(f"the bundle's {ROOTFS} is cut short: {exc}") from None
    except OSError as exc:
        raise SlotWriteError(f"{partition}: writing the root failed: {exc.strerror}") from None


def _write_esp_file(esp: Esp, target: Path, source: int, extent: Extent) -> None:
    """Write ``target`` on the ESP through a temporary file (it replaces the old one whole)."""
    try:
        with esp.replacing(target) as handle:
            copy_range(source, extent.offset, extent.size, handle.fileno())
    except EOFError as exc:
        raise SlotWriteError(f"{target.name}: the bundle is cut short: {exc}") from None
    except EspError as exc:
        raise SlotWriteError(f"{target.name}: {exc}") from None
    except OSError as exc:
        raise SlotWriteError(f"ESP {target}: writing failed: {exc.strerror}") from None


def of_machine(root: Path, ephemeral: Path, sys_block: Path | None = None) -> MetalSlots | None:
    """The slots of this machine when it booted from a Basalt disk, else None."""
    from basalt.machinery.disk.names import EFI, META, slot_partition

    from ..storage.partitions import SYS_BLOCK, find_partition, kernel_slot
    from ..sys.efivars import EFIVARS
    from .install_entries import mounted_esp

    blocks = sys_block or SYS_BLOCK
    slot = kernel_slot(CMDLINE).lower()
    if slot not in ("a", "b"):
        return None
    esp, meta = find_partition(EFI, blocks), find_partition(META, blocks)
    if esp is None or meta is None:
        return None
    partitions = {}
    for name in SlotName:
        device = find_partition(slot_partition(name.value), blocks)
        if device is not None:
            partitions[name] = Path(device)
    devices = MetalDevices(
        esp_dir=root / "run" / "basalt" / "esp",
        meta=Path(meta),
        partitions=partitions,
        efivars=EFIVARS,
        staged_dir=ephemeral / "lib" / "basalt" / "staged",
        esp_device=esp,
    )
    return MetalSlots(devices, SlotName(slot), mounted_esp)
