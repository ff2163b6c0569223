"""The metal platform against a real kernel, inside namespaces these tests make.

Each test creates its own network namespaces joined by a veth pair (the node's end is
called eth0 inside its namespace) and deletes them afterwards; DHCP comes from Debian's
dnsmasq running in the "server" namespace. The code under test runs in a child
process inside the node's network namespace and in fresh UTS and mount namespaces
(PID namespaces too where it must be PID 1), so the host's links, addresses, routes,
host name and mounts are never touched. State is read back with ``ip -n NS``.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, ip_interface
from pathlib import Path
from typing import Any

import pytest

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        os.geteuid() != 0 or not (shutil.which("ip") and shutil.which("unshare")),
        reason="network, UTS, mount and PID namespaces need root, ip(8) and unshare(1)",
    ),
]

CHILD = Path(__file__).with_name("metal_child.py")
BIN = Path(sys.executable).parent
API = "basalt.dev/v1alpha1"


def _run(cmd: list[str], *, timeout: float = 30, check: bool = True) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr}")
    return done.stdout


def _signal_code(returncode: int) -> int:
    """unshare(1) reports a child killed by signal N as 128+N, or dies of it itself."""
    return 128 - returncode if returncode < 0 else returncode


@dataclass
class Namespaces:
    """A node namespace (``eth0``) and a server namespace on one /24, linked by a veth."""

    node: str
    server: str
    server_link: str
    subnet: IPv4Network

    @property
    def server_ip(self) -> IPv4Address:
        return self.subnet.network_address + 1

    def host(self, last: int) -> str:
        return str(self.subnet.network_address + last)

    def ip_json(self, *args: str) -> Any:
        return json.loads(_run(["ip", "-j", "-n", self.node, *args]) or "[]")

    def addresses(self) -> dict[str, dict[str, Any]]:
        (link,) = self.ip_json("addr", "show", "dev", "eth0")
        return {f"{a['local']}/{a['prefixlen']}": a for a in link["addr_info"]}

    def routes(self, family: str = "-4") -> list[dict[str, Any]]:
        return list(json.loads(_run(["ip", "-j", family, "-n", self.node, "route"]) or "[]"))

    def child_command(self, *args: str, pid: bool = False) -> list[str]:
        unshare = ["unshare", "--uts", "--mount", "--propagation", "private"]
        if pid:
            unshare += ["--pid", "--fork", "--mount-proc"]
        return ["ip", "netns", "exec", self.node, *unshare, sys.executable, str(CHILD), *args]

    def child(self, *args: str, timeout: float = 60) -> dict[str, Any]:
        out = _run(self.child_command(*args), timeout=timeout)
        return dict(json.loads(out.strip().splitlines()[-1]))


@pytest.fixture
def netns() -> Iterator[Namespaces]:
    tag = secrets.token_hex(3)
    node, server, server_link = f"bmn{tag}", f"bms{tag}", f"bv{tag}"
    subnet = IPv4Network(f"10.251.{random.randint(1, 254)}.0/24")
    created: list[str] = []
    try:
        for name in (node, server):
            _run(["ip", "netns", "add", name])
            created.append(name)
        # Both ends are made inside their namespaces: the host never sees the link.
        _run(["ip", "link", "add", "eth0", "netns", node, "type", "veth",
              "peer", "name", server_link, "netns", server])  # fmt: skip
        _run(["ip", "-n", server, "addr", "add", f"{subnet.network_address + 1}/24",
              "dev", server_link])  # fmt: skip
        for name, link in ((server, server_link), (server, "lo")):
            _run(["ip", "-n", name, "link", "set", link, "up"])
        yield Namespaces(node, server, server_link, subnet)
    finally:
        for name in created:
            _run(["ip", "netns", "del", name], check=False)


@dataclass
class Dnsmasq:
    process: subprocess.Popen[bytes]
    log: Path
    leases: Path

    def acks(self) -> int:
        return self.log.read_text().count("DHCPACK(")

    def leased(self, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            lines = self.leases.read_text().split("\n") if self.leases.exists() else []
            for line in lines:
                if line.strip():
                    return line.split()[2]
            time.sleep(0.2)
        raise AssertionError(f"no DHCP lease in {timeout} s:\n{self.log.read_text()}")


@pytest.fixture
def dnsmasq(netns: Namespaces, tmp_path: Path) -> Iterator[Dnsmasq]:
    if shutil.which("dnsmasq") is None:
        pytest.skip("dnsmasq is not installed (Debian package dnsmasq-base)")
    log, leases = tmp_path / "dnsmasq.log", tmp_path / "dnsmasq.leases"
    net = netns.subnet.network_address
    command = [
        "ip", "netns", "exec", netns.server, "dnsmasq", "--no-daemon", "--conf-file=/dev/null",
        "--port=0", f"--interface={netns.server_link}", "--bind-interfaces", "--no-ping",
        f"--dhcp-range={net + 50},{net + 60},255.255.255.0,2m",
        f"--dhcp-option=option:router,{netns.server_ip}",
        f"--dhcp-option=option:dns-server,{net + 53}",
        "--dhcp-option=option:domain-search,lab.test",
        "--dhcp-option=option:T1,2", "--dhcp-option=option:T2,4",
        f"--dhcp-leasefile={leases}", "--pid-file=", "--log-dhcp",
    ]  # fmt: skip
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while "DHCP, sockets bound" not in log.read_text():
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        yield Dnsmasq(process, log, leases)
    finally:
        process.terminate()
        process.wait(10)


def _link_config(name: str, body: str) -> str:
    return f"apiVersion: {API}\nkind: LinkConfig\nname: {name}\n{body}"


def test_link_config_applies_addresses_routes_mtu_and_removes_what_config_drops(
    netns: Namespaces, tmp_path: Path
) -> None:
    gateway = str(netns.server_ip)
    first = (
        _link_config(
            "eth0",
            f"mtu: 1400\naddresses: [{netns.host(10)}/24, 2001:db8:5::10/64]\n"
            f"routes:\n  - network: 198.51.100.0/24\n    gateway: {gateway}\n    metric: 50\n"
            f"  - gateway: {gateway}\n",
        )
        + "---\n"
        + _link_config("nope0", "addresses: [192.0.2.1/24]\n")
    )
    second = _link_config("eth0", f"addresses: [{netns.host(11)}/24]\n")
    child = subprocess.Popen(
        netns.child_command("links", str(tmp_path), first, second),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert child.stdin is not None and child.stdout is not None
    try:
        step = json.loads(child.stdout.readline())
        assert step["error"] == ("LinkConfig(nope0): no link named nope0 (links: eth0, lo)"), step
        assert step["addresses"][:2] == [netns.host(10), "2001:db8:5::10"]
        assert step["again"] == step["addresses"]
        addresses = netns.addresses()
        assert f"{netns.host(10)}/24" in addresses and "2001:db8:5::10/64" in addresses
        assert addresses[f"{netns.host(10)}/24"]["valid_life_time"] == 4294967295  # static
        (link,) = netns.ip_json("link", "show", "dev", "eth0")
        assert link["mtu"] == 1400 and "UP" in link["flags"]
        routes = {r["dst"]: r for r in netns.routes()}
        assert routes["default"]["gateway"] == gateway
        assert routes["default"]["protocol"] == "static"
        assert routes["198.51.100.0/24"]["metric"] == 50
        # lo was brought up too.
        (lo,) = netns.ip_json("link", "show", "dev", "lo")
        assert "UP" in lo["flags"]

        child.stdin.write("\n")
        child.stdin.flush()
        step = json.loads(child.stdout.readline())
        assert step["error"] is None
        assert step["addresses"] == [netns.host(11)]
        addresses = netns.addresses()
        assert f"{netns.host(11)}/24" in addresses
        assert f"{netns.host(10)}/24" not in addresses
        assert "2001:db8:5::10/64" not in addresses
        assert {r["dst"] for r in netns.routes()} == {f"{netns.subnet}"}
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.wait(30) == 0, child.stderr.read() if child.stderr else ""
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


@pytest.mark.parametrize("configured", [False, True], ids=["default-link", "dhcp-and-static"])
def test_dhcp_lease_address_route_resolvers_and_renewal(
    netns: Namespaces, dnsmasq: Dnsmasq, tmp_path: Path, configured: bool
) -> None:
    host_name = os.uname().nodename
    config = (
        _link_config("eth0", f"dhcp: true\naddresses: [{netns.host(10)}/24]\n")
        if configured
        else ""
    )
    result = netns.child("dhcp", str(tmp_path), config)
    leased = dnsmasq.leased()
    assert result["lease"] == f"{leased}/24"
    assert ip_interface(result["lease"]).network == netns.subnet
    assert result["address"] == (netns.host(10) if configured else leased)
    assert result["errors"] == {}
    # The kernel holds the lease with its lifetime, and the default route from DHCP.
    address = netns.addresses()[f"{leased}/24"]
    assert 0 < address["valid_life_time"] <= 120
    (default,) = [r for r in netns.routes() if r["dst"] == "default"]
    assert default["gateway"] == str(netns.server_ip)
    assert default["protocol"] == "dhcp"
    # Renewed at T1 (dnsmasq was told 2 s; it may round up) without losing the address.
    assert 0 < result["renewal_time"] <= 5
    assert result["renewed"] > 0
    assert dnsmasq.acks() >= 2
    # Generated /etc files and the host name (in the child's own UTS namespace).
    assert result["resolv_conf"] == (
        f"# Generated by Basalt from DHCP on eth0.\nnameserver {netns.host(53)}\nsearch lab.test\n"
    )
    assert f"{result['address']} child-node" in result["hosts"]
    assert result["hostname_file"] == "child-node\n"
    assert result["kernel_hostname"] == "child-node"
    assert os.uname().nodename == host_name


def test_first_lease_goes_on_the_link_before_pyroute2_is_imported(
    netns: Namespaces, dnsmasq: Dnsmasq, tmp_path: Path
) -> None:
    """While the maintenance API opens, DHCP starts from sysfs and its lease (address
    with its lifetime, default route, proto dhcp) goes on the link through rtnetlink
    directly; netlink (pyroute2) takes over once the API listens."""
    result = netns.child("dhcp_first", str(tmp_path))
    leased = dnsmasq.leased()
    before = result["before"]
    assert not before["pyroute2"] and not before["published"]
    (link,) = before["addresses"]
    assert link["operstate"] in ("UP", "UNKNOWN"), link  # brought up by the ioctl
    (address,) = [a for a in link["addr_info"] if a["local"] == leased]
    assert address["prefixlen"] == 24 and 0 < address["valid_life_time"] <= 120
    assert address["broadcast"] == str(netns.subnet.broadcast_address)
    (default,) = [r for r in before["routes"] if r["dst"] == "default"]
    assert (default["gateway"], default["protocol"]) == (str(netns.server_ip), "dhcp")
    assert default["metric"] == 1024
    assert result["address"] == leased and result["pyroute2"]  # netlink took over
    assert result["errors"] == {}


def test_sysctls_are_written_and_failures_name_the_key(netns: Namespaces, tmp_path: Path) -> None:
    def forwarding() -> str:
        return _run(["ip", "netns", "exec", netns.node, "cat", "/proc/sys/net/ipv4/ip_forward"])

    host_before = Path("/proc/sys/net/ipv4/ip_forward").read_text()
    assert forwarding().strip() == "0"
    config = (
        f"apiVersion: {API}\nkind: SysctlConfig\nsysctls:\n"
        "  net.ipv4.ip_forward: '1'\n"
        "  net.ipv4.conf.eth0.accept_redirects: '0'\n"
        "  net.ipv4.no_such_key: '1'\n"
    )
    result = netns.child("sysctls", "/", config)
    assert result["error"] == (
        "sysctls not set: net.ipv4.no_such_key: no such sysctl (/proc/sys/net/ipv4/no_such_key)"
    )
    assert forwarding().strip() == "1"
    redirects = ["cat", "/proc/sys/net/ipv4/conf/eth0/accept_redirects"]
    assert _run(["ip", "netns", "exec", netns.node, *redirects]).strip() == "0"
    assert Path("/proc/sys/net/ipv4/ip_forward").read_text() == host_before


def _in_mount_namespace(*args: str, pid: bool = False) -> list[str]:
    unshare = ["unshare", "--uts", "--mount", "--propagation", "private"]
    if pid:
        unshare += ["--pid", "--fork", "--mount-proc"]
    return [*unshare, sys.executable, str(CHILD), *args]


def test_prepare_mounts_pseudo_filesystems_and_binds_etc_read_only(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    out = _run(_in_mount_namespace("prepare", str(root)))
    result = json.loads(out.strip().splitlines()[-1])
    expected = {
        "proc": "proc",
        "sys": "sysfs",
        "dev": "devtmpfs",
        "dev/pts": "devpts",
        "dev/shm": "tmpfs",
        "sys/fs/cgroup": "cgroup2",
        "run": "tmpfs",
        "tmp": "tmpfs",
        "var": "tmpfs",
        "system": "tmpfs",
        "etc/kubernetes": "tmpfs",
        "etc/cni": "tmpfs",
    }
    fstypes = {k.removeprefix(f"{root}/"): v for k, v in result["fstypes"].items()}
    for target, fstype in expected.items():
        assert fstypes.get(target) == fstype, (target, fstypes)
    for name in ("hostname", "hosts", "resolv.conf"):
        assert f"etc/{name}" in fstypes
    assert result["mount_count"] == len(result["targets"]) == len(expected) + 3  # no doubles
    assert result["write_error"] == "Read-only file system"
    assert result["through_bind"] == "nameserver 192.0.2.53\n"  # written in /run/basalt/etc
    assert result["hostname_file"] == "m1\n"
    # All of it lived in the child's mount namespace only.
    assert not os.path.ismount(root / "proc")
    assert (root / "etc" / "resolv.conf").read_text() == ""


def test_reaper_as_pid_1_reaps_orphans_and_leaves_owned_children_alone() -> None:
    out = _run(_in_mount_namespace("reaper", pid=True), timeout=60)
    result = json.loads(out.strip().splitlines()[-1])
    assert result["reaped_codes"] == [7] * 5
    assert result["async_code"] == 3
    assert result["threaded_code"] == 5
    assert result["zombies"] == []


@pytest.mark.parametrize(
    ("code", "sig", "console"),
    [
        (75, signal.SIGHUP, "machined: reboot: stopping every process"),
        (0, signal.SIGINT, "machined: poweroff: stopping every process"),
        (-1, signal.SIGHUP, "RuntimeError: the agent crashed"),
        (70, signal.SIGHUP, "fatal error (exit code 70); rebooting in 0.5 s"),
    ],
    ids=["reboot", "poweroff", "crash", "fatal"],
)
def test_pid_1_ends_in_reboot_or_poweroff_never_an_exit(
    tmp_path: Path, code: int, sig: signal.Signals, console: str
) -> None:
    # In a PID namespace, reboot(2) from its PID 1 ends the namespace: the parent sees
    # PID 1 killed by SIGHUP (restart) or SIGINT (power off). /dev/console is a file here.
    log = tmp_path / "console"
    log.touch()
    script = f'mount --bind {log} /dev/console && exec "$@"'
    command = [
        "unshare", "--mount", "--propagation", "private", "--pid", "--fork", "--mount-proc",
        "sh", "-c", script, "sh", sys.executable, str(CHILD), "power", str(code),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert _signal_code(done.returncode) == 128 + sig, done.stderr
    assert console in log.read_text()


def test_kernel_module_load_failure_names_the_module(tmp_path: Path) -> None:
    """finit_module(2) really runs: a file that is no module is refused by the kernel
    (or the kernel has no module support); either way the error names the module."""
    from basalt.machined.sys.kmod import KernelModuleError, ModuleIndex, load_module

    from ..unit.test_metal import fake_module

    root = tmp_path / "6.1.0"
    (root / "kernel").mkdir(parents=True)
    (root / "kernel" / "bogus.ko").write_bytes(fake_module({"name": "bogus"}))
    index = ModuleIndex(root, sysfs=tmp_path / "sys")
    with pytest.raises(KernelModuleError, match=r"kernel module bogus \(.*\) failed to load: "):
        load_module("bogus", index=index)


@pytest.mark.slow
def test_metal_node_as_pid_1_gets_dhcp_serves_maintenance_applies_config_and_reboots(
    netns: Namespaces, dnsmasq: Dnsmasq, tmp_path: Path
) -> None:
    """machined --platform metal as PID 1 of its own namespaces: the whole first boot."""
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    # The image's schematic record, as the initramfs leaves it (docs/adr/0012).
    schematic_id = "5c" * 32
    extensions = root / "usr" / "lib" / "basalt" / "extensions"
    extensions.mkdir(parents=True)
    (extensions / "schematic.json").write_text(json.dumps({"id": schematic_id}))
    console, log = tmp_path / "console", tmp_path / "machined.log"
    console.touch()
    script = f'mount --bind {console} /dev/console && exec "$@"'
    command = [
        "ip", "netns", "exec", netns.node,
        "unshare", "--uts", "--mount", "--propagation", "private", "--pid", "--fork",
        "--mount-proc", "sh", "-c", script, "sh",
        sys.executable, "-m", "basalt.machined", "--platform", "metal", "--node-dir", str(root),
    ]  # fmt: skip
    with log.open("wb") as out:
        node = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    ctl = [str(BIN / "basaltctl")]

    def from_server(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "netns", "exec", netns.server, *ctl, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def eventually(*args: str, want: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            done = from_server(*args)
            last = done.stdout + done.stderr
            if done.returncode == 0 and want in done.stdout:
                return done.stdout
            assert node.poll() is None, log.read_text()
            time.sleep(0.5)
        raise AssertionError(f"{args}: no {want!r} in {timeout} s:\n{last}\n{log.read_text()}")

    try:
        address = dnsmasq.leased()
        version = eventually("version", "--insecure", "-n", address, want="maintenance mode")
        assert "Platform: metal" in version
        assert f"Schematic: {schematic_id}" in version  # the Version RPC carries it
        # DHCP started while the maintenance API opened (its lease may come either side).
        text = log.read_text()
        assert text.index("eth0: DHCPv4 started") < text.index("API listening"), text
        assert f"eth0: DHCP address {address}/" in text
        # A control-plane config for this node, applied over the insecure maintenance API.
        gen = tmp_path / "gen"
        gen.mkdir()
        _run([*ctl, "gen", "secrets", "-o", str(gen / "secrets.yaml")])
        _run([*ctl, "gen", "config", "lab", f"https://{address}:6443",
              "--with-secrets", str(gen / "secrets.yaml"), "--install-disk", "/dev/vda",
              "-o", str(gen)])  # fmt: skip
        applied = from_server("apply-config", "--insecure", "-n", address,
                              "-f", str(gen / "controlplane.yaml"))  # fmt: skip
        assert applied.returncode == 0, applied.stderr
        authed = ["--basaltconfig", str(gen / "basaltconfig")]
        services = eventually(*authed, "services", "-n", address, want="apid")
        assert "RUNNING" in services
        addresses = eventually(*authed, "get", "nodeaddresses", "-n", address, want=address)
        assert addresses.split()[-1] == address
        mac = netns.ip_json("link", "show", "dev", "eth0")[0]["address"]
        hostname = "basalt-" + mac.replace(":", "")[-6:]
        eventually(*authed, "get", "hostnames", "-n", address, want=hostname)
        rebooted = from_server(*authed, "reboot", "-n", address)
        assert rebooted.returncode == 0, rebooted.stderr
        assert _signal_code(node.wait(60)) == 128 + signal.SIGHUP, log.read_text()
        assert "machined: reboot: stopping every process" in console.read_text()
    finally:
        if node.poll() is None:
            os.killpg(node.pid, signal.SIGKILL)
            node.wait()
