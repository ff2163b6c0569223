"""Real FAT32 ESP images for the repair tests, and the torn states a power cut leaves.

Images are made the way the imager makes the ESP (``mkfs.fat`` + ``mcopy``); files are
added and removed with mtools, whose FAT code frees clusters on a delete as a vfat
unlink does. A torn state is made by writing the directory entry or FAT words a cut
would have left, and ``fsck.fat -n`` judges the result. :class:`MtoolsMount` stands in
for mounting the ESP (the host kernel may have no vfat): the image's tree is copied out
on entry, and what changed is written back with mtools on exit.
"""

from __future__ import annotations

import contextlib
import filecmp
import os
import shutil
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from basalt.machined.boot.fat import FatVolume

ENV = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
TOOLS = ("mkfs.fat", "fsck.fat", "mcopy", "mdel", "mmd")


def require_tools() -> None:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed: run 'make image-deps' as root")


def _mtools(*argv: str) -> None:
    subprocess.run(argv, env=ENV, check=True, capture_output=True)


def make_image(image: Path, files: dict[str, bytes], size_mib: int = 40) -> Path:
    """A FAT32 image holding ``files`` (relative path -> content)."""
    require_tools()
    with open(image, "wb") as handle:
        handle.truncate(size_mib << 20)
    subprocess.run(
        ["mkfs.fat", "-F", "32", "-n", "EFI", "--invariant", str(image)],
        check=True,
        capture_output=True,
    )
    for path, data in files.items():
        put(image, path, data)
    return image


def put(image: Path, path: str, data: bytes) -> None:
    """Write ``path`` in the image (its directories made as needed), as a new file."""
    parts = path.split("/")
    made = ""
    for part in parts[:-1]:
        made = f"{made}/{part}"
        # mmd fails when the directory exists: that is fine
        subprocess.run(
            ["mmd", "-i", str(image), f"::{made}"], env=ENV, capture_output=True, check=False
        )
    local = image.with_name(f".put-{os.getpid()}")
    local.write_bytes(data)
    try:
        _mtools("mcopy", "-o", "-i", str(image), str(local), f"::/{path}")
    finally:
        local.unlink()


def _fat_words(image: Path) -> tuple[int, int, int]:
    """(offset of the first FAT, bytes per FAT, number of FATs)."""
    with open(image, "rb") as handle:
        boot = handle.read(512)
    sector, _, reserved, fats = struct.unpack_from("<HBHB", boot, 11)
    fat_sectors = struct.unpack_from("<I", boot, 36)[0]
    return reserved * sector, fat_sectors * sector, fats


def _set_fat(image: Path, cluster: int, value: int) -> None:
    """Set a FAT word in every FAT; the FSInfo free count becomes "unknown", as after a
    cut (Linux updates it only when it syncs the volume)."""
    first, size, count = _fat_words(image)
    with open(image, "r+b") as handle:
        for copy in range(count):
            handle.seek(first + copy * size + cluster * 4)
            handle.write(struct.pack("<I", value))
        handle.seek(48)
        (fsinfo,) = struct.unpack("<H", handle.read(2))
        handle.seek(fsinfo * 512 + 488)
        handle.write(b"\xff\xff\xff\xff")


def _set_start(image: Path, entry_offset: int, start: int, size: int) -> None:
    with open(image, "r+b") as handle:
        handle.seek(entry_offset + 20)
        handle.write(struct.pack("<H", start >> 16))
        handle.seek(entry_offset + 26)
        handle.write(struct.pack("<HI", start & 0xFFFF, size))


def second_name(image: Path, path: str, new_name: str) -> None:
    """A rename of ``path`` to ``new_name`` cut after the new name was written whole and
    before the old one was removed: two names, one cluster chain."""
    with FatVolume.open(image) as volume:
        old = volume.lookup(path)
        assert old is not None
        data = volume.read(old)
    new_path = f"{path.rpartition('/')[0]}/{new_name}"
    put(image, new_path, data)
    with FatVolume.open(image) as volume:
        new = volume.lookup(new_path)
        assert new is not None
    with FatVolume.open(image) as volume:
        own = volume.clusters(new)
    for cluster in own:  # the copy's own clusters go back: it is the same file
        _set_fat(image, cluster, 0)
    _set_start(image, new.entry_offset, old.start, old.size)


def empty_name(image: Path, path: str) -> None:
    """A rename cut after Linux wrote the new name, before its clusters and size."""
    put(image, path, b"")


def freed(image: Path, path: str) -> None:
    """A removal cut after the FAT freed the file's clusters, before its name went."""
    with FatVolume.open(image) as volume:
        found = volume.lookup(path)
        assert found is not None
        clusters = volume.clusters(found)
    for cluster in clusters:
        _set_fat(image, cluster, 0)


def read(image: Path, path: str) -> bytes | None:
    with FatVolume.open(image) as volume:
        found = volume.lookup(path)
        return None if found is None else volume.read(found)


def listing(image: Path, directory: str) -> list[str]:
    with FatVolume.open(image) as volume:
        found = volume.lookup(directory)
        return sorted(f.name for f in volume.listdir(found))


def fsck(image: Path) -> tuple[int, str]:
    """``fsck.fat -n`` (check only): its exit code and what it said past its banner."""
    done = subprocess.run(
        ["fsck.fat", "-n", str(image)], capture_output=True, text=True, check=False
    )
    lines = (done.stdout + done.stderr).splitlines()
    return done.returncode, "\n".join(line for line in lines if not line.startswith("fsck.fat"))


class MtoolsMount:
    """A stand-in for ``mount -t vfat``: ``(device, target)`` -> a context in which the
    image's tree is a directory at ``target``; on exit, removed files are deleted with
    ``mdel`` (freeing their clusters, as vfat does) and new or changed ones copied in."""

    def __init__(self) -> None:
        self.mounts = 0

    @contextlib.contextmanager
    def __call__(self, device: str, target: Path) -> Iterator[Path]:
        image = Path(device)
        self.mounts += 1
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        _mtools("mcopy", "-s", "-n", "-m", "-i", str(image), "::/*", str(target))
        before = target.with_name(target.name + ".before")
        shutil.rmtree(before, ignore_errors=True)
        shutil.copytree(target, before)
        try:
            yield target
        finally:
            self._write_back(image, before, target)
            shutil.rmtree(before)
            shutil.rmtree(target)

    @staticmethod
    def _files(root: Path) -> set[str]:
        return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}

    def _write_back(self, image: Path, before: Path, after: Path) -> None:
        old, new = self._files(before), self._files(after)
        for path in sorted(old - new):
            _mtools("mdel", "-i", str(image), f"::/{path}")
        for path in sorted(new):
            if path not in old or not filecmp.cmp(before / path, after / path, shallow=False):
                put(image, path, (after / path).read_bytes())
