"""Upgrade bundles: create and verify, each refusal with exactly its error, flat memory.

Every refusal is checked two ways: the exception is exactly the class of the failed
check (not merely a subclass of ImageVerificationError), and nothing under the test's
directory changed.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import stat
import tarfile
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest

from basalt.cli.main import main
from basalt.machinery.config import bundle_from_raw
from basalt.machinery.errors import BasaltError
from basalt.machinery.images import (
    BundleInputError,
    ImageArchitectureError,
    ImageFormatError,
    ImageManifestError,
    ImagePayloadError,
    ImageSignatureError,
    ImageVerificationError,
    SigningKeyError,
    UnknownSigningKeyError,
    UnsignedImageError,
    VerificationKey,
    create_bundle,
    generate_signing_key,
    key_id,
    load_signing_key,
    parse_manifest,
    trusted_keys_from_config,
    verification_key,
    verify_bundle,
    verify_tar_stream,
)
from basalt.machinery.images._stream import FileSeal
from basalt.machinery.images.manifest import Manifest, canonical_json

CREATED = dt.datetime(2025, 1, 31, 12, 0, tzinfo=dt.UTC)
FORMS = ["directory", "tar"]


@pytest.fixture
def payload(tmp_path: Path) -> dict[str, Path]:
    src = tmp_path / "src"
    src.mkdir()
    files = {
        "kernel": os.urandom(300_000),
        "initramfs": os.urandom(70_000),
        "rootfs.squashfs": os.urandom(1_500_000),
    }
    for name, data in files.items():
        (src / name).write_bytes(data)
    return {name: src / name for name in files}


def make(
    tmp_path: Path,
    payload: dict[str, Path],
    keypair: tuple[str, str],
    form: str,
    *,
    arch: str = "x86_64",
    name: str = "bundle",
) -> Path:
    out = tmp_path / (f"{name}.tar" if form == "tar" else name)
    create_bundle(
        out, payload, "0.2.0", "default", arch, load_signing_key(keypair[0]), created=CREATED
    )
    return out


def tree(root: Path) -> dict[str, tuple[int, int, bytes]]:
    found = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        content = path.read_bytes() if stat.S_ISREG(info.st_mode) else b""
        found[str(path.relative_to(root))] = (info.st_mode, info.st_mtime_ns, content)
    return found


def refused(
    expected: type[ImageVerificationError],
    bundle: Path,
    keys: list[VerificationKey],
    arch: str = "x86_64",
    *,
    root: Path | None = None,
) -> ImageVerificationError:
    """Verify, expect exactly ``expected``, and check that nothing was written. A tar
    file is also verified as a stream (as a node receives it): the same error."""
    watched = root or bundle.parent
    before = tree(watched)
    with pytest.raises(ImageVerificationError) as caught:
        verify_bundle(bundle, keys, arch)
    assert type(caught.value) is expected, caught.value.render()
    assert tree(watched) == before
    rendered = caught.value.render()
    assert f"{expected.check} check failed" in rendered and "hint:" in rendered
    if bundle.is_file():
        with open(bundle, "rb") as source, pytest.raises(ImageVerificationError) as streamed:
            verify_tar_stream(source, io.BytesIO(), bundle, keys, arch, label=str(bundle))
        assert streamed.value.render() == rendered
    return caught.value


# -- tar surgery ----------------------------------------------------------------------------------


def rewrite_tar(
    source: Path, target: Path, edit: Callable[[list[tuple[tarfile.TarInfo, bytes]]], None]
) -> Path:
    with tarfile.open(source) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]  # type: ignore[union-attr]
    edit(members)
    with tarfile.open(target, "w", format=tarfile.PAX_FORMAT) as out:
        for info, data in members:
            info.size = len(data) if info.isreg() else 0
            out.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return target


def member(name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = ""):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    return info, data


# -- the happy path -------------------------------------------------------------------------------


@pytest.mark.parametrize("form", FORMS)
def test_create_and_verify_round_trip(tmp_path, payload, keypair, trusted, form) -> None:
    bundle = make(tmp_path, payload, keypair, form)
    verified = verify_bundle(bundle, trusted, "x86_64")
    assert verified.form == form
    assert (verified.version, verified.schematic_id, verified.architecture) == (
        "0.2.0",
        "default",
        "x86_64",
    )
    assert verified.key.key_id == key_id(load_signing_key(keypair[0]))
    assert verified.manifest.created == "2025-01-31T12:00:00Z"
    listed = {f.path: f for f in verified.manifest.files}
    assert sorted(listed) == sorted([*payload, "chunks.json"])  # a root: indexed (chunks.py)
    for name, path in payload.items():
        assert listed[name].size == path.stat().st_size


def test_a_tar_verified_as_a_stream_is_copied_whole_with_its_layout(
    tmp_path, payload, keypair, trusted
) -> None:
    bundle = make(tmp_path, payload, keypair, "tar")
    from_file = verify_bundle(bundle, trusted, "x86_64")
    copy = tmp_path / "received.tar"
    with open(bundle, "rb") as source, open(copy, "wb") as sink:
        streamed = verify_tar_stream(source, sink, copy, trusted, "x86_64")
    assert copy.read_bytes() == bundle.read_bytes()
    assert streamed.source == copy and streamed.manifest == from_file.manifest
    assert streamed.layout is not None and from_file.layout is not None
    assert streamed.layout.extents == from_file.layout.extents
    with tarfile.open(copy) as tar:
        for info in tar.getmembers():
            extent = streamed.layout.extents[info.name]
            assert (extent.offset, extent.size) == (info.offset_data, info.size)
    with open(copy, "rb") as handle:
        assert streamed.layout.seal == FileSeal.of(handle.fileno())


def test_a_stream_stops_at_a_bad_signature_without_reading_the_payload(
    tmp_path, payload, keypair
) -> None:
    bundle = make(tmp_path, payload, keypair, "tar")
    other = [verification_key(generate_signing_key()[1], "other")]
    with open(bundle, "rb") as source:
        with pytest.raises(UnknownSigningKeyError):
            verify_tar_stream(source, io.BytesIO(), bundle, other, "x86_64")
        read = source.tell()
    assert read <= 512 * 1024 < bundle.stat().st_size


def test_bundles_are_reproducible(tmp_path, payload, keypair, monkeypatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    key = load_signing_key(keypair[0])
    for name in ("one.tar", "two.tar", "one", "two"):
        create_bundle(tmp_path / name, payload, "0.2.0", "default", "x86_64", key)
    assert (tmp_path / "one.tar").read_bytes() == (tmp_path / "two.tar").read_bytes()
    assert tree(tmp_path / "one") == tree(tmp_path / "two")  # modes, times and bytes
    manifest = parse_manifest((tmp_path / "one" / "manifest.json").read_bytes())
    assert manifest.created == "2023-11-14T22:13:20Z"
    with tarfile.open(tmp_path / "one.tar") as tar:
        assert tar.getnames()[:2] == ["manifest.json", "manifest.sig"]
        assert {(m.mtime, m.uid, m.gid, m.mode) for m in tar.getmembers()} == {
            (1700000000, 0, 0, 0o644)
        }


def test_manifest_is_canonical_json(tmp_path, payload, keypair) -> None:
    bundle = make(tmp_path, payload, keypair, "directory")
    data = (bundle / "manifest.json").read_bytes()
    raw = json.loads(data)
    assert data == json.dumps(raw, sort_keys=True, separators=(",", ":")).encode()
    assert set(raw) == {
        "architecture",
        "created",
        "files",
        "formatVersion",
        "schematicId",
        "version",
    }
    assert [f["path"] for f in raw["files"]] == sorted([*payload, "chunks.json"])
    signature = json.loads((bundle / "manifest.sig").read_bytes())
    assert signature["algorithm"] == "ed25519"
    assert signature["keyId"] == key_id(load_signing_key(keypair[0]))


def test_create_refuses_bad_inputs_and_writes_nothing(tmp_path, payload, keypair) -> None:
    key = load_signing_key(keypair[0])
    cases = [
        ({**payload, "../evil": payload["kernel"]}, "0.2.0", "x86_64", "not a plain file name"),
        ({**payload, "manifest.json": payload["kernel"]}, "0.2.0", "x86_64", "reserved"),
        (payload, "0.2.0+1", "x86_64", "no '+'"),
        (payload, "0.2.0", "riscv64", "architecture 'riscv64'"),
        ({"kernel": tmp_path / "missing"}, "0.2.0", "x86_64", "does not exist"),
        ({}, "0.2.0", "x86_64", "no payload files"),
    ]
    for files, version, arch, problem in cases:
        before = tree(tmp_path)
        with pytest.raises(BundleInputError, match=problem.replace("+", r"\+")):
            create_bundle(tmp_path / "b.tar", files, version, "default", arch, key)
        assert tree(tmp_path) == before
    make(tmp_path, payload, keypair, "tar")
    with pytest.raises(BundleInputError, match="already exists"):
        make(tmp_path, payload, keypair, "tar")


def test_create_overwrites_only_when_asked(tmp_path, payload, keypair, trusted) -> None:
    key = load_signing_key(keypair[0])
    for out in (tmp_path / "b.tar", tmp_path / "b"):
        create_bundle(out, payload, "0.2.0", "default", "x86_64", key)
        create_bundle(out, payload, "0.3.0", "default", "x86_64", key, overwrite=True)
        assert verify_bundle(out, trusted, "x86_64").version == "0.3.0"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "b.tar", "src"]


# -- each refusal, exactly its error --------------------------------------------------------------


@pytest.mark.parametrize("form", FORMS)
def test_unsigned_bundle(tmp_path, payload, keypair, trusted, form) -> None:
    bundle = make(tmp_path, payload, keypair, form)
    if form == "directory":
        (bundle / "manifest.sig").unlink()
    else:
        bundle = rewrite_tar(bundle, tmp_path / "unsigned.tar", lambda ms: ms.pop(1))
    error = refused(UnsignedImageError, bundle, trusted)
    assert "not signed" in error.message


@pytest.mark.parametrize("form", FORMS)
def test_unknown_signing_key(tmp_path, payload, keypair, trusted, form) -> None:
    other_private, _ = generate_signing_key()
    bundle = make(tmp_path, payload, (other_private, ""), form)
    error = refused(UnknownSigningKeyError, bundle, trusted)
    assert isinstance(error, UnknownSigningKeyError)
    assert error.key_id == key_id(load_signing_key(other_private))
    assert error.trusted == [trusted[0].key_id]
    assert error.key_id in error.message and trusted[0].key_id in error.message
    error = refused(UnknownSigningKeyError, bundle, [])
    assert "trusted key ids: (none)" in error.message


@pytest.mark.parametrize("form", FORMS)
def test_tampered_byte(tmp_path, payload, keypair, trusted, form) -> None:
    bundle = make(tmp_path, payload, keypair, form)
    if form == "directory":
        target, offset = bundle / "rootfs.squashfs", 1_000_000
    else:
        with tarfile.open(bundle) as tar:
            offset = tar.getmember("rootfs.squashfs").offset_data + 1_000_000
        target = bundle
    data = bytearray(target.read_bytes())
    data[offset] ^= 0x01
    target.write_bytes(bytes(data))
    error = refused(ImagePayloadError, bundle, trusted)
    assert isinstance(error, ImagePayloadError)
    assert error.path == "rootfs.squashfs" and "tampered" in error.message


@pytest.mark.parametrize("form", FORMS)
def test_truncated_file(tmp_path, payload, keypair, trusted, form) -> None:
    bundle = make(tmp_path, payload, keypair, form)
    if form == "directory":
        with open(bundle / "kernel", "r+b") as handle:
            handle.truncate(1000)
        name = "kernel"
    else:  # a download cut short: the tar file ends inside the last member
        with tarfile.open(bundle) as tar:
            last = tar.getmembers()[-1]
        with open(bundle, "r+b") as handle:
            handle.truncate(last.offset_data + 5000)
        name = last.name
    error = refused(ImagePayloadError, bundle, trusted)
    assert isinstance(error, ImagePayloadError)
    assert error.path == name and "truncated" in error.message


def test_truncated_member_header_size(tmp_path, payload, keypair, trusted) -> None:
    bundle = make(tmp_path, payload, keypair, "tar")

    def shorten(members: list[tuple[tarfile.TarInfo, bytes]]) -> None:
        index = next(i for i, (m, _) in enumerate(members) if m.name == "kernel")
        members[index] = (members[index][0], members[index][1][:-1])

    error = refused(
        ImagePayloadError, rewrite_tar(bundle, tmp_path / "short.tar", shorten), trusted
    )
    assert "kernel: truncated: 299999 bytes, the signed manifest says 300000" in error.message


@pytest.mark.parametrize("form", FORMS)
def test_extra_file(tmp_path, payload, keypair, trusted, form) -> None:
    bundle = make(tmp_path, payload, keypair, form)
    if form == "directory":
        (bundle / "backdoor").write_bytes(b"#!/bin/sh\n")
    else:
        bundle = rewrite_tar(
            bundle, tmp_path / "extra.tar", lambda ms: ms.append(member("backdoor", b"x"))
        )
    error = refused(ImagePayloadError, bundle, trusted)
    assert isinstance(error, ImagePayloadError)
    assert error.path == "backdoor" and "not listed in the signed manifest" in error.message


@pytest.mark.parametrize("form", FORMS)
def test_missing_file(tmp_path, payload, keypair, trusted, form) -> None:
    bundle = make(tmp_path, payload, keypair, form)
    if form == "directory":
        (bundle / "initramfs").unlink()
    else:
        bundle = rewrite_tar(
            bundle,
            tmp_path / "missing.tar",
            lambda ms: ms.remove(next(m for m in ms if m[0].name == "initramfs")),
        )
    error = refused(ImagePayloadError, bundle, trusted)
    assert isinstance(error, ImagePayloadError)
    assert error.path == "initramfs" and "is missing" in error.message


@pytest.mark.parametrize("form", FORMS)
def test_wrong_architecture(tmp_path, payload, keypair, trusted, form) -> None:
    bundle = make(tmp_path, payload, keypair, form, arch="aarch64")
    error = refused(ImageArchitectureError, bundle, trusted, "x86_64")
    assert "built for aarch64, expected x86_64" in error.message


def _edit_manifest(bundle: Path, tmp_path: Path, form: str, edit: Callable[[dict], None]) -> Path:
    def rewrite(data: bytes) -> bytes:
        raw = json.loads(data)
        edit(raw)
        return canonical_json(raw)

    if form == "directory":
        path = bundle / "manifest.json"
        path.write_bytes(rewrite(path.read_bytes()))
        return bundle

    def in_tar(members: list[tuple[tarfile.TarInfo, bytes]]) -> None:
        members[0] = (members[0][0], rewrite(members[0][1]))

    return rewrite_tar(bundle, tmp_path / "edited.tar", in_tar)


@pytest.mark.parametrize("form", FORMS)
def test_manifest_edited_after_signing(tmp_path, payload, keypair, trusted, form) -> None:
    bundle = make(tmp_path, payload, keypair, form, arch="aarch64")
    # Claiming x86_64 must not get past the signature to the architecture check.
    edited = _edit_manifest(bundle, tmp_path, form, lambda raw: raw.update(architecture="x86_64"))
    error = refused(ImageSignatureError, edited, trusted, "x86_64")
    assert "changed after signing" in error.message


@pytest.mark.parametrize("form", FORMS)
def test_manifest_matching_a_tampered_payload_is_still_refused(
    tmp_path, payload, keypair, trusted, form
) -> None:
    """An attacker who swaps a file and fixes its size and sha256 in the manifest."""
    bundle = make(tmp_path, payload, keypair, form)
    evil = b"evil kernel"
    import hashlib

    def swap(raw: dict) -> None:
        for f in raw["files"]:
            if f["path"] == "kernel":
                f.update(size=len(evil), sha256=hashlib.sha256(evil).hexdigest())

    edited = _edit_manifest(bundle, tmp_path, form, swap)
    if form == "directory":
        (edited / "kernel").write_bytes(evil)
    refused(ImageSignatureError, edited, trusted)


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (lambda raw: raw.update(formatVersion=2), "formatVersion 2 is not supported"),
        (lambda raw: raw.update(extra=1), "unknown field(s): extra"),
        (lambda raw: raw.pop("version"), "missing field(s): version"),
        (lambda raw: raw["files"].reverse(), "not in canonical form"),
        (lambda raw: raw["files"][0].update(path="../etc/passwd"), "not a plain file name"),
        (lambda raw: raw["files"][0].update(size=-1), "size is not a byte count"),
        (lambda raw: raw["files"][0].update(sha256="AB" * 32), "64 lowercase hex"),
        (lambda raw: raw.update(files=[]), "files is not a non-empty list"),
    ],
)
def test_malformed_manifest(tmp_path, payload, keypair, trusted, edit, problem) -> None:
    bundle = make(tmp_path, payload, keypair, "directory")
    error = refused(
        ImageManifestError, _edit_manifest(bundle, tmp_path, "directory", edit), trusted
    )
    assert problem in error.message


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (None, "is missing"),
        (b"", "not JSON"),
        (b'{"formatVersion": 1}', "not in canonical form"),  # whitespace
        (b"[]", "not a JSON object"),
        (b"x" * ((1 << 20) + 1), "is 1048577 bytes, more than the 1048576 allowed"),
    ],
)
def test_missing_or_unreadable_manifest(tmp_path, payload, keypair, trusted, data, problem):
    bundle = make(tmp_path, payload, keypair, "directory")
    path = bundle / "manifest.json"
    if data is None:
        path.unlink()
    else:
        raw = json.loads(path.read_bytes())
        path.write_bytes(data if data != b'{"formatVersion": 1}' else json.dumps(raw).encode())
    assert problem in refused(ImageManifestError, bundle, trusted).message


def test_symlinked_manifest_is_refused(tmp_path, payload, keypair, trusted) -> None:
    bundle = make(tmp_path, payload, keypair, "directory")
    (tmp_path / "elsewhere.json").write_bytes((bundle / "manifest.json").read_bytes())
    (bundle / "manifest.json").unlink()
    (bundle / "manifest.json").symlink_to(tmp_path / "elsewhere.json")
    assert "not a regular file" in refused(ImageManifestError, bundle, trusted).message


def test_symlinked_payload_is_refused(tmp_path, payload, keypair, trusted) -> None:
    bundle = make(tmp_path, payload, keypair, "directory")
    (bundle / "kernel").unlink()
    (bundle / "kernel").symlink_to(payload["kernel"])
    error = refused(ImagePayloadError, bundle, trusted)
    assert "kernel: is not a regular file" in error.message


def test_malformed_signature(tmp_path, payload, keypair, trusted) -> None:
    bundle = make(tmp_path, payload, keypair, "directory")
    (bundle / "manifest.sig").write_bytes(b'{"algorithm":"rsa"}')
    assert "manifest.sig is malformed" in refused(ImageSignatureError, bundle, trusted).message


def test_signature_over_another_manifest(tmp_path, payload, keypair, trusted) -> None:
    first = make(tmp_path, payload, keypair, "directory", name="first")
    second = make(tmp_path, payload, keypair, "directory", arch="aarch64", name="second")
    (first / "manifest.sig").write_bytes((second / "manifest.sig").read_bytes())
    refused(ImageSignatureError, first, trusted)


UNSAFE_MEMBERS = [
    (member("../evil", b"x"), "has '..' in its path"),
    (member("/etc/cron.d/evil", b"x"), "has an absolute path"),
    (member("kernel2", kind=tarfile.SYMTYPE, link="/etc/shadow"), "is a link"),
    (member("kernel2", kind=tarfile.LNKTYPE, link="kernel"), "is a link"),
    (member("null", kind=tarfile.CHRTYPE), "is a device"),
    (member("sda", kind=tarfile.BLKTYPE), "is a device"),
    (member("fifo", kind=tarfile.FIFOTYPE), "is a FIFO"),
    (member("sub", kind=tarfile.DIRTYPE), "is a directory"),
]


@pytest.mark.parametrize(
    ("evil", "problem", "position"),
    [
        pytest.param(evil, problem, position, id=f"{problem}-{position}")
        for evil, problem in UNSAFE_MEMBERS
        for position in ("first", "after the signature", "last")
    ]
    # Of two copies of a name, the first is checked against the manifest like any file.
    + [pytest.param(member("kernel", b"again"), "appears twice", "last", id="duplicate")],
)
def test_unsafe_tar_members(tmp_path, payload, keypair, trusted, evil, problem, position):
    bundle = make(tmp_path, payload, keypair, "tar")
    index = {"first": 0, "after the signature": 2, "last": None}[position]

    def insert(members: list[tuple[tarfile.TarInfo, bytes]]) -> None:
        if index is None:
            members.append(evil)
        else:
            members.insert(index, evil)

    unsafe = rewrite_tar(bundle, tmp_path / "unsafe.tar", insert)
    error = refused(ImageFormatError, unsafe, trusted)
    assert problem in error.message


@pytest.mark.parametrize("index", [0, 2])
def test_oversized_tar_headers_are_refused_unread(tmp_path, payload, keypair, trusted, index):
    bundle = make(tmp_path, payload, keypair, "tar")
    huge, _ = member("notes")
    huge.pax_headers = {"comment": "x" * (4 << 20)}

    def insert(members: list[tuple[tarfile.TarInfo, bytes]]) -> None:
        members.insert(index, (huge, b""))

    unsafe = rewrite_tar(bundle, tmp_path / "huge.tar", insert)
    assert "extended header of" in refused(ImageFormatError, unsafe, trusted).message
    tracemalloc.start()
    try:
        with pytest.raises(ImageFormatError):
            verify_bundle(unsafe, trusted, "x86_64")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"peak {peak / 2**20:.1f} MiB"


def test_manifest_must_come_first_in_a_tar(tmp_path, payload, keypair, trusted) -> None:
    bundle = make(tmp_path, payload, keypair, "tar")
    moved = rewrite_tar(bundle, tmp_path / "moved.tar", lambda ms: ms.append(ms.pop(0)))
    error = refused(ImageManifestError, moved, trusted)
    assert "must be the first member" in error.message


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"", "not a directory or an uncompressed tar file"),
        (b"\x1f\x8b\x08\x00" + b"\x00" * 600, "not a directory or an uncompressed tar file"),
        (b"hello world" * 100, "not a directory or an uncompressed tar file"),
    ],
)
def test_not_a_bundle(tmp_path, trusted, content, problem) -> None:
    path = tmp_path / "thing.tar"
    path.write_bytes(content)
    assert problem in refused(ImageFormatError, path, trusted).message
    assert "does not exist" in refused(ImageFormatError, tmp_path / "nope", trusted).message


def test_checks_run_in_order(tmp_path, payload, keypair, trusted) -> None:
    """With several faults at once, the earliest check in the documented order reports."""
    other_private, _ = generate_signing_key()
    bundle = make(tmp_path, payload, (other_private, ""), "directory", arch="aarch64")
    (bundle / "kernel").write_bytes(b"tampered")
    (bundle / "extra").write_bytes(b"x")
    refused(UnknownSigningKeyError, bundle, trusted, "x86_64")
    (bundle / "manifest.sig").unlink()
    refused(UnsignedImageError, bundle, trusted, "x86_64")
    (bundle / "manifest.json").write_bytes(b"{}")
    refused(ImageManifestError, bundle, trusted, "x86_64")

    good = make(tmp_path, payload, keypair, "directory", arch="aarch64", name="good")
    (good / "kernel").write_bytes(b"tampered")
    refused(ImageArchitectureError, good, trusted, "x86_64")


def test_every_verification_error_is_a_basalt_error() -> None:
    classes = [
        ImageFormatError,
        ImageManifestError,
        UnsignedImageError,
        UnknownSigningKeyError,
        ImageSignatureError,
        ImageArchitectureError,
        ImagePayloadError,
    ]
    assert len({c.check for c in classes}) == len(classes)
    for cls in classes:
        assert issubclass(cls, ImageVerificationError) and issubclass(cls, BasaltError)
    assert issubclass(SigningKeyError, BasaltError) and issubclass(BundleInputError, BasaltError)


def test_unknown_expected_architecture_is_a_caller_error(tmp_path, payload, keypair, trusted):
    bundle = make(tmp_path, payload, keypair, "tar")
    with pytest.raises(BasaltError, match="unknown architecture 'amd64'") as caught:
        verify_bundle(bundle, trusted, "amd64")
    assert not isinstance(caught.value, ImageVerificationError)


# -- memory ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", FORMS)
def test_verifying_64_mib_stays_under_8_mib(tmp_path, keypair, trusted, form) -> None:
    big = tmp_path / "rootfs.squashfs"
    block = os.urandom(1 << 20)
    with open(big, "wb") as handle:
        for i in range(64):
            handle.write(block[i:] + block[:i])
    bundle = make(tmp_path, {"rootfs.squashfs": big}, keypair, form)
    tracemalloc.start()
    try:
        verify_bundle(bundle, trusted, "x86_64")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20, f"peak {peak / 2**20:.1f} MiB"


# -- keys -----------------------------------------------------------------------------------------


def test_key_ids_are_sha256_of_the_raw_public_key(keypair) -> None:
    import hashlib

    from cryptography.hazmat.primitives import serialization

    private = load_signing_key(keypair[0])
    raw = private.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    assert key_id(private) == hashlib.sha256(raw).hexdigest()
    assert verification_key(keypair[1]).key_id == key_id(private)
    assert verification_key(keypair[0]).key_id == key_id(private)  # a private key works too


@pytest.mark.parametrize(
    "pem",
    [
        "not a key",
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    ],
)
def test_bad_signing_keys_are_refused(pem: str) -> None:
    with pytest.raises(SigningKeyError):
        load_signing_key(pem, "k.key")
    with pytest.raises(SigningKeyError):
        verification_key(pem, "k.pub")


def test_non_ed25519_keys_are_refused() -> None:
    from basalt.machinery.pki import generate_private_key, private_key_pem, public_key_pem

    ec_key = generate_private_key()
    with pytest.raises(SigningKeyError, match="not an Ed25519 key"):
        load_signing_key(private_key_pem(ec_key))
    with pytest.raises(SigningKeyError, match="not an Ed25519 key"):
        verification_key(public_key_pem(ec_key))


def test_trusted_keys_come_from_image_verification_config(keypair) -> None:
    _, other_public = generate_signing_key()
    config = bundle_from_raw(
        [
            {
                "apiVersion": "basalt.dev/v1alpha1",
                "kind": "ImageVerificationConfig",
                "keys": [
                    {"name": "release", "publicKey": keypair[1]},
                    {"name": "hotfix", "publicKey": other_public},
                    {"name": "release-again", "publicKey": keypair[1]},
                ],
            }
        ]
    )
    keys = trusted_keys_from_config(config)
    assert [k.name for k in keys] == ["release-again", "hotfix"]
    assert keys[0].key_id == verification_key(keypair[1]).key_id
    assert trusted_keys_from_config(bundle_from_raw([])) == []


# -- CLI ------------------------------------------------------------------------------------------


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_gen_signing_key(tmp_path, capsys) -> None:
    prefix = tmp_path / "release"
    code, out, _ = cli(capsys, "gen", "signing-key", "-o", str(prefix))
    assert code == 0
    private, public = Path(f"{prefix}.key"), Path(f"{prefix}.pub")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert stat.S_IMODE(public.stat().st_mode) == 0o644
    assert f"key id {verification_key(public.read_text()).key_id}" in out
    assert (
        verification_key(private.read_text()).key_id == verification_key(public.read_text()).key_id
    )
    before = private.read_bytes()
    code, _, err = cli(capsys, "gen", "signing-key", "-o", str(prefix))
    assert code == 1 and "already exists" in err and private.read_bytes() == before
    assert cli(capsys, "gen", "signing-key", "-o", str(prefix), "--force")[0] == 0
    assert private.read_bytes() != before


def test_cli_bundle_create_and_verify(tmp_path, payload, capsys, monkeypatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    key = tmp_path / "rel"
    assert cli(capsys, "gen", "signing-key", "-o", str(key))[0] == 0
    out = tmp_path / "b.tar"
    common = ["--kernel", str(payload["kernel"]), "--initramfs", str(payload["initramfs"])]
    code, stdout, err = cli(
        capsys,
        "bundle",
        "create",
        *common,
        "--rootfs",
        str(payload["rootfs.squashfs"]),
        "--version",
        "0.2.0",
        "--arch",
        "x86_64",
        "--key",
        f"{key}.key",
        "--file",
        "notes.txt=" + str(payload["initramfs"]),
        "-o",
        str(out),
    )
    assert code == 0, err
    assert "basalt 0.2.0 x86_64, 5 files" in stdout
    code, stdout, err = cli(capsys, "bundle", "verify", str(out), "--key", f"{key}.pub")
    assert code == 0, err
    assert "verified" in stdout and "notes.txt" in stdout and "rel.pub (" in stdout
    code, stdout, _ = cli(capsys, "bundle", "verify", str(out), "--key", f"{key}.pub", "-o", "json")
    assert json.loads(stdout)["created"] == "2023-11-14T22:13:20Z"

    code, _, err = cli(
        capsys, "bundle", "verify", str(out), "--key", f"{key}.pub", "--arch", "aarch64"
    )
    assert code == 1 and "architecture check failed: built for x86_64, expected aarch64" in err
    code, _, err = cli(capsys, "bundle", "verify", str(out))
    assert code == 1 and "no trusted keys" in err

    config = tmp_path / "worker.yaml"
    config.write_text(
        "apiVersion: basalt.dev/v1alpha1\nkind: ImageVerificationConfig\nkeys:\n"
        "  - name: release\n    publicKey: |\n"
        + "".join(f"      {line}\n" for line in Path(f"{key}.pub").read_text().splitlines())
    )
    code, stdout, err = cli(capsys, "bundle", "verify", str(out), "--config", str(config))
    assert code == 0, err and "release (" in stdout

    before = out.read_bytes()
    code, _, err = cli(
        capsys, "bundle", "create", *common, "--rootfs", str(payload["kernel"]),
        "--version", "0.3.0", "--key", f"{key}.key", "-o", str(out),
    )  # fmt: skip
    assert code == 1 and "already exists" in err and out.read_bytes() == before


def test_cli_bundle_create_refuses_a_public_key(tmp_path, payload, capsys) -> None:
    key = tmp_path / "rel"
    cli(capsys, "gen", "signing-key", "-o", str(key))
    code, _, err = cli(
        capsys, "bundle", "create", "--kernel", str(payload["kernel"]),
        "--initramfs", str(payload["initramfs"]), "--rootfs", str(payload["rootfs.squashfs"]),
        "--version", "0.2.0", "--key", f"{key}.pub", "-o", str(tmp_path / "b.tar"),
    )  # fmt: skip
    assert code == 1 and "not a PEM private key" in err
    assert not (tmp_path / "b.tar").exists()


def test_manifest_total_size() -> None:
    from basalt.machinery.images import PayloadFile

    manifest = Manifest("0.1.0", "default", "x86_64", "2025-01-01T00:00:00Z",
                        (PayloadFile("a", 1, "0" * 64), PayloadFile("b", 2, "0" * 64)))  # fmt: skip
    assert manifest.total_size == 3
    assert parse_manifest(manifest.encode()) == manifest
