"""Links read from sysfs (what DHCP starts with before pyroute2 is imported): the same
choice of DHCP link as netlink's view gives."""

from __future__ import annotations

from pathlib import Path

import pytest

from basalt.machined.controllers.network import default_dhcp_link
from basalt.machined.sys import ifaces
from basalt.machined.sys.netlink import NetlinkError


def _link(root: Path, name: str, index: int, mac: str, *, flags: str = "0x1002",
          kind: str = "1", device: bool = False) -> None:  # fmt: skip
    entry = root / name
    entry.mkdir(parents=True)
    values = {"ifindex": index, "flags": flags, "operstate": "down", "mtu": 1500,
              "address": mac, "type": kind}  # fmt: skip
    for key, value in values.items():
        (entry / key).write_text(f"{value}\n")
    if device:
        (entry / "device").mkdir()


def test_sysfs_links_and_the_default_dhcp_link(tmp_path: Path) -> None:
    _link(tmp_path, "lo", 1, "00:00:00:00:00:00", flags="0x9", kind="772")
    _link(tmp_path, "veth0", 2, "02:00:00:00:00:02")
    _link(tmp_path, "eth0", 3, "52:54:00:12:34:56", flags="0x1003", device=True)
    (tmp_path / "bonding_masters").write_text("\n")  # not a link: skipped
    links = ifaces.sysfs_links(tmp_path)
    assert [(link.name, link.index) for link in links] == [("lo", 1), ("veth0", 2), ("eth0", 3)]
    lo, veth, eth = links
    assert lo.loopback and not veth.loopback and lo.mac == ""
    assert (eth.up, eth.kind, veth.up, veth.kind) == (True, None, False, "virtual")
    chosen = default_dhcp_link(links)
    assert chosen is not None and chosen.name == "eth0"  # the NIC before the veth
    assert ifaces.sysfs_links(tmp_path / "missing") == []


def test_set_up_refuses_a_bad_name_and_names_the_link() -> None:
    with pytest.raises(NetlinkError, match="not a link name"):
        ifaces.set_up("x" * 16)
    with pytest.raises(NetlinkError, match="bring no-such-link0 up: No such device"):
        ifaces.set_up("no-such-link0")
