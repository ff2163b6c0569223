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

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from basalt.machinery.fileio import write_atomic

from . import common
from .common import BringUp, Progress, ProvisionError, alive, write_cluster_inputs
from .process import ClusterRequest
from .qemu_argv import (
    DEFAULT_CMDLINE,
    DISK_NAME,
    IMAGE_FILES,
    OVMF,
    QEMU,
    RUNNER,
    TCG_CPU,
    Image,
    VmOptions,
    cpu_model,
    qemu_command,
    runner_command,
)
from .qemu_kvm import (
    ACCELERATORS,
    KvmProbe,
    cached_probe,
    choose_accel,
    probe_command,
    probe_kvm,
)
from .qemu_network import (
    BRIDGE_GATEWAY,
    FORWARDED_PORTS,
    GUEST_DNS,
    GUEST_GATEWAY,
    GUEST_NETWORK,
    MAX_NODES,
    NETWORKS,
    Forward,
    check_guest_forwards,
    cluster_bridge,
    guest_address,
    guest_forward,
    mac_address,
    netdev,
    network_mode,
    peer_forwards,
    relay_command,
    start_bridge,
    stop_bridge,
)
from .qemu_runner import PARENT_ENV
from .state import ClusterRecord, NodeRecord

# The seams: command lines (qemu_argv), networks (qemu_network), the KVM probe (qemu_kvm);
# this module is the lifecycle (image, disks, processes, create and destroy) and the
# provisioner's whole interface.
__all__ = [
    "ACCELERATORS",
    "BRIDGE_GATEWAY",
    "DEFAULT_CMDLINE",
    "DISK_NAME",
    "FORWARDED_PORTS",
    "GUEST_DNS",
    "GUEST_GATEWAY",
    "GUEST_NETWORK",
    "IMAGE_FILES",
    "INSTALL_DISK",
    "MAX_NODES",
    "NETWORKS",
    "OVMF",
    "PARENT_ENV",
    "QEMU",
    "RUNNER",
    "TCG_CPU",
    "Forward",
    "Image",
    "KvmProbe",
    "VmOptions",
    "cached_probe",
    "check_guest_forwards",
    "choose_accel",
    "cluster_bridge",
    "copy_image",
    "cpu_model",
    "create",
    "destroy",
    "ensure_image",
    "guest_address",
    "guest_forward",
    "is_ours",
    "mac_address",
    "machine_running",
    "make_disk",
    "netdev",
    "network_mode",
    "node_configs",
    "peer_forwards",
    "plan_nodes",
    "probe_command",
    "probe_kvm",
    "qemu_command",
    "relay_command",
    "relays_of",
    "runner_command",
    "start_bridge",
    "stop_bridge",
    "stop_nodes",
]

#: Each node boots from its one virtio disk (a qcow2 over the image's disk.raw) and
#: installs to it: STATE and EPHEMERAL go into the space beyond the image.
INSTALL_DISK = "/dev/vda"
QEMU_IMG = "qemu-img"


def default_image_dir() -> Path:
    """``_out/image`` of this source tree (where ``python -m basalt.imager build`` writes)."""
    return Path(__file__).resolve().parents[3] / "_out" / "image"


# -- plan --------------------------------------------------------------------------------------


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
    from basalt.machinery.config.secrets import generate_secrets

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
    async with common.stopped_on_failure(lambda: stop_nodes(record), state_dir):
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
    return record


async def stop_nodes(record: ClusterRecord, timeout: float = 10.0) -> list[str]:
    """Power the VMs off (SIGTERM to QEMU, SIGKILL after ``timeout``), then the relays.

    Only processes this cluster started are signalled: a QEMU pid must still be a QEMU
    whose command line names this node's pidfile, a relay must name this cluster.
    """
    running = [n for n in record.nodes if is_ours(n)]
    await common.terminate_then_wait([n.launcher_pid for n in running], timeout)
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
