"""Fuzz target for ImageImport's archive reader (machined/containerd/archive.py).

Refusal: ArchiveError. Oracle: an accepted archive yields blobs whose files hash to their
digests and have their sizes, at most MAX_LAYERS layers with one diff id each, and no more
bytes written than twice what the archive may unpack to (its tar, once, and the blobs).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from basalt.machined.containerd import archive
from tests.fakes.oci import docker_archive_tar, oci_layout_tar

from .conftest import fuzz

NAME = "example.org/t/hello:1"
PROGRAMS = {"/hello": (b"hello\n", 0)}
OCI = oci_layout_tar(NAME, PROGRAMS, ["/hello"])
DOCKER = docker_archive_tar(NAME, PROGRAMS, ["/hello"])
WORKDIR = Path(tempfile.mkdtemp(prefix="fuzz-archive-"))


def _members(data: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}  # type: ignore[union-attr]


def _tar(files: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _json_values() -> st.SearchStrategy[Any]:
    scalars = st.none() | st.booleans() | st.integers(-2, 300) | st.text(max_size=12)
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner,
                                                                      max_size=3),
        max_leaves=8,
    )  # fmt: skip


@st.composite
def _json_edits(draw: st.DrawFn) -> bytes:
    """An OCI or docker archive with one JSON document (or one field of it) replaced; blob
    digests are fixed up so the edit reaches the parser's checks beyond them."""
    files = _members(OCI)
    index = json.loads(files["index.json"])
    entry = index["manifests"][0]
    manifest_name = f"blobs/sha256/{entry['digest'][7:]}"
    manifest = json.loads(files[manifest_name])
    which = draw(st.sampled_from(["index", "manifest", "config", "docker"]))
    if which == "docker":
        files = _members(DOCKER)
        body = json.loads(files["manifest.json"])
        if draw(st.booleans()):
            body = draw(_json_values())
        else:
            body[0][draw(st.sampled_from(["Config", "RepoTags", "Layers"]))] = draw(_json_values())
        files["manifest.json"] = json.dumps(body).encode()
        return _tar(files)
    if which == "config":
        config_name = f"blobs/sha256/{manifest['config']['digest'][7:]}"
        config = json.loads(files.pop(config_name))
        config[draw(st.sampled_from(["os", "rootfs", "config"]))] = draw(_json_values())
        data = json.dumps(config).encode()
        files[f"blobs/sha256/{_digest(data)[7:]}"] = data
        manifest["config"].update(digest=_digest(data), size=len(data))
    elif which == "manifest":
        key = draw(st.sampled_from(["config", "layers", "mediaType"]))
        manifest[key] = draw(_json_values() | st.just([manifest["layers"][0]] * 130))
    if which in ("config", "manifest"):
        del files[manifest_name]
        data = json.dumps(manifest).encode()
        files[f"blobs/sha256/{_digest(data)[7:]}"] = data
        entry.update(digest=_digest(data), size=len(data))
    if which == "index":
        target = draw(st.sampled_from(["whole", "entry", "mediaType", "annotations", "size"]))
        value = draw(_json_values())
        if target == "whole":
            index = value
        elif target == "entry":
            index["manifests"] = [value]
        else:
            entry[target] = value
    files["index.json"] = json.dumps(index).encode()
    return _tar(files)


@st.composite
def _byte_mutations(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from([OCI, DOCKER])))
    for _ in range(draw(st.integers(1, 3))):
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        how = draw(st.sampled_from(["flip", "insert", "truncate"]))
        if how == "flip":
            data[at] ^= draw(st.integers(1, 255))
        elif how == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=512))
        else:
            del data[at:]
    packed = bytes(data)
    return gzip.compress(packed, mtime=0) if draw(st.booleans()) else packed


@given(st.one_of(_json_edits(), _byte_mutations()))
@fuzz
def test_fuzz_archive_import(data: bytes) -> None:
    path = WORKDIR / "image.tar"
    path.write_bytes(data)
    work = WORKDIR / "work"
    shutil.rmtree(work, ignore_errors=True)
    try:
        image = archive.parse(path, work)
    except archive.ArchiveError:
        return
    assert len(image.layers) <= archive.MAX_LAYERS and len(image.diff_ids) == len(image.layers)
    for blob in (image.manifest, image.config, *image.layers):
        content = blob.path.read_bytes()
        assert (len(content), _digest(content)) == (blob.size, blob.digest), blob
    written = sum(p.stat().st_size for p in work.rglob("*") if p.is_file())
    # A compressed archive is unpacked once to the workdir, then its blobs copied out.
    assert written <= 2 * archive.unpacked_limit(path) + 4096
