"""The toolbox's resources without a cluster: the JSONPath subset (a table of templates and
of faults with their positions), ``-o`` parsing and wide columns, the readers of sysfs,
mountinfo and /proc/sys over trees built here, rtnetlink on this host's loopback, the
dot rendering, and that no controller writes a type it does not declare (so the graph of
``inspect dependencies`` cannot lie)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest

from basalt.cli.inspect import render_dot
from basalt.cli.jsonpath import JsonPathError, compile_template
from basalt.cli.resources import Output, _lookup, parse_output
from basalt.machined.api.graph import controller_graph, found_writers
from basalt.machined.assemble import build_node
from basalt.machined.controllers import start_engine
from basalt.machined.controllers.kernel_params import read_params
from basalt.machined.controllers.network_status import (
    _ADDRESS_FLAGS,
    _LINK_FLAGS,
    flag_names,
    read_network,
)
from basalt.machined.controllers.storage_status import (
    directory_volumes,
    metal_volumes,
    mount_of,
    parse_mountinfo,
    read_disks,
    transport,
    tree_bytes,
)
from basalt.machined.node import Tuning
from basalt.machined.platform import NodePaths, Platform, PlatformMode
from basalt.machinery.api import machine_pb2
from basalt.machinery.errors import BasaltError
from basalt.machinery.resources import DEFINITIONS, resolve_type

DATA: dict[str, Any] = {
    "items": [
        {"metadata": {"id": "lo"}, "spec": {"address": "127.0.0.1/8", "flags": ["UP", "LOOPBACK"]}},
        {"metadata": {"id": "eth0"}, "spec": {"address": "192.0.2.5/24", "flags": []}},
    ],
    "my.key": True,
}


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("{.items[0].spec.address}", "127.0.0.1/8"),
        ("{.items[*].metadata.id}", "lo eth0"),
        ("{.items[-1].metadata.id}", "eth0"),
        ("{.items[1:].metadata.id}", "eth0"),
        ("{..id}", "lo eth0"),
        ("{$.items[0]['metadata'].id}", "lo"),
        ("{['my.key']}", "true"),
        ("{.items[0].spec.flags}", '["UP","LOOPBACK"]'),
        ("{.items[0].spec.flags[*]}", "UP LOOPBACK"),
        ("id: {.items[5].metadata.id}{.missing}.", "id: ."),
        ('{range .items[*]}{.metadata.id}{"\\t"}{.spec.address}{"\\n"}{end}',
         "lo\t127.0.0.1/8\neth0\t192.0.2.5/24\n"),
        ("{range .items[*]}[{range .spec.flags[*]}{@}{end}]{end}", "[UPLOOPBACK][]"),
        ("{.items[0].metadata.*}", "lo"),
    ],
)  # fmt: skip
def test_jsonpath_templates(template: str, expected: str) -> None:
    assert compile_template(template).render(DATA) == expected


@pytest.mark.parametrize(
    ("template", "what", "position"),
    [
        ("{.items[", "never closed", 1),
        ("{.a}}", "'}' with no '{'", 5),
        ("x{range .items[*]}{.a}", "{range} with no {end}", 2),
        ("{end}", "{end} with no {range}", 1),
        ("{foo}", "unknown word 'foo'", 2),
        ("{.a..}", "field name must follow '..'", 6),
        ("{.a[?(@.x)]}", "filters", 4),
        ("{ }", "empty expression", 2),
        ("{.a b}", "unexpected ' '", 4),
        ('{"abc}', "never closed", 1),
        ("{range }", "'range' needs a path", 7),
        ("{.a{.b}}", "'{' inside an expression", 4),
    ],
)
def test_jsonpath_faults_name_their_position(template: str, what: str, position: int) -> None:
    with pytest.raises(JsonPathError) as caught:
        compile_template(template)
    message = str(caught.value)
    assert what in message and f"at position {position}:" in message
    caret_line = message.splitlines()[-1]
    assert caret_line.index("^") - 4 == position - 1  # under the faulty character
    assert caught.value.hint and "jsonpath=" in caught.value.hint


def test_output_formats() -> None:
    assert parse_output("wide").kind is Output.wide and parse_output("wide").tabular
    assert parse_output("json").kind is Output.json
    parsed = parse_output("jsonpath={.spec}")
    assert parsed.kind is Output.jsonpath and parsed.template is not None
    for bad in ("jsonpath", "xml", "wide=1", "jsonpath="):
        with pytest.raises(BasaltError):
            parse_output(bad)
    assert _lookup({"partitions": [{"label": "EFI"}, {"label": "META"}]}, "partitions.label") == [
        "EFI",
        "META",
    ]
    assert _lookup({"a": 1}, "a.b") == ""


def test_every_column_names_a_field_of_its_spec() -> None:
    aliases: list[str] = []
    for definition in DEFINITIONS:
        fields = set(definition.spec.field_keys().values())
        for _, key in definition.columns + definition.wide_columns:
            assert key.split(".")[0] in fields, (definition.type, key)
        aliases += definition.aliases
        assert resolve_type(definition.type) is definition
    assert len(aliases) == len(set(aliases)), "an alias names two types"
    assert resolve_type("addresses").type == "Addresses"
    assert resolve_type("blockdevices").type == "Disks"


# -- sysfs, mountinfo, /proc/sys ------------------------------------------------------------


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _fake_machine(root: Path) -> None:
    """A /sys with disk vda (virtio, Basalt's layout, booted from slot A), sda (USB,
    empty) and loop0; and a kernel command line."""
    block = root / "sys" / "devices" / "pci0000:00"
    vda = block / "virtio1" / "block" / "vda"
    _write(vda / "size", "4194304\n")
    _write(vda / "ro", "0\n")
    _write(vda / "queue" / "rotational", "0\n")
    _write(vda / "serial", "disk-1\n")
    parts = [
        ("vda1", "EFI", 2048, 262144),
        ("vda2", "BASALT-A", 264192, 393216),
        ("vda3", "BASALT-B", 657408, 393216),
        ("vda4", "META", 1050624, 2048),
        ("vda5", "STATE", 1052672, 204800),
        ("vda6", "EPHEMERAL", 1257472, 2936832),
    ]
    for number, (device, label, start, size) in enumerate(parts, 1):
        _write(vda / device / "partition", f"{number}\n")
        _write(vda / device / "start", f"{start}\n")
        _write(vda / device / "size", f"{size}\n")
        _write(vda / device / "dev", f"253:{number}\n")
        _write(vda / device / "uevent", f"DEVTYPE=partition\nPARTNAME={label}\n")
    sda = block / "usb1" / "1-1" / "host0" / "block" / "sda"
    _write(sda / "size", "1000\n")
    _write(sda / "device" / "model", "Stick\n")
    loop = root / "sys" / "devices" / "virtual" / "block" / "loop0"
    _write(loop / "size", "100\n")
    for link_dir in (root / "sys" / "block", root / "sys" / "class" / "block"):
        link_dir.mkdir(parents=True)
        for disk in (vda, sda, loop):
            (link_dir / disk.name).symlink_to(disk)
    for device, *_ in parts:
        (root / "sys" / "class" / "block" / device).symlink_to(vda / device)
    _write(root / "proc" / "cmdline", "console=ttyS0 basalt.slot=A\n")


def test_disks_from_sysfs(tmp_path: Path) -> None:
    _fake_machine(tmp_path)
    disks = read_disks(tmp_path, read_tables=False)
    assert sorted(disks) == ["sda", "vda"]  # no loop device
    vda = disks["vda"]
    assert vda.size == 4194304 * 512 and vda.transport == "virtio" and vda.system_disk
    assert vda.serial == "disk-1" and not vda.rotational and not vda.readonly
    assert [p.label for p in vda.partitions] == [
        "EFI", "BASALT-A", "BASALT-B", "META", "STATE", "EPHEMERAL"
    ]  # fmt: skip
    assert vda.partitions[0].start == 2048 * 512 and vda.partitions[0].size == 262144 * 512
    assert disks["sda"].transport == "usb" and disks["sda"].model == "Stick"
    assert not disks["sda"].system_disk and disks["sda"].partitions == []
    assert transport("nvme0n1", tmp_path) == "nvme"


MOUNTINFO = r"""22 1 0:21 / / rw,relatime - overlay overlay rw
30 22 253:5 / /system/state rw,relatime - ext4 /dev/vda5 rw
31 22 253:6 / /var rw,relatime shared:1 - ext4 /dev/vda6 rw
32 31 0:40 / /var/my\040dir rw - tmpfs tmpfs rw
"""


def test_mountinfo_and_the_mount_of_a_path() -> None:
    mounts = parse_mountinfo(MOUNTINFO)
    assert [m.path for m in mounts] == ["/", "/system/state", "/var", "/var/my dir"]
    assert mounts[2].device == "253:6" and mounts[2].filesystem == "ext4"
    assert mount_of(Path("/var/lib/etcd"), mounts) == mounts[2]
    assert mount_of(Path("/var/my dir/x"), mounts) == mounts[3]
    assert mount_of(Path("/variable"), mounts) == mounts[0]
    assert mount_of(Path("/system/state"), mounts) == mounts[1]


def test_metal_volumes_are_the_layouts_partitions(tmp_path: Path) -> None:
    _fake_machine(tmp_path)
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev" / "vda2").write_bytes(b"hsqs" + bytes(100))
    mounts = [m for m in parse_mountinfo(MOUNTINFO) if m.path != "/system/state"]
    mounts += parse_mountinfo(f"30 22 253:5 / {tmp_path} rw - ext4 /dev/vda5 rw")
    volumes = metal_volumes(tmp_path, mounts)
    assert list(volumes) == ["EFI", "BASALT-A", "BASALT-B", "META", "STATE", "EPHEMERAL"]
    state = volumes["STATE"]
    assert state.device == "/dev/vda5" and state.mounted and state.path == str(tmp_path)
    assert state.size > 0 and 0 <= state.used <= state.size and state.filesystem == "ext4"
    assert volumes["BASALT-A"].filesystem == "squashfs" and not volumes["BASALT-A"].mounted
    assert volumes["META"].size == 2048 * 512 and volumes["META"].used == 0


def test_directory_volumes_count_the_bytes_under_them(tmp_path: Path) -> None:
    state = tmp_path / "state"
    (state / "sub").mkdir(parents=True)
    (state / "config.yaml").write_bytes(b"x" * 10000)
    os.link(state / "config.yaml", state / "sub" / "again")  # counted once
    (state / "loop").symlink_to(tmp_path)  # not followed
    counted = [state / "config.yaml", state / "sub", state / "loop"]  # not the second link
    assert tree_bytes(state) == sum(path.lstat().st_blocks * 512 for path in counted)
    mounts = parse_mountinfo(Path("/proc/self/mountinfo").read_text())
    volumes = directory_volumes({"STATE": state}, mounts)
    spec = volumes["STATE"]
    assert spec.path == str(state) and spec.mounted and spec.contents >= 10000
    assert spec.size > 0 and spec.free <= spec.size


def test_kernel_params_read_from_proc_sys(tmp_path: Path) -> None:
    _write(tmp_path / "net" / "ipv4" / "ip_forward", "1\n")
    _write(tmp_path / "net" / "ipv4" / "tcp_rmem", "4096\t131072\t6291456\n")
    params = read_params(
        {"net.ipv4.ip_forward": "1", "net.ipv4.tcp_rmem": "4096 87380 6291456", "vm.nope": "1"},
        {"net.ipv4.ip_forward", "net.ipv4.tcp_rmem"},
        tmp_path,
        applied=True,
    )
    assert params["net.ipv4.ip_forward"].value == "1"
    assert params["net.ipv4.tcp_rmem"].value == "4096 131072 6291456"
    assert params["vm.nope"].error == "no such parameter on this kernel"
    assert params["vm.nope"].value == "" and params["vm.nope"].source == "config"


# -- rtnetlink ------------------------------------------------------------------------------


def test_flag_names() -> None:
    assert flag_names(0x10049, _LINK_FLAGS) == ["UP", "LOOPBACK", "RUNNING", "LOWER_UP"]
    assert flag_names(0x82, _ADDRESS_FLAGS) == ["nodad", "permanent"]


def test_this_hosts_loopback_through_rtnetlink() -> None:
    from pyroute2.iproute.linux import IPRoute

    with IPRoute() as ipr:
        state = read_network(ipr)
    assert state.links["lo"].type == "loopback" and "LOOPBACK" in state.links["lo"].flags
    assert state.addresses["lo/127.0.0.1/8"].scope == "host"
    local = [r for r in state.routes.values() if r.destination == "127.0.0.0/8"]
    assert local and local[0].table == "local" and local[0].link == "lo"


# -- the controller graph -------------------------------------------------------------------


def test_dot_marks_inputs_outputs_writers_and_lies() -> None:
    def dep(type_: str, kind: str) -> machine_pb2.ControllerDependency:
        return machine_pb2.ControllerDependency(resource_type=type_, kind=kind)

    controllers = [
        machine_pb2.ControllerNode(
            name="hostname",
            dependencies=[dep("MachineConfigs", "input"), dep("Hostnames", "output")],
        ),
        machine_pb2.ControllerNode(
            name="sequencer", dependencies=[dep("MachineStatuses", "writes")]
        ),
        machine_pb2.ControllerNode(
            name="liar", dependencies=[dep("Links", "output"), dep("Routes", "writes")]
        ),
    ]
    dot = render_dot('node "1"', controllers, {"Links": 4, "Versions": 1})
    assert dot.startswith('digraph "basalt node \\"1\\"" {')
    assert '"resource:MachineConfigs" -> "controller:hostname" [style="dashed"' in dot
    assert '"controller:hostname" -> "resource:Hostnames" [style="solid"]' in dot
    assert '"controller:sequencer" -> "resource:MachineStatuses" [style="dotted"' in dot
    assert '"controller:liar" -> "resource:Routes" [style="bold", color="red"' in dot
    assert '"controller:sequencer" [label="sequencer", shape=note' in dot
    assert '"resource:Versions" [label="Versions\\n1", shape=ellipse]' in dot


def test_no_controller_writes_a_type_it_does_not_declare(tmp_path: Path) -> None:
    """Run the engine of a container-mode node for a moment; every resource a controller
    owns must be of a type it declares as output, so the graph shows what happens."""

    async def run() -> None:
        paths = NodePaths.under(tmp_path)
        paths.create()
        platform = Platform(PlatformMode.CONTAINER, paths, "127.0.0.1", "toolbox")
        node = build_node(platform, Tuning(stats_interval=0.1))
        engine = start_engine(node)
        try:
            for _ in range(100):
                if node.store.list("Links") and node.store.list("Volumes"):
                    break
                await asyncio.sleep(0.1)
            declared = {c.name: set(c.outputs) for c in engine.controllers}
            writers = found_writers(node.store, declared)
            assert not set(writers) & set(declared), writers
            for controller in engine.controllers:
                for type_ in (*controller.inputs, *controller.outputs):
                    resolve_type(type_)  # a declared type that exists
            nodes, counts = controller_graph(node.store, engine.controllers, with_resources=True)
            assert counts["Links"] >= 1 and counts["ResourceDefinitions"] == len(DEFINITIONS)
            names = {n.name for n in nodes}
            assert {"network-status", "storage-status", "kernel-params"} <= names
        finally:
            await engine.stop()
            await node.stop_background()

    asyncio.run(run())
