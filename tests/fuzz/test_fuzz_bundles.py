"""Fuzz targets for upgrade bundles: the manifest parser and the tar reader/verifier.

Refusals: ManifestFormatError (the parser's documented error) and ImageVerificationError
(the verifier's). Oracles: an accepted manifest is the canonical encoding of what was
parsed; an accepted (mutated) signed bundle yields, for every member a slot writer
installs, exactly the signed bytes at the extent it copies, as a file and as a stream.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import tempfile
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from basalt.machinery.images import (
    ImageVerificationError,
    VerifiedBundle,
    create_bundle,
    generate_signing_key,
    load_signing_key,
    verification_key,
    verify_bundle,
    verify_tar_stream,
)
from basalt.machinery.images.manifest import ManifestFormatError, parse_manifest

from .conftest import fuzz

ARCH = "x86_64"
WORKDIR = Path(tempfile.mkdtemp(prefix="fuzz-bundles-"))
PRIVATE, PUBLIC = generate_signing_key()
KEYS = [verification_key(PUBLIC, "fuzz")]


def _signed_bundle() -> bytes:
    src = WORKDIR / "src"
    src.mkdir()
    files = {
        "initramfs": os.urandom(700),
        "kernel": os.urandom(1500),
        "rootfs.squashfs": os.urandom(1000) + bytes(3000),  # a tail that could be a hole
    }
    for name, data in files.items():
        (src / name).write_bytes(data)
    out = WORKDIR / "signed.tar"
    create_bundle(out, {n: src / n for n in files}, "0.2.0", "default", ARCH,
                  load_signing_key(PRIVATE))  # fmt: skip
    return out.read_bytes()


SIGNED = _signed_bundle()
MANIFEST = verify_bundle(WORKDIR / "signed.tar", KEYS, ARCH).manifest_bytes


# -- the manifest parser --------------------------------------------------------------------------


def _json_values() -> st.SearchStrategy[object]:
    scalars = st.none() | st.booleans() | st.integers() | st.text(max_size=20)
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                      max_size=4),
        max_leaves=12,
    )  # fmt: skip


def _mutated_manifest() -> st.SearchStrategy[bytes]:
    valid = json.loads(MANIFEST)

    def replace(path_and_value: tuple[list[str], object]) -> bytes:
        keys, value = path_and_value
        edited = json.loads(MANIFEST)
        target = edited
        for key in keys[:-1]:
            target = target.get(key) if isinstance(target, dict) else None
        if isinstance(target, dict) and keys:
            target[keys[-1]] = value
        return json.dumps(edited, sort_keys=True, separators=(",", ":")).encode()

    field = st.lists(st.sampled_from(sorted(valid)), min_size=1, max_size=1)
    return st.tuples(field, _json_values()).map(replace)


@given(
    st.one_of(
        st.binary(max_size=400),
        _json_values().map(lambda v: json.dumps(v).encode()),
        _mutated_manifest(),
        st.tuples(st.integers(0, len(MANIFEST) - 1), st.integers(0, 255)).map(
            lambda at: MANIFEST[: at[0]] + bytes([at[1]]) + MANIFEST[at[0] + 1 :]
        ),
    )
)
@fuzz
def test_fuzz_manifest_parser(data: bytes) -> None:
    try:
        manifest = parse_manifest(data)
    except ManifestFormatError:
        return
    assert manifest.encode() == data, "accepted a manifest that is not in its canonical form"


# -- the bundle tar reader / verifier -------------------------------------------------------------


def _members() -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(SIGNED)) as tar:
        return [(m, tar.extractfile(m).read()) for m in tar]  # type: ignore[union-attr]


PAX_KEYS = st.sampled_from(
    ["GNU.sparse.map", "GNU.sparse.size", "GNU.sparse.realsize", "GNU.sparse.major",
     "GNU.sparse.minor", "GNU.sparse.name", "GNU.sparse.offset", "GNU.sparse.numbytes",
     "GNU.sparse.numblocks", "size", "path", "mtime", "uid", "comment", "linkpath"]
)  # fmt: skip
PAX_VALUES = st.sampled_from(["0", "1", "512", "4000", "0,1000", "0,1000,4000,0", "kernel", "-1",
                              "x", "99999999999"])  # fmt: skip
TYPES = st.sampled_from([b"0", b"\0", b"S", b"x", b"g", b"L", b"K", b"7", b"1", b"2", b"5"])


@st.composite
def _reencoded(draw: st.DrawFn) -> bytes:
    """The signed bundle written again with PAX keys, another type or size on one member."""
    members = _members()
    index = draw(st.integers(0, len(members) - 1))
    info, _ = members[index]
    info.pax_headers = draw(st.dictionaries(PAX_KEYS, PAX_VALUES, max_size=3))
    if draw(st.booleans()):
        info.type = draw(TYPES)
    stored = draw(st.none() | st.integers(0, 5000))
    out = io.BytesIO()
    for i, (member, data) in enumerate(members):
        member.size = len(data) if (i != index or stored is None) else stored
        fmt = tarfile.PAX_FORMAT if member.pax_headers else tarfile.USTAR_FORMAT
        try:
            out.write(member.tobuf(format=fmt))
        except ValueError:
            out.write(tarfile.TarInfo(member.name).tobuf())
        out.write(data + bytes(-len(data) % tarfile.BLOCKSIZE))
    out.write(draw(st.sampled_from([bytes(1024), b"", bytes(1024) + b"tail", b"x" * 600])))
    return out.getvalue()


@st.composite
def _byte_mutations(draw: st.DrawFn) -> bytes:
    data = bytearray(SIGNED)
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data) - 1))
        how = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "append"]))
        if how == "flip":
            data[at] ^= draw(st.integers(1, 255))
        elif how == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=600))
        elif how == "delete":
            del data[at : at + draw(st.integers(1, 600))]
        elif how == "truncate":
            del data[at:]
        else:
            data += draw(st.binary(min_size=1, max_size=1200))
        if not data:
            break
    return bytes(data)


def _installed_bytes_are_signed(bundle: VerifiedBundle, raw: bytes) -> None:
    assert bundle.manifest_bytes == MANIFEST, "accepted another manifest than the signed one"
    assert bundle.layout is not None
    for f in bundle.manifest.files:
        extent = bundle.layout.extents[f.path]
        stored = raw[extent.offset : extent.offset + extent.size]
        assert hashlib.sha256(stored).hexdigest() == f.sha256, f"{f.path}: unsigned bytes"


@given(st.one_of(_reencoded(), _byte_mutations()))
@fuzz
def test_fuzz_bundle_reader(data: bytes) -> None:
    path = WORKDIR / "mutated.tar"
    path.write_bytes(data)
    verdicts: list[str] = []
    try:
        bundle = verify_bundle(path, KEYS, ARCH)
    except ImageVerificationError as exc:
        verdicts.append(exc.problem)
    else:
        _installed_bytes_are_signed(bundle, data)
        verdicts.append("accepted")
    received = WORKDIR / "received.tar"
    try:
        with open(path, "rb") as source, open(received, "wb") as sink:
            streamed = verify_tar_stream(source, sink, received, KEYS, ARCH, label=str(path))
    except ImageVerificationError as exc:
        verdicts.append(exc.problem)
    else:
        assert received.read_bytes() == data, "the stream's copy is not what was sent"
        _installed_bytes_are_signed(streamed, data)
        verdicts.append("accepted")
    assert verdicts[0] == verdicts[1], f"file and stream disagree: {verdicts}"
