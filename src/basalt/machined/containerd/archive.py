"""Reading an image tar: an OCI image layout or a docker-archive (``docker save``).

Everything is checked before anything is written to containerd: every blob the image
needs is present with the size and sha256 its descriptor names, the config is JSON for
Linux, and there is one diff id per layer. Blocking; the API runs it in a thread.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
import shutil
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
LAYER_TYPES = frozenset(
    {
        "application/vnd.oci.image.layer.v1.tar",
        "application/vnd.oci.image.layer.v1.tar+gzip",
        "application/vnd.oci.image.layer.v1.tar+zstd",
        DOCKER_LAYER,
        DOCKER_LAYER_GZIP,
    }
)
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})
MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})

NAME_ANNOTATION = "io.containerd.image.name"
REF_ANNOTATION = "org.opencontainers.image.ref.name"
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_NAME = re.compile(r"^[a-z0-9][a-z0-9._/:@-]*$")
MAX_JSON = 4 * 1024 * 1024
#: Bounds on what an archive may make the node do, each checked before the work:
#: entries (tarfile keeps every header in memory), layers, unpacked bytes (read and
#: written), and for a compressed archive its unpacked size over its own.
MAX_ENTRIES = 4096
MAX_LAYERS = 128
MAX_UNPACKED = 4 * 1024 * 1024 * 1024
MAX_RATIO = 100
MAX_EXTENDED_HEADER = 64 * 1024
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")


class ArchiveError(ValueError):
    """The tar is not an image Basalt can import; the message says what and where."""


@dataclass(frozen=True)
class Blob:
    """One verified blob, copied out of the tar to ``path``."""

    media_type: str
    digest: str
    size: int
    path: Path


@dataclass
class ParsedImage:
    name: str
    manifest: Blob
    config: Blob
    layers: list[Blob]
    diff_ids: list[str]
    config_json: dict[str, Any] = field(default_factory=dict)

    #: The manifest blob's content labels: children the garbage collector must keep.
    @property
    def manifest_labels(self) -> dict[str, str]:
        labels = {"containerd.io/gc.ref.content.config": self.config.digest}
        for i, layer in enumerate(self.layers):
            labels[f"containerd.io/gc.ref.content.l.{i}"] = layer.digest
        return labels


def chain_ids(diff_ids: list[str]) -> list[str]:
    """The snapshot name of each layer stacked on the ones below it (OCI chain ids)."""
    chain: list[str] = []
    for diff_id in diff_ids:
        if not chain:
            chain.append(diff_id)
        else:
            text = f"{chain[-1]} {diff_id}".encode()
            chain.append("sha256:" + hashlib.sha256(text).hexdigest())
    return chain


def check_name(name: str) -> str:
    if not name or len(name) > 255 or not _NAME.match(name):
        raise ArchiveError(
            f"{name!r} is not an image name: use lowercase letters, digits and . _ / : @ -, "
            "e.g. example.org/tools/hello:1.0"
        )
    return name


class _BoundedTarInfo(tarfile.TarInfo):
    """Refuses an oversized PAX or GNU long-name header before tarfile reads it into memory."""

    def _proc_member(self, tar: tarfile.TarFile) -> tarfile.TarInfo:
        extended = {tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE}
        extended |= {tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK}
        if self.type in extended and self.size > MAX_EXTENDED_HEADER:
            raise ArchiveError(
                f"an extended tar header of {self.size} bytes (at most {MAX_EXTENDED_HEADER})"
            )
        process: Callable[[tarfile.TarFile], tarfile.TarInfo] = super()._proc_member  # type: ignore[misc]
        return process(tar)


def _compressed(path: Path) -> bool:
    with path.open("rb") as raw:
        return raw.read(6).startswith(_COMPRESSED_MAGIC)


def unpacked_limit(path: Path) -> int:
    """How many bytes the archive at ``path`` may unpack to."""
    size = path.stat().st_size
    if _compressed(path):
        return min(MAX_UNPACKED, max(size, 1024 * 1024) * MAX_RATIO)
    return min(MAX_UNPACKED, size)


def _open(path: Path, limit: int) -> tuple[tarfile.TarFile, list[tarfile.TarInfo]]:
    """The tar at ``path`` and its headers (bounded by :func:`_members`)."""
    try:
        tar = tarfile.open(path, "r:*", tarinfo=_BoundedTarInfo)  # noqa: SIM115 - the caller closes it
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        raise ArchiveError(f"not a readable tar archive: {exc}") from None
    try:
        return tar, _members(tar, limit)
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        tar.close()
        if isinstance(exc, ArchiveError):
            raise
        raise ArchiveError(f"not a readable tar archive: {exc}") from None


def _decompress(tar: tarfile.TarFile, target: Path, limit: int) -> None:
    """Write a compressed archive's tar out once (its size was checked by the scan): its
    blobs are read in the image's order, not the archive's, and every step back in a
    compressed stream would decompress it again from the start."""
    source = tar.fileobj
    assert source is not None
    source.seek(0)
    written = 0
    with target.open("wb") as out:
        while chunk := source.read(1024 * 1024):
            written += len(chunk)
            if written > limit:  # the scan saw the headers only; padding may follow
                raise ArchiveError(f"the archive unpacks to more than {limit} bytes")
            out.write(chunk)


def _members(tar: tarfile.TarFile, limit: int) -> list[tarfile.TarInfo]:
    """The archive's headers, refusing too many, or data beyond ``limit`` unpacked bytes,
    before tarfile reads (or decompresses) past them."""
    members = []
    for member in tar:
        members.append(member)
        if len(members) > MAX_ENTRIES:
            raise ArchiveError(
                f"the archive has more than {MAX_ENTRIES} entries; an image archive has a "
                "few per layer"
            )
        if member.offset_data + member.size > limit:
            raise ArchiveError(
                f"{member.name}: the archive unpacks to more than {limit} bytes (at most "
                f"{MAX_UNPACKED}, and {MAX_RATIO} times its compressed size)"
            )
    return members


class _Tar:
    def __init__(self, path: Path, workdir: Path) -> None:
        limit = unpacked_limit(path)
        self.tar, members = _open(path, limit)
        if _compressed(path):
            unpacked = workdir / "archive.tar"
            try:
                _decompress(self.tar, unpacked, limit)
            except (EOFError, OSError, ValueError) as exc:
                if isinstance(exc, ArchiveError):
                    raise
                raise ArchiveError(f"not a readable compressed archive: {exc}") from None
            finally:
                self.tar.close()
            self.tar, members = _open(unpacked, limit)
        self.members = {
            posixpath.normpath(m.name.lstrip("/")).removeprefix("./"): m
            for m in members
            if m.isfile()
        }
        self.workdir = workdir
        self.limit = limit
        self.written = 0
        #: Each member is copied out once, however often the image lists it.
        self.copied: dict[str, tuple[Path, str, int]] = {}

    def has(self, name: str) -> bool:
        return name in self.members

    def read_json(self, name: str, what: str) -> Any:
        member = self.members.get(name)
        if member is None:
            raise ArchiveError(f"{what}: {name} is missing from the archive")
        if member.size > MAX_JSON:
            raise ArchiveError(f"{what}: {name} is larger than {MAX_JSON} bytes")
        data = self._read(member)
        return _json(data, f"{what} ({name})")

    def _read(self, member: tarfile.TarInfo) -> bytes:
        stream = self.tar.extractfile(member)
        assert stream is not None
        with stream:
            return stream.read()

    def member(self, name: str, what: str) -> tarfile.TarInfo:
        member = self.members.get(name)
        if member is None:
            raise ArchiveError(f"{what}: {name} is missing from the archive")
        return member

    def copy(self, name: str, what: str) -> tuple[Path, str, int]:
        """Copy a member out (once), hashing it: (path, digest, size)."""
        if name in self.copied:
            return self.copied[name]
        member = self.member(name, what)
        if self.written + member.size > self.limit:
            raise ArchiveError(
                f"{what}: {name} would take the bytes written past {self.limit}; the image "
                "lists more content than the archive holds"
            )
        stream = self.tar.extractfile(member)
        assert stream is not None
        digest = hashlib.sha256()
        target = self.workdir / f"blob-{len(self.copied) + 1}"
        size = 0
        with stream, target.open("wb") as out:
            while chunk := stream.read(1024 * 1024):
                digest.update(chunk)
                out.write(chunk)
                size += len(chunk)
        self.written += size
        self.copied[name] = (target, "sha256:" + digest.hexdigest(), size)
        return self.copied[name]

    def blob(self, descriptor: Any, what: str) -> Blob:
        """A blob of an OCI layout, checked against its descriptor."""
        if not isinstance(descriptor, dict):
            raise ArchiveError(f"{what}: a descriptor must be an object")
        digest = descriptor.get("digest")
        size = descriptor.get("size")
        media_type = descriptor.get("mediaType", "")
        if not isinstance(digest, str) or not _DIGEST.match(digest):
            raise ArchiveError(f"{what}: digest {digest!r} is not sha256:<64 hex digits>")
        if not isinstance(size, int) or size < 0:
            raise ArchiveError(f"{what}: size {size!r} is not a byte count")
        name = f"blobs/sha256/{digest[7:]}"
        stored = self.member(name, what).size
        if stored != size:  # before copying anything
            raise ArchiveError(f"{what}: {digest} has {stored} bytes, its descriptor says {size}")
        path, actual, actual_size = self.copy(name, what)
        if actual_size != size:
            raise ArchiveError(
                f"{what}: {digest} has {actual_size} bytes, its descriptor says {size}"
            )
        if actual != digest:
            raise ArchiveError(f"{what}: blobs/sha256/{digest[7:]} hashes to {actual}")
        return Blob(str(media_type), digest, size, path)


def _json(data: bytes, what: str) -> Any:
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ArchiveError(f"{what} is not JSON: {exc}") from None


def parse(path: Path, workdir: Path, *, name: str = "", arch: str = "amd64") -> ParsedImage:
    """Check the tar at ``path`` and copy what the image needs into ``workdir``."""
    workdir.mkdir(parents=True, exist_ok=True)
    tar = _Tar(path, workdir)
    try:
        if tar.has("index.json"):
            image = _parse_oci(tar, name, arch)
        elif tar.has("manifest.json"):
            image = _parse_docker(tar, name)
        else:
            raise ArchiveError(
                "neither an OCI image layout (no index.json) nor a docker-archive (no "
                "manifest.json): make the tar with `docker save`, `skopeo copy oci-archive:` "
                "or `buildah push ... oci-archive:`"
            )
    finally:
        tar.tar.close()
    _check_config(image)
    return image


def _parse_oci(tar: _Tar, name: str, arch: str) -> ParsedImage:
    index = tar.read_json("index.json", "image index")
    manifests = index.get("manifests") if isinstance(index, dict) else None
    if not isinstance(manifests, list) or not manifests:
        raise ArchiveError("image index (index.json): has no manifests")
    if len(manifests) != 1:
        raise ArchiveError(
            f"image index (index.json): holds {len(manifests)} images; Basalt imports one "
            "image per archive"
        )
    entry = _object(manifests[0], "image index (index.json): its manifest entry")
    annotations = entry.get("annotations") or {}
    if not isinstance(annotations, dict):
        raise ArchiveError("image index (index.json): annotations is not an object")
    if not name:
        name = _text(annotations.get(NAME_ANNOTATION))
    if not name:
        ref = _text(annotations.get(REF_ANNOTATION))
        name = ref if ("/" in ref or ":" in ref) else ""
    if not name:
        raise ArchiveError(
            "the archive does not name its image (no io.containerd.image.name or full "
            "org.opencontainers.image.ref.name annotation): give a name (--name)"
        )
    descriptor = _platform_manifest(tar, entry, arch)
    media_type = _text(descriptor.get("mediaType"))
    if media_type not in MANIFEST_TYPES:
        raise ArchiveError(f"image manifest: media type {media_type!r} is not an image manifest")
    manifest = tar.blob(descriptor, "image manifest")
    body = _json(manifest.path.read_bytes(), f"image manifest {manifest.digest}")
    if not isinstance(body, dict):
        raise ArchiveError(f"image manifest {manifest.digest}: not a JSON object")
    config = tar.blob(body.get("config"), "image config")
    layers_desc = body.get("layers")
    if not isinstance(layers_desc, list):
        raise ArchiveError(f"image manifest {manifest.digest}: layers is not a list")
    _check_layer_count(len(layers_desc), f"image manifest {manifest.digest}")
    layers = []
    for i, desc in enumerate(layers_desc):
        layer = tar.blob(desc, f"layer {i}")
        if layer.media_type not in LAYER_TYPES:
            raise ArchiveError(
                f"layer {i}: media type {layer.media_type!r} is not a layer tar "
                f"({', '.join(sorted(LAYER_TYPES))})"
            )
        layers.append(layer)
    return ParsedImage(check_name(name), manifest, config, layers, [])


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ArchiveError(f"{what} is not a JSON object")
    return value


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _platform_manifest(tar: _Tar, descriptor: dict[str, Any], arch: str) -> dict[str, Any]:
    """Follow nested image indexes (at most 4) to the manifest for linux/``arch``."""
    seen = 0
    while _text(descriptor.get("mediaType")) in INDEX_TYPES:
        seen += 1
        if seen > 4:
            raise ArchiveError("image index: nested more than 4 levels deep")
        nested = tar.blob(descriptor, "image index")
        what = f"image index {nested.digest}"
        inner = _object(_json(nested.path.read_bytes(), what), what)
        listed = inner.get("manifests")
        if not isinstance(listed, list):
            raise ArchiveError(f"{what}: manifests is not a list")
        candidates = []
        for m in listed:
            platform = _object(m, f"{what}: an entry").get("platform") or {}
            platform = _object(platform, f"{what}: a platform")
            if (
                platform.get("os", "linux") == "linux"
                and platform.get("architecture", arch) == arch
            ):
                candidates.append(m)
        if not candidates:
            raise ArchiveError(f"{what}: no manifest for linux/{arch}")
        descriptor = candidates[0]
    return descriptor


def _parse_docker(tar: _Tar, name: str) -> ParsedImage:
    entries = tar.read_json("manifest.json", "docker-archive manifest")
    if not isinstance(entries, list) or not entries:
        raise ArchiveError("docker-archive manifest (manifest.json): not a non-empty list")
    if len(entries) != 1:
        raise ArchiveError(
            f"docker-archive manifest (manifest.json): holds {len(entries)} images; Basalt "
            "imports one image per archive"
        )
    entry = entries[0]
    if not isinstance(entry, dict) or not isinstance(entry.get("Config"), str):
        raise ArchiveError("docker-archive manifest (manifest.json): the entry has no Config")
    tags = entry.get("RepoTags") or []
    if not isinstance(tags, list):
        raise ArchiveError("docker-archive manifest (manifest.json): RepoTags is not a list")
    if not name and tags:
        name = str(tags[0])
    if not name:
        raise ArchiveError("the docker-archive has no RepoTags: give a name (--name)")
    path, digest, size = tar.copy(posixpath.normpath(entry["Config"]), "image config")
    config = Blob(DOCKER_CONFIG, digest, size, path)
    listed = entry.get("Layers") or []
    if not isinstance(listed, list):
        raise ArchiveError("docker-archive manifest (manifest.json): Layers is not a list")
    _check_layer_count(len(listed), "docker-archive manifest (manifest.json)")
    layers = []
    for i, member in enumerate(listed):
        path, digest, size = tar.copy(posixpath.normpath(str(member)), f"layer {i}")
        with path.open("rb") as stream:
            gzipped = stream.read(2) == b"\x1f\x8b"
        layers.append(Blob(DOCKER_LAYER_GZIP if gzipped else DOCKER_LAYER, digest, size, path))
    manifest_body = {
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST,
        "config": {"mediaType": DOCKER_CONFIG, "digest": config.digest, "size": config.size},
        "layers": [
            {"mediaType": layer.media_type, "digest": layer.digest, "size": layer.size}
            for layer in layers
        ],
    }
    data = json.dumps(manifest_body, separators=(",", ":")).encode()
    manifest_path = tar.workdir / "manifest"
    manifest_path.write_bytes(data)
    manifest = Blob(
        DOCKER_MANIFEST, "sha256:" + hashlib.sha256(data).hexdigest(), len(data), manifest_path
    )
    return ParsedImage(check_name(name), manifest, config, layers, [])


def _check_layer_count(count: int, what: str) -> None:
    if count > MAX_LAYERS:
        raise ArchiveError(
            f"{what}: lists {count} layers, more than the {MAX_LAYERS} Basalt imports; "
            "squash the image"
        )


def _check_config(image: ParsedImage) -> None:
    config = _json(image.config.path.read_bytes(), f"image config {image.config.digest}")
    if not isinstance(config, dict):
        raise ArchiveError(f"image config {image.config.digest}: not a JSON object")
    if config.get("os", "linux") != "linux":
        raise ArchiveError(f"image config: the image is for {config.get('os')!r}, not linux")
    rootfs = config.get("rootfs") or {}
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list) or not all(
        isinstance(d, str) and _DIGEST.match(d) for d in diff_ids
    ):
        raise ArchiveError("image config: rootfs.diff_ids is not a list of sha256 digests")
    if len(diff_ids) != len(image.layers):
        raise ArchiveError(f"image config: {len(diff_ids)} diff ids for {len(image.layers)} layers")
    if not diff_ids:
        raise ArchiveError("image manifest: the image has no layers")
    image.diff_ids = list(diff_ids)
    image.config_json = config


def cleanup(workdir: Path) -> None:
    shutil.rmtree(workdir, ignore_errors=True)
