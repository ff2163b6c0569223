"""The metal platform's pure parts: mount options, sysctl paths, module metadata, the
reaper's choice, generated /etc files, resolvers, and which controllers act where."""

from __future__ import annotations

import ast
import asyncio
import os
import platform
import struct
from ipaddress import IPv4Address, IPv4Interface
from pathlib import Path

import pytest

from basalt.machined.controllers.network import default_dhcp_link, order_addresses
from basalt.machined.controllers.resolvers import choose_resolvers, render_resolv_conf
from basalt.machined.controllers.sysctls import DEFAULT_SYSCTLS, apply_sysctls, wanted_sysctls
from basalt.machined.platform import NodePaths, Platform, PlatformMode
from basalt.machined.platform.etc import render_hosts, write_generated
from basalt.machined.platform.metal import (
    IMAGE_MODULES,
    MetalPlatform,
    ModuleLoader,
    ModuleLoaderError,
    default_hostname,
    kernel_hostname,
    load_image_modules,
    run_as_init,
)
from basalt.machined.sys import mount
from basalt.machined.sys.dhcp import Lease
from basalt.machined.sys.kmod import KernelModuleError, ModuleIndex, load_module, parse_modinfo
from basalt.machined.sys.netlink import Address, Link
from basalt.machined.sys.power import PowerAction, PowerError, power, terminate_all
from basalt.machined.sys.reaper import parse_stat, select_reapable
from basalt.machined.sys.sysctl import sysctl_path
from basalt.machinery.config.network import ResolverConfig
from basalt.machinery.config.system import SysctlConfig

SRC = Path(__file__).resolve().parents[2] / "src" / "basalt"
API = "basalt.dev/v1alpha1"

# -- mount options ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "flags", "data"),
    [
        ("", 0, ""),
        ("ro,nosuid,nodev", mount.MS_RDONLY | mount.MS_NOSUID | mount.MS_NODEV, ""),
        ("nosuid,mode=0755,size=10%", mount.MS_NOSUID, "mode=0755,size=10%"),
        ("ro,rw", 0, ""),  # later options win
        ("rw,ro", mount.MS_RDONLY, ""),
        ("rbind", mount.MS_BIND | mount.MS_REC, ""),
        ("defaults,noexec", mount.MS_NOEXEC, ""),
        (["relatime", " nsdelegate "], mount.MS_RELATIME, "nsdelegate"),
    ],
)
def test_parse_options(options: str | list[str], flags: int, data: str) -> None:
    assert mount.parse_options(options) == (flags, data)


def test_format_flags_names_bits_and_shows_unknown_ones() -> None:
    assert mount.format_flags(mount.MS_RDONLY | mount.MS_NOSUID) == "ro,nosuid"
    assert mount.format_flags(mount.MS_BIND | 1 << 30) == "bind,0x40000000"
    assert mount.format_flags(0) == ""


def test_every_pseudo_filesystem_option_parses_to_flags_and_data() -> None:
    targets = [p.target for p in mount.PSEUDO_FILESYSTEMS]
    assert targets == ["/proc", "/sys", "/dev", "/dev/pts", "/dev/shm", "/sys/fs/cgroup", "/run"]
    for point in mount.PSEUDO_FILESYSTEMS:
        flags, _ = mount.parse_options(point.options)
        assert flags & mount.MS_NOSUID, point
    assert mount.PSEUDO_FILESYSTEMS[0].under(Path("/tmp/r")) == Path("/tmp/r/proc")


def test_parse_mountinfo_unescapes_paths() -> None:
    text = (
        "22 1 0:21 / /proc rw,nosuid - proc proc rw\n"
        "40 22 0:35 / /tmp/with\\040space rw - tmpfs my\\134src rw\n"
        "garbage line\n"
    )
    assert mount.parse_mountinfo(text) == [
        ("/proc", "proc", "proc"),
        ("/tmp/with space", "tmpfs", "my\\src"),
    ]


def test_mounted_from_names_where_a_device_is_mounted(tmp_path: Path) -> None:
    """The ESP repair writes the device only where this finds it unmounted."""
    info = tmp_path / "mountinfo"
    info.write_text(
        "22 1 0:21 / /proc rw,nosuid - proc proc rw\n"
        "41 22 254:1 / /run/basalt/esp rw - vfat /dev/vda1 rw\n"
        "42 22 254:1 / /mnt/second rw - vfat /dev/vda1 rw\n"
    )
    assert mount.mounted_from("/dev/vda1", info) == ["/run/basalt/esp", "/mnt/second"]
    assert mount.mounted_from("/dev/vda2", info) == []
    assert mount.mounted_from("proc", info) == []  # not a device path
    assert mount.mounted_from("/dev/vda1", tmp_path / "none") == []


def test_mount_errors_name_the_target_and_reason(tmp_path: Path) -> None:
    with pytest.raises(mount.MountError, match=r"on .*missing.* failed: No such file"):
        mount.mount("tmpfs", tmp_path / "missing", "tmpfs", mount.MS_NOSUID, "mode=0755")


# -- sysctls ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "path"),
    [
        ("net.ipv4.ip_forward", "net/ipv4/ip_forward"),
        ("kernel.pid_max", "kernel/pid_max"),
        ("net/ipv4/conf/eth0.100/forwarding", "net/ipv4/conf/eth0.100/forwarding"),
        ("net.ipv4.conf.all.rp_filter", "net/ipv4/conf/all/rp_filter"),
    ],
)
def test_sysctl_path(key: str, path: str) -> None:
    assert sysctl_path(key, Path("/proc/sys")) == Path("/proc/sys") / path


@pytest.mark.parametrize("key", ["", "net..ipv4", "net/../../etc/passwd", "net/ipv4/", "./x"])
def test_sysctl_path_refuses_keys_that_leave_proc_sys(key: str) -> None:
    with pytest.raises(ValueError):
        sysctl_path(key)


def test_apply_sysctls_reports_each_failing_key(tmp_path: Path) -> None:
    (tmp_path / "net" / "ipv4").mkdir(parents=True)
    (tmp_path / "net" / "ipv4" / "ip_forward").write_text("0\n")
    failed = apply_sysctls(
        {"net.ipv4.ip_forward": "1", "net.ipv4.nope": "1", "net/../x": "1"}, tmp_path
    )
    assert (tmp_path / "net" / "ipv4" / "ip_forward").read_text() == "1"
    assert failed["net.ipv4.nope"].startswith("no such sysctl")
    assert "not a sysctl name" in failed["net/../x"]
    assert set(failed) == {"net.ipv4.nope", "net/../x"}


def test_later_sysctl_documents_win() -> None:
    first = SysctlConfig.model_validate(
        {"apiVersion": API, "kind": "SysctlConfig", "sysctls": {"a.b": "1", "c.d": "2"}}
    )
    second = SysctlConfig.model_validate(
        {"apiVersion": API, "kind": "SysctlConfig", "sysctls": {"a.b": "3"}}
    )
    wanted = wanted_sysctls([first, second])
    assert wanted == {**DEFAULT_SYSCTLS, "a.b": "3", "c.d": "2"}
    override = SysctlConfig.model_validate(
        {"apiVersion": API, "kind": "SysctlConfig",
         "sysctls": {"net.ipv4.conf.all.promote_secondaries": "0"}}
    )  # fmt: skip
    assert wanted_sysctls([override])["net.ipv4.conf.all.promote_secondaries"] == "0"


# -- kernel modules --------------------------------------------------------------------------


def fake_module(modinfo: dict[str, str], *, wide: bool = True) -> bytes:
    """A minimal ELF with a .modinfo and a section name table (what the loader reads)."""
    info = b"".join(f"{k}={v}".encode() + b"\0" for k, v in modinfo.items())
    names = b"\0.modinfo\0.shstrtab\0"
    header_size = 64 if wide else 52
    section_size = 64 if wide else 40
    info_at = header_size
    names_at = info_at + len(info)
    shoff = names_at + len(names)
    if wide:
        header = b"\x7fELF\x02\x01\x01" + bytes(9)
        header += struct.pack("<HHIQQQIHHHHHH", 1, 62, 1, 0, 0, shoff, 0, 64, 0, 0, 64, 3, 2)
        layout = "<IIQQQQIIQQ"
    else:
        header = b"\x7fELF\x01\x01\x01" + bytes(9)
        header += struct.pack("<HHIIIIIHHHHHH", 1, 3, 1, 0, 0, shoff, 0, 52, 0, 0, 40, 3, 2)
        layout = "<IIIIIIIIII"
    sections = struct.pack(layout, *([0] * 10))
    sections += struct.pack(layout, 1, 1, 0, 0, info_at, len(info), 0, 0, 1, 0)
    sections += struct.pack(layout, 10, 3, 0, 0, names_at, len(names), 0, 0, 1, 0)
    assert len(sections) == 3 * section_size
    return header + info + names + sections


@pytest.mark.parametrize("wide", [True, False])
def test_parse_modinfo(wide: bool) -> None:
    elf = fake_module({"license": "GPL", "depends": "bridge,stp", "parm": "x:int"}, wide=wide)
    assert parse_modinfo(elf) == {"license": ["GPL"], "depends": ["bridge,stp"], "parm": ["x:int"]}
    with pytest.raises(KernelModuleError, match="not a kernel module"):
        parse_modinfo(b"#!/bin/sh\n")


def _modules(tmp_path: Path, depends: dict[str, str]) -> ModuleIndex:
    root = tmp_path / "lib" / "modules" / "6.1.0"
    for name, deps in depends.items():
        path = root / "kernel" / f"{name.replace('_', '-')}.ko"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(fake_module({"name": name, "depends": deps}))
    (tmp_path / "sys" / "module").mkdir(parents=True)
    return ModuleIndex(root, sysfs=tmp_path / "sys" / "module")


def test_load_module_loads_dependencies_first_with_parameters_for_the_module(
    tmp_path: Path,
) -> None:
    index = _modules(
        tmp_path, {"br_netfilter": "bridge", "bridge": "stp,llc", "stp": "llc", "llc": ""}
    )
    calls: list[tuple[str, str]] = []

    def loader(path: Path, parameters: str) -> bool:
        calls.append((path.name, parameters))
        return path.name != "llc.ko"  # llc: "already loaded"

    loaded = load_module("br-netfilter", ["a=1", "b=2"], index=index, loader=loader)
    assert calls == [
        ("llc.ko", ""),
        ("stp.ko", ""),
        ("bridge.ko", ""),
        ("br-netfilter.ko", "a=1 b=2"),
    ]
    assert loaded == ["stp", "bridge", "br_netfilter"]


def test_loaded_and_builtin_modules_are_skipped(tmp_path: Path) -> None:
    index = _modules(tmp_path, {"overlay": ""})
    live = tmp_path / "sys" / "module" / "overlay"
    live.mkdir()
    (live / "initstate").write_text("live\n")
    (tmp_path / "sys" / "module" / "ext4").mkdir()  # built in: no initstate

    def loader(path: Path, parameters: str) -> bool:
        raise AssertionError("nothing should be loaded")

    assert load_module("overlay", index=index, loader=loader) == []
    assert load_module("ext4", index=index, loader=loader) == []


def test_missing_module_and_load_failure_name_the_module(tmp_path: Path) -> None:
    index = _modules(tmp_path, {"vfat": "fat", "loopy": "loopy"})
    with pytest.raises(KernelModuleError, match=r"kernel module fat not found in .*6\.1\.0"):
        load_module("vfat", index=index, loader=lambda p, a: True)
    with pytest.raises(KernelModuleError, match="circular dependency"):
        load_module("loopy", index=index, loader=lambda p, a: True)

    def refuse(path: Path, parameters: str) -> bool:
        raise OSError(8, "Exec format error", str(path))

    index = _modules(tmp_path / "other", {"dummy": ""})
    with pytest.raises(KernelModuleError, match=r"dummy .* failed to load: Exec format error"):
        load_module("dummy", ["numdummies=2"], index=index, loader=refuse)


def test_module_index_uses_modules_dep_when_present(tmp_path: Path) -> None:
    root = tmp_path / "6.1.0"
    (root / "kernel" / "fs").mkdir(parents=True)
    (root / "modules.dep").write_text("kernel/fs/squashfs.ko:\nkernel/fs/other.ko.xz:\n")
    (root / "modules.builtin").write_text("kernel/fs/ext4/ext4.ko\n")
    index = ModuleIndex(root, sysfs=tmp_path / "nosys")
    assert index.find("squashfs") == root / "kernel" / "fs" / "squashfs.ko"
    assert index.find("other") is None  # compressed modules are not supported
    assert index.builtin("ext4")


def test_image_modules_load_in_order_and_failures_do_not_stop_the_rest(tmp_path: Path) -> None:
    assert load_image_modules(tmp_path) == ([], [])  # no list: nothing to do
    modules = tmp_path / "lib" / "modules" / platform.release() / "kernel"
    for name, deps in {
        "virtio_net": "net_failover",
        "net_failover": "failover",
        "failover": "",
    }.items():
        modules.mkdir(parents=True, exist_ok=True)
        (modules / f"{name}.ko").write_bytes(fake_module({"name": name, "depends": deps}))
    (tmp_path / "sys" / "module").mkdir(parents=True)
    (tmp_path / IMAGE_MODULES).parent.mkdir(parents=True)
    (tmp_path / IMAGE_MODULES).write_text("# the image's modules\nmissing\nvirtio_net\n")
    calls: list[str] = []

    def loader(path: Path, parameters: str) -> bool:
        calls.append(path.name)
        return True

    loaded, failed = load_image_modules(tmp_path, loader)
    assert calls == ["failover.ko", "net_failover.ko", "virtio_net.ko"]
    assert loaded == ["failover", "net_failover", "virtio_net"]
    assert len(failed) == 1 and "kernel module missing not found" in failed[0]


def test_efivarfs_is_loaded_only_on_a_uefi_boot(tmp_path: Path) -> None:
    modules = tmp_path / "lib" / "modules" / platform.release() / "kernel"
    modules.mkdir(parents=True)
    (modules / "efivarfs.ko").write_bytes(fake_module({"name": "efivarfs", "depends": ""}))
    (tmp_path / "sys" / "module").mkdir(parents=True)
    (tmp_path / IMAGE_MODULES).parent.mkdir(parents=True)
    (tmp_path / IMAGE_MODULES).write_text("efivarfs\n")
    calls: list[str] = []

    def loader(path: Path, parameters: str) -> bool:
        calls.append(path.name)
        return True

    # direct kernel boot (no /sys/firmware/efi): skipped, not a failure
    assert load_image_modules(tmp_path, loader) == ([], [])
    (tmp_path / "sys" / "firmware" / "efi").mkdir(parents=True)
    assert load_image_modules(tmp_path, loader) == (["efivarfs"], [])
    assert calls == ["efivarfs.ko"]


def test_a_child_loads_the_modules_and_prepare_takes_its_answer(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """PID 1 forks the loading (begin()); its answer comes through a pipe."""
    marker = tmp_path / "loaded-by"

    def load(root: Path) -> tuple[list[str], list[str]]:
        marker.write_text(str(os.getpid()))  # the child's pid, not this process's
        return ["failover", "virtio_net"], ["kernel module missing not found"]

    loader = ModuleLoader.fork(tmp_path, load)
    assert loader is not None
    assert loader.result() == (["failover", "virtio_net"], ["kernel module missing not found"])
    assert int(marker.read_text()) == loader.pid != os.getpid()
    os.waitpid(loader.pid, 0)
    with pytest.raises(ModuleLoaderError, match="asked already"):
        loader.result()

    metal = MetalPlatform.create(address="192.0.2.1", hostname="n", root=tmp_path, init=False)
    metal.module_loader = ModuleLoader.fork(tmp_path, load)
    assert metal.module_loader is not None
    pid = metal.module_loader.pid
    with caplog.at_level("INFO"):
        metal._load_image_modules()
    os.waitpid(pid, 0)
    assert "loaded kernel modules: failover, virtio_net" in caplog.text
    assert "kernel module missing not found" in caplog.text and metal.module_loader is None


def test_a_failed_module_child_leaves_the_loading_to_machined(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def load(root: Path) -> tuple[list[str], list[str]]:
        raise RuntimeError("no /lib/modules in this child")

    loader = ModuleLoader.fork(tmp_path, load)
    assert loader is not None
    with pytest.raises(ModuleLoaderError, match="RuntimeError: no /lib/modules in this child"):
        loader.result()
    os.waitpid(loader.pid, 0)
    metal = MetalPlatform.create(address="192.0.2.1", hostname="n", root=tmp_path, init=False)
    metal.module_loader = ModuleLoader.fork(tmp_path, load)
    assert metal.module_loader is not None
    pid = metal.module_loader.pid
    with caplog.at_level("INFO"):
        metal._load_image_modules()  # no list below tmp_path: nothing to load here either
    os.waitpid(pid, 0)
    assert "loading them in machined" in caplog.text
    assert "loaded kernel modules" not in caplog.text


# -- reaper ----------------------------------------------------------------------------------


def test_parse_stat_handles_parentheses_in_the_command() -> None:
    assert parse_stat("42 (a) b (c)) Z 1 42 42 0 -1") == ("Z", 1)
    assert parse_stat("7 (sleep) S 3 7 7") == ("S", 3)


def test_select_reapable_waits_out_the_grace_and_skips_owned_pids() -> None:
    first_seen: dict[int, float] = {}
    assert select_reapable([10, 11, 12], {11}, first_seen, now=100.0, grace=1.0) == []
    assert first_seen == {10: 100.0, 12: 100.0}
    # 12 was collected by its owner meanwhile; 10 is still there after the grace.
    assert select_reapable([10, 11], {11}, first_seen, now=101.0, grace=1.0) == [10]
    assert first_seen == {10: 100.0}
    # An owned pid is never chosen, however long it stays.
    assert select_reapable([11], {11}, first_seen, now=500.0, grace=1.0) == []


# -- power -----------------------------------------------------------------------------------


def test_power_refuses_unless_pid_1() -> None:
    # The safety net that keeps tests and developers from rebooting their machine.
    with pytest.raises(PowerError, match="only PID 1"):
        power(PowerAction.REBOOT)
    with pytest.raises(PowerError, match="only PID 1"):
        terminate_all()


def test_run_as_init_is_a_plain_call_when_not_pid_1() -> None:
    assert run_as_init(lambda: 75) == 75


# -- generated /etc files --------------------------------------------------------------------


def test_render_hosts() -> None:
    assert render_hosts("cp-1", "lab.test", "10.0.2.15").splitlines() == [
        "127.0.0.1 localhost",
        "::1 localhost ip6-localhost ip6-loopback",
        "10.0.2.15 cp-1.lab.test cp-1",
    ]
    assert render_hosts("cp-1").splitlines()[-1] == "127.0.1.1 cp-1"
    assert render_hosts("cp-1", address="0.0.0.0").splitlines()[-1] == "127.0.1.1 cp-1"


def test_write_generated_writes_in_place(tmp_path: Path) -> None:
    assert write_generated(tmp_path / "etc", "hosts", "one\n")
    inode = (tmp_path / "etc" / "hosts").stat().st_ino
    assert not write_generated(tmp_path / "etc", "hosts", "one\n")
    assert write_generated(tmp_path / "etc", "hosts", "two\n")
    # Same inode: a bind mount of the file keeps showing the current text.
    assert (tmp_path / "etc" / "hosts").stat().st_ino == inode
    assert (tmp_path / "etc" / "hosts").read_text() == "two\n"


def test_default_hostname_comes_from_the_first_ethernet_link(tmp_path: Path) -> None:
    assert default_hostname(tmp_path / "none") == "basalt"
    for name, index, kind, mac in [
        ("lo", 1, "772", "00:00:00:00:00:00"),
        ("eth1", 3, "1", "52:54:00:00:00:02"),
        ("eth0", 2, "1", "52:54:00:ab:cd:ef"),
        ("sit0", 4, "776", "00:00:00:00"),
    ]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "type").write_text(kind + "\n")
        (tmp_path / name / "address").write_text(mac + "\n")
        (tmp_path / name / "ifindex").write_text(f"{index}\n")
    assert default_hostname(tmp_path) == "basalt-abcdef"


# -- network and resolvers -------------------------------------------------------------------


def _link(index: int, name: str, mac: str, kind: str | None = None) -> Link:
    loopback = name == "lo"
    return Link(index, name, True, True, loopback, 1500, mac, kind)


@pytest.mark.parametrize(
    ("cmdline", "hostname"),
    [
        ("console=ttyS0 basalt.hostname=CP-1 quiet", "cp-1"),
        ("basalt.hostname=a basalt.hostname=b.lab.test", "b.lab.test"),
        ("basalt.hostname=-bad", ""),
        ("basalt.hostname=", ""),
        ("console=ttyS0 basalt.hostnames=x", ""),
    ],
)
def test_kernel_hostname(tmp_path: Path, cmdline: str, hostname: str) -> None:
    (tmp_path / "cmdline").write_text(cmdline + "\n")
    assert kernel_hostname(tmp_path / "cmdline") == hostname
    assert kernel_hostname(tmp_path / "missing") == ""


def test_default_dhcp_link_prefers_physical_ethernet() -> None:
    lo = _link(1, "lo", "00:00:00:00:00:00")
    veth = _link(2, "veth0", "aa:aa:aa:aa:aa:aa", "veth")
    eth = _link(3, "eth0", "52:54:00:00:00:01")
    assert default_dhcp_link([lo, veth, eth]) == eth
    assert default_dhcp_link([lo, veth]) == veth
    assert default_dhcp_link([lo]) is None


def test_order_addresses_puts_configured_then_dhcp_then_the_rest() -> None:
    def address(ip: str, scope: int = 0) -> Address:
        return Address(2, ip, scope, True, 0)

    present = [
        address("10.0.0.9/24"),
        address("10.0.2.15/24"),
        address("192.0.2.10/24"),
        address("fe80::1/64", scope=253),
    ]
    ordered = order_addresses(present, ["192.0.2.10", "198.51.100.1"], ["10.0.2.15"])
    assert ordered == ["192.0.2.10", "10.0.2.15", "10.0.0.9"]


def _lease(dns: list[str], search: tuple[str, ...] = (), domain: str | None = None) -> Lease:
    return Lease(
        address=IPv4Interface("10.0.2.15/24"),
        server=IPv4Address("10.0.2.2"),
        lease_time=100,
        renewal_time=50,
        rebinding_time=87,
        acquired=0.0,
        dns_servers=tuple(IPv4Address(d) for d in dns),
        search=search,
        domain=domain,
    )


def test_resolvers_come_from_config_else_dhcp() -> None:
    leases = [
        ("eth0", _lease(["10.0.2.3", "10.0.2.4"], domain="lab")),
        ("eth1", _lease(["9.9.9.9"])),
    ]
    from_dhcp = choose_resolvers(None, leases)
    assert from_dhcp.nameservers == ("10.0.2.3", "10.0.2.4", "9.9.9.9")
    assert from_dhcp.search == ("lab",)
    assert from_dhcp.source == "DHCP on eth0, eth1"
    config = ResolverConfig.model_validate(
        {
            "apiVersion": API,
            "kind": "ResolverConfig",
            "nameservers": ["192.0.2.53"],
            "searchDomains": ["corp.example"],
        }
    )
    chosen = choose_resolvers(config, leases)
    assert chosen.nameservers == ("192.0.2.53",)
    assert chosen.search == ("corp.example",)
    assert render_resolv_conf(chosen) == (
        "# Generated by Basalt from ResolverConfig.\nnameserver 192.0.2.53\nsearch corp.example\n"
    )
    # A ResolverConfig with search domains only keeps DHCP's servers.
    search_only = ResolverConfig.model_validate(
        {"apiVersion": API, "kind": "ResolverConfig", "searchDomains": ["corp.example"]}
    )
    mixed = choose_resolvers(search_only, leases)
    assert mixed.nameservers[0] == "10.0.2.3" and mixed.search == ("corp.example",)
    nothing = choose_resolvers(None, [])
    assert render_resolv_conf(nothing).count("nameserver") == 0


def test_at_most_three_name_servers_and_no_duplicates() -> None:
    leases = [("eth0", _lease(["10.0.0.1", "10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"]))]
    assert choose_resolvers(None, leases).nameservers == ("10.0.0.1", "10.0.0.2", "10.0.0.3")


# -- platform capabilities -------------------------------------------------------------------


def test_capabilities_by_mode() -> None:
    metal, container = PlatformMode.METAL, PlatformMode.CONTAINER
    assert metal.manages_network and metal.manages_kernel and metal.requires_install
    assert not (container.manages_network or container.manages_kernel)


def test_metal_platform_layout_and_power_signals(tmp_path: Path) -> None:
    import signal

    metal = MetalPlatform.create(address="0.0.0.0", hostname="", root=tmp_path)
    assert metal.paths == NodePaths.under(tmp_path)
    assert metal.paths.state == tmp_path / "system" / "state"
    assert metal.paths.ephemeral == tmp_path / "var"
    assert metal.generated_etc == tmp_path / "run" / "basalt" / "etc"
    assert not metal.init and not metal.address_known
    assert metal.power_signals() == {signal.SIGTERM: "shutdown", signal.SIGINT: "reboot"}
    container = Platform(PlatformMode.CONTAINER, NodePaths.under(tmp_path), "127.0.0.2", "n")
    assert container.power_signals()[signal.SIGINT] == "shutdown"


def test_metal_prepare_without_pid_1_only_writes_the_generated_files(tmp_path: Path) -> None:
    metal = MetalPlatform.create(address="0.0.0.0", hostname="node-1.lab", root=tmp_path)
    metal.prepare()
    etc = tmp_path / "run" / "basalt" / "etc"
    assert (etc / "hostname").read_text() == "node-1\n"
    assert "127.0.1.1 node-1.lab node-1" in (etc / "hosts").read_text()
    assert (etc / "resolv.conf").exists()
    assert not (tmp_path / "proc").exists()  # nothing mounted, nothing bound


def test_container_mode_controllers_do_nothing(tmp_path: Path) -> None:
    """The metal controllers return before touching the kernel in container mode."""
    from basalt.machined.assemble import build_node
    from basalt.machined.controllers.hostname_apply import HostnameApplyController
    from basalt.machined.controllers.kernel_modules import KernelModulesController
    from basalt.machined.controllers.network import NetworkController
    from basalt.machined.controllers.resolvers import ResolversController
    from basalt.machined.controllers.sysctls import SysctlsController
    from basalt.machinery.config import load_bundle

    async def run() -> None:
        platform = Platform(PlatformMode.CONTAINER, NodePaths.under(tmp_path), "127.0.0.9", "n1")
        node = build_node(platform)
        node.use_config(
            load_bundle(
                f"apiVersion: {API}\nkind: SysctlConfig\nsysctls:\n  kernel.pid_max: '1'\n"
                f"---\napiVersion: {API}\nkind: KernelModuleConfig\nname: nope\n---\n"
                f"apiVersion: {API}\nkind: LinkConfig\nname: nope0\n"
                "addresses: [192.0.2.1/24]\n",
                "test",
            )
        )
        network = NetworkController(node)
        for controller in (
            network,
            ResolversController(node, network.leases),
            HostnameApplyController(node),
            SysctlsController(node),
            KernelModulesController(node),
        ):
            await controller.reconcile(node.store)
        assert node.store.get("NodeAddresses", "current") is None
        assert not (tmp_path / "run").exists()

    asyncio.run(run())


def test_only_machined_sys_touches_the_kernel() -> None:
    """In the agent, ctypes and pyroute2 are imported only below basalt/machined/sys."""
    offenders = []
    for path in sorted((SRC / "machined").rglob("*.py")):
        if (SRC / "machined" / "sys") in path.parents:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module]
            for name in names:
                if name.split(".")[0] in ("ctypes", "pyroute2"):
                    offenders.append(f"{path.relative_to(SRC)} imports {name}")
    assert not offenders, "\n".join(offenders)


def test_machined_arguments_metal_defaults_and_container_requirements() -> None:
    from basalt.machined.main import make_platform, parse_args

    metal = make_platform(parse_args(["--platform", "metal"]))
    assert isinstance(metal, MetalPlatform)
    assert metal.paths.root == Path("/") and metal.system_root == Path("/")
    assert metal.address == "0.0.0.0" and metal.hostname == ""
    given = make_platform(parse_args(["--platform", "metal", "--address", "192.0.2.7"]))
    assert given.address_known
    with pytest.raises(SystemExit):
        parse_args(["--platform", "container", "--address", "127.0.0.2"])
