"""The pure parts of stats, cgroups, time and usage: the kernel's file formats, the du
walk on a real temporary tree, sizes and server names as users write them."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from basalt.cli.node_info import (
    cgroup_cell,
    cgroup_rows,
    container_namespace,
    human_bytes,
    human_seconds,
    parse_size,
)
from basalt.machined.api.errors import InvalidRequestError
from basalt.machined.api.inspect import _passes, parse_server
from basalt.machined.sys import cgroups
from basalt.machined.sys.diskusage import Usage, pseudo_devices, usage
from basalt.machinery.errors import BasaltError

# -- cgroup files ------------------------------------------------------------------------

MOUNTINFO_HYBRID = """\
25 30 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
26 30 0:5 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw
31 25 0:26 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw
32 25 0:27 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid shared:11 - cgroup cgroup rw,cpu,cpuacct
33 25 0:28 / /sys/fs/cgroup/pids rw,nosuid shared:12 - cgroup cgroup rw,pids
34 25 0:29 / /sys/fs/cgroup/systemd rw shared:13 - cgroup cgroup rw,xattr,name=systemd
40 30 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
"""


def test_mountinfo_finds_v2_and_each_v1_controller() -> None:
    assert cgroups.parse_mountinfo(MOUNTINFO_HYBRID) == {
        "": "/sys/fs/cgroup/unified",
        "cpu": "/sys/fs/cgroup/cpu,cpuacct",
        "cpuacct": "/sys/fs/cgroup/cpu,cpuacct",
        "pids": "/sys/fs/cgroup/pids",
        "xattr": "/sys/fs/cgroup/systemd",
    }


def test_proc_cgroup_file() -> None:
    text = "12:pids:/basalt/x\n4:cpu,cpuacct:/\n1:name=systemd:/init.scope\n0::/basalt/x\n"
    assert cgroups.parse_cgroup_file(text) == {
        "pids": "/basalt/x",
        "cpu": "/",
        "cpuacct": "/",
        "name=systemd": "/init.scope",
        "": "/basalt/x",
    }


def test_keyed_and_io_stat() -> None:
    assert cgroups.parse_keyed("usage_usec 120\nuser_usec 100\n\nsystem_usec 20\n") == {
        "usage_usec": "120",
        "user_usec": "100",
        "system_usec": "20",
    }
    io = "8:0 rbytes=100 wbytes=10 rios=1 wios=2 dbytes=0\n259:0 rbytes=50 wbytes=5 rios=3 wios=4\n"
    assert cgroups.parse_io_stat(io) == {
        "rbytes": "150",
        "wbytes": "15",
        "rios": "4",
        "wios": "6",
        "dbytes": "0",
    }


def test_unknown_preset_names_the_presets() -> None:
    assert cgroups.preset_keys("pids") == ("pids.current", "pids.max")
    assert set(cgroups.preset_keys("all")) == {k for keys in cgroups.PRESETS.values() for k in keys}
    with pytest.raises(cgroups.CgroupError, match="cpu, memory, io, pids and all"):
        cgroups.preset_keys("disk")


def _v2_tree(tmp_path: Path) -> cgroups.Hierarchies:
    root = tmp_path / "cg"
    (root / "basalt" / "c1").mkdir(parents=True)
    (root / "cgroup.controllers").write_text("cpu memory pids\n")
    (root / "cpu.stat").write_text("usage_usec 9000\nuser_usec 6000\nsystem_usec 3000\n")
    (root / "basalt" / "pids.current").write_text("3\n")
    (root / "basalt" / "pids.max").write_text("max\n")
    (root / "basalt" / "c1" / "pids.current").write_text("1\n")
    (root / "basalt" / "c1" / "pids.max").write_text("64\n")
    (root / "basalt" / "c1" / "memory.current").write_text("4096\n")
    (root / "basalt" / "c1" / "memory.stat").write_text("anon 1024\nfile 2048\n")
    return cgroups.Hierarchies({"": str(root)}, {"": "/"}, frozenset({"cpu", "memory", "pids"}))


def test_walk_reads_a_v2_tree_parents_first(tmp_path: Path) -> None:
    tree = _v2_tree(tmp_path)
    rows, truncated = cgroups.walk(tree, cgroups.preset_keys("pids"))
    assert not truncated
    assert rows == [
        ("", {}),
        ("basalt", {"pids.current": "3", "pids.max": "max"}),
        ("basalt/c1", {"pids.current": "1", "pids.max": "64"}),
    ]
    rows, _ = cgroups.walk(tree, cgroups.preset_keys("memory"), "basalt/c1")
    assert rows == [
        (
            "basalt/c1",
            {"memory.current": "4096", "memory.stat.anon": "1024", "memory.stat.file": "2048"},
        )
    ]
    rows, _ = cgroups.walk(tree, cgroups.preset_keys("cpu"), "/")
    assert rows[0] == (
        "",
        {
            "cpu.stat.usage_usec": "9000",
            "cpu.stat.user_usec": "6000",
            "cpu.stat.system_usec": "3000",
        },
    )


def test_walk_refuses_climbing_and_missing_paths(tmp_path: Path) -> None:
    tree = _v2_tree(tmp_path)
    with pytest.raises(cgroups.CgroupError, match="may not contain"):
        cgroups.walk(tree, cgroups.preset_keys("pids"), "basalt/../..")
    with pytest.raises(cgroups.CgroupError, match="no cgroup 'nope'"):
        cgroups.walk(tree, cgroups.preset_keys("pids"), "nope")


def test_walk_stops_at_the_limit(tmp_path: Path) -> None:
    rows, truncated = cgroups.walk(_v2_tree(tmp_path), ("pids.current",), limit=2)
    assert truncated and len(rows) == 2


def test_v1_files_answer_under_v2_names(tmp_path: Path) -> None:
    memory, cpu, acct = tmp_path / "memory", tmp_path / "cpu", tmp_path / "cpuacct"
    for d in (memory, cpu, acct):
        d.mkdir()
    (memory / "memory.usage_in_bytes").write_text("8192\n")
    (memory / "memory.max_usage_in_bytes").write_text("16384\n")
    (memory / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    (memory / "memory.stat").write_text("cache 100\nrss 200\n")
    (cpu / "cpu.shares").write_text("1024\n")
    (cpu / "cpu.cfs_quota_us").write_text("-1\n")
    (cpu / "cpu.cfs_period_us").write_text("100000\n")
    (acct / "cpuacct.usage").write_text("5000000\n")
    mounts = {"memory": str(memory), "cpu": str(cpu), "cpuacct": str(acct)}
    tree = cgroups.Hierarchies(mounts, {}, frozenset())
    rows, _ = cgroups.walk(tree, cgroups.preset_keys("all"))
    assert rows == [
        (
            "",
            {
                "memory.current": "8192",
                "memory.peak": "16384",
                "memory.max": "max",
                "memory.stat.anon": "200",
                "memory.stat.file": "100",
                "cpu.weight": "39",
                "cpu.max": "max 100000",
                "cpu.stat.usage_usec": "5000",
            },
        )
    ]


def test_read_pid_finds_this_process() -> None:
    values = cgroups.read_pid(cgroups.Hierarchies.current(), os.getpid(), ("cpu.stat.usage_usec",))
    assert int(values.get("cpu.stat.usage_usec", "1")) > 0
    assert cgroups.read_pid(cgroups.Hierarchies.current(), 2**22 + 1, ("pids.current",)) == {}


# -- du ----------------------------------------------------------------------------------


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    top = tmp_path / "t"
    (top / "a" / "b").mkdir(parents=True)
    (top / "z").mkdir()
    (top / "a" / "x.bin").write_bytes(b"x" * 100)
    (top / "a" / "b" / "y.bin").write_bytes(b"y" * 1000)
    os.link(top / "a" / "b" / "y.bin", top / "z" / "y-again")
    os.symlink("a", top / "link")
    return top


def test_usage_post_order_hard_links_once_links_not_followed(tree: Path) -> None:
    got = list(usage(str(tree), max_depth=-1, show_files=True))
    assert got == [
        Usage("a/b/y.bin", 1000, False),
        Usage("a/b", 1000, True),
        Usage("a/x.bin", 100, False),
        Usage("a", 1100, True),
        Usage("link", 1, False),
        Usage("z", 0, True),
        Usage(".", 1101, True),
    ]


def test_usage_depth_and_directories_only(tree: Path) -> None:
    assert list(usage(str(tree), max_depth=0, show_files=True)) == [Usage(".", 1101, True)]
    assert list(usage(str(tree), max_depth=1, show_files=False)) == [
        Usage("a", 1100, True),
        Usage("z", 0, True),
        Usage(".", 1101, True),
    ]
    single = tree / "a" / "x.bin"
    assert list(usage(str(single), max_depth=0, show_files=False)) == [Usage(".", 100, False)]


def test_usage_skips_sensitive_and_pseudo_directories(tree: Path) -> None:
    sensitive = str(tree / "a" / "b")
    got = list(usage(str(tree), max_depth=-1, show_files=False, skip=lambda p: p == sensitive))
    assert Usage("a/b", 0, True, "not counted: sensitive path") in got
    device = os.lstat(tree / "z").st_dev
    got = list(usage(str(tree), max_depth=0, show_files=False, pseudo=frozenset({device})))
    assert got == [Usage(".", 0, True, "not counted: a kernel pseudo filesystem")]


def test_pseudo_devices_from_mountinfo() -> None:
    assert pseudo_devices(MOUNTINFO_HYBRID) == frozenset(
        {os.makedev(0, 23), os.makedev(0, 26), os.makedev(0, 27), os.makedev(0, 28),
         os.makedev(0, 29), os.makedev(0, 5)}
    )  # fmt: skip


@pytest.mark.parametrize(
    ("size", "threshold", "shown"),
    [(10, 0, True), (10, 10, True), (9, 10, False), (9, -10, True), (10, -10, False)],
)
def test_threshold(size: int, threshold: int, shown: bool) -> None:
    assert _passes(size, threshold) is shown


# -- what users type ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("4096", 4096),
        ("10K", 10 * 1024),
        ("1.5M", 3 * 512 * 1024),
        ("2G", 2 << 30),
        ("2GiB", 2 << 30),
        ("3mb", 3 << 20),
        ("-100K", -100 * 1024),
        ("0", 0),
    ],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "lots", "10X", "1KK", "nan", "inf", "--5", "M"])
def test_parse_size_refuses(text: str) -> None:
    with pytest.raises(BasaltError, match="is not a size"):
        parse_size(text)


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("time.example.org", ("time.example.org", 123)),
        ("127.0.0.1:12323", ("127.0.0.1", 12323)),
        ("[::1]:124", ("::1", 124)),
        ("::1", ("::1", 123)),
        ("fe80::1%eth0", ("fe80::1%eth0", 123)),
    ],
)
def test_parse_server(text: str, parsed: tuple[str, int]) -> None:
    assert parse_server(text, 123) == parsed


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("not a host", "is not HOST[:PORT]"),
        ("host:0", "port '0'"),
        ("host:99999", "port '99999'"),
        ("host:", "port ''"),
        ("[::1", "is not HOST[:PORT]"),
        ("-x", "is not HOST[:PORT]"),
        ("", "is not HOST[:PORT]"),
    ],
)
def test_parse_server_refuses(text: str, why: str) -> None:
    with pytest.raises(InvalidRequestError, match=why.replace("[", r"\[").replace("]", r"\]")):
        parse_server(text, 123)


def test_namespace_options() -> None:
    assert container_namespace(False, "") == ""
    assert container_namespace(True, "") == "k8s.io"
    assert container_namespace(True, "k8s.io") == "k8s.io"
    with pytest.raises(BasaltError, match="contradicts"):
        container_namespace(True, "basalt")


def test_human_units_and_cgroup_cells() -> None:
    assert human_bytes(512) == "512B" and human_bytes(123456789) == "117.7MiB"
    assert human_seconds(0.25) == "0.25s" and human_seconds(245) == "4m05s"
    assert human_seconds(7380) == "2h03m"
    assert cgroup_cell("memory.max", "max") == "max"
    assert cgroup_cell("memory.current", "2048") == "2.0KiB"
    assert cgroup_cell("cpu.stat.usage_usec", "1500000") == "1.50s"
    assert cgroup_cell("pids.current", None) == "-"


def test_cgroup_rows_indent_by_depth() -> None:
    entries = [
        SimpleNamespace(path="basalt", values={"pids.current": "3"}),
        SimpleNamespace(path="basalt/c1", values={"pids.current": "1"}),
        SimpleNamespace(path="basalt/c1/x", values={}),
    ]
    assert cgroup_rows("n", entries, ["pids.current"]) == [
        ("n", "basalt", "3"),
        ("n", "  c1", "1"),
        ("n", "    x", "-"),
    ]
