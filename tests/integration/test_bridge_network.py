"""The qemu provisioner's root-mode network, without VMs: a namespace with a bridge and
taps, DHCP on the bridge, and the forwarder from a host loopback address into it."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from basalt.provision import bridge
from basalt.provision.forward import Mapping

pytestmark = pytest.mark.skipif(
    bridge.available() is not None, reason=f"root mode unavailable: {bridge.available()}"
)

NETWORK = ipaddress.IPv4Network("10.5.0.0/24")
HOST = "127.0.0.236"


def _host_links() -> str:
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True)
    return "\n".join(sorted(line.split(":")[1] for line in out.stdout.splitlines()))


def _wait(url: str, timeout: float = 10.0) -> bytes:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                return bytes(answer.read())
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_forwarder_reaches_inside_the_namespace_and_delete_leaves_the_host_as_it_was(
    tmp_path: Path,
) -> None:
    before = _host_links()
    net = bridge.BridgeNetwork.for_cluster(tmp_path, NETWORK, "10.5.0.1")
    bridge.create(net, taps=2)
    pids: list[int] = []
    try:
        assert net.exists() and _host_links() == before  # nothing on the host side
        inside = subprocess.run(
            [*net.exec_prefix(), "ip", "-o", "link"], capture_output=True, text=True, check=True
        ).stdout
        assert "br0" in inside and "tap0" in inside and "tap1" in inside
        (tmp_path / "www").mkdir()
        (tmp_path / "www" / "hello").write_text("from inside")
        server = subprocess.Popen(
            [
                *net.exec_prefix(),
                sys.executable,
                "-m",
                "http.server",
                "--bind",
                "10.5.0.1",
                "--directory",
                str(tmp_path / "www"),
                "18080",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        pids.append(server.pid)
        pids.append(bridge.start_forwarder(net, tmp_path, [(HOST, 18081, "10.5.0.1", 18080)]))
        assert _wait(f"http://{HOST}:18081/hello") == b"from inside"
        dhcp = bridge.start_dhcp(
            net, [bridge.Lease("52:54:00:ba:5a:01", "10.5.0.11", "n1")], tmp_path
        )
        pids.append(dhcp)
        time.sleep(0.5)
        from basalt.provision.common import alive

        assert alive(dhcp), (tmp_path / "dnsmasq.out").read_text()
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        bridge.delete(net)
    assert not net.exists() and _host_links() == before


def test_forwarder_refuses_to_listen_outside_loopback() -> None:
    with pytest.raises(ValueError, match="loopback addresses only"):
        Mapping.parse("10.0.0.1:50000=10.5.0.11:50000")
    assert Mapping.parse("127.0.0.11:50000=10.5.0.11:50001") == Mapping(
        "127.0.0.11", 50000, "10.5.0.11", 50001
    )
