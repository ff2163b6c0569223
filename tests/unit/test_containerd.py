"""Pure parts of the runtime lane: image tars (checked before anything is written), chain
ids, containerd's config, the OCI runtime spec, and the test image's hand-made ELF."""

from __future__ import annotations

import hashlib
import io
import json
import platform
import subprocess
import tarfile
from pathlib import Path

import pytest

from basalt.machined.containerd import archive
from basalt.machined.containerd.config import ContainerdPaths
from basalt.machined.containerd.spec import command, environment, runtime_spec
from tests.fakes.oci import docker_archive_tar, elf_program, oci_layout_tar

PROGRAMS = {"/hello": (b"hello\n", 0)}
NAME = "example.org/t/hello:1"


def _parse(tmp_path: Path, data: bytes, name: str = "") -> archive.ParsedImage:
    path = tmp_path / "image.tar"
    path.write_bytes(data)
    return archive.parse(path, tmp_path / "work", name=name)


def _retar(data: bytes, change: dict[str, bytes | None]) -> bytes:
    """The tar with members replaced (bytes) or dropped (None)."""
    out = io.BytesIO()
    with (
        tarfile.open(fileobj=io.BytesIO(data)) as source,
        tarfile.open(fileobj=out, mode="w") as target,
    ):
        for member in source.getmembers():
            body = source.extractfile(member)
            content = body.read() if body else b""
            if member.name in change:
                replaced = change[member.name]
                if replaced is None:
                    continue
                content = replaced
                member.size = len(content)
            target.addfile(member, io.BytesIO(content))
    return out.getvalue()


def _members(data: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}  # type: ignore[union-attr]


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the test program is x86-64")
def test_the_hand_made_elf_prints_exactly_its_message_and_exits_with_its_code(
    tmp_path: Path,
) -> None:
    program = tmp_path / "hello"
    program.write_bytes(elf_program(b"exactly this\n", 7))
    program.chmod(0o755)
    result = subprocess.run([str(program)], capture_output=True, check=False)
    assert (result.returncode, result.stdout, result.stderr) == (7, b"exactly this\n", b"")


def test_oci_layout_parses_with_verified_blobs(tmp_path: Path) -> None:
    image = _parse(tmp_path, oci_layout_tar(NAME, PROGRAMS, ["/hello"]))
    assert image.name == NAME
    assert image.manifest.media_type == archive.OCI_MANIFEST
    assert [layer.media_type for layer in image.layers] == [
        "application/vnd.oci.image.layer.v1.tar+gzip"
    ]
    for blob in (image.manifest, image.config, *image.layers):
        assert "sha256:" + hashlib.sha256(blob.path.read_bytes()).hexdigest() == blob.digest
    assert image.manifest_labels == {
        "containerd.io/gc.ref.content.config": image.config.digest,
        "containerd.io/gc.ref.content.l.0": image.layers[0].digest,
    }
    assert len(image.diff_ids) == 1


def test_docker_archive_gets_a_manifest_and_its_repo_tag(tmp_path: Path) -> None:
    image = _parse(tmp_path, docker_archive_tar(NAME, PROGRAMS, ["/hello"]))
    assert image.name == NAME
    assert image.layers[0].media_type == archive.DOCKER_LAYER
    manifest = json.loads(image.manifest.path.read_bytes())
    assert manifest["config"]["digest"] == image.config.digest
    assert image.diff_ids == [image.layers[0].digest]  # uncompressed: the layer is its diff


def test_a_given_name_wins_and_is_checked(tmp_path: Path) -> None:
    data = oci_layout_tar(NAME, PROGRAMS, ["/hello"])
    assert _parse(tmp_path, data, name="example.org/other:2").name == "example.org/other:2"
    with pytest.raises(archive.ArchiveError, match="is not an image name"):
        _parse(tmp_path, data, name="Bad Name")


def _oci_with(change_blob: str, mutate: object) -> bytes:
    data = oci_layout_tar(NAME, PROGRAMS, ["/hello"])
    members = _members(data)
    index = json.loads(members["index.json"])
    manifest_digest = index["manifests"][0]["digest"]
    manifest = json.loads(members[f"blobs/sha256/{manifest_digest[7:]}"])
    target = {
        "layer": manifest["layers"][0]["digest"],
        "config": manifest["config"]["digest"],
    }[change_blob]
    name = f"blobs/sha256/{target[7:]}"
    return _retar(data, {name: mutate(members[name])})  # type: ignore[operator]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"no tar here" * 50, "not a readable tar archive"),
        (
            _retar(oci_layout_tar(NAME, PROGRAMS, ["/hello"]), {"index.json": None}),
            "neither an OCI image layout",
        ),
        (_oci_with("layer", lambda b: b[:-1] + b"x"), "hashes to"),
        (_oci_with("layer", lambda b: None), "is missing from the archive"),
        (_oci_with("config", lambda b: b + b" "), "bytes, its descriptor says"),
        (oci_layout_tar(NAME, PROGRAMS, ["/hello"], annotate=False), "give a name"),
    ],
    ids=["garbage", "no-index", "bad-digest", "missing-layer", "wrong-size", "no-name"],
)
def test_bad_archives_are_refused_with_what_and_where(
    tmp_path: Path, data: bytes, message: str
) -> None:
    with pytest.raises(archive.ArchiveError, match=message):
        _parse(tmp_path, data)


def test_two_images_in_one_layout_are_refused(tmp_path: Path) -> None:
    data = oci_layout_tar(NAME, PROGRAMS, ["/hello"])
    index = json.loads(_members(data)["index.json"])
    index["manifests"] *= 2
    with pytest.raises(archive.ArchiveError, match="holds 2 images"):
        _parse(tmp_path, _retar(data, {"index.json": json.dumps(index).encode()}))


def test_chain_ids_follow_the_oci_definition() -> None:
    a, b = "sha256:" + "a" * 64, "sha256:" + "b" * 64
    second = "sha256:" + hashlib.sha256(f"{a} {b}".encode()).hexdigest()
    assert archive.chain_ids([a, b]) == [a, second]


def test_metal_config_serves_the_cri_on_run_containerd() -> None:
    paths = ContainerdPaths.metal(Path("/"), Path("/var"))
    text = paths.render()
    assert 'root = "/var/lib/containerd"' in text
    assert 'state = "/run/containerd"' in text
    assert 'address = "/run/containerd/containerd.sock"' in text
    assert 'snapshotter = "overlayfs"' in text
    assert "disabled_plugins" not in text
    # the metal platform mounts a tmpfs on /etc/cni: the CRI reads (and creates) net.d there
    assert paths.cni_conf_dir == Path("/etc/cni/net.d")
    assert 'conf_dir = "/etc/cni/net.d"' in text


def test_metal_mounts_a_writable_etc_cni_that_the_image_provides() -> None:
    from basalt.machined.platform.metal import IMAGE_MOUNT_DIRECTORIES, RUNTIME_FILESYSTEMS

    assert "etc/cni" in IMAGE_MOUNT_DIRECTORIES
    (point,) = [p for p in RUNTIME_FILESYSTEMS if p.target == "/etc/cni"]
    assert point.fstype == "tmpfs"
    assert "ro" not in point.options.split(",")
    paths = ContainerdPaths.metal(Path("/node"), Path("/node/var"))
    assert paths.cni_conf_dir == Path("/node/etc/cni/net.d")


def test_process_node_config_stays_under_its_own_dir(tmp_path: Path) -> None:
    paths = ContainerdPaths.under(tmp_path / "var")
    text = paths.render()
    for line in text.splitlines():
        if '= "/' in line:
            assert str(tmp_path) in line, line
    assert 'disabled_plugins = ["io.containerd.grpc.v1.cri"]' in text
    long = ContainerdPaths.under(Path("/tmp/" + "x" * 100))
    with pytest.raises(ValueError, match="longer than 107 bytes"):
        long.check()


def test_spec_runs_the_entrypoint_with_args_in_its_own_namespaces() -> None:
    config = {"config": {"Entrypoint": ["/bin/tool"], "Cmd": ["--help"], "Env": ["A=1"]}}
    assert command(config, []) == ["/bin/tool", "--help"]
    assert command(config, ["run"]) == ["/bin/tool", "run"]
    assert environment(config, ["A=2", "B=3"])[:2] == ["A=2", "B=3"]
    with pytest.raises(ValueError, match="not NAME=value"):
        environment(config, ["oops"])
    with pytest.raises(ValueError, match="no entrypoint or cmd"):
        command({}, [])
    spec = json.loads(runtime_spec("run-1", ["/hello"], ["PATH=/"]))
    kinds = {n["type"] for n in spec["linux"]["namespaces"]}
    assert kinds == {"pid", "ipc", "uts", "mount", "network"}
    assert all("path" not in n for n in spec["linux"]["namespaces"])  # none shared
    assert spec["process"]["noNewPrivileges"] is True
    assert spec["linux"]["cgroupsPath"] == "/basalt/run-1"
