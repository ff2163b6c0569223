"""Extensions at fixed root paths and the boot's checks of extension images: the overlay
plan (which directories, which lower directories, which extensions are refused and why)
from temporary trees standing in for mounted extensions, the overlay mounts through a
fake mount table, the sha256 check of an image against the schematic record, the
service environment, and the skipped extensions on the Versions resource."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
from pathlib import Path

import pytest

from basalt.machined.extensions import (
    SERVICE_PATH,
    ExtensionRunner,
    MountedExtension,
    check_image,
    file_sha256,
    mount_and_log,
    mount_extensions,
    mount_overlays,
    overlay_options,
    plan_overlays,
)
from basalt.machined.sys import mount
from basalt.machinery.image_layout import EXTENSIONS_DIR, OVERLAY_DIRECTORIES
from basalt.machinery.resources import VersionSpec
from basalt.machinery.schematic import ExtensionManifest, ExtensionService
from tests.fakes.mounts import FakeMountTable

BIN = "usr/local/bin"
CNI = "opt/cni/bin"


def _root(tmp_path: Path, files: tuple[str, ...] = ()) -> Path:
    """An image root: every overlay directory, empty, and ``files`` in them."""
    root = tmp_path / "root"
    for directory in OVERLAY_DIRECTORIES:
        (root / directory).mkdir(parents=True, exist_ok=True)
    for name in files:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("root's\n")
    return root


def _ext(
    root: Path, name: str, provides: tuple[str, ...], files: tuple[str, ...] | None = None
) -> MountedExtension:
    """A mounted extension's tree at root/usr/lib/basalt/extensions/NAME holding
    ``files`` (default: what it provides)."""
    tree = root / EXTENSIONS_DIR / name
    tree.mkdir(parents=True)
    for path in provides if files is None else files:
        (tree / path.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        (tree / path.lstrip("/")).write_text(f"{name}\n")
    manifest = ExtensionManifest(name, "1.0", provides=tuple(sorted(provides)))
    return MountedExtension(manifest, tree, "/dev/loop0")


# -- the plan ---------------------------------------------------------------------------------


def test_one_overlay_per_directory_extensions_first_by_name_root_last(tmp_path: Path) -> None:
    root = _root(tmp_path)
    kube = _ext(root, "kubernetes", ("/usr/local/bin/kubelet", "/usr/local/bin/kubectl"))
    cni = _ext(root, "cni-plugins", ("/opt/cni/bin/bridge", "/usr/local/bin/cnitool"))
    plain = _ext(root, "qemu-guest-agent", (), files=("/usr/bin/qemu-ga",))
    overlays, refused = plan_overlays([plain, kube, cni], root)
    assert refused == {}
    assert overlays == {
        BIN: [cni.root / BIN, kube.root / BIN, root / BIN],
        CNI: [cni.root / CNI, root / CNI],
    }


def test_no_extension_provides_anything_no_overlay(tmp_path: Path) -> None:
    root = _root(tmp_path)
    plain = _ext(root, "qemu-guest-agent", (), files=("/usr/bin/qemu-ga",))
    assert plan_overlays([plain], root) == ({}, {})


@pytest.mark.parametrize(
    ("others", "provides", "files", "reason"),
    [
        # another extension, earlier by name, has the path: the later one is refused
        (
            {"a-kube": ("/usr/local/bin/kubelet",)},
            ("/usr/local/bin/kubelet",),
            None,
            "/usr/local/bin/kubelet is also provided by extension a-kube",
        ),
        # a file where the path needs a directory, and a path below a provided directory
        (
            {"a-lib": ("/usr/local/lib/foo",)},
            ("/usr/local/lib/foo/x.so",),
            None,
            "/usr/local/lib/foo/x.so is also provided by extension a-lib",
        ),
        (
            {"a-lib": ("/usr/local/lib/foo/x.so",)},
            ("/usr/local/lib/foo",),
            None,
            "/usr/local/lib/foo is also provided by extension a-lib",
        ),
        # the manifest provides a file the tree does not have
        ({}, ("/usr/local/bin/kubelet",), (), "/usr/local/bin/kubelet is not in the extension"),
        # the tree has a file in the overlay directory that the manifest does not provide
        (
            {},
            ("/usr/local/bin/kubelet",),
            ("/usr/local/bin/kubelet", "/usr/local/bin/sh"),
            "/usr/local/bin/sh is in the extension but its manifest does not provide it",
        ),
    ],
)
def test_refusals_name_the_path_and_the_other_extension(
    tmp_path: Path,
    others: dict[str, tuple[str, ...]],
    provides: tuple[str, ...],
    files: tuple[str, ...] | None,
    reason: str,
) -> None:
    root = _root(tmp_path)
    earlier = [_ext(root, name, paths) for name, paths in others.items()]
    late = _ext(root, "z-late", provides, files)
    overlays, refused = plan_overlays([late, *earlier], root)
    assert reason in refused["z-late"]
    assert set(refused) == {"z-late"}
    assert all(late.root / d not in lowers for d, lowers in overlays.items())


def test_empty_directories_may_stay_but_hide_no_file(tmp_path: Path) -> None:
    root = _root(tmp_path, files=("usr/local/lib/python3",))
    first = _ext(root, "a", ("/usr/local/lib/liba.so",))
    (first.root / "usr/local/lib/pkgconfig").mkdir()  # empty: allowed
    second = _ext(root, "b", ("/usr/local/lib/pkgconfig",))  # a's directory would hide it
    third = _ext(root, "c", ("/usr/local/lib/libc.so",))
    (third.root / "usr/local/lib/python3").mkdir()  # would hide the root's file
    overlays, refused = plan_overlays([first, second, third], root)
    assert refused == {
        "b": "/usr/local/lib/pkgconfig is a directory in extension a",
        "c": "/usr/local/lib/python3, a directory in the extension, is a file in the root",
    }
    assert overlays == {"usr/local/lib": [first.root / "usr/local/lib", root / "usr/local/lib"]}


def test_a_path_the_root_has_refuses_the_extension(tmp_path: Path) -> None:
    root = _root(tmp_path, files=("usr/local/bin/kubelet",))
    kube = _ext(root, "kubernetes", ("/usr/local/bin/kubelet",))
    assert plan_overlays([kube], root) == (
        {},
        {"kubernetes": "/usr/local/bin/kubelet is in the image's root"},
    )


def test_a_root_without_the_directory_refuses_the_extension(tmp_path: Path) -> None:
    root = _root(tmp_path)
    (root / CNI).rmdir()
    cni = _ext(root, "cni-plugins", ("/opt/cni/bin/bridge",))
    _, refused = plan_overlays([cni], root)
    assert refused == {
        "cni-plugins": "the image's root has no /opt/cni/bin to show /opt/cni/bin/bridge in"
    }


def test_a_refused_extension_is_out_of_every_overlay_and_does_not_block_a_later_one(
    tmp_path: Path,
) -> None:
    root = _root(tmp_path)
    first = _ext(root, "a", ("/opt/cni/bin/bridge",))
    # b collides in opt/cni/bin, so its usr/local/bin file is not shown either...
    second = _ext(root, "b", ("/opt/cni/bin/bridge", "/usr/local/bin/tool"))
    # ...and c may provide that file: what a refused extension provides is not taken.
    third = _ext(root, "c", ("/usr/local/bin/tool",))
    overlays, refused = plan_overlays([first, second, third], root)
    assert set(refused) == {"b"}
    assert overlays == {BIN: [third.root / BIN, root / BIN], CNI: [first.root / CNI, root / CNI]}


def test_every_problem_of_an_extension_is_reported(tmp_path: Path) -> None:
    root = _root(tmp_path, files=("usr/local/bin/kubectl",))
    kube = _ext(root, "kube", ("/usr/local/bin/kubectl", "/usr/local/bin/kubelet"), files=())
    (kube.root / "usr/local/bin/kubectl").parent.mkdir(parents=True)
    (kube.root / "usr/local/bin/kubectl").write_text("x")
    _, refused = plan_overlays([kube], root)
    assert refused["kube"] == (
        "/usr/local/bin/kubelet is not in the extension (its manifest provides it); "
        "/usr/local/bin/kubectl is in the image's root"
    )


def test_a_symlinked_directory_in_the_extension_is_refused(tmp_path: Path) -> None:
    root = _root(tmp_path)
    elsewhere = tmp_path / "elsewhere/bin"
    elsewhere.mkdir(parents=True)
    (elsewhere / "kubelet").write_text("x")
    kube = _ext(root, "kube", ("/usr/local/bin/kubelet",), files=())
    (kube.root / "usr").mkdir()
    (kube.root / "usr/local").symlink_to(tmp_path / "elsewhere")
    _, refused = plan_overlays([kube], root)
    assert "/usr/local/bin in the extension is not a plain directory" in refused["kube"]


def test_an_overlay_already_up_hides_the_root_side(tmp_path: Path) -> None:
    """A second pass (the overlay already mounted) sees the extension's file in the root's
    directory; it must not take that for a collision."""
    root = _root(tmp_path, files=("usr/local/bin/kubelet",))
    kube = _ext(root, "kube", ("/usr/local/bin/kubelet",))
    overlays, refused = plan_overlays([kube], root, mounted={BIN})
    assert refused == {} and overlays == {BIN: [kube.root / BIN, root / BIN]}


def test_overlay_options_escape_separators() -> None:
    lowers = [Path("/x/a:b"), Path("/x/c,d"), Path("/x/e\\f"), Path("/root/usr/local/bin")]
    assert overlay_options(lowers) == ("lowerdir=/x/a\\:b:/x/c\\,d:/x/e\\\\f:/root/usr/local/bin")


# -- mounting them ------------------------------------------------------------------------------


def test_overlays_are_mounted_read_only_once_each(tmp_path: Path) -> None:
    root = _root(tmp_path)
    kube = _ext(root, "kubernetes", ("/usr/local/bin/kubelet",))
    cni = _ext(root, "cni-plugins", ("/opt/cni/bin/bridge",))
    table = FakeMountTable()
    kept, refused = mount_overlays([cni, kube], root, table)
    assert kept == [cni, kube] and refused == {}
    assert [(m.source, m.target, m.fstype, m.flags) for m in table.mounts] == [
        ("basalt-ext", root / CNI, "overlay", mount.MS_RDONLY | mount.MS_NODEV),
        ("basalt-ext", root / BIN, "overlay", mount.MS_RDONLY | mount.MS_NODEV),
    ]
    assert table.mounts[1].data == f"lowerdir={kube.root / BIN}:{root / BIN}"
    # idempotent: a second pass finds them mounted and mounts nothing
    assert mount_overlays([cni, kube], root, table) == ([cni, kube], {})
    assert len(table.mounts) == 2


def test_a_failed_overlay_refuses_its_extensions_and_the_boot_goes_on(tmp_path: Path) -> None:
    root = _root(tmp_path)
    kube = _ext(root, "kubernetes", ("/usr/local/bin/kubelet",))
    cni = _ext(root, "cni-plugins", ("/opt/cni/bin/bridge",))
    plain = _ext(root, "qemu-guest-agent", (), files=("/usr/bin/qemu-ga",))
    table = FakeMountTable(failing={root / BIN: errno.ENODEV})
    kept, refused = mount_overlays([cni, kube, plain], root, table)
    assert kept == [cni, plain]
    assert refused == {
        "kubernetes": "the overlay on /usr/local/bin failed: [Errno 19] "
        f"No such device: '{root / BIN}'"
    }


def test_a_colliding_extension_is_not_kept_so_its_services_do_not_run(tmp_path: Path) -> None:
    root = _root(tmp_path)
    first = _ext(root, "a", ("/usr/local/bin/kubelet",))
    second = _ext(root, "b", ("/usr/local/bin/kubelet",))
    kept, refused = mount_overlays([first, second], root, FakeMountTable())
    assert kept == [first]
    assert refused == {"b": "/usr/local/bin/kubelet is also provided by extension a"}


# -- the images' sha256 -------------------------------------------------------------------------


def _image(directory: Path, name: str, data: bytes) -> tuple[Path, str]:
    directory.mkdir(parents=True, exist_ok=True)
    image = directory / f"{name}.sqfs"
    image.write_bytes(data)
    return image, hashlib.sha256(data).hexdigest()


def test_file_sha256_reads_in_chunks(tmp_path: Path) -> None:
    data = bytes(range(256)) * 8193  # a little over 2 MiB: three reads
    image, digest = _image(tmp_path, "big", data)
    assert file_sha256(image) == digest


def test_an_image_that_changed_since_the_build_is_refused(tmp_path: Path) -> None:
    image, digest = _image(tmp_path, "hello", b"hsqs" + bytes(100) + b"signature trailer")
    record = {"extensions": [], "sha256": {"hello": digest}, "customExtensions": [digest]}
    assert check_image(image, record) is None
    image.write_bytes(b"hsqs" + bytes(100) + b"another trailer!!")
    found = file_sha256(image)
    reason = check_image(image, record)
    assert reason == (
        f"{image} changed since the image was built: expected sha256 {digest}, found {found}"
    )


@pytest.mark.parametrize(
    ("record", "refused"),
    [
        ({}, False),  # no record: an image older than schematics
        ({"id": "x", "extensions": ["hello"]}, False),  # no sha256 table: older image
        ({"id": "x", "extensions": ["qemu-guest-agent"]}, True),  # not one it lists
        ({"id": "x", "extensions": [], "sha256": {}}, True),  # the table names every image
        ({"id": "x", "extensions": [], "sha256": {"other": "0" * 64}}, True),
    ],
)
def test_an_image_the_record_does_not_name_is_refused(
    tmp_path: Path, record: dict[str, object], refused: bool
) -> None:
    image, _ = _image(tmp_path, "hello", b"hsqs")
    reason = check_image(image, record)
    assert (reason is not None) is refused
    if reason:
        assert str(image) in reason and "not one of the image's extensions" in reason


def _boot_dir(tmp_path: Path, record: dict[str, object]) -> Path:
    directory = tmp_path / EXTENSIONS_DIR
    directory.mkdir(parents=True)
    (directory / "schematic.json").write_text(json.dumps(record))
    return directory


def test_mount_extensions_skips_a_changed_image_before_attaching_it(tmp_path: Path) -> None:
    directory = _boot_dir(tmp_path, {"id": "x", "extensions": [], "sha256": {}})
    image, digest = _image(directory, "hello", b"hsqs and more")
    (directory / "hello").mkdir()
    (directory / "schematic.json").write_text(
        json.dumps({"id": "x", "extensions": [], "sha256": {"hello": "f" * 64}})
    )
    mounted, failed = mount_extensions(tmp_path)
    assert mounted == []
    assert failed == [
        f"hello: {image} changed since the image was built: "
        f"expected sha256 {'f' * 64}, found {digest}"
    ]
    # with the right sha256 the image gets as far as the loop device (none here)
    (directory / "schematic.json").write_text(
        json.dumps({"id": "x", "extensions": [], "sha256": {"hello": digest}})
    )
    _, failed = mount_extensions(tmp_path)
    assert len(failed) == 1 and "loop-control" in failed[0]


def test_each_skip_is_one_log_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    directory = _boot_dir(tmp_path, {"id": "x", "extensions": ["a"], "sha256": {}})
    _image(directory, "stray", b"hsqs")
    with caplog.at_level(logging.ERROR, logger="basalt.machined.extensions"):
        mounted, skipped = mount_and_log(tmp_path)
    assert mounted == [] and len(skipped) == 1 and skipped[0].startswith("stray: ")
    (record,) = caplog.records
    assert record.getMessage().startswith("extension stray: ") and record.exc_info is None
    assert "\n" not in record.getMessage()


# -- services and reporting ---------------------------------------------------------------------


def test_service_environment_adds_the_manifests_and_machined_wins(tmp_path: Path) -> None:
    service = ExtensionService(
        "ext-hello",
        "/usr/bin/hello",
        environment=(("GREETING", "hi"), ("LANG", "fr_FR.UTF-8"), ("PATH", "/tmp")),
    )
    extension = _ext(tmp_path, "hello", (), files=("/usr/bin/hello",))
    environment = ExtensionRunner(extension, service, tmp_path).environment()
    assert environment["GREETING"] == "hi"
    assert environment["LANG"] == "C.UTF-8"
    assert environment["PATH"] == SERVICE_PATH
    assert SERVICE_PATH.startswith("/usr/local/bin:/usr/local/sbin:")
    assert environment["LD_LIBRARY_PATH"].startswith(str(extension.root))


def test_versions_carries_the_skipped_extensions() -> None:
    spec = VersionSpec(
        tag="v1",
        python="3.11",
        platform="metal",
        arch="x86_64",
        extensions_skipped=["b: /usr/local/bin/kubelet is also provided by extension a"],
    )
    data = spec.to_dict()
    assert data["extensionsSkipped"] == [
        "b: /usr/local/bin/kubelet is also provided by extension a"
    ]
    assert VersionSpec.from_dict(data) == spec
    assert VersionSpec(tag="v", python="3", platform="m", arch="a").extensions_skipped == []


def test_a_service_name_two_extensions_share_starts_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The image builder refuses this; a node given such an image starts the first
    extension's service and says why the second does not run (no crash)."""
    from basalt.machined.extensions import extension_services
    from basalt.machinery.schematic import ExtensionManifest, ExtensionService

    service = ExtensionService("ext-agent", "/usr/bin/agent")
    first = MountedExtension(ExtensionManifest("alpha", "1", "", (service,)), tmp_path, "")
    second = MountedExtension(ExtensionManifest("beta", "1", "", (service,)), tmp_path, "")
    with caplog.at_level("ERROR"):
        specs = extension_services([first, second], tmp_path)
    assert [spec.id for spec in specs] == ["ext-agent"]
    assert "extension beta: service ext-agent is also a service of extension alpha" in caplog.text
