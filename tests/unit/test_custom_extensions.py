"""Custom system extensions without a machine: a source checked against a small fake root
tree, built into a reproducible signed squashfs (real mksquashfs, a static stand-in
program compiled from tests/fixtures/extensions/standin.c), verified, refused when
damaged, unpacked from an OCI image layout, found for a schematic, and parsed (the
schematic's ``customExtensions``, the manifest's ``provides`` and ``environment``)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import shutil
import stat
import struct
import subprocess
import tarfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from basalt.cli.main import main
from basalt.imager.custom import (
    MAGIC,
    ExtensionFileError,
    ExtensionSourceError,
    ExtensionSources,
    SignedInfo,
    build_extension,
    read_signed,
    verify_extension,
)
from basalt.imager.errors import ImageBuildError, ImageError
from basalt.imager.pipeline import custom_stages, fixed_path_conflicts
from basalt.imager.stage import sha256_file
from basalt.machinery.errors import BasaltError
from basalt.machinery.image_layout import OVERLAY_DIRECTORIES
from basalt.machinery.images import (
    VerificationKey,
    generate_signing_key,
    key_id,
    load_signing_key,
    verification_key,
)
from basalt.machinery.schematic import (
    RESERVED_SERVICE_NAMES,
    CustomExtensionRef,
    ExtensionManifest,
    ManifestError,
    Schematic,
    SchematicError,
    parse_manifest,
    parse_schematic,
)
from tests.fixtures.extensions import MANIFEST, build_standin, hello_source

HELLO = MANIFEST.read_text()
LIBDIR = "usr/lib/x86_64-linux-gnu"
SHA_A, SHA_B = "a" * 64, "b" * 64


# -- host tools, keys, trees ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def standin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """standin.c, compiled static once per module."""
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is not installed: the extension's programs are built from standin.c")
    libc = subprocess.run(
        [gcc, "-print-file-name=libc.a"], capture_output=True, text=True, check=False
    ).stdout.strip()
    if not os.path.isabs(libc):
        pytest.skip("libc.a is missing (install libc6-dev): 'gcc -static' cannot link standin.c")
    return build_standin(tmp_path_factory.mktemp("standin") / "standin")


@pytest.fixture(scope="module")
def squashfs_tools() -> None:
    for tool in ("mksquashfs", "unsquashfs"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed: run 'make image-deps' (squashfs-tools)")


@dataclass(frozen=True)
class KeyPair:
    private: ed25519.Ed25519PrivateKey
    trusted: VerificationKey
    key_file: Path
    pub_file: Path


def _key_pair(directory: Path, name: str) -> KeyPair:
    private_pem, public_pem = generate_signing_key()
    (directory / f"{name}.key").write_text(private_pem)
    (directory / f"{name}.pub").write_text(public_pem)
    return KeyPair(
        load_signing_key(private_pem),
        verification_key(public_pem, f"{name}.pub"),
        directory / f"{name}.key",
        directory / f"{name}.pub",
    )


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[KeyPair, KeyPair]:
    """Two signing key pairs: the one that signs, and another one."""
    directory = tmp_path_factory.mktemp("keys")
    return _key_pair(directory, "ext"), _key_pair(directory, "other")


def make_root(path: Path, *, libc: bool = True) -> Path:
    """A stand-in for the image's root: the loader, libc (unless not wanted) and the
    empty overlay directories the real root has."""
    for name in ("lib64/ld-linux-x86-64.so.2", f"{LIBDIR}/ld-linux-x86-64.so.2"):
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(b"loader")
    if libc:
        (path / LIBDIR / "libc.so.6").write_bytes(b"libc")
    for directory in OVERLAY_DIRECTORIES:
        (path / directory).mkdir(parents=True, exist_ok=True)
    return path


def put(tree: Path, relative: str, content: bytes | Path, mode: int = 0o755) -> Path:
    path = tree / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content.read_bytes() if isinstance(content, Path) else content)
    os.chmod(path, mode)
    return path


def make_source(path: Path, standin: Path, manifest: str = HELLO) -> Path:
    """The hello extension's source: its manifest, /usr/bin/hello and the kubelet."""
    return hello_source(path, standin, manifest)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return make_root(tmp_path / "root")


@pytest.fixture
def source(tmp_path: Path, standin: Path, squashfs_tools: None) -> Path:
    return make_source(tmp_path / "src", standin)


@dataclass(frozen=True)
class Built:
    path: Path
    info: SignedInfo
    manifest: ExtensionManifest
    source: Path
    root: Path


@pytest.fixture(scope="module")
def built(
    tmp_path_factory: pytest.TempPathFactory,
    standin: Path,
    squashfs_tools: None,
    keys: tuple[KeyPair, KeyPair],
) -> Built:
    """The hello extension, built once per module with the first key."""
    base = tmp_path_factory.mktemp("built")
    src, fake_root = make_source(base / "src", standin), make_root(base / "root")
    out = base / "out" / "hello.sqfs"
    info, manifest = build_extension(src, out, keys[0].private, fake_root)
    return Built(out, info, manifest, src, fake_root)


def refused(source: Path, root: Path, key: ed25519.Ed25519PrivateKey) -> ExtensionSourceError:
    """The error building ``source`` raises; nothing may be written."""
    out = source.parent / "refused" / "x.sqfs"
    with pytest.raises(ExtensionSourceError) as caught:
        build_extension(source, out, key, root)
    assert not out.parent.exists() or not list(out.parent.iterdir())
    return caught.value


def problem_of(error: SchematicError, path: str) -> str:
    """The message of the one problem at ``path``, with the error naming the source."""
    assert error.source in error.render()
    found = [p.message for p in error.problems if p.path == path]
    assert found, f"no problem at {path}: {[p.path for p in error.problems]}"
    return found[0]


# -- a good build ---------------------------------------------------------------------------------


def listing(image: Path) -> dict[str, str]:
    """``unsquashfs -lls``: path (below the squashfs root) -> its mode and owner columns."""
    out = subprocess.run(
        ["unsquashfs", "-lls", str(image)], capture_output=True, text=True, check=True
    ).stdout
    entries = {}
    for line in out.splitlines():
        fields = line.split(" -> ")[0].split()  # a symlink's line ends with its target
        if len(fields) >= 6 and fields[-1].startswith("squashfs-root"):
            name = fields[-1].removeprefix("squashfs-root").lstrip("/")
            entries[name] = f"{fields[0]} {fields[1]}"
    return entries


def test_a_good_build_holds_the_manifest_and_the_files(built: Built, tmp_path: Path) -> None:
    assert built.manifest == parse_manifest(HELLO)
    assert (built.info.name, built.info.version) == ("hello", "1.0.0")
    assert built.info.sha256 == sha256_file(built.path) == read_signed(built.path).sha256
    squashfs = built.path.read_bytes()[: built.info.squashfs_bytes]
    assert squashfs[:4] == b"hsqs"
    assert hashlib.sha256(squashfs).hexdigest() == built.info.squashfs_sha256
    entries = listing(built.path)
    assert sorted(name for name, mode in entries.items() if not mode.startswith("d")) == [
        "manifest.yaml",
        "usr/bin/hello",
        "usr/local/bin/kubelet",
    ]
    assert entries["usr/bin/hello"] == "-rwxr-xr-x root/root"
    assert entries["manifest.yaml"] == "-rw-r--r-- root/root"
    unpacked = tmp_path / "unpacked"
    subprocess.run(
        ["unsquashfs", "-no-xattrs", "-d", str(unpacked), str(built.path), "manifest.yaml"],
        capture_output=True,
        check=True,
    )
    assert parse_manifest((unpacked / "manifest.yaml").read_text()) == built.manifest


def test_the_build_is_reproducible_and_the_key_only_changes_the_trailer(
    built: Built, tmp_path: Path, standin: Path, keys: tuple[KeyPair, KeyPair]
) -> None:
    again = make_source(tmp_path / "elsewhere" / "src", standin)
    for path in [again, *again.rglob("*")]:
        os.utime(path, (1_700_000_000, 1_700_000_000), follow_symlinks=False)
    same, _ = build_extension(again, tmp_path / "same.sqfs", keys[0].private, built.root)
    assert (tmp_path / "same.sqfs").read_bytes() == built.path.read_bytes()
    assert same == built.info
    other, _ = build_extension(again, tmp_path / "other.sqfs", keys[1].private, built.root)
    first, second = built.path.read_bytes(), (tmp_path / "other.sqfs").read_bytes()
    size = built.info.squashfs_bytes
    assert other.squashfs_bytes == size and first[:size] == second[:size]
    assert first[size:] != second[size:] and other.sha256 != built.info.sha256
    assert other.key_id == keys[1].trusted.key_id == key_id(keys[1].private)


# -- verifying a signed file ----------------------------------------------------------------------


def test_the_signing_key_verifies_it(built: Built, keys: tuple[KeyPair, KeyPair]) -> None:
    info = verify_extension(built.path, [keys[1].trusted, keys[0].trusted])
    assert info == built.info and info.key_id == keys[0].trusted.key_id


@pytest.mark.parametrize("trusted", ["other key", "no key"])
def test_an_untrusted_key_is_refused(
    built: Built, keys: tuple[KeyPair, KeyPair], trusted: str
) -> None:
    with pytest.raises(ExtensionFileError) as caught:
        verify_extension(built.path, [keys[1].trusted] if trusted == "other key" else [])
    text = caught.value.render()
    assert str(built.path) in text and "not trusted here" in text
    assert keys[0].trusted.key_id[:16] in text and "--extension-key" in text


def _rewrite_trailer(data: bytes, change: Callable[[dict[str, object]], object]) -> bytes:
    """``data`` with its trailer's payload changed (the signature kept)."""
    (length,) = struct.unpack(">I", data[-12:-8])
    payload = json.loads(data[-12 - length : -12])
    change(payload)
    raw = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return data[: -12 - length] + raw + struct.pack(">I", len(raw)) + MAGIC


def _damaged(kind: str, signed: bytes, squashfs_bytes: int) -> bytes:
    squashfs, trailer = signed[:squashfs_bytes], signed[squashfs_bytes:]
    if kind == "a changed squashfs byte":
        return squashfs[:1000] + bytes([squashfs[1000] ^ 1]) + squashfs[1001:] + trailer
    if kind == "a shortened squashfs":
        return squashfs[:-4096] + trailer
    if kind == "a truncated file":
        return signed[:-5]
    if kind == "a plain squashfs":
        return squashfs
    if kind == "a changed version in the trailer":
        return _rewrite_trailer(signed, lambda p: p.update(version="9.9.9"))
    if kind == "a changed signature":
        return _rewrite_trailer(signed, lambda p: p.update(signature="00" * 64))
    if kind == "a signature that is not hex":
        return _rewrite_trailer(signed, lambda p: p.update(signature="zz"))
    if kind == "a trailer of another format":
        return _rewrite_trailer(signed, lambda p: p.update(format="other/v9"))
    if kind == "a trailer missing a field":
        return _rewrite_trailer(signed, lambda p: p.pop("keyId"))
    if kind == "garbage":
        return b"not an extension at all\n" * 200
    if kind == "too short":
        return b"hsqs"
    if kind == "an impossible length":
        return b"x" * 64 + struct.pack(">I", 1 << 30) + MAGIC
    if kind == "a trailer that is not JSON":
        return b"x" * 64 + b"{nope" + struct.pack(">I", 5) + MAGIC
    raise AssertionError(kind)


@pytest.mark.parametrize(
    ("kind", "words"),
    [
        ("a changed squashfs byte", "does not match its signature's sha256"),
        ("a shortened squashfs", "changed or truncated"),
        ("a truncated file", "no signature trailer"),
        ("a plain squashfs", "no signature trailer: unsigned?"),
        ("a changed version in the trailer", "does not verify"),
        ("a changed signature", "does not verify"),
        ("a signature that is not hex", "signature is not hex"),
        ("a trailer of another format", "is not basalt-extension/v1"),
        ("a trailer missing a field", "is not basalt-extension/v1"),
        ("garbage", "no signature trailer"),
        ("too short", "too short"),
        ("an impossible length", "impossible length"),
        ("a trailer that is not JSON", "not JSON"),
    ],
)
def test_a_damaged_file_is_refused_naming_the_file_and_the_fault(
    built: Built, keys: tuple[KeyPair, KeyPair], tmp_path: Path, kind: str, words: str
) -> None:
    path = tmp_path / "damaged.sqfs"
    path.write_bytes(_damaged(kind, built.path.read_bytes(), built.info.squashfs_bytes))
    with pytest.raises(ExtensionFileError) as caught:
        verify_extension(path, [keys[0].trusted])
    assert caught.value.message.startswith(f"{path}: ")
    assert words in caught.value.message


def test_a_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ExtensionFileError, match=r"cannot read extension .*nothere\.sqfs"):
        read_signed(tmp_path / "nothere.sqfs")


# -- checking a source ----------------------------------------------------------------------------


def test_manifest_errors_are_all_listed_with_their_paths(
    source: Path, root: Path, keys: tuple[KeyPair, KeyPair]
) -> None:
    text = (
        HELLO.replace("name: hello", "name: Hello World")
        .replace('version: "1.0.0"\n', "")
        .replace("restart: always", "restart: sometimes")
        .replace("BASALT_GREETING:", "LD_PRELOAD:")
    )
    (source / "manifest.yaml").write_text(text)
    error = refused(source, root, keys[0].private)
    assert str(source / "manifest.yaml") in error.render()
    assert {p.path for p in error.problems} == {
        "name",
        "version",
        "services[0].restart",
        "services[0].environment.LD_PRELOAD",
    }
    assert "is not a name" in problem_of(error, "name")


def test_a_missing_manifest_and_a_missing_rootfs_are_named(
    tmp_path: Path, root: Path, keys: tuple[KeyPair, KeyPair]
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    error = refused(empty, root, keys[0].private)
    assert "is missing" in problem_of(error, "manifest.yaml")
    assert "is missing" in problem_of(error, "rootfs")


def test_a_service_command_missing_from_rootfs(
    source: Path, root: Path, keys: tuple[KeyPair, KeyPair]
) -> None:
    (source / "rootfs/usr/bin/hello").unlink()
    error = refused(source, root, keys[0].private)
    message = problem_of(error, "manifest.yaml: services[0].command")
    assert "/usr/bin/hello is not in rootfs/" in message


def test_a_service_command_that_is_not_executable(
    source: Path, root: Path, keys: tuple[KeyPair, KeyPair]
) -> None:
    os.chmod(source / "rootfs/usr/bin/hello", 0o644)
    error = refused(source, root, keys[0].private)
    message = problem_of(error, "manifest.yaml: services[0].command")
    assert "rootfs/usr/bin/hello is not executable" in message


def test_a_provided_path_missing_from_rootfs(
    source: Path, root: Path, keys: tuple[KeyPair, KeyPair]
) -> None:
    (source / "rootfs/usr/local/bin/kubelet").unlink()
    error = refused(source, root, keys[0].private)
    assert "/usr/local/bin/kubelet is not in rootfs/" in problem_of(
        error, "manifest.yaml: provides[0]"
    )


def test_a_file_in_a_fixed_directory_must_be_provided(
    source: Path, root: Path, keys: tuple[KeyPair, KeyPair], standin: Path
) -> None:
    put(source, "rootfs/usr/local/bin/kubectl", standin)
    put(source, "rootfs/opt/cni/bin/bridge", standin)
    error = refused(source, root, keys[0].private)
    assert "not in provides" in problem_of(error, "rootfs/usr/local/bin/kubectl")
    assert "below /opt/cni/bin" in problem_of(error, "rootfs/opt/cni/bin/bridge")
    assert len(error.problems) == 2


def test_a_provided_path_the_root_has_collides(
    source: Path, root: Path, keys: tuple[KeyPair, KeyPair]
) -> None:
    put(root, "usr/local/bin/kubelet", b"the root's own")
    error = refused(source, root, keys[0].private)
    assert "collides with the image's root" in problem_of(error, "manifest.yaml: provides[0]")


@pytest.mark.parametrize(
    ("link", "target"),
    [("usr/bin/up", "../../../etc/passwd"), ("usr/escape", "../.."), ("top", "..")],
)
def test_a_symlink_that_leaves_the_extension_is_refused(
    source: Path, root: Path, keys: tuple[KeyPair, KeyPair], link: str, target: str
) -> None:
    os.symlink(target, source / "rootfs" / link)
    error = refused(source, root, keys[0].private)
    assert "leaves the extension" in problem_of(error, f"rootfs/{link}")


def test_symlinks_inside_the_extension_or_to_node_paths_are_kept(
    source: Path, root: Path, keys: tuple[KeyPair, KeyPair], tmp_path: Path
) -> None:
    os.symlink("hello", source / "rootfs/usr/bin/hi")
    os.symlink("../../bin/hello", source / "rootfs/usr/local/bin/hello-link")
    os.symlink("/usr/bin/env", source / "rootfs/usr/bin/env-link")
    text = HELLO.replace(
        "  - /usr/local/bin/kubelet", "  - /usr/local/bin/kubelet\n  - /usr/local/bin/hello-link"
    )
    (source / "manifest.yaml").write_text(text)
    build_extension(source, tmp_path / "ok.sqfs", keys[0].private, root)
    entries = listing(tmp_path / "ok.sqfs")
    assert entries["usr/bin/hi"].startswith("l") and entries["usr/bin/env-link"].startswith("l")


def test_a_fifo_and_a_setuid_file_are_refused(
    source: Path, root: Path, keys: tuple[KeyPair, KeyPair]
) -> None:
    fifo = source / "rootfs/usr/bin/pipe"
    os.mkfifo(fifo)
    os.chmod(source / "rootfs/usr/bin/hello", 0o4755)
    errors: list[ExtensionSourceError] = []
    worker = threading.Thread(
        target=lambda: errors.append(refused(source, root, keys[0].private)), daemon=True
    )
    worker.start()
    worker.join(60)
    if worker.is_alive():  # the check opened the fifo to read it: unblock it, then fail
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        worker.join(60)
        pytest.fail("the build blocked reading the fifo")
    (error,) = errors
    assert "device, pipe or socket" in problem_of(error, "rootfs/usr/bin/pipe")
    assert "setuid" in problem_of(error, "rootfs/usr/bin/hello")


def test_every_problem_of_a_source_comes_in_one_error(
    source: Path, root: Path, keys: tuple[KeyPair, KeyPair], standin: Path
) -> None:
    (source / "rootfs/usr/bin/hello").unlink()
    os.mkfifo(source / "rootfs/fifo")
    put(source, "rootfs/usr/local/sbin/extra", standin)
    put(root, "usr/local/bin/kubelet", b"the root's own")
    error = refused(source, root, keys[0].private)
    assert len(error.problems) == 4
    assert f"{source}: 4 errors in the extension source" in error.render()


def _host_dynamic_program() -> Path:
    for candidate in ("/usr/bin/true", "/bin/true"):
        path = Path(candidate)
        if path.is_file() and b"ld-linux-x86-64.so.2" in path.read_bytes():
            return path
    pytest.skip("no dynamically linked /usr/bin/true (glibc, x86_64) on this host")


def _host_libc() -> Path:
    path = Path("/usr/lib/x86_64-linux-gnu/libc.so.6")
    if not path.is_file():
        pytest.skip("no /usr/lib/x86_64-linux-gnu/libc.so.6 on this host")
    return path


def test_a_library_neither_the_root_nor_the_extension_has_is_refused_until_shipped(
    source: Path, tmp_path: Path, keys: tuple[KeyPair, KeyPair]
) -> None:
    bare = make_root(tmp_path / "bare-root", libc=False)
    put(source, "rootfs/usr/bin/true", _host_dynamic_program())
    error = refused(source, bare, keys[0].private)
    message = problem_of(error, "rootfs/usr/bin/true")
    assert "needs libc.so.6" in message and "neither the image's root nor the extension" in message
    put(source, f"rootfs/{LIBDIR}/libc.so.6", _host_libc(), 0o755)
    info, _ = build_extension(source, tmp_path / "with-libc.sqfs", keys[0].private, bare)
    assert f"{LIBDIR}/libc.so.6" in listing(tmp_path / "with-libc.sqfs")
    assert info.name == "hello"


def test_a_fixed_path_program_must_find_its_libraries_in_the_root(
    source: Path, tmp_path: Path, keys: tuple[KeyPair, KeyPair]
) -> None:
    """/usr/local/bin/kubelet runs from the node's own kubelet service, without the
    extension's LD_LIBRARY_PATH: shipping the library in the extension is not enough."""
    bare = make_root(tmp_path / "bare-root", libc=False)
    put(source, "rootfs/usr/local/bin/kubelet", _host_dynamic_program())
    put(source, f"rootfs/{LIBDIR}/libc.so.6", _host_libc(), 0o755)
    error = refused(source, bare, keys[0].private)
    message = problem_of(error, "rootfs/usr/local/bin/kubelet")
    assert "needs libc.so.6, which the image's root does not have" in message, message
    assert "fixed path" in message
    with_libc = make_root(tmp_path / "root-with-libc")
    info, _ = build_extension(source, tmp_path / "fixed.sqfs", keys[0].private, with_libc)
    assert info.name == "hello"


def test_a_program_whose_loader_the_root_lacks_is_refused(
    source: Path, tmp_path: Path, keys: tuple[KeyPair, KeyPair]
) -> None:
    no_loader = tmp_path / "no-loader"
    put(no_loader, f"{LIBDIR}/libc.so.6", b"libc")
    put(source, "rootfs/usr/bin/true", _host_dynamic_program())
    error = refused(source, no_loader, keys[0].private)
    assert "needs the loader /lib64/ld-linux-x86-64.so.2" in problem_of(
        error, "rootfs/usr/bin/true"
    )


def test_a_source_that_does_not_exist(
    tmp_path: Path, root: Path, keys: tuple[KeyPair, KeyPair]
) -> None:
    with pytest.raises(BasaltError, match="does not exist"):
        build_extension(tmp_path / "nothing", tmp_path / "x.sqfs", keys[0].private, root)
    (tmp_path / "file").write_text("x")
    with pytest.raises(BasaltError, match="is not a directory"):
        build_extension(tmp_path / "file", tmp_path / "x.sqfs", keys[0].private, root)
    assert not (tmp_path / "x.sqfs").exists()


# -- OCI image layouts ----------------------------------------------------------------------------

Member = tuple[tarfile.TarInfo, bytes | None]


def tree_members(directory: Path, prefix: str = "") -> list[Member]:
    """The tar entries of ``directory`` (names prefixed with ``prefix``), in order."""
    members: list[Member] = []
    for path in sorted(directory.rglob("*")):
        info = tarfile.TarInfo(prefix + str(path.relative_to(directory)))
        info.mode = stat.S_IMODE(path.lstat().st_mode)
        if path.is_symlink():
            info.type, info.linkname = tarfile.SYMTYPE, os.readlink(path)
            members.append((info, None))
        elif path.is_dir():
            info.type = tarfile.DIRTYPE
            members.append((info, None))
        else:
            data = path.read_bytes()
            info.size = len(data)
            members.append((info, data))
    return members


def entry(name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = "") -> Member:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, link, 0o755
    if kind == tarfile.REGTYPE:
        info.size = len(data)
        return info, data
    return info, None


def write_layout(layout: Path, layers: list[list[Member]], *, gzipped: bool = True) -> Path:
    """An OCI image layout at ``layout``: each layer a tar (gzip or not) of its members,
    blobs/sha256/<digest>, the image manifest, index.json and oci-layout."""
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def blob(data: bytes, media: str) -> dict[str, object]:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return {"mediaType": media, "digest": f"sha256:{digest}", "size": len(data)}

    descriptors = []
    for members in layers:
        raw = io.BytesIO()
        with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as archive:
            for info, data in members:
                archive.addfile(info, io.BytesIO(data) if data is not None else None)
        layer = gzip.compress(raw.getvalue(), mtime=0) if gzipped else raw.getvalue()
        media = "application/vnd.oci.image.layer.v1.tar" + ("+gzip" if gzipped else "")
        descriptors.append(blob(layer, media))
    config = blob(
        b'{"architecture":"amd64","os":"linux"}', "application/vnd.oci.image.config.v1+json"
    )
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config,
        "layers": descriptors,
    }
    image = blob(json.dumps(manifest).encode(), "application/vnd.oci.image.manifest.v1+json")
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [image]}))
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    return layout


@pytest.mark.parametrize(("prefix", "gzipped"), [("", True), ("./", True), ("", False)])
def test_an_oci_layout_builds_the_same_bytes_as_its_directory(
    built: Built, tmp_path: Path, keys: tuple[KeyPair, KeyPair], prefix: str, gzipped: bool
) -> None:
    layout = write_layout(
        tmp_path / "layout", [tree_members(built.source, prefix)], gzipped=gzipped
    )
    info, manifest = build_extension(layout, tmp_path / "oci.sqfs", keys[0].private, built.root)
    assert (tmp_path / "oci.sqfs").read_bytes() == built.path.read_bytes()
    assert info == built.info and manifest == built.manifest


def test_layers_of_an_oci_layout_add_up(
    built: Built, tmp_path: Path, keys: tuple[KeyPair, KeyPair]
) -> None:
    members = tree_members(built.source)
    manifest = [m for m in members if m[0].name == "manifest.yaml"]
    layout = write_layout(
        tmp_path / "layout", [manifest, [m for m in members if m not in manifest]]
    )
    build_extension(layout, tmp_path / "oci.sqfs", keys[0].private, built.root)
    assert (tmp_path / "oci.sqfs").read_bytes() == built.path.read_bytes()


@pytest.mark.parametrize(
    ("bad", "words"),
    [
        (entry("rootfs/../../escape", b"x"), "escapes the image"),
        (entry("./../escape", b"x"), "escapes the image"),
        (entry("/etc/passwd", b"x"), "escapes the image"),
        (entry("rootfs/usr/bin/.wh.hello"), "is a whiteout"),
        (entry("./.wh.rootfs"), "is a whiteout"),
        (entry("./.wh..wh..opq"), "is a whiteout"),
        (
            entry("rootfs/usr/bin/hard", kind=tarfile.LNKTYPE, link="rootfs/usr/bin/hello"),
            "hard link",
        ),
        (entry("rootfs/dev/null", kind=tarfile.CHRTYPE), "device or special file"),
        (entry("rootfs/fifo", kind=tarfile.FIFOTYPE), "device or special file"),
    ],
)
def test_an_oci_layer_entry_that_is_not_plain_is_refused(
    built: Built, tmp_path: Path, keys: tuple[KeyPair, KeyPair], bad: Member, words: str
) -> None:
    layout = write_layout(tmp_path / "layout", [[*tree_members(built.source), bad]])
    with pytest.raises(BasaltError) as caught:
        build_extension(layout, tmp_path / "x.sqfs", keys[0].private, built.root)
    assert str(layout) in caught.value.message and words in caught.value.message
    assert repr(bad[0].name) in caught.value.message
    assert not (tmp_path / "x.sqfs").exists()


def test_an_oci_layer_cannot_write_through_a_symlink(
    built: Built, tmp_path: Path, keys: tuple[KeyPair, KeyPair]
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    layers = [
        [
            *tree_members(built.source),
            entry("rootfs/link", kind=tarfile.SYMTYPE, link=str(outside)),
        ],
        [entry("rootfs/link/planted", b"x")],
    ]
    layout = write_layout(tmp_path / "layout", layers)
    with pytest.raises(BasaltError, match="below a symlink that leads out of the image"):
        build_extension(layout, tmp_path / "x.sqfs", keys[0].private, built.root)
    assert list(outside.iterdir()) == []


def test_an_oci_file_replaces_a_symlink_instead_of_writing_through_it(
    built: Built, tmp_path: Path, keys: tuple[KeyPair, KeyPair]
) -> None:
    victim = tmp_path / "victim"
    victim.write_text("unchanged")
    layers = [
        [
            *tree_members(built.source),
            entry("rootfs/usr/bin/x", kind=tarfile.SYMTYPE, link=str(victim)),
        ],
        [entry("rootfs/usr/bin/x", b"new")],
    ]
    layout = write_layout(tmp_path / "layout", layers)
    build_extension(layout, tmp_path / "x.sqfs", keys[0].private, built.root)
    assert victim.read_text() == "unchanged"
    assert listing(tmp_path / "x.sqfs")["usr/bin/x"].startswith("-rwx")


def test_an_oci_blob_that_does_not_match_its_digest_is_refused(
    built: Built, tmp_path: Path, keys: tuple[KeyPair, KeyPair]
) -> None:
    layout = write_layout(tmp_path / "layout", [tree_members(built.source)])
    index = json.loads((layout / "index.json").read_text())
    manifest_blob = layout / "blobs/sha256" / index["manifests"][0]["digest"].split(":")[1]
    layer = json.loads(manifest_blob.read_text())["layers"][0]["digest"]
    layer_blob = layout / "blobs/sha256" / layer.split(":")[1]
    layer_blob.write_bytes(layer_blob.read_bytes() + b"\0")
    with pytest.raises(BasaltError) as caught:
        build_extension(layout, tmp_path / "x.sqfs", keys[0].private, built.root)
    assert f"blob {layer} (layer 0) is missing or does not match its digest" in str(caught.value)
    layer_blob.unlink()
    with pytest.raises(BasaltError, match="is missing or does not match"):
        build_extension(layout, tmp_path / "x.sqfs", keys[0].private, built.root)
    assert not (tmp_path / "x.sqfs").exists()


def test_an_oci_index_must_name_one_image(
    built: Built, tmp_path: Path, keys: tuple[KeyPair, KeyPair]
) -> None:
    layout = write_layout(tmp_path / "layout", [tree_members(built.source)])
    index = json.loads((layout / "index.json").read_text())
    index["manifests"] *= 2
    (layout / "index.json").write_text(json.dumps(index))
    with pytest.raises(BasaltError, match="expected exactly one manifest, found 2"):
        build_extension(layout, tmp_path / "x.sqfs", keys[0].private, built.root)


# -- finding a schematic's extensions -------------------------------------------------------------


def schematic_of(*refs: CustomExtensionRef) -> Schematic:
    return Schematic(custom_extensions=refs)


def test_resolve_by_a_path_relative_to_the_schematic(
    built: Built, keys: tuple[KeyPair, KeyPair]
) -> None:
    ref = CustomExtensionRef(built.info.sha256, "hello.sqfs")
    sources = ExtensionSources(trusted=(keys[0].trusted,), base=built.path.parent)
    (found,) = sources.resolve(schematic_of(ref))
    assert found.path == built.path and found.info == built.info and found.ref == ref
    absolute = CustomExtensionRef(built.info.sha256, str(built.path))
    assert ExtensionSources(trusted=(keys[0].trusted,)).resolve(schematic_of(absolute))


def test_resolve_by_sha256_in_a_registry(
    built: Built, keys: tuple[KeyPair, KeyPair], tmp_path: Path
) -> None:
    registry = tmp_path / "registry"
    registry.mkdir()
    shutil.copyfile(built.path, registry / f"{built.info.sha256}.sqfs")
    sources = ExtensionSources(search=(tmp_path / "empty", registry), trusted=(keys[0].trusted,))
    (found,) = sources.resolve(schematic_of(CustomExtensionRef(built.info.sha256)))
    assert found.path == registry / f"{built.info.sha256}.sqfs"
    assert found.info.name == "hello"


def _resolve_error(sources: ExtensionSources, *refs: CustomExtensionRef) -> str:
    with pytest.raises(ImageBuildError) as caught:
        sources.resolve(schematic_of(*refs))
    return caught.value.render()


def test_a_file_whose_sha256_differs_from_the_pin_names_both_sums(
    built: Built, keys: tuple[KeyPair, KeyPair]
) -> None:
    ref = CustomExtensionRef(SHA_A, str(built.path))
    text = _resolve_error(ExtensionSources(trusted=(keys[0].trusted,)), ref)
    assert built.info.sha256 in text and SHA_A in text and str(built.path) in text


def test_missing_extensions_are_named(tmp_path: Path) -> None:
    by_path = CustomExtensionRef(SHA_A, "gone.sqfs")
    text = _resolve_error(ExtensionSources(base=tmp_path), by_path)
    assert "gone.sqfs: cannot read" in text
    text = _resolve_error(ExtensionSources(), CustomExtensionRef(SHA_B))
    assert f"sha256 {SHA_B[:16]}" in text and "no such extension" in text and "no registry" in text
    text = _resolve_error(ExtensionSources(search=(tmp_path,)), CustomExtensionRef(SHA_B))
    assert str(tmp_path) in text


def test_resolve_lists_every_problem_including_an_untrusted_signature(
    built: Built, keys: tuple[KeyPair, KeyPair], tmp_path: Path
) -> None:
    refs = (
        CustomExtensionRef(built.info.sha256, str(built.path)),
        CustomExtensionRef(SHA_A, "gone.sqfs"),
    )
    text = _resolve_error(ExtensionSources(trusted=(keys[1].trusted,), base=tmp_path), *refs)
    assert "not trusted here" in text and "gone.sqfs" in text


def test_two_extensions_with_one_name_are_refused(
    built: Built, keys: tuple[KeyPair, KeyPair], tmp_path: Path, standin: Path
) -> None:
    second = make_source(tmp_path / "src2", standin, HELLO.replace('"1.0.0"', '"2.0.0"'))
    info, _ = build_extension(second, tmp_path / "hello-2.sqfs", keys[0].private, built.root)
    refs = (
        CustomExtensionRef(built.info.sha256, str(built.path)),
        CustomExtensionRef(info.sha256, str(tmp_path / "hello-2.sqfs")),
    )
    text = _resolve_error(ExtensionSources(trusted=(keys[0].trusted,)), *refs)
    assert "a second extension named 'hello'" in text


def test_a_custom_extension_may_not_take_an_official_name(
    built: Built, keys: tuple[KeyPair, KeyPair]
) -> None:
    ref = CustomExtensionRef(built.info.sha256, str(built.path))
    sources = ExtensionSources(trusted=(keys[0].trusted,))
    (stage,) = custom_stages(schematic_of(ref), sources, {"qemu-guest-agent"})
    assert (stage.extension, stage.sha256, stage.source) == ("hello", ref.sha256, str(built.path))
    with pytest.raises(ImageError, match="hello has the name of an official extension"):
        custom_stages(schematic_of(ref), sources, {"hello"})


def test_fixed_path_conflicts_between_extensions_and_with_the_root(tmp_path: Path) -> None:
    root = make_root(tmp_path / "root")
    put(root, "opt/cni/bin/bridge", b"the root's own")
    extensions: list[dict[str, Any]] = [
        {"name": "a", "provides": ["/usr/local/bin/kubelet", "/usr/local/bin/kubectl"]},
        {"name": "b", "provides": ["/usr/local/bin/kubelet"]},
        {"name": "c", "provides": ["/opt/cni/bin/bridge", "/opt/cni/bin/host-local"]},
        {"name": "d"},
    ]
    assert fixed_path_conflicts(root, extensions) == [
        "b: /usr/local/bin/kubelet is also provided by a",
        "c: /opt/cni/bin/bridge is in the image's root",
    ]
    assert fixed_path_conflicts(root, [extensions[0], extensions[3]]) == []


# -- basaltctl extension --------------------------------------------------------------------------


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_builds_and_prints_the_sha256_last(
    capsys: pytest.CaptureFixture[str], source: Path, root: Path, tmp_path: Path
) -> None:
    prefix = tmp_path / "keys" / "ext"
    prefix.parent.mkdir()
    assert run(capsys, "gen", "signing-key", "-o", str(prefix))[0] == 0
    out = tmp_path / "out" / "hello.sqfs"
    key = f"{prefix}.key"
    code, stdout, stderr = run(
        capsys,
        "extension",
        "build",
        str(source),
        "-o",
        str(out),
        "--signing-key",
        key,
        "--root",
        str(root),
    )
    assert code == 0, stderr
    assert stdout.splitlines()[-1] == sha256_file(out)
    assert "provides  /usr/local/bin/kubelet" in stderr and "customExtensions:" in stderr
    code, stdout, _ = run(capsys, "extension", "inspect", str(out), "--key", f"{prefix}.pub")
    shown = json.loads(stdout)
    assert code == 0 and shown["verified"] is True and shown["sha256"] == sha256_file(out)
    assert shown["name"] == "hello" and shown["version"] == "1.0.0"
    code, stdout, _ = run(capsys, "extension", "inspect", str(out))
    assert code == 0 and json.loads(stdout)["verified"] is False


def test_cli_inspect_refuses_a_file_signed_by_another_key(
    capsys: pytest.CaptureFixture[str], built: Built, keys: tuple[KeyPair, KeyPair]
) -> None:
    code, stdout, stderr = run(
        capsys, "extension", "inspect", str(built.path), "--key", str(keys[1].pub_file)
    )
    assert code == 1 and stdout == ""
    assert str(built.path) in stderr and "not trusted here" in stderr


def test_cli_lists_every_problem_and_writes_nothing(
    capsys: pytest.CaptureFixture[str],
    source: Path,
    root: Path,
    tmp_path: Path,
    keys: tuple[KeyPair, KeyPair],
    standin: Path,
) -> None:
    (source / "rootfs/usr/bin/hello").unlink()
    put(source, "rootfs/usr/local/bin/kubectl", standin)
    os.symlink("../../..", source / "rootfs/usr/up")
    out = tmp_path / "out" / "hello.sqfs"
    code, stdout, stderr = run(
        capsys,
        "extension",
        "build",
        str(source),
        "-o",
        str(out),
        "--signing-key",
        str(keys[0].key_file),
        "--root",
        str(root),
    )
    assert code == 1 and stdout == ""
    assert "3 errors in the extension source" in stderr
    for words in ("/usr/bin/hello is not in rootfs/", "kubectl", "leaves the extension"):
        assert words in stderr
    assert "Traceback" not in stderr
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


def test_cli_refuses_a_bad_signing_key_before_any_work(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, keys: tuple[KeyPair, KeyPair]
) -> None:
    code, _, stderr = run(
        capsys,
        "extension",
        "build",
        str(tmp_path / "nothing"),
        "-o",
        str(tmp_path / "x.sqfs"),
        "--signing-key",
        str(keys[0].pub_file),
        "--root",
        str(tmp_path),
    )
    assert code == 1 and "not a PEM private key" in stderr


# -- schematics: customExtensions -----------------------------------------------------------------


def custom_schematic(body: str) -> str:
    return "customization:\n  systemExtensions:\n    customExtensions:" + body


def test_custom_extensions_parse_sorted_and_only_their_sha256_is_in_the_id() -> None:
    schematic = parse_schematic(
        custom_schematic(
            f"\n      - path: ./hello.sqfs\n        sha256: {SHA_B}\n      - sha256: {SHA_A}\n"
        )
    )
    assert schematic.custom_extensions == (
        CustomExtensionRef(SHA_A),
        CustomExtensionRef(SHA_B, "./hello.sqfs"),
    )
    moved = parse_schematic(
        custom_schematic(f" [{{sha256: {SHA_A}}}, {{sha256: {SHA_B}, path: /x.sqfs}}]\n")
    )
    assert moved.id == schematic.id and moved != schematic
    assert schematic.id != Schematic().id
    assert schematic.record()["customExtensions"] == [SHA_A, SHA_B]
    assert "customExtensions" not in Schematic().record()
    assert parse_schematic(schematic.to_yaml()) == schematic


@pytest.mark.parametrize(
    ("body", "path", "words"),
    [
        (" [{path: a.sqfs, sha256: abc123}]", "[0].sha256", "is not a sha256"),
        (f" [{{sha256: {SHA_A.upper()}}}]", "[0].sha256", "is not a sha256"),
        (" [{sha256: 12}]", "[0].sha256", "is not a sha256"),
        (" [{path: a.sqfs}]", "[0].sha256", "is required"),
        (
            f" [{{sha256: {SHA_A}}}, {{sha256: {SHA_A}, path: b.sqfs}}]",
            "[1].sha256",
            "listed twice",
        ),
        (f" {{sha256: {SHA_A}}}", "", "must be a list"),
        (f" {SHA_A}", "", "must be a list"),
        (" [hello.sqfs]", "[0]", "must be a mapping"),
        (f" [{{sha256: {SHA_A}, url: 'https://x'}}]", "[0].url", "unknown field 'url'"),
        (f" [{{sha256: {SHA_A}, path: ''}}]", "[0].path", "non-empty string"),
    ],
)
def test_custom_extension_errors_name_the_field(body: str, path: str, words: str) -> None:
    with pytest.raises(SchematicError) as caught:
        parse_schematic(custom_schematic(body + "\n"), "s.yaml")
    message = problem_of(caught.value, "customization.systemExtensions.customExtensions" + path)
    assert words in message
    assert all(p.line == 3 for p in caught.value.problems)


def test_every_custom_extension_problem_is_listed() -> None:
    text = custom_schematic(
        f"\n      - {{sha256: nope}}\n      - {{path: x}}\n      - {{sha256: {SHA_A}, size: 3}}\n"
    )
    with pytest.raises(SchematicError) as caught:
        parse_schematic(text, "s.yaml")
    prefix = "customization.systemExtensions.customExtensions"
    assert [(p.path.removeprefix(prefix), p.line) for p in caught.value.problems] == [
        ("[0].sha256", 4),
        ("[1].sha256", 5),
        ("[2].size", 6),
    ]
    assert "s.yaml: 3 errors in the schematic" in caught.value.render()


# -- manifests: environment and provides ----------------------------------------------------------


def manifest_with(service_extra: str = "", provides: str = "") -> str:
    text = "name: x\nversion: '1'\nservices:\n  - name: s\n    command: /usr/bin/s\n"
    return text + service_extra + provides


def test_environment_is_sorted_and_numbers_become_strings() -> None:
    text = manifest_with("    environment:\n      ZED: z\n      PORT: 8080\n      RATIO: 0.5\n")
    (service,) = parse_manifest(text).services
    assert service.environment == (("PORT", "8080"), ("RATIO", "0.5"), ("ZED", "z"))
    manifest = parse_manifest(text)
    assert parse_manifest(manifest.to_yaml()) == manifest


@pytest.mark.parametrize(
    ("line", "key", "words"),
    [
        ("LD_PRELOAD: /x.so", "LD_PRELOAD", "is set by machined"),
        ("LD_LIBRARY_PATH: /x", "LD_LIBRARY_PATH", "is set by machined"),
        ("LD_AUDIT: /x.so", "LD_AUDIT", "is set by machined"),
        ("PATH: /x", "PATH", "is set by machined"),
        ("LANG: C", "LANG", "is set by machined"),
        ("1ABC: x", '["1ABC"]', "not an environment variable name"),
        ("A-B: x", '["A-B"]', "not an environment variable name"),
        ("1: x", '["1"]', "not an environment variable name"),
        ("LIST: [a, b]", "LIST", "must be a string, not a list"),
        ("MAP: {a: b}", "MAP", "must be a string, not a mapping"),
        ("FLAG: true", "FLAG", "must be a string, not a boolean"),
        ("EMPTY:", "EMPTY", "must be a string, not empty"),
    ],
)
def test_environment_errors(line: str, key: str, words: str) -> None:
    with pytest.raises(ManifestError) as caught:
        parse_manifest(manifest_with(f"    environment:\n      {line}\n"), "m.yaml")
    sep = "" if key.startswith("[") else "."
    assert words in problem_of(caught.value, f"services[0].environment{sep}{key}")


def test_environment_must_be_a_mapping() -> None:
    with pytest.raises(ManifestError) as caught:
        parse_manifest(manifest_with("    environment: [A=b]\n"))
    assert "must be a mapping" in problem_of(caught.value, "services[0].environment")


@pytest.mark.parametrize("name", RESERVED_SERVICE_NAMES)
def test_a_service_may_not_take_the_name_of_one_machined_runs(name: str) -> None:
    with pytest.raises(ManifestError) as caught:
        parse_manifest(manifest_with().replace("name: s\n", f"name: {name}\n"), "m.yaml")
    assert "machined runs itself" in problem_of(caught.value, "services[0].name")


def test_the_reserved_service_names_are_machineds_own() -> None:
    from basalt.machined.containerd.runtime import SERVICE_ID

    assert SERVICE_ID in RESERVED_SERVICE_NAMES
    machined = Path(__file__).resolve().parents[2] / "src/basalt/machined"
    services = (machined / "system_services.py").read_text()
    for text in (services, (machined / "etcd/service.py").read_text()):
        for found in re.findall(r'\bid="([a-z-]+)"', text):  # id="kubelet", id="etcd"
            assert found in RESERVED_SERVICE_NAMES
    for found in re.findall(r'_server_service\(node, \w+, \w+, "([a-z]+)"\)', services):
        assert found in RESERVED_SERVICE_NAMES  # apid, trustd


def test_provides_is_sorted_and_names_its_overlay_directories() -> None:
    text = manifest_with(provides="provides: [/usr/local/bin/kubelet, /opt/cni/bin/bridge]\n")
    manifest = parse_manifest(text)
    assert manifest.provides == ("/opt/cni/bin/bridge", "/usr/local/bin/kubelet")
    assert manifest.overlay_directories() == ("opt/cni/bin", "usr/local/bin")
    assert parse_manifest(manifest.to_yaml()) == manifest


@pytest.mark.parametrize(
    ("value", "path", "words"),
    [
        ("[/usr/bin/hello]", "provides[0]", "not below a directory extensions may provide"),
        ("[/usr/local/bin]", "provides[0]", "not below a directory"),
        ("[/usr/local/binary/x]", "provides[0]", "not below a directory"),
        ("[/etc/kubernetes/x]", "provides[0]", "not below a directory"),
        ("[usr/local/bin/x]", "provides[0]", "absolute, normal path"),
        ("[/usr/local/bin/../sbin/x]", "provides[0]", "no '..'"),
        ("[/usr/local/bin/./x]", "provides[0]", "absolute, normal path"),
        ("[/usr/local/bin//x]", "provides[0]", "absolute, normal path"),
        ("[/usr/local/bin/x, /usr/local/bin/x]", "provides[1]", "listed twice"),
        ("/usr/local/bin/x", "provides", "must be a list of strings"),
        ("[5]", "provides[0]", "must be a string"),
    ],
)
def test_provides_errors(value: str, path: str, words: str) -> None:
    with pytest.raises(ManifestError) as caught:
        parse_manifest(manifest_with(provides=f"provides: {value}\n"), "m.yaml")
    assert words in problem_of(caught.value, path)


def test_every_manifest_problem_is_listed_at_once() -> None:
    text = manifest_with(
        "    environment: {PATH: /x, OK: fine, BAD-NAME: y}\n",
        "provides: [/usr/bin/x, /opt/cni/bin/ok, /opt/cni/bin/ok]\n",
    )
    with pytest.raises(ManifestError) as caught:
        parse_manifest(text, "m.yaml")
    assert sorted(p.path for p in caught.value.problems) == [
        "provides[0]",
        "provides[2]",
        "services[0].environment.PATH",
        'services[0].environment["BAD-NAME"]',
    ]


def test_two_extensions_with_a_service_of_the_same_name_are_refused() -> None:
    from basalt.imager.pipeline import service_conflicts

    described = [
        {"name": "alpha", "services": ["ext-agent", "ext-alpha"]},
        {"name": "beta", "services": ["ext-agent"]},
        {"name": "gamma", "services": ["ext-gamma"]},
    ]
    assert service_conflicts(described) == ["beta: service ext-agent is also a service of alpha"]
    assert service_conflicts(described[::2]) == []
