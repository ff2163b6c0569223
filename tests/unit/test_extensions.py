"""System extensions without a machine: manifests, the initramfs segment, the service
runner (a real child process), virtio port lookup and the loop ioctl's argument."""

from __future__ import annotations

import asyncio
import os
import stat
import sys
from pathlib import Path

import pytest

from basalt.imager import init
from basalt.imager.cpio import TRAILER
from basalt.imager.extensions import (
    QEMU_GUEST_AGENT,
    RECIPES,
    SEGMENT_DIR,
    append_segment,
    schematic_json,
)
from basalt.machined.extensions import (
    ExtensionRunner,
    MountedExtension,
    extension_services,
    find_virtio_port,
    mount_extensions,
    schematic_record,
)
from basalt.machined.services import LogBuffer, RestartPolicy
from basalt.machined.sys import loop
from basalt.machinery.image_layout import EXTENSIONS_DIR
from basalt.machinery.schematic import (
    OFFICIAL_EXTENSIONS,
    ExtensionManifest,
    ExtensionService,
    ManifestError,
    Schematic,
    parse_manifest,
)

PORT = "org.qemu.guest_agent.0"


def _manifest() -> ExtensionManifest:
    return ExtensionManifest("qemu-guest-agent", "1:7.2+dfsg-7", "d", QEMU_GUEST_AGENT.services)


def test_manifest_round_trips_and_recipes_match_the_catalogue() -> None:
    manifest = _manifest()
    assert parse_manifest(manifest.to_yaml()) == manifest
    assert sorted(RECIPES) == sorted(OFFICIAL_EXTENSIONS)
    (service,) = manifest.services
    assert service.virtio_port == PORT and service.restart == "always"


@pytest.mark.parametrize(
    ("change", "path", "words"),
    [
        ("restart: always", "services[0].restart", "unknown restart policy"),
        ("command: /usr/sbin/qemu-ga", "services[0].command", "absolute path"),
        ("stateDirectory: /run/qemu-ga", "services[0].stateDirectory", "below /run"),
        ("name: qemu-guest-agent", "name", "is not a name"),
        ("description:", "descriptio", "unknown field"),
    ],
)
def test_manifest_errors_name_the_field_and_line(change: str, path: str, words: str) -> None:
    replacement = {
        "restart: always": "restart: sometimes",
        "command: /usr/sbin/qemu-ga": "command: usr/sbin/qemu-ga",
        "stateDirectory: /run/qemu-ga": "stateDirectory: /var/lib/qemu-ga",
        "name: qemu-guest-agent": "name: Qemu Guest Agent",
        "description:": "descriptio:",
    }[change]
    text = _manifest().to_yaml()
    line = next(n for n, ln in enumerate(text.splitlines(), 1) if change in ln)
    with pytest.raises(ManifestError) as caught:
        parse_manifest(text.replace(change, replacement), "m.yaml")
    problem = next(p for p in caught.value.problems if p.path == path)
    assert words in problem.message and problem.line == line


def test_manifest_needs_a_port_for_the_port_placeholder() -> None:
    text = _manifest().to_yaml().replace("  needs:\n    virtioPort: org.qemu.guest_agent.0\n", "")
    with pytest.raises(ManifestError) as caught:
        parse_manifest(text)
    assert any("{virtioPort}" in p.message for p in caught.value.problems)


def test_segment_is_an_aligned_newc_archive_after_the_first(tmp_path: Path) -> None:
    initrd = tmp_path / "initrd.img"
    initrd.write_bytes(b"\x28\xb5\x2f\xfd" + b"x" * 7)  # 11 bytes: a compressed segment
    image = tmp_path / "qemu-guest-agent.sqfs"
    image.write_bytes(b"hsqs" + bytes(100))
    record = schematic_json(Schematic((), ("qemu-guest-agent",)))
    assert append_segment(initrd, [image], record, tmp_path) == 3
    data = initrd.read_bytes()
    assert data[11:12] == b"\0" and data[12:18] == b"070701"  # zero padding to 4 bytes
    names = []
    offset = 12
    while True:
        header = data[offset : offset + 110]
        size, name_size = int(header[54:62], 16), int(header[94:102], 16)
        name = data[offset + 110 : offset + 110 + name_size - 1].decode()
        start = offset + 110 + name_size + (-(110 + name_size) % 4)
        if name == TRAILER:
            break
        names.append(name)
        if name.endswith(".json"):
            assert data[start : start + size].decode() == record
        offset = start + size + (-size % 4)
    assert names == [
        SEGMENT_DIR,
        f"{SEGMENT_DIR}/qemu-guest-agent.sqfs",
        "extensions/schematic.json",
    ]
    assert not (tmp_path / "segment").exists()


def test_initramfs_and_node_agree_on_the_places() -> None:
    assert f"/{SEGMENT_DIR}" == init.EXTENSIONS_SOURCE
    assert f"/{EXTENSIONS_DIR}" == init.EXTENSIONS_TARGET


def test_init_copy_moves_bytes_exactly(tmp_path: Path) -> None:
    source = tmp_path / "a.sqfs"
    source.write_bytes(os.urandom(3 * (1 << 20) + 17))
    init._copy(str(source), str(tmp_path / "b.sqfs"))
    assert (tmp_path / "b.sqfs").read_bytes() == source.read_bytes()


def _sysfs(root: Path, ports: dict[str, str]) -> None:
    for device, name in ports.items():
        (root / "sys/class/virtio-ports" / device).mkdir(parents=True)
        (root / "sys/class/virtio-ports" / device / "name").write_text(name + "\n")


def test_virtio_port_is_found_by_name_in_sysfs(tmp_path: Path) -> None:
    assert find_virtio_port(PORT, tmp_path) is None
    _sysfs(tmp_path, {"vport0p1": "org.other", "vport1p1": PORT})
    assert find_virtio_port(PORT, tmp_path) == tmp_path / "dev/vport1p1"


def test_schematic_record_is_read_from_the_extensions_dir(tmp_path: Path) -> None:
    assert schematic_record(tmp_path) == {}
    (tmp_path / EXTENSIONS_DIR).mkdir(parents=True)
    (tmp_path / EXTENSIONS_DIR / "schematic.json").write_text(schematic_json(Schematic()))
    assert schematic_record(tmp_path)["id"] == Schematic().id
    assert mount_extensions(tmp_path) == ([], [])  # no images: nothing to mount


def _extension(tmp_path: Path, service: ExtensionService) -> MountedExtension:
    """An 'extension' tree whose command is a script printing its arguments and env."""
    root = tmp_path / EXTENSIONS_DIR / "demo"
    program = root / "usr/sbin/demo"
    program.parent.mkdir(parents=True)
    program.write_text(
        f"#!{sys.executable}\nimport os, sys\n"
        "print('args', *sys.argv[1:])\nprint('lib', os.environ['LD_LIBRARY_PATH'])\n"
    )
    program.chmod(program.stat().st_mode | stat.S_IXUSR)
    manifest = ExtensionManifest("demo", "1.0", "", (service,))
    return MountedExtension(manifest, root, "/dev/loop9")


def test_extension_service_runs_its_command_with_the_port_and_libraries(tmp_path: Path) -> None:
    service = ExtensionService(
        "ext-demo",
        "/usr/sbin/demo",
        ("-p", "{virtioPort}", "-t", "/run/demo"),
        "onFailure",
        PORT,
        "/run/demo",
    )
    extension = _extension(tmp_path, service)
    (spec,) = extension_services([extension], tmp_path)
    assert spec.id == "ext-demo" and spec.restart is RestartPolicy.ON_FAILURE
    assert spec.skip_reason is not None and PORT in (spec.skip_reason() or "")
    _sysfs(tmp_path, {"vport2p1": PORT})
    assert spec.skip_reason() is None

    async def run() -> list[str]:
        log = LogBuffer(max_lines=50)
        running = await spec.runner.start(log)
        status = await running.wait()
        assert status.ok, status
        return [line.decode() for line in log.lines()]

    lines = asyncio.run(run())
    assert f"args -p {tmp_path}/dev/vport2p1 -t /run/demo" in lines
    assert f"lib {extension.root}/usr/lib/x86_64-linux-gnu:{extension.root}/usr/lib" in lines
    assert (tmp_path / "run/demo").is_dir()  # the state directory, made before the start


def test_runner_without_its_port_refuses_to_start(tmp_path: Path) -> None:
    service = ExtensionService("ext-demo", "/usr/sbin/demo", ("{virtioPort}",), virtio_port=PORT)
    runner = ExtensionRunner(_extension(tmp_path, service), service, tmp_path)
    with pytest.raises(Exception, match=PORT):
        runner.argv()


def test_loop_config_has_the_kernel_layout() -> None:
    config = loop.loop_config(7, "/usr/lib/basalt/extensions/x.sqfs")
    assert len(config) == 304  # fd, block_size, loop_info64 (232), 8 reserved u64
    assert config[:8] == (7).to_bytes(4, "little") + bytes(4)
    flags = int.from_bytes(config[8 + 52 : 8 + 56], "little")  # loop_info64.lo_flags
    assert flags == loop.LO_FLAGS_READ_ONLY | loop.LO_FLAGS_AUTOCLEAR
    assert config[8 + 56 : 8 + 56 + 4] == b"/usr"


def test_pipeline_shares_the_root_and_carries_the_schematic_in_boot_and_disk() -> None:
    import json

    from basalt.imager import lock as lockfile
    from basalt.imager.pipeline import CMDLINE, Pipeline

    lock = lockfile.read()
    schematic = Schematic(("console=ttyS1",), ("qemu-guest-agent",))
    wired, plain = Pipeline.from_lock(lock, schematic), Pipeline.from_lock(lock)
    assert wired.rootfs.stage_id() == plain.rootfs.stage_id()  # one root for every schematic
    assert wired.squashfs.stage_id() == plain.squashfs.stage_id()
    assert wired.boot.stage_id() != plain.boot.stage_id()
    (extension,) = wired.extensions
    versions = {deb.name: deb.version for deb in lock.debs}
    assert extension.package_version == versions["qemu-guest-agent"]
    assert json.loads(wired.boot.schematic)["id"] == schematic.id
    assert json.loads(plain.boot.schematic)["extensions"] == []
    assert wired.disk is not None and wired.disk.cmdline == f"{CMDLINE} console=ttyS1"
