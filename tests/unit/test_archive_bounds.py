"""ImageImport's archive reader is bounded before it does the work: a layer listed many
times is copied once, too many layers / entries are refused, and a compressed archive may
not unpack to more than MAX_RATIO times its size (or MAX_UNPACKED)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
import time
import tracemalloc
from pathlib import Path

import pytest

from basalt.machined.containerd import archive
from tests.fakes.oci import docker_archive_tar, oci_layout_tar

NAME = "example.org/t/hello:1"
#: A layer of about 1 MiB (random, so gzip keeps it that size).
BIG = {"/hello": (b"hello\n", 0), "/big": (os.urandom(1 << 20), 0)}


def _written(workdir: Path) -> int:
    return sum(p.stat().st_size for p in workdir.rglob("*") if p.is_file())


def _parse(tmp_path: Path, data: bytes) -> archive.ParsedImage:
    path = tmp_path / "image.tar"
    path.write_bytes(data)
    return archive.parse(path, tmp_path / "work")


@pytest.mark.parametrize("make", [oci_layout_tar, docker_archive_tar], ids=["oci", "docker"])
def test_a_layer_listed_100_times_is_copied_once(tmp_path: Path, make) -> None:
    image = _parse(tmp_path, make(NAME, BIG, ["/hello"], repeat=100))
    assert len(image.layers) == 100 and len({layer.path for layer in image.layers}) == 1
    assert _written(tmp_path / "work") < 3 << 20, "each layer copy is written again"


@pytest.mark.parametrize("make", [oci_layout_tar, docker_archive_tar], ids=["oci", "docker"])
def test_more_layers_than_allowed_are_refused_before_copying(tmp_path: Path, make) -> None:
    data = make(NAME, BIG, ["/hello"], repeat=archive.MAX_LAYERS + 1)
    with pytest.raises(archive.ArchiveError, match=f"more than the {archive.MAX_LAYERS}"):
        _parse(tmp_path, data)
    assert _written(tmp_path / "work") < 64 << 10


def _gzip_of_empty_headers(count: int) -> bytes:
    out = io.BytesIO()
    with (
        gzip.GzipFile(fileobj=out, mode="wb", mtime=0) as packed,
        tarfile.open(fileobj=packed, mode="w|", format=tarfile.USTAR_FORMAT) as tar,
    ):
        for i in range(count):
            tar.addfile(tarfile.TarInfo(f"e{i}"))
    return out.getvalue()


def test_an_archive_of_many_empty_entries_is_refused_in_bounded_memory(tmp_path: Path) -> None:
    data = _gzip_of_empty_headers(50_000)
    tracemalloc.start()
    try:
        with pytest.raises(archive.ArchiveError, match=f"more than {archive.MAX_ENTRIES} entries"):
            _parse(tmp_path, data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, f"peak {peak / 2**20:.0f} MiB"


def _gzip_bomb(size: int) -> bytes:
    """A gzip tar of one member of ``size`` zero bytes (and an index.json after it)."""
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", mtime=0, compresslevel=9) as packed:
        info = tarfile.TarInfo("blobs/sha256/zeros")
        info.size = size
        packed.write(info.tobuf(format=tarfile.USTAR_FORMAT))
        zeros = bytes(1 << 20)
        for _ in range(size >> 20):
            packed.write(zeros)
        index = tarfile.TarInfo("index.json")
        packed.write(index.tobuf(format=tarfile.USTAR_FORMAT) + bytes(1024))
    return out.getvalue()


def test_a_decompression_bomb_is_refused_before_it_is_unpacked(tmp_path: Path) -> None:
    data = _gzip_bomb(256 << 20)
    assert len(data) < 1 << 20
    with pytest.raises(archive.ArchiveError, match="unpacks to more than"):
        _parse(tmp_path, data)
    assert _written(tmp_path / "work") == 0


def test_a_compressed_archive_within_the_ratio_is_imported(tmp_path: Path) -> None:
    data = gzip.compress(oci_layout_tar(NAME, BIG, ["/hello"]), mtime=0)
    assert _parse(tmp_path, data).name == NAME


def _oci_index(index: object) -> bytes:
    return _retar(oci_layout_tar(NAME, BIG, ["/hello"]), "index.json", index)


def _retar(data: bytes, name: str, value: object) -> bytes:
    out = io.BytesIO()
    with (
        tarfile.open(fileobj=io.BytesIO(data)) as source,
        tarfile.open(fileobj=out, mode="w") as target,
    ):
        for member in source.getmembers():
            body = source.extractfile(member)
            content = body.read() if body else b""
            if member.name == name:
                content = json.dumps(value).encode()
                member.size = len(content)
            target.addfile(member, io.BytesIO(content))
    return out.getvalue()


NAMED = {archive.NAME_ANNOTATION: NAME}
# Found by tests/fuzz/test_fuzz_archive.py: each crashed with TypeError/AttributeError/KeyError.
MALFORMED = [
    (_oci_index({"manifests": [7]}), "its manifest entry is not a JSON object"),
    (_oci_index({"manifests": [{"annotations": [1]}]}), "annotations is not an object"),
    (
        _oci_index({"manifests": [{"mediaType": [1], "annotations": NAMED}]}),
        "is not an image manifest",
    ),
    (
        _retar(docker_archive_tar(NAME, BIG, ["/hello"]), "manifest.json",
               [{"Config": "x.json", "RepoTags": {"a": 1}}]),
        "RepoTags is not a list",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("data", "message"), MALFORMED, ids=["entry", "annot", "type", "tags"])
def test_malformed_image_json_is_refused_not_a_crash(tmp_path: Path, data: bytes, message: str):
    with pytest.raises(archive.ArchiveError, match=message):
        _parse(tmp_path, data)


def _many_blobs_out_of_order(count: int) -> bytes:
    """An uncompressed OCI tar of ``count`` 1 MiB layers (mostly zeros), which the manifest
    lists in the reverse of their order in the tar."""
    layers = [bytes((1 << 20) - 20_000) + os.urandom(20_000) for _ in range(count)]

    def digest(data: bytes) -> str:
        return "sha256:" + hashlib.sha256(data).hexdigest()

    config = json.dumps({"os": "linux", "rootfs": {"diff_ids": [digest(x) for x in layers]}})
    manifest = json.dumps(
        {
            "mediaType": archive.OCI_MANIFEST,
            "config": {"digest": digest(config.encode()), "size": len(config)},
            "layers": [
                {"mediaType": archive.DOCKER_LAYER, "digest": digest(x), "size": len(x)}
                for x in reversed(layers)
            ],
        }
    ).encode()
    entry = {"mediaType": archive.OCI_MANIFEST, "digest": digest(manifest), "size": len(manifest)}
    index = json.dumps({"manifests": [{**entry, "annotations": NAMED}]}).encode()
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for data in (index, manifest, config.encode(), *layers):
            name = "index.json" if data is index else f"blobs/sha256/{digest(data)[7:]}"
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def test_a_compressed_archive_is_decompressed_once_not_per_blob(tmp_path: Path) -> None:
    """Blobs are read in the image's order: in a compressed stream each step back would
    decompress it again from its start (100 layers of 1 MiB: about 50 times the work)."""
    raw = _many_blobs_out_of_order(100)
    timings = []
    for name, data in (("raw", raw), ("gzip", gzip.compress(raw, compresslevel=1, mtime=0))):
        (tmp_path / name).mkdir()
        begun = time.monotonic()
        image = _parse(tmp_path / name, data)
        timings.append(time.monotonic() - begun)
        assert len(image.layers) == 100
    plain, packed = timings
    assert packed < 2.0 + 4 * plain, f"{packed:.1f} s compressed, {plain:.1f} s uncompressed"
