"""The qemu provisioner's root mode: the VMs share one Ethernet segment, a bridge inside a
network namespace the provisioner creates for the cluster.

    host (init netns)                      netns basalt-<id> (the cluster's own)
    127.0.0.11:50000 ─┐                    br0 10.5.0.1/24 ── tap0 ── QEMU node 1 (10.5.0.11)
    127.0.0.12:50000 ─┴─ forwarder ──────▶                ├── tap1 ── QEMU node 2 (10.5.0.12)
                        (listens on the host,             └── dnsmasq: DHCP by MAC, no DNS
                         connects in the netns)

Nodes see each other's real addresses (etcd's peer checks pass, so several control
planes work); the host reaches each node's API only through the forwarder, on the node's
own loopback address. Nothing in the namespace routes anywhere: it has no link to the
host's network. Everything is created here and deleted by :func:`delete`; a host
interface is never touched.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .common import ProvisionError

NETNS_DIR = Path("/run/netns")
BRIDGE = "br0"


@dataclass(frozen=True)
class Lease:
    """A DHCP reservation: a node's MAC gets its address and host name."""

    mac: str
    address: str
    hostname: str


@dataclass(frozen=True)
class BridgeNetwork:
    netns: str
    network: ipaddress.IPv4Network
    gateway: str

    @classmethod
    def for_cluster(
        cls, state_dir: Path, network: ipaddress.IPv4Network, gateway: str
    ) -> BridgeNetwork:
        """Named after the state directory: two clusters never share a namespace."""
        digest = hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:8]
        return cls(f"basalt-{digest}", network, gateway)

    @staticmethod
    def tap(index: int) -> str:
        return f"tap{index}"

    def exec_prefix(self) -> list[str]:
        """Run a program inside the namespace (it execs: the pid stays the program's)."""
        return ["ip", "netns", "exec", self.netns]

    def exists(self) -> bool:
        return (NETNS_DIR / self.netns).exists()


def available() -> str | None:
    """None when root mode can work here, else why not."""
    if os.geteuid() != 0:
        return "not running as root"
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is missing"
    if not Path("/dev/net/tun").exists():
        return "/dev/net/tun does not exist"
    return None


def _ip(net: BridgeNetwork, *args: str) -> None:
    argv = ["ip", "-n", net.netns, *args]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise ProvisionError(f"{' '.join(argv)} failed: {done.stderr.strip()}")


def create(net: BridgeNetwork, taps: int) -> None:
    """The namespace, its bridge with the gateway address, and one tap per VM."""
    if net.exists():
        raise ProvisionError(
            f"network namespace {net.netns} already exists",
            hint="an earlier cluster at this state directory was not destroyed: "
            f"'ip netns del {net.netns}' once no QEMU of it runs",
        )
    done = subprocess.run(
        ["ip", "netns", "add", net.netns], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise ProvisionError(f"ip netns add {net.netns} failed: {done.stderr.strip()}")
    try:
        _ip(net, "link", "set", "lo", "up")
        _ip(net, "link", "add", BRIDGE, "type", "bridge")
        _ip(net, "addr", "add", f"{net.gateway}/{net.network.prefixlen}", "dev", BRIDGE)
        _ip(net, "link", "set", BRIDGE, "up")
        for index in range(taps):
            tap = net.tap(index)
            _ip(net, "tuntap", "add", "dev", tap, "mode", "tap")
            _ip(net, "link", "set", tap, "master", BRIDGE)
            _ip(net, "link", "set", tap, "up")
    except BaseException:
        delete(net)
        raise


def delete(net: BridgeNetwork) -> None:
    """Remove the namespace (and with it the bridge and taps); gone already is fine."""
    if net.exists():
        subprocess.run(["ip", "netns", "del", net.netns], capture_output=True, check=False)


def dnsmasq_command(net: BridgeNetwork, leases: Sequence[Lease], state_dir: Path) -> list[str]:
    """DHCP only (``--port=0``: no DNS), on the bridge only, fixed address per MAC."""
    argv = [
        *net.exec_prefix(),
        shutil.which("dnsmasq") or "dnsmasq",
        "--keep-in-foreground",
        "--conf-file=/dev/null",
        "--port=0",
        f"--interface={BRIDGE}",
        "--bind-interfaces",
        f"--dhcp-range={net.network.network_address},static,{net.network.netmask},12h",
        f"--dhcp-option=option:router,{net.gateway}",
        f"--dhcp-leasefile={state_dir / 'dnsmasq.leases'}",
        f"--pid-file={state_dir / 'dnsmasq.pid'}",
        "--log-dhcp",
        f"--log-facility={state_dir / 'dnsmasq.log'}",
    ]
    argv += [f"--dhcp-host={lease.mac},{lease.address},{lease.hostname}" for lease in leases]
    return argv


def start_dhcp(net: BridgeNetwork, leases: Sequence[Lease], state_dir: Path) -> int:
    if shutil.which("dnsmasq") is None:
        raise ProvisionError(
            "dnsmasq is not installed: root mode serves the VMs' DHCP with it",
            hint="install Debian's dnsmasq-base package ('make install' does)",
        )
    return _spawn(dnsmasq_command(net, leases, state_dir), state_dir / "dnsmasq.out")


def forwarder_command(
    net: BridgeNetwork,
    state_dir: Path,
    forwards: Sequence[tuple[str, int, str, int]],
    python: str = sys.executable,
) -> list[str]:
    argv = [python, "-m", "basalt.provision.forward", "--cluster", str(state_dir)]
    argv += ["--netns", net.netns]
    argv += [f"{host}:{port}={guest}:{guest_port}" for host, port, guest, guest_port in forwards]
    return argv


def start_forwarder(
    net: BridgeNetwork, state_dir: Path, forwards: Sequence[tuple[str, int, str, int]]
) -> int:
    return _spawn(forwarder_command(net, state_dir, forwards), state_dir / "forwarder.log")


def _spawn(argv: list[str], log_path: Path) -> int:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return process.pid


def stop_pid(pid: int, marker: bytes) -> None:
    """SIGKILL ``pid`` only while its command line still contains ``marker``."""
    import signal

    from .common import cmdline

    if pid > 0 and any(marker in arg for arg in cmdline(pid)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
