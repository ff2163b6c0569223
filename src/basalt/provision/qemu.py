"""The ``qemu`` provisioner: a cluster of Basalt VMs on this machine.

Each node is a QEMU VM (q35, OVMF) booting its own qcow2 disk, backed by the image's
``disk.raw``, through systemd-boot. Nodes boot into maintenance mode and get their configs
through the insecure maintenance API, as real machines do: they install to that disk
(``/dev/vda``) and reboot into it. QEMU runs with ``-no-reboot`` under
:mod:`basalt.provision.qemu_runner`, which starts it again when the guest reboots. The
bring-up after that is the ``process`` provisioner's (``common``).

Two networks:

- **bridge** (root; the default when root mode works here): the VMs share a bridge in a
  network namespace created for the cluster; a dnsmasq on that bridge hands each MAC its
  address; a forwarder makes each node's API reachable on its own host loopback address
  (:mod:`basalt.provision.bridge`). Nodes see each other's real addresses, so several
  control planes form one etcd cluster. The namespace has no link to the host's network.
- **user** (rootless): QEMU user networking (slirp), one private NAT per VM, with
  ``restrict=on``: a guest reaches neither the host nor anything beyond it, only what is
  forwarded explicitly: host -> node by ``hostfwd`` from the node's own loopback address
  (127.0.0.11, .12, ...) to its API (50000) and trust (50001) ports; node -> node by a
  ``guestfwd`` per peer port that runs :mod:`basalt.provision.relay`, which connects to
  that node's host-side ``hostfwd``. Every VM numbers the same virtual network
  10.5.0.0/24, node *i* being 10.5.0.(11+i).

Either way nothing listens or connects outside 127.0.0.0/8 on the host, and nothing
multicasts. What user networking cannot do (one control plane only, TCP only, NAT) is in
docs/adr/0009-qemu-provisioner.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from basalt.machinery.api import API_PORT, TRUST_PORT
from basalt.machinery.errors import BasaltError
from basalt.machinery.fileio import write_atomic

from . import bridge, common
from .common import BringUp, Progress, ProvisionError, alive, write_cluster_inputs
from .process import ClusterRequest
from .qemu_runner import PARENT_ENV
from .state import ClusterRecord, NodeRecord

QEMU = "qemu-system-x86_64"
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
#: Kernel arguments of a direct-kernel boot when the image does not say (image.json).
DEFAULT_CMDLINE = "console=ttyS0 quiet panic=-1 tsc_early_khz=2000000 no_timer_check"
IMAGE_FILES = ("vmlinuz", "initrd.img", "root.sqfs", "disk.raw")
#: Each node boots from its one virtio disk (a qcow2 over the image's disk.raw) and
#: installs to it: STATE and EPHEMERAL go into the space beyond the image.
INSTALL_DISK = "/dev/vda"
OVMF = Path("/usr/share/ovmf/OVMF.fd")
QEMU_IMG = "qemu-img"
#: The node's disk in its directory, and the module that restarts QEMU on guest reboots.
DISK_NAME = "disk.qcow2"
RUNNER = "basalt.provision.qemu_runner"
ACCELERATORS = ("auto", "kvm", "tcg")

PROBE_TIMEOUT = 10.0
#: The probe boots the image's kernel with no root: it ends in this panic, then
#: ``panic=-1`` + ``-no-reboot`` end QEMU. Seeing it proves guest code ran under KVM.
PROBE_PROOF = b"Kernel panic"


def default_image_dir() -> Path:
    """``_out/image`` of this source tree (where ``python -m basalt.imager build`` writes)."""
    return Path(__file__).resolve().parents[3] / "_out" / "image"


# -- plan --------------------------------------------------------------------------------------


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


@dataclass(frozen=True)
class VmOptions:
    """What every VM of the cluster gets."""

    memory_mib: int = 512
    cpus: int = 2
    image_dir: Path | None = None
    accel: str = "auto"
    qemu: str = QEMU
    #: The node's own disk (sparse): ``install.disk``, for when install-to-disk exists.
    disk_gib: int = 8
    #: QEMU start to the maintenance API answering (TCG boots take 15-40 s).
    boot_timeout: float = 240.0
    #: user: QEMU user networking (rootless); bridge: one segment in a namespace of the
    #: cluster's own (root); auto: bridge when root mode works here, else user.
    network: str = "auto"
    #: user network only: guest-only addresses forwarded to servers on host loopback
    #: (an HTTP server with upgrade bundles, say); every node gets them.
    guest_forwards: tuple[Forward, ...] = ()


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


def plan_nodes(request: ClusterRequest, state_dir: Path, network: str = "auto") -> list[NodeRecord]:
    """The process provisioner's plan (names, host loopback addresses) + guest addresses."""
    if request.controlplanes > 1 and network_mode(network)[0] == "user":
        raise ProvisionError(
            f"--controlplanes {request.controlplanes}: QEMU user networking supports one "
            "control plane",
            hint=(
                "etcd members check that a peer connects from an address in its certificate; "
                f"behind user-mode NAT every peer connects from {GUEST_GATEWAY}, so etcd "
                "would refuse them (docs/adr/0009-qemu-provisioner.md); run as root (the "
                "bridge network), or use --controlplanes 1 and any number of --workers, or "
                "the process provisioner for several control planes"
            ),
        )
    nodes = common.plan_nodes(
        request.name,
        request.controlplanes,
        request.workers,
        request.base_address,
        state_dir,
        what="qemu",
    )
    for index, node in enumerate(nodes):
        node.guest_address = guest_address(index)
    return nodes


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


@dataclass(frozen=True)
class Image:
    kernel: Path
    initrd: Path
    root: Path
    cmdline: str
    #: The UEFI disk image (GPT: EFI, BASALT-A, BASALT-B, META) each node's disk is over.
    disk: Path

    @classmethod
    def from_dir(cls, directory: Path) -> Image:
        missing = [name for name in IMAGE_FILES if not (directory / name).is_file()]
        if missing:
            raise ProvisionError(
                f"{directory} is not a built image: {', '.join(missing)} missing",
                hint="build one with 'python -m basalt.imager build --out DIR'",
            )
        cmdline = DEFAULT_CMDLINE
        with contextlib.suppress(OSError, ValueError, AttributeError):
            cmdline = json.loads((directory / "image.json").read_text()).get("cmdline") or cmdline
        return cls(
            directory / "vmlinuz",
            directory / "initrd.img",
            directory / "root.sqfs",
            cmdline,
            directory / "disk.raw",
        )


def _qemu_value(text: str) -> str:
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
    command = _qemu_value(relay_command(state_dir, forward, python))
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


def qemu_command(
    node: NodeRecord,
    nodes: Sequence[NodeRecord],
    image: Image,
    options: VmOptions,
    accel: str,
    state_dir: Path,
    network: str = "user",
) -> list[str]:
    """The whole QEMU command line of one node (q35 + OVMF, its disk through systemd-boot).

    bridge: QEMU runs inside the cluster's namespace (``ip netns exec`` execs it, so the
    pid is QEMU's), where its tap is."""
    index = [n.name for n in nodes].index(node.name)
    node_dir = Path(node.node_dir)
    prefix = (
        bridge.BridgeNetwork.for_cluster(state_dir, GUEST_NETWORK, BRIDGE_GATEWAY).exec_prefix()
        if network == "bridge"
        else []
    )
    argv = [*prefix, options.qemu, "-name", _qemu_value(node.name), "-accel", accel]
    argv += ["-m", str(options.memory_mib), "-smp", str(options.cpus), "-cpu", cpu_model(accel)]
    argv += ["-nographic", "-no-reboot", "-pidfile", str(node_dir / "qemu.pid")]
    argv += ["-M", "q35", "-bios", str(OVMF), "-vga", "none"]
    disk = _qemu_value(str(node_dir / DISK_NAME))
    argv += ["-drive", f"id=disk,file={disk},format=qcow2,if=none,discard=unmap"]
    argv += ["-device", "virtio-blk-pci,drive=disk,bootindex=0"]
    argv += ["-netdev", netdev(node, nodes, state_dir, network, options.guest_forwards)]
    argv += ["-device", f"virtio-net-pci,netdev=n0,mac={mac_address(index)},romfile="]
    argv += ["-device", "virtio-rng-pci"]
    return argv


#: The guest CPU under TCG: everything QEMU emulates but AVX2. QEMU 7.2 emulates AVX2
#: slowly enough that OpenSSL's AVX2 sha256 takes twice as long as its AVX path (qemu-user,
#: 16 MiB: 655 ms with AVX2, 345 ms without); hashing an upgrade bundle and TLS are most
#: of what an upgrade costs the guest. Debian's binaries need no AVX2.
TCG_CPU = "max,-avx2"


def cpu_model(accel: str) -> str:
    """``-cpu`` for ``accel``: the host's CPU under KVM, :data:`TCG_CPU` under TCG."""
    return "max" if accel == "kvm" else TCG_CPU


def runner_command(argv: list[str], node: NodeRecord, python: str = sys.executable) -> list[str]:
    """QEMU under :mod:`basalt.provision.qemu_runner`: started again on a guest reboot."""
    console = str(Path(node.node_dir) / "console.log")
    parent = os.environ.get(PARENT_ENV, "")
    owner = ["--parent", parent] if parent.isdigit() else []
    return [python, "-m", RUNNER, "--console", console, *owner, "--", *argv]


# -- KVM ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KvmProbe:
    usable: bool
    reason: str


def probe_command(qemu: str, kernel: Path) -> list[str]:
    """A KVM guest that boots the image's kernel without a root: it must panic and end."""
    return [
        qemu,
        "-accel",
        "kvm",
        "-M",
        "microvm,x-option-roms=off,rtc=on,isa-serial=on",
        "-cpu",
        "max",
        "-m",
        "128",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-serial",
        "stdio",
        "-monitor",
        "none",
        "-no-reboot",
        "-kernel",
        str(kernel),
        "-append",
        "console=ttyS0 panic=-1 tsc_early_khz=2000000 no_timer_check",
    ]


def probe_kvm(
    qemu: str, kernel: Path, *, timeout: float = PROBE_TIMEOUT, device: Path = Path("/dev/kvm")
) -> KvmProbe:
    """Whether a KVM guest really runs here, found out in a child QEMU with a deadline.

    On some hosts ``/dev/kvm`` exists and opens, and the guest then hangs forever: only a
    guest that boots its kernel within ``timeout`` counts.
    """
    if not device.exists():
        return KvmProbe(False, f"{device} does not exist")
    if not os.access(device, os.R_OK | os.W_OK):
        return KvmProbe(False, f"{device} is not readable and writable by this user")
    try:
        child = subprocess.Popen(
            probe_command(qemu, kernel),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    except OSError as exc:
        return KvmProbe(False, f"cannot run {qemu}: {exc}")
    try:
        output, _ = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.communicate(timeout=5)
        return KvmProbe(False, f"a KVM guest did not boot within {timeout:g}s (KVM hangs here)")
    if child.returncode == 0 and PROBE_PROOF in output:
        return KvmProbe(True, "a KVM guest booted its kernel")
    last = output.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
    return KvmProbe(False, f"a KVM guest failed (exit {child.returncode}): {last[0][:200]}")


def _probe_key(qemu: str, kernel: Path) -> str:
    """Same boot of this host, same QEMU binary, same kernel: the same answer."""
    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot_id = "unknown"
    binary = shutil.which(qemu) or qemu
    facts = [boot_id, binary]
    for path in (Path(binary), kernel):
        with contextlib.suppress(OSError):
            stat = path.stat()
            facts += [str(stat.st_size), str(stat.st_mtime_ns)]
    return hashlib.sha256("\0".join(facts).encode()).hexdigest()


def cached_probe(
    cache: Path | None, qemu: str, kernel: Path, probe: Callable[[], KvmProbe]
) -> KvmProbe:
    """``probe()``, remembered in ``cache`` until the host reboots or QEMU changes."""
    key = _probe_key(qemu, kernel)
    if cache is not None:
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            data = json.loads(cache.read_text())
            if data["key"] == key:
                return KvmProbe(bool(data["usable"]), str(data["reason"]) + " (cached)")
    result = probe()
    if cache is not None:
        with contextlib.suppress(OSError):
            cache.parent.mkdir(parents=True, exist_ok=True)
            payload = {"key": key, "usable": result.usable, "reason": result.reason}
            write_atomic(cache, json.dumps(payload) + "\n")
    return result


def choose_accel(requested: str, probe: Callable[[], KvmProbe]) -> tuple[str, str]:
    """(accelerator, why): TCG unless KVM was asked for or a probe shows it works."""
    if requested not in ACCELERATORS:
        raise ProvisionError(f"--accel {requested!r}: expected one of {', '.join(ACCELERATORS)}")
    if requested == "tcg":
        return "tcg", "TCG requested"
    result = probe()
    if requested == "kvm":
        if not result.usable:
            raise ProvisionError(
                f"--accel kvm: KVM does not work here: {result.reason}",
                hint="use --accel tcg (or auto, which falls back to TCG)",
            )
        return "kvm", result.reason
    return ("kvm", result.reason) if result.usable else ("tcg", result.reason)


# -- image -------------------------------------------------------------------------------------


def ensure_image(image_dir: Path | None, progress: Progress) -> Path:
    """The image to boot; the default one (``_out/image``) is built when missing."""
    directory = (image_dir or default_image_dir()).resolve()
    if all((directory / name).is_file() for name in IMAGE_FILES):
        return directory
    if image_dir is not None and directory != default_image_dir().resolve():
        Image.from_dir(directory)  # raises, naming what is missing
    progress("image", f"building {directory} (python -m basalt.imager build)")
    built = subprocess.run(
        [sys.executable, "-m", "basalt.imager", "build", "--out", str(directory)],
        stdin=subprocess.DEVNULL,
        stdout=sys.stderr,
        check=False,
    )
    if built.returncode != 0:
        raise ProvisionError(
            f"building the image into {directory} failed (exit {built.returncode})",
            hint="the imager needs qemu-system-x86, squashfs-tools and apt: 'make image-deps'",
        )
    return directory


def copy_image(source: Path, state_dir: Path) -> Image:
    """The cluster boots from its own copy: rebuilding the image leaves running VMs be."""
    target = state_dir / "image"
    target.mkdir(parents=True, exist_ok=True)
    for name in (*IMAGE_FILES, "image.json"):
        if (source / name).is_file():
            _link_or_copy(source / name, target / name)
    return Image.from_dir(target)


def _link_or_copy(source: Path, target: Path) -> None:
    """A hard link when both are on one filesystem (the imager replaces its outputs by
    new files, never in place, so the link keeps this build); a sparse copy otherwise."""
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:
        subprocess.run(["cp", "--sparse=always", str(source), str(target)], check=True)


# -- processes ---------------------------------------------------------------------------------


def is_ours(node: NodeRecord) -> bool:
    """``launcher_pid`` is still the QEMU (or the runner of the QEMU) this provisioner
    started for ``node``: its command line names the node's pidfile."""
    return _names_pidfile(node.launcher_pid, node)


def _names_pidfile(pid: int, node: NodeRecord) -> bool:
    args = common.cmdline(pid)
    if not args:
        return False
    qemu = os.path.basename(args[0]).startswith(b"qemu-system")
    if not qemu and RUNNER.encode() not in args:
        return False
    return str(Path(node.node_dir) / "qemu.pid").encode() in args


def _qemu_pid(node: NodeRecord) -> int | None:
    """The node's QEMU, from its pidfile, if it still is that QEMU."""
    try:
        pid = int((Path(node.node_dir) / "qemu.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return pid if _names_pidfile(pid, node) else None


def machine_running(node: NodeRecord) -> bool:
    return is_ours(node) and alive(node.launcher_pid)


def relays_of(state_dir: str) -> list[int]:
    """This cluster's relay processes (a guest connection each)."""
    found = []
    for pid in common.processes_naming(b"basalt.provision.relay"):
        args = common.cmdline(pid)
        with contextlib.suppress(ValueError, IndexError):
            if args[args.index(b"--cluster") + 1] == state_dir.encode():
                found.append(pid)
    return found


def make_disk(node: NodeRecord, gib: int, image: Image, qemu_img: str = QEMU_IMG) -> Path:
    """The node's own disk: a qcow2 over the image's disk.raw, grown to ``gib`` GiB (only
    what the node writes takes space)."""
    path = Path(node.node_dir) / DISK_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    argv = [qemu_img, "create", "-q", "-f", "qcow2", "-b", str(image.disk), "-F", "raw"]
    done = subprocess.run(
        [*argv, str(path), f"{gib}G"], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise ProvisionError(f"qemu-img create {path} failed: {done.stderr.strip()}")
    return path


def _launch(argv: list[str], node: NodeRecord) -> int:
    node_dir = Path(node.node_dir)
    node_dir.mkdir(parents=True, exist_ok=True)
    log = open(node_dir / "console.log", "ab")  # noqa: SIM115 (handed to the child)
    try:
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=node_dir,
            start_new_session=True,
        )
    finally:
        log.close()
    return process.pid


def console_tail(node: NodeRecord, lines: int = 15) -> str:
    try:
        text = (Path(node.node_dir) / "console.log").read_bytes().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip().splitlines()[-lines:])


def _dead_machines(nodes: Sequence[NodeRecord]) -> Callable[[], str | None]:
    def check() -> str | None:
        for node in nodes:
            if not alive(node.launcher_pid):
                tail = console_tail(node)
                return f"QEMU of {node.name} exited" + (
                    f"; its console ends:\n{tail}" if tail else ""
                )
        return None

    return check


# -- create / destroy --------------------------------------------------------------------------


def node_configs(nodes: Sequence[NodeRecord], configs: dict[str, str]) -> dict[str, str]:
    """Each node's type config, plus its name and the host address it is reached on."""
    from basalt.machinery.config import API_VERSION, load_bundle, parse_patch, patch_and_check

    result = {}
    for node in nodes:
        patch = parse_patch(
            f"apiVersion: {API_VERSION}\nkind: MachineConfig\ncertSANs: [{node.address}]\n"
            f"---\napiVersion: {API_VERSION}\nkind: HostnameConfig\nhostname: {node.name}\n",
            f"<qemu provisioner: {node.name}>",
        )
        base = load_bundle(configs[node.type], f"{node.type}.yaml")
        bundle, _ = patch_and_check(base.to_raw(), [patch], target=node.name)
        result[node.name] = bundle.to_yaml()
    return result


async def create(
    request: ClusterRequest,
    state_dir: Path,
    progress: Progress,
    options: VmOptions | None = None,
    *,
    kvm_cache: Path | None = None,
) -> ClusterRecord:
    """Create the cluster; on failure the VMs are stopped and their console logs kept."""
    from basalt.machinery.config import GenerateOptions, generate_configs
    from basalt.machinery.secrets import generate_secrets

    options = options or VmOptions()
    if (state_dir / "cluster.json").exists():
        raise ProvisionError(
            f"a cluster already exists at {state_dir}",
            hint=f"destroy it first: basaltctl cluster destroy --name {request.name}",
        )
    if shutil.which(options.qemu) is None:
        raise ProvisionError(
            f"{options.qemu} is not installed", hint="install Debian's qemu-system-x86 package"
        )
    for tool, package in ((QEMU_IMG, "qemu-utils"), (str(OVMF), "ovmf")):
        if shutil.which(tool) is None and not Path(tool).is_file():
            raise ProvisionError(
                f"{tool} is not installed", hint=f"install Debian's {package} package"
            )
    if options.memory_mib < 256 or options.cpus < 1:
        raise ProvisionError("each VM needs --memory 256 (MiB) or more and --cpus 1 or more")
    network, network_why = network_mode(options.network)
    nodes = plan_nodes(request, state_dir, network)
    check_guest_forwards(options.guest_forwards, nodes, network)
    common.check_ports_free(
        nodes,
        FORWARDED_PORTS,
        hint="destroy the other cluster or pick other addresses with --base-address",
    )
    source = ensure_image(options.image_dir, progress)
    accel, why = choose_accel(
        options.accel,
        lambda: cached_probe(
            kvm_cache,
            options.qemu,
            source / "vmlinuz",
            lambda: probe_kvm(options.qemu, source / "vmlinuz"),
        ),
    )
    secrets = generate_secrets()
    endpoint = f"https://{nodes[0].guest_address}:6443"
    generated = generate_configs(
        secrets,
        GenerateOptions(
            cluster_name=request.name,
            endpoint=endpoint,
            version_contract=request.version_contract,
            install_disk=INSTALL_DISK,
        ),
        patches=request.patches,
        controlplane_patches=request.controlplane_patches,
        worker_patches=request.worker_patches,
    )
    configs = write_cluster_inputs(state_dir, secrets, generated)
    per_node = node_configs(nodes, configs)
    image = copy_image(source, state_dir)
    record = ClusterRecord(
        request.name,
        "qemu",
        str(state_dir),
        endpoint,
        nodes,
        options={
            "accel": accel,
            "accel_reason": why,
            "image": str(source),
            "memory_mib": options.memory_mib,
            "cpus": options.cpus,
            "network": network,
            "network_reason": network_why,
        },
    )
    record.save()
    try:
        if network == "bridge":
            start_bridge(record, nodes)
        for node in nodes:
            Path(node.node_dir).mkdir(parents=True, exist_ok=True)
            write_atomic(Path(node.node_dir) / "config.yaml", per_node[node.name], mode=0o600)
            make_disk(node, options.disk_gib, image)
            argv = qemu_command(node, nodes, image, options, accel, state_dir, network)
            node.launcher_pid = _launch(runner_command(argv, node), node)
            progress(node.name, f"booting ({accel})")
        record.save()
        context = common.client_context(
            request.name, state_dir, nodes, common.generated_client(secrets, nodes)
        )
        await common.bring_up(
            nodes,
            per_node,
            context,
            progress,
            BringUp(
                maintenance_timeout=options.boot_timeout,
                ready_timeout=request.ready_timeout,
                members_timeout=max(30.0, request.ready_timeout / 2),
                bootstrap=request.bootstrap,
            ),
            give_up=_dead_machines(nodes),
        )
    except BaseException as exc:
        await stop_nodes(record)
        if isinstance(exc, BasaltError):
            exc.hint = common.failure_hint(state_dir)
        raise
    return record


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


async def stop_nodes(record: ClusterRecord, timeout: float = 10.0) -> list[str]:
    """Power the VMs off (SIGTERM to QEMU, SIGKILL after ``timeout``), then the relays.

    Only processes this cluster started are signalled: a QEMU pid must still be a QEMU
    whose command line names this node's pidfile, a relay must name this cluster.
    """
    running = [n for n in record.nodes if is_ours(n)]
    for node in running:
        with contextlib.suppress(ProcessLookupError):
            os.kill(node.launcher_pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(n.launcher_pid) for n in running):
        await asyncio.sleep(0.1)
    for node in running:
        if alive(node.launcher_pid) and is_ours(node):
            with contextlib.suppress(ProcessLookupError):
                os.kill(node.launcher_pid, signal.SIGKILL)
        qemu_pid = _qemu_pid(node)  # a runner killed before its QEMU ended
        if qemu_pid is not None and qemu_pid != node.launcher_pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(qemu_pid, signal.SIGKILL)
    for pid in relays_of(record.state_dir):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if record.options.get("network") == "bridge":
        stop_bridge(record)
    return [n.name for n in running]


async def destroy(record: ClusterRecord) -> list[str]:
    stopped = await stop_nodes(record)
    shutil.rmtree(record.state_dir, ignore_errors=True)
    return stopped
