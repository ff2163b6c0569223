"""The qemu provisioner's networks: the guest addresses every VM numbers the same way,
user networking's forwards (``hostfwd`` in, ``guestfwd`` through
:mod:`basalt.provision.relay` out), and root mode's bridge in the cluster's own network
namespace (:mod:`basalt.provision.bridge`). The whole picture is in :mod:`.qemu`'s
docstring and docs/adr/0009-qemu-provisioner.md."""

from __future__ import annotations

import ipaddress
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from basalt.machinery.api import API_PORT, TRUST_PORT

from . import bridge
from .common import ProvisionError
from .state import ClusterRecord, NodeRecord

#: The virtual network every VM numbers the same way; node i is 10.5.0.(11 + i).
GUEST_NETWORK = ipaddress.IPv4Network("10.5.0.0/24")
#: slirp's own addresses: the gateway (the host, unreachable under restrict=on) and DNS.
GUEST_GATEWAY = "10.5.0.2"
GUEST_DNS = "10.5.0.3"
#: Root mode: the bridge's own address in the cluster's namespace (routes nowhere).
BRIDGE_GATEWAY = "10.5.0.1"
NETWORKS = ("auto", "user", "bridge")
GUEST_FIRST_HOST = 11
MAX_NODES = 254 - GUEST_FIRST_HOST + 1
#: What a node serves that the host and other nodes may reach.
FORWARDED_PORTS = (API_PORT, TRUST_PORT)


@dataclass(frozen=True)
class Forward:
    """A ``guestfwd``: the guest's connections to ``guest:port`` go to ``host:port`` (or
    to ``host:host_port`` when that is given)."""

    guest: str
    host: str
    port: int
    host_port: int | None = None

    @property
    def target_port(self) -> int:
        return self.port if self.host_port is None else self.host_port


def network_mode(requested: str) -> tuple[str, str]:
    """(user | bridge, why)."""
    if requested not in NETWORKS:
        raise ProvisionError(f"--network {requested!r}: expected one of {', '.join(NETWORKS)}")
    unavailable = bridge.available()
    if requested == "bridge" and unavailable:
        raise ProvisionError(
            f"--network bridge: {unavailable}",
            hint="run as root, or use --network user (rootless, one control plane)",
        )
    if requested == "user":
        return "user", "user networking requested"
    if unavailable:
        return "user", f"user networking: root mode unavailable ({unavailable})"
    return "bridge", "bridge in the cluster's own network namespace"


def guest_address(index: int) -> str:
    if not 0 <= index < MAX_NODES:
        raise ProvisionError(f"the qemu provisioner numbers at most {MAX_NODES} nodes")
    return str(GUEST_NETWORK.network_address + GUEST_FIRST_HOST + index)


def mac_address(index: int) -> str:
    """Locally administered, distinct per node of a cluster (52:54:00 is QEMU's prefix)."""
    return f"52:54:00:ba:5a:{index + 1:02x}"


def peer_forwards(node: NodeRecord, nodes: Sequence[NodeRecord]) -> list[Forward]:
    """What ``node`` may reach of the others: every API, and control planes' trust port."""
    forwards = []
    for peer in nodes:
        if peer.name == node.name:
            continue
        ports = FORWARDED_PORTS if peer.type == "controlplane" else (API_PORT,)
        forwards += [Forward(peer.guest_address, peer.address, port) for port in ports]
    return forwards


def check_guest_forwards(
    forwards: Sequence[Forward], nodes: Sequence[NodeRecord], network: str
) -> None:
    """Extra guest forwards: user network only, to host loopback only, from a guest
    address of the virtual network that no node, gateway or DNS uses."""
    if not forwards:
        return
    if network != "user":
        raise ProvisionError(
            "guest forwards to host servers work on the user network only",
            hint="use --network user (the bridge's namespace has no way to host loopback)",
        )
    taken = {GUEST_GATEWAY, GUEST_DNS, *(n.guest_address for n in nodes)}
    for forward in forwards:
        guest, host = ipaddress.IPv4Address(forward.guest), ipaddress.IPv4Address(forward.host)
        if not host.is_loopback:
            raise ProvisionError(f"guest forward to {forward.host}: only loopback is allowed")
        if guest not in GUEST_NETWORK or forward.guest in taken:
            raise ProvisionError(
                f"guest forward from {forward.guest}: pick a free address of {GUEST_NETWORK} "
                f"(not {', '.join(sorted(taken))})"
            )


def qemu_value(text: str) -> str:
    """A value inside a QEMU ``key=value,...`` option: commas are doubled."""
    return text.replace(",", ",,")


def relay_command(state_dir: Path, forward: Forward, python: str = sys.executable) -> str:
    """The ``cmd:`` of a ``guestfwd``: parsed by GLib's shell-like parser, not by a shell."""
    argv = [python, "-m", "basalt.provision.relay", "--cluster", str(state_dir)]
    return shlex.join([*argv, forward.host, str(forward.target_port)])


def guest_forward(forward: Forward, state_dir: Path, python: str = sys.executable) -> str:
    """The ``-netdev user`` option of one forward, through :mod:`basalt.provision.relay`.

    Not QEMU's ``guestfwd=...-tcp:HOST:PORT`` (a socket chardev): QEMU opens that one
    connection when it starts (and does not start when nothing listens), and every guest
    connection shares it. A ``cmd:`` runs once per guest connection, so each gets a
    connection of its own, made when the guest connects."""
    command = qemu_value(relay_command(state_dir, forward, python))
    return f"guestfwd=tcp:{forward.guest}:{forward.port}-cmd:{command}"


def netdev(
    node: NodeRecord,
    nodes: Sequence[NodeRecord],
    state_dir: Path,
    network: str = "user",
    extra: Sequence[Forward] = (),
) -> str:
    """``-netdev`` of one node. bridge: its tap in the cluster's namespace. user: its
    private NAT, its forwards (to its peers, and ``extra``), nothing else."""
    if network == "bridge":
        index = [n.name for n in nodes].index(node.name)
        return f"tap,id=n0,ifname={bridge.BridgeNetwork.tap(index)},script=no,downscript=no"
    parts = [
        "user",
        "id=n0",
        "ipv6=off",
        f"net={GUEST_NETWORK}",
        f"host={GUEST_GATEWAY}",
        f"dns={GUEST_DNS}",
        f"dhcpstart={node.guest_address}",
        "restrict=on",
    ]
    parts += [
        f"hostfwd=tcp:{node.address}:{port}-{node.guest_address}:{port}" for port in FORWARDED_PORTS
    ]
    parts += [guest_forward(f, state_dir) for f in (*peer_forwards(node, nodes), *extra)]
    return ",".join(parts)


def cluster_bridge(state_dir: Path) -> bridge.BridgeNetwork:
    return bridge.BridgeNetwork.for_cluster(state_dir, GUEST_NETWORK, BRIDGE_GATEWAY)


def start_bridge(record: ClusterRecord, nodes: Sequence[NodeRecord]) -> None:
    """Root mode: the namespace with its bridge and taps, DHCP, and the host forwarder."""
    state_dir = Path(record.state_dir)
    net = cluster_bridge(state_dir)
    bridge.create(net, len(nodes))
    record.options["netns"] = net.netns
    record.save()
    leases = [bridge.Lease(mac_address(i), n.guest_address, n.name) for i, n in enumerate(nodes)]
    record.options["dnsmasq_pid"] = bridge.start_dhcp(net, leases, state_dir)
    forwards = [
        (node.address, port, node.guest_address, port)
        for node in nodes
        for port in (FORWARDED_PORTS if node.type == "controlplane" else (API_PORT,))
    ]
    record.options["forwarder_pid"] = bridge.start_forwarder(net, state_dir, forwards)
    record.save()


def stop_bridge(record: ClusterRecord) -> None:
    marker = record.state_dir.encode()
    for key in ("dnsmasq_pid", "forwarder_pid"):
        pid = record.options.get(key)
        if isinstance(pid, int):
            bridge.stop_pid(pid, marker)
    if record.options.get("netns"):
        bridge.delete(cluster_bridge(Path(record.state_dir)))
