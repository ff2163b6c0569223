"""A signed bundle re-encoded so that tarfile reads other bytes for a member than the
bytes stored at its extent (which the slot writers copy) is refused: sparse members,
GNU sparse PAX keys, PAX size overrides, stored sizes that differ from logical sizes,
and bytes after the tar's end. The oracle of each: refused, or every member's stored
bytes (what a slot writer installs) are exactly the signed bytes."""

from __future__ import annotations

import hashlib
import os
import tarfile
from pathlib import Path

import pytest

from basalt.machinery.images import (
    ImageFormatError,
    VerificationKey,
    VerifiedBundle,
    create_bundle,
    load_signing_key,
    verify_bundle,
    verify_tar_stream,
)
from basalt.machinery.images.errors import ImageVerificationError

ARCH = "x86_64"
#: The last payload member: 4 KiB of data, then 8 KiB of zeros (a sparse tail).
DATA = os.urandom(4096)
LAST = DATA + bytes(8192)
EVIL = (b"import os; os.system('id')  # not signed\n" * 300)[:8192]


@pytest.fixture
def members(tmp_path: Path, keypair: tuple[str, str]) -> list[tuple[str, bytes]]:
    """The members of a signed bundle, in order (the last is ``rootfs.squashfs``)."""
    src = tmp_path / "src"
    src.mkdir()
    files = {"initramfs": os.urandom(3000), "kernel": os.urandom(5000), "rootfs.squashfs": LAST}
    for name, data in files.items():
        (src / name).write_bytes(data)
    out = tmp_path / "signed.tar"
    key = load_signing_key(keypair[0])
    create_bundle(out, {n: src / n for n in files}, "0.2.0", "default", ARCH, key)
    with tarfile.open(out) as tar:
        found = [(m.name, tar.extractfile(m).read()) for m in tar]  # type: ignore[union-attr]
    assert found[-1][0] == "rootfs.squashfs"
    return found


def _pad(data: bytes) -> bytes:
    return data + bytes(-len(data) % tarfile.BLOCKSIZE)


def header(name: str, size: int, pax: dict[str, str] | None = None, kind: bytes = b"0") -> bytes:
    """A ustar header block storing ``size``, preceded by a PAX header with ``pax``."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.type = kind
    block = info.tobuf(format=tarfile.USTAR_FORMAT)
    if not pax:
        return block
    extended = tarfile.TarInfo._create_pax_generic_header(pax, tarfile.XHDTYPE, "utf-8")  # type: ignore[attr-defined]
    return bytes(extended) + block


def plain(members: list[tuple[str, bytes]]) -> bytes:
    return b"".join(header(n, len(d)) + _pad(d) for n, d in members)


END = bytes(2 * tarfile.BLOCKSIZE)


def write(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "reencoded.tar"
    path.write_bytes(data)
    return path


def installed_or_refused(path: Path, trusted: list[VerificationKey]) -> ImageVerificationError:
    """The oracle: verifying ``path`` (as a file and as a stream) is refused, or else the
    stored bytes of every member are the signed bytes (and the test fails)."""
    results: list[VerifiedBundle | ImageVerificationError] = []
    for stream in (False, True):
        try:
            if stream:
                with open(path, "rb") as source, open(path.with_suffix(".in"), "wb") as sink:
                    results.append(
                        verify_tar_stream(source, sink, path.with_suffix(".in"), trusted, ARCH)
                    )
            else:
                results.append(verify_bundle(path, trusted, ARCH))
        except ImageVerificationError as exc:
            results.append(exc)
    for result in results:
        if isinstance(result, VerifiedBundle):
            assert result.layout is not None
            raw = result.source.read_bytes()
            for f in result.manifest.files:
                extent = result.layout.extents[f.path]
                stored = raw[extent.offset : extent.offset + extent.size]
                assert hashlib.sha256(stored).hexdigest() == f.sha256, (
                    f"{f.path}: accepted, but a slot writer would copy unsigned bytes"
                )
            pytest.fail(f"{path.name} was accepted (its stored bytes happen to be the signed ones)")
    first, second = results
    assert isinstance(first, ImageFormatError), first
    assert isinstance(second, ImageFormatError) and second.problem == first.problem
    return first


def test_the_reencoder_makes_a_valid_bundle(tmp_path, members, trusted) -> None:
    verify_bundle(write(tmp_path, plain(members) + END), trusted, ARCH)


def test_a_sparse_member_hiding_bytes_after_the_end_is_refused(tmp_path, members, trusted):
    """The bypass: the last member is sparse (its 8 KiB of zeros a hole), so tarfile hashes
    data + zeros; its extent runs over the bytes after the archive's end, which tarfile never
    reads (an invalid header ends its iteration silently)."""
    *head, (name, _) = members
    sparse = {"GNU.sparse.map": f"0,{len(DATA)}", "GNU.sparse.size": str(len(LAST))}
    data = plain(head) + header(name, len(DATA), sparse) + _pad(DATA) + EVIL + END
    error = installed_or_refused(write(tmp_path, data), trusted)
    assert "sparse" in error.problem


@pytest.mark.parametrize(
    "keys",
    [
        {"GNU.sparse.map": f"0,{len(LAST)}", "GNU.sparse.size": str(len(LAST))},
        {
            "GNU.sparse.size": str(len(LAST)),
            "GNU.sparse.numblocks": "1",
            "GNU.sparse.offset": "0",
            "GNU.sparse.numbytes": str(len(LAST)),
        },
        {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.realsize": str(len(LAST))},
        {"GNU.sparse.name": "rootfs.squashfs"},
        {"GNU.sparse.realsize": str(len(LAST))},
    ],
    ids=["0.1-map", "0.0", "1.0", "name-only", "realsize-only"],
)
def test_gnu_sparse_pax_keys_are_refused(tmp_path, members, trusted, keys) -> None:
    *head, (name, data) = members
    body = plain(head) + header(name, len(data), keys) + _pad(data) + END
    assert "sparse" in installed_or_refused(write(tmp_path, body), trusted).problem


def test_an_old_gnu_sparse_member_is_refused(tmp_path, members, trusted) -> None:
    *head, (name, data) = members
    body = plain(head) + header(name, len(data), kind=tarfile.GNUTYPE_SPARSE) + _pad(data) + END
    installed_or_refused(write(tmp_path, body), trusted)


def test_a_pax_size_override_is_refused(tmp_path, members, trusted) -> None:
    """Same size in PAX and in the header: harmless here, but a reader that ignores PAX
    sees another file; refused."""
    *head, (name, data) = members
    body = plain(head) + header(name, len(data), {"size": str(len(data))}) + _pad(data) + END
    assert "PAX size" in installed_or_refused(write(tmp_path, body), trusted).problem


def test_a_stored_size_other_than_the_logical_size_is_refused(tmp_path, members, trusted):
    """The header stores 512 bytes, PAX says the whole file: tarfile reads the whole file."""
    *head, (name, data) = members
    body = plain(head) + header(name, 512, {"size": str(len(data))}) + _pad(data) + END
    installed_or_refused(write(tmp_path, body), trusted)


@pytest.mark.parametrize(
    "tail",
    [EVIL, END + EVIL, END + bytes(tarfile.RECORDSIZE) + b"x", bytes(1 << 20)],
    ids=["instead-of-end", "after-end", "after-padding", "megabyte-of-zeros"],
)
def test_bytes_after_the_end_of_the_tar_are_refused(tmp_path, members, trusted, tail) -> None:
    body = plain(members) + tail
    error = installed_or_refused(write(tmp_path, body), trusted)
    assert "after the last member" in error.problem


@pytest.mark.parametrize("tail", [b"", END, END + bytes(tarfile.RECORDSIZE - 1024)])
def test_the_end_blocks_and_record_padding_are_accepted(tmp_path, members, trusted, tail):
    verify_bundle(write(tmp_path, plain(members) + tail), trusted, ARCH)
    with open(tmp_path / "reencoded.tar", "rb") as source, open(tmp_path / "in", "wb") as sink:
        verify_tar_stream(source, sink, tmp_path / "in", trusted, ARCH)
    assert (tmp_path / "in").read_bytes() == (tmp_path / "reencoded.tar").read_bytes()
