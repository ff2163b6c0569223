"""The qemu provisioner without booting anything: plans, command lines, ports, the KVM
probe's decision, process ownership, the guestfwd relay and the CLI's refusals."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from basalt.cli.main import main
from basalt.machinery.config import HostnameConfig, MachineConfig, load_bundle
from basalt.provision import backend, bridge, common, qemu, qemu_network
from basalt.provision.process import ClusterRequest
from basalt.provision.relay import relay
from basalt.provision.state import ClusterRecord, NodeRecord


def request(**changes: object) -> ClusterRequest:
    fields: dict[str, object] = {"name": "t", "controlplanes": 1, "workers": 2}
    fields.update(changes)
    return ClusterRequest(**fields)  # type: ignore[arg-type]


@pytest.fixture
def image(tmp_path: Path) -> qemu.Image:
    directory = tmp_path / "img,1"  # a comma: QEMU option values must escape it
    directory.mkdir()
    for name in qemu.IMAGE_FILES:
        (directory / name).write_bytes(b"x")
    (directory / "image.json").write_text(json.dumps({"cmdline": "console=ttyS0 quiet"}))
    return qemu.Image.from_dir(directory)


def options_of(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, arg in enumerate(argv) if arg == flag]


# -- plan ----------------------------------------------------------------------------------------


def test_plan_gives_each_node_a_host_loopback_and_a_guest_address(tmp_path: Path) -> None:
    nodes = qemu.plan_nodes(request(base_address="127.0.0.71"), tmp_path)
    assert [(n.name, n.type, n.address, n.guest_address) for n in nodes] == [
        ("t-controlplane-1", "controlplane", "127.0.0.71", "10.5.0.11"),
        ("t-worker-1", "worker", "127.0.0.72", "10.5.0.12"),
        ("t-worker-2", "worker", "127.0.0.73", "10.5.0.13"),
    ]
    assert all(Path(n.node_dir).parent == tmp_path for n in nodes)


def test_plan_refuses_several_control_planes_and_says_why(tmp_path: Path) -> None:
    with pytest.raises(qemu.ProvisionError) as caught:
        qemu.plan_nodes(request(controlplanes=3), tmp_path, "user")
    assert "one control plane" in str(caught.value)
    assert "etcd" in (caught.value.hint or "") and qemu.GUEST_GATEWAY in (caught.value.hint or "")


@pytest.mark.parametrize("base", ["10.0.0.1", "127.255.255.254", "not-an-ip"])
def test_plan_keeps_host_addresses_on_loopback(tmp_path: Path, base: str) -> None:
    with pytest.raises(qemu.ProvisionError):
        qemu.plan_nodes(request(base_address=base), tmp_path)


def test_guest_addresses_and_macs_are_distinct_and_bounded() -> None:
    addresses = {qemu.guest_address(i) for i in range(qemu.MAX_NODES)}
    macs = {qemu.mac_address(i) for i in range(qemu.MAX_NODES)}
    assert len(addresses) == len(macs) == qemu.MAX_NODES
    assert qemu.guest_address(qemu.MAX_NODES - 1) == "10.5.0.254"
    with pytest.raises(qemu.ProvisionError):
        qemu.guest_address(qemu.MAX_NODES)


def test_peer_forwards_reach_every_api_and_only_control_planes_trust_port(tmp_path: Path) -> None:
    cp, w1, w2 = qemu.plan_nodes(request(), tmp_path)
    assert qemu.peer_forwards(w1, [cp, w1, w2]) == [
        qemu.Forward("10.5.0.11", "127.0.0.11", 50000),
        qemu.Forward("10.5.0.11", "127.0.0.11", 50001),
        qemu.Forward("10.5.0.13", "127.0.0.13", 50000),
    ]
    assert qemu.peer_forwards(cp, [cp, w1, w2]) == [
        qemu.Forward("10.5.0.12", "127.0.0.12", 50000),
        qemu.Forward("10.5.0.13", "127.0.0.13", 50000),
    ]


# -- command line ---------------------------------------------------------------------------------


def test_command_line_boots_the_node_disk_under_uefi_and_records_its_pid(
    tmp_path: Path, image: qemu.Image
) -> None:
    nodes = qemu.plan_nodes(request(base_address="127.0.0.71"), tmp_path)
    vm = qemu.VmOptions(memory_mib=768, cpus=3)
    argv = qemu.qemu_command(nodes[1], nodes, image, vm, "tcg", tmp_path)
    assert argv[0] == "qemu-system-x86_64"
    assert options_of(argv, "-accel") == ["tcg"]
    assert options_of(argv, "-m") == ["768"] and options_of(argv, "-smp") == ["3"]
    assert "-no-reboot" in argv  # a guest reboot ends QEMU; the runner starts it again
    assert options_of(argv, "-pidfile") == [f"{nodes[1].node_dir}/qemu.pid"]
    assert options_of(argv, "-M") == ["q35"]
    assert options_of(argv, "-bios") == [str(qemu.OVMF)]
    assert options_of(argv, "-kernel") == [] and options_of(argv, "-append") == []
    (disk,) = options_of(argv, "-drive")
    assert f"file={nodes[1].node_dir}/disk.qcow2," in disk and "format=qcow2" in disk
    assert "readonly" not in disk  # the firmware and the installer write it
    devices = options_of(argv, "-device")
    assert devices[0] == "virtio-blk-pci,drive=disk,bootindex=0"  # /dev/vda: boot + install
    assert "virtio-net-pci,netdev=n0,mac=52:54:00:ba:5a:02,romfile=" in devices
    assert "virtio-rng-pci" in devices
    assert options_of(argv, "-cpu") == ["max,-avx2"]  # AVX2 under TCG is slow (TCG_CPU)
    on_kvm = qemu.qemu_command(nodes[0], nodes, image, vm, "kvm", tmp_path)
    assert options_of(on_kvm, "-accel") == ["kvm"] and options_of(on_kvm, "-cpu") == ["max"]
    wrapped = qemu.runner_command(argv, nodes[1], python="/py")
    assert wrapped[:5] == [
        "/py",
        "-m",
        qemu.RUNNER,
        "--console",
        f"{nodes[1].node_dir}/console.log",
    ]
    assert wrapped[5:] == ["--", *argv]


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img not installed")
def test_each_node_disk_is_a_qcow2_over_the_image_disk(tmp_path: Path) -> None:
    source = tmp_path / "image"
    source.mkdir()
    for name in qemu.IMAGE_FILES:
        (source / name).write_bytes(b"x" * 512)
    image = qemu.copy_image(source, tmp_path / "cluster")
    assert image.disk == tmp_path / "cluster" / "image" / "disk.raw"
    (node,) = qemu.plan_nodes(request(workers=0), tmp_path / "cluster")
    disk = qemu.make_disk(node, 4, image)
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "--output=json", str(disk)],
            capture_output=True, text=True, check=True,
        ).stdout
    )  # fmt: skip
    assert info["format"] == "qcow2" and info["virtual-size"] == 4 * 2**30
    assert info["backing-filename"] == str(image.disk)


def test_network_is_user_mode_restricted_with_loopback_forwards_only(
    tmp_path: Path, image: qemu.Image
) -> None:
    nodes = qemu.plan_nodes(request(base_address="127.0.0.71", workers=1), tmp_path)
    argv = qemu.qemu_command(nodes[1], nodes, image, qemu.VmOptions(), "tcg", tmp_path)
    (netdev,) = options_of(argv, "-netdev")
    assert netdev.startswith("user,id=n0,")
    for forbidden in ("socket", "mcast", "tap", "bridge", "vde", "l2tpv3"):
        assert not any(arg.startswith(forbidden) for arg in options_of(argv, "-netdev"))
    assert "restrict=on" in netdev.split(",")
    assert "dhcpstart=10.5.0.12" in netdev.split(",")
    hostfwds = [part for part in netdev.split(",") if part.startswith("hostfwd=")]
    assert hostfwds == [
        "hostfwd=tcp:127.0.0.72:50000-10.5.0.12:50000",
        "hostfwd=tcp:127.0.0.72:50001-10.5.0.12:50001",
    ]
    guestfwds = netdev.split(",guestfwd=")[1:]
    assert len(guestfwds) == 2  # the control plane's API and trust ports
    target, _, command = guestfwds[0].partition("-cmd:")
    assert target == "tcp:10.5.0.11:50000"
    argv_relay = shlex.split(command)
    assert argv_relay[1:] == [
        "-m",
        "basalt.provision.relay",
        "--cluster",
        str(tmp_path),
        "127.0.0.71",
        "50000",
    ]


def test_relay_command_survives_qemu_and_glib_parsing(tmp_path: Path) -> None:
    state = tmp_path / "a b,c"
    command = qemu.relay_command(state, qemu.Forward("10.5.0.11", "127.0.0.11", 50001), "/py")
    assert shlex.split(command) == [
        "/py",
        "-m",
        "basalt.provision.relay",
        "--cluster",
        str(state),
        "127.0.0.11",
        "50001",
    ]
    assert qemu_network.qemu_value(command).count(",,") == 1


def test_extra_guest_forwards_reach_host_loopback_servers(
    tmp_path: Path, image: qemu.Image
) -> None:
    nodes = qemu.plan_nodes(request(base_address="127.0.0.71", workers=0), tmp_path)
    http = qemu.Forward("10.5.0.250", "127.0.0.89", 8080, host_port=41234)
    options = qemu.VmOptions(guest_forwards=(http,))
    qemu.check_guest_forwards(options.guest_forwards, nodes, "user")
    argv = qemu.qemu_command(nodes[0], nodes, image, options, "tcg", tmp_path)
    (netdev,) = options_of(argv, "-netdev")
    (forward,) = netdev.split(",guestfwd=")[1:]  # one node: no peers, only the extra one
    target, _, command = forward.partition("-cmd:")
    assert target == "tcp:10.5.0.250:8080"
    assert shlex.split(command)[-2:] == ["127.0.0.89", "41234"]
    assert "restrict=on" in netdev.split(",")


@pytest.mark.parametrize(
    ("forward", "network", "message"),
    [
        (qemu.Forward("10.5.0.250", "127.0.0.89", 80), "bridge", "user network only"),
        (qemu.Forward("10.5.0.250", "192.0.2.1", 80), "user", "only loopback"),
        (qemu.Forward("10.5.0.11", "127.0.0.89", 80), "user", "pick a free address"),
        (qemu.Forward("10.5.0.2", "127.0.0.89", 80), "user", "pick a free address"),
        (qemu.Forward("10.0.2.100", "127.0.0.89", 80), "user", "pick a free address"),
    ],
)
def test_extra_guest_forwards_are_checked(
    tmp_path: Path, forward: qemu.Forward, network: str, message: str
) -> None:
    nodes = qemu.plan_nodes(request(base_address="127.0.0.71"), tmp_path)
    with pytest.raises(qemu.ProvisionError, match=message):
        qemu.check_guest_forwards((forward,), nodes, network)


def test_a_guest_forward_may_land_on_another_host_port(tmp_path: Path) -> None:
    # A guest-only address and port (10.0.2.100:8080) onto a host server's free port.
    forward = qemu.Forward("10.0.2.100", "127.0.0.89", 8080, host_port=41234)
    option = qemu.guest_forward(forward, tmp_path, "/py")
    target, _, command = option.partition("-cmd:")
    assert target == "guestfwd=tcp:10.0.2.100:8080"
    assert shlex.split(command)[-2:] == ["127.0.0.89", "41234"]
    same = qemu.Forward("10.5.0.11", "127.0.0.11", 50000)
    assert shlex.split(qemu.guest_forward(same, tmp_path, "/py"))[-1] == "50000"


def test_image_needs_its_files_and_reads_its_cmdline(tmp_path: Path) -> None:
    with pytest.raises(
        qemu.ProvisionError, match=r"vmlinuz, initrd\.img, root\.sqfs, disk\.raw missing"
    ):
        qemu.Image.from_dir(tmp_path)
    for name in qemu.IMAGE_FILES:
        (tmp_path / name).write_bytes(b"")
    assert qemu.Image.from_dir(tmp_path).cmdline == qemu.DEFAULT_CMDLINE


def test_a_missing_image_that_is_not_the_default_is_not_built(tmp_path: Path) -> None:
    with pytest.raises(qemu.ProvisionError, match="not a built image"):
        qemu.ensure_image(tmp_path / "nowhere", lambda *_: None)


def test_each_node_gets_its_name_and_host_address_in_its_config(
    tmp_path: Path, cp_yaml: str, worker_yaml: str
) -> None:
    nodes = qemu.plan_nodes(request(workers=1), tmp_path)
    configs = qemu.node_configs(nodes, {"controlplane": cp_yaml, "worker": worker_yaml})
    for node in nodes:
        bundle = load_bundle(configs[node.name])
        machine = bundle.first(MachineConfig)
        hostname = bundle.first(HostnameConfig)
        assert machine is not None and hostname is not None
        assert machine.type == node.type
        assert node.address in machine.cert_sans
        assert hostname.hostname == node.name


# -- ports ---------------------------------------------------------------------------------------


def test_ports_in_use_are_refused_before_anything_starts() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.213", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert not common.port_free("127.0.0.213", port)
        node = NodeRecord("n", "worker", "127.0.0.213", "/nonexistent")
        with pytest.raises(common.ProvisionError, match=f"127.0.0.213:{port} is in use"):
            common.check_ports_free([node], (port,), hint="x")
    assert common.port_free("127.0.0.213", port)


# -- KVM -----------------------------------------------------------------------------------------


def fake_qemu(tmp_path: Path, body: str) -> str:
    path = tmp_path / "qemu-system-fake"
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return str(path)


@pytest.fixture
def kvm_device(tmp_path: Path) -> Path:
    device = tmp_path / "kvm"
    device.write_bytes(b"")
    return device


def test_probe_accepts_kvm_only_when_a_guest_kernel_ran(tmp_path: Path, kvm_device: Path) -> None:
    booted = fake_qemu(tmp_path, 'echo "Kernel panic - not syncing: VFS"; exit 0')
    result = qemu.probe_kvm(booted, tmp_path / "vmlinuz", device=kvm_device)
    assert result.usable


def test_probe_rejects_a_guest_that_resets_without_booting(
    tmp_path: Path, kvm_device: Path
) -> None:
    # Seen here with too little memory: QEMU exits 0 after the real-mode setup code.
    reset = fake_qemu(tmp_path, 'echo "Probing EDD (edd=off to disable)... ok"; exit 0')
    result = qemu.probe_kvm(reset, tmp_path / "vmlinuz", device=kvm_device)
    assert not result.usable and "exit 0" in result.reason


def test_probe_gives_up_on_a_hanging_guest_and_kills_it(tmp_path: Path, kvm_device: Path) -> None:
    marker = tmp_path / "still-running"
    hang = fake_qemu(tmp_path, f"sleep 30; touch {marker}")
    started = time.monotonic()
    result = qemu.probe_kvm(hang, tmp_path / "vmlinuz", timeout=0.5, device=kvm_device)
    assert not result.usable and "did not boot within 0.5s" in result.reason
    assert time.monotonic() - started < 10
    assert not common.processes_naming(str(hang).encode())


def test_probe_does_not_run_qemu_without_a_usable_device(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    spy = fake_qemu(tmp_path, f"touch {marker}")
    result = qemu.probe_kvm(spy, tmp_path / "vmlinuz", device=tmp_path / "missing")
    assert not result.usable and "does not exist" in result.reason
    assert not marker.exists()


def test_probe_command_boots_the_kernel_under_kvm_and_ends() -> None:
    argv = qemu.probe_command("qemu-system-x86_64", Path("/img/vmlinuz"))
    assert options_of(argv, "-accel") == ["kvm"]
    assert options_of(argv, "-kernel") == ["/img/vmlinuz"]
    assert "-no-reboot" in argv and "panic=-1" in options_of(argv, "-append")[0]
    assert "-netdev" not in argv and "-initrd" not in argv


def test_accelerator_decision() -> None:
    calls: list[int] = []

    def probe(usable: bool) -> qemu.KvmProbe:
        calls.append(1)
        return qemu.KvmProbe(usable, "because")

    assert qemu.choose_accel("tcg", lambda: probe(True)) == ("tcg", "TCG requested")
    assert not calls  # TCG asked for: no probe at all
    assert qemu.choose_accel("auto", lambda: probe(True)) == ("kvm", "because")
    assert qemu.choose_accel("auto", lambda: probe(False)) == ("tcg", "because")
    assert qemu.choose_accel("kvm", lambda: probe(True)) == ("kvm", "because")
    with pytest.raises(qemu.ProvisionError, match="KVM does not work here: because"):
        qemu.choose_accel("kvm", lambda: probe(False))
    with pytest.raises(qemu.ProvisionError, match="expected one of"):
        qemu.choose_accel("hvf", lambda: probe(True))


def test_probe_result_is_cached_per_boot_qemu_and_kernel(tmp_path: Path) -> None:
    cache = tmp_path / "cache" / "kvm.json"
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"k")
    calls: list[int] = []

    def probe() -> qemu.KvmProbe:
        calls.append(1)
        return qemu.KvmProbe(False, "hangs")

    first = qemu.cached_probe(cache, "qemu-system-x86_64", kernel, probe)
    second = qemu.cached_probe(cache, "qemu-system-x86_64", kernel, probe)
    assert (first.usable, second.usable) == (False, False)
    assert second.reason == "hangs (cached)" and len(calls) == 1
    kernel.write_bytes(b"another kernel")
    qemu.cached_probe(cache, "qemu-system-x86_64", kernel, probe)
    assert len(calls) == 2
    cache.write_text("not json")
    qemu.cached_probe(cache, "qemu-system-x86_64", kernel, probe)
    assert len(calls) == 3


# -- process ownership ---------------------------------------------------------------------------


def spawn_named(argv0: str, *args: str) -> subprocess.Popen[bytes]:
    """A process whose command line is ``argv0 -c 'sleep 30; :' args...`` (a shell)."""
    return subprocess.Popen([argv0, "-c", "sleep 30; :", *args], executable="/bin/sh")


def test_only_our_own_qemu_is_recognised_and_stopped(tmp_path: Path) -> None:
    ours = NodeRecord("a", "controlplane", "127.0.0.1", str(tmp_path / "a"))
    other = NodeRecord("b", "worker", "127.0.0.2", str(tmp_path / "b"))
    vm = spawn_named("qemu-system-x86_64", "-pidfile", f"{ours.node_dir}/qemu.pid")
    stranger = spawn_named("qemu-system-x86_64", "-pidfile", "/elsewhere/qemu.pid")
    not_qemu = spawn_named("sh", "-pidfile", f"{other.node_dir}/qemu.pid")
    try:
        ours.launcher_pid = vm.pid
        assert qemu.is_ours(ours) and qemu.machine_running(ours)
        other.launcher_pid = stranger.pid  # a recycled pid: some other QEMU
        assert not qemu.is_ours(other)
        other.launcher_pid = not_qemu.pid  # a recycled pid: not a QEMU at all
        assert not qemu.is_ours(other)
        record = ClusterRecord("t", "qemu", str(tmp_path), "https://x:6443", [ours, other])
        import asyncio

        assert asyncio.run(qemu.stop_nodes(record, timeout=5)) == ["a"]
        assert vm.wait(timeout=5) is not None
        assert stranger.poll() is None and not_qemu.poll() is None
        assert not qemu.machine_running(ours)
    finally:
        for process in (vm, stranger, not_qemu):
            process.kill()
            process.wait()


def test_relays_are_found_by_their_cluster(tmp_path: Path) -> None:
    sleeper = [sys.executable, "-c", "import time; time.sleep(30)", "basalt.provision.relay"]
    mine = subprocess.Popen([*sleeper, "--cluster", str(tmp_path), "127.0.0.1", "1"])
    theirs = subprocess.Popen([*sleeper, "--cluster", str(tmp_path / "other"), "127.0.0.1", "1"])
    try:
        deadline = time.monotonic() + 5
        while mine.pid not in qemu.relays_of(str(tmp_path)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert qemu.relays_of(str(tmp_path)) == [mine.pid]
    finally:
        for process in (mine, theirs):
            process.kill()
            process.wait()


# -- relay ---------------------------------------------------------------------------------------


RELAY = (sys.executable, "-m", "basalt.provision.relay")


def echo_server() -> tuple[socket.socket, int]:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()

    def serve() -> None:
        connection, _ = server.accept()
        with connection:
            while data := connection.recv(4096):
                connection.sendall(data.upper())

    threading.Thread(target=serve, daemon=True).start()
    return server, server.getsockname()[1]


def test_relay_copies_both_ways_and_passes_the_close_on() -> None:
    server, port = echo_server()
    guest, inside = socket.socketpair()
    outside = socket.create_connection(("127.0.0.1", port))
    worker = threading.Thread(target=relay, args=(inside, outside))
    worker.start()
    guest.sendall(b"hello")
    assert guest.recv(100) == b"HELLO"
    guest.shutdown(socket.SHUT_WR)
    assert guest.recv(100) == b""  # the server saw EOF, closed, and that came back
    worker.join(timeout=5)
    assert not worker.is_alive()
    for sock in (guest, inside, outside, server):
        sock.close()


def test_relay_process_talks_through_its_standard_input(tmp_path: Path) -> None:
    server, port = echo_server()
    guest, child_end = socket.socketpair()
    child = subprocess.Popen(
        [*RELAY, "--cluster", str(tmp_path), "127.0.0.1", str(port)],
        stdin=child_end,
        stdout=child_end,
        stderr=child_end,
    )
    child_end.close()
    try:
        guest.sendall(b"abc")
        assert guest.recv(100) == b"ABC"
        guest.shutdown(socket.SHUT_WR)
        assert child.wait(timeout=10) == 0
    finally:
        child.kill()
        guest.close()
        server.close()


def test_relay_refuses_anything_but_loopback(tmp_path: Path) -> None:
    guest, child_end = socket.socketpair()
    code = subprocess.call(
        [*RELAY, "--cluster", str(tmp_path), "192.0.2.1", "50000"],
        stdin=child_end,
        stdout=child_end,
        stderr=child_end,
        timeout=10,
    )
    assert code == 2
    guest.close()
    child_end.close()


# -- CLI -----------------------------------------------------------------------------------------


@pytest.fixture
def clusters(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "clusters"
    monkeypatch.setenv("BASALT_CLUSTERS_DIR", str(directory))
    return directory


def test_cli_refuses_vm_options_for_the_process_provisioner(
    clusters: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["cluster", "create", "--memory", "256", "--image", "/x"]) != 0
    assert "--memory, --image only apply to VMs" in capsys.readouterr().err
    assert not clusters.exists()


def test_cli_refuses_several_qemu_control_planes_before_starting_anything(
    clusters: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        ["cluster", "create", "--provisioner", "qemu", "--controlplanes", "3", "--network", "user"]
    )
    assert code != 0
    assert "one control plane" in capsys.readouterr().err
    assert not clusters.exists()


def test_show_and_destroy_follow_the_recorded_provisioner(
    clusters: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = clusters / "vm"
    node = NodeRecord("vm-controlplane-1", "controlplane", "127.0.0.71", str(state / "n"))
    node.guest_address, node.launcher_pid = "10.5.0.11", 1  # pid 1 is nobody's QEMU
    state.mkdir(parents=True)
    record = ClusterRecord("vm", "qemu", str(state), "https://10.5.0.11:6443", [node])
    record.options["accel"] = "tcg"
    record.save()
    assert main(["cluster", "show", "--name", "vm"]) == 0
    out = capsys.readouterr().out
    assert "cluster vm (qemu)" in out and "accel: tcg" in out
    assert "10.5.0.11" in out and "stopped" in out
    assert main(["cluster", "destroy", "--name", "vm"]) == 0
    assert "0 VMs stopped" in capsys.readouterr().err
    assert not state.exists()


def test_backend_names_the_provisioners() -> None:
    assert backend("qemu") is qemu
    with pytest.raises(Exception, match="unknown provisioner"):
        backend("lxc")


def test_bridge_network_takes_several_control_planes_and_runs_qemu_in_the_namespace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bridge, "available", lambda: None)
    nodes = qemu.plan_nodes(request(controlplanes=3, workers=0), tmp_path, "bridge")
    assert [n.type for n in nodes] == ["controlplane"] * 3
    image = qemu.Image(
        tmp_path / "k", tmp_path / "i", tmp_path / "r", "console=ttyS0", tmp_path / "d"
    )
    argv = qemu.qemu_command(nodes[2], nodes, image, qemu.VmOptions(), "tcg", tmp_path, "bridge")
    net = qemu.cluster_bridge(tmp_path)
    assert argv[:4] == ["ip", "netns", "exec", net.netns] and "qemu-system" in argv[4]
    assert options_of(argv, "-netdev") == ["tap,id=n0,ifname=tap2,script=no,downscript=no"]


def test_network_mode_falls_back_to_user_without_root_and_refuses_bridge(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(bridge, "available", lambda: "not running as root")
    assert qemu.network_mode("auto") == (
        "user",
        "user networking: root mode unavailable (not running as root)",
    )
    with pytest.raises(qemu.ProvisionError, match="--network bridge: not running as root"):
        qemu.network_mode("bridge")
    with pytest.raises(qemu.ProvisionError, match="expected one of auto, user, bridge"):
        qemu.network_mode("tap")


def test_runner_starts_qemu_again_after_a_guest_reboot_only(tmp_path: Path) -> None:
    """A stand-in for QEMU prints the kernel's reboot line on its first two runs and
    exits 0 (as QEMU does under -no-reboot), then powers off: three runs in all."""
    from basalt.provision import qemu_runner

    runs, console = tmp_path / "runs", tmp_path / "console.log"
    script = (
        "import pathlib, sys; p = pathlib.Path(sys.argv[1]); "
        "n = len(p.read_text()) if p.exists() else 0; p.write_text('x' * (n + 1)); "
        "print('[ 1.0] reboot: Restarting system' if n < 2 else 'reboot: Power down')"
    )
    code = qemu_runner.run([sys.executable, "-c", script, str(runs)], console)
    assert code == 0
    assert runs.read_text() == "xxx"
    text = console.read_text()
    assert text.count("starting QEMU again") == 2 and text.endswith("reboot: Power down\n")
    failing = [sys.executable, "-c", "print('reboot: Restarting system'); raise SystemExit(3)"]
    assert qemu_runner.run(failing, tmp_path / "other.log") == 3  # a crash is not a reboot


def test_runner_power_cycles_a_guest_stalled_before_its_initramfs(tmp_path: Path) -> None:
    """A stand-in for QEMU that prints nothing and hangs on its first run (as a guest stuck
    in firmware does) and boots on its second: one power cycle, then the guest's own end."""
    from basalt.provision import qemu_runner

    runs, console = tmp_path / "runs", tmp_path / "console.log"
    script = (
        "import pathlib, sys, time; p = pathlib.Path(sys.argv[1]); "
        "n = len(p.read_text()) if p.exists() else 0; p.write_text('x' * (n + 1)); "
        "n == 0 and time.sleep(60); "
        "print('[ 3.9] basalt-init: initramfs: started'); print('reboot: Power down')"
    )
    started = time.monotonic()
    assert qemu_runner.run([sys.executable, "-c", script, str(runs)], console, stall=1.0) == 0
    assert time.monotonic() - started < 30  # the hung run was killed, not waited for
    assert runs.read_text() == "xx"
    text = console.read_text()
    assert text.count("stuck before Basalt ran; power cycle (boot 2)") == 1
    assert text.endswith("reboot: Power down\n")


def test_runner_gives_up_on_a_guest_that_never_reaches_its_initramfs(tmp_path: Path) -> None:
    from basalt.provision import qemu_runner

    runs, console = tmp_path / "runs", tmp_path / "console.log"
    script = (
        "import pathlib, sys, time; p = pathlib.Path(sys.argv[1]); "
        "p.write_text(p.read_text() + 'x' if p.exists() else 'x'); time.sleep(60)"
    )
    code = qemu_runner.run([sys.executable, "-c", script, str(runs)], console, stall=0.5)
    assert code == 1
    assert runs.read_text() == "x" * qemu_runner.MAX_STALLS
    assert console.read_text().count("power cycle") == qemu_runner.MAX_STALLS - 1
    assert f"{qemu_runner.MAX_STALLS} boots in a row; giving up" in console.read_text()


def _wait_for_pid(pidfile: Path) -> int:
    """The pid a stand-in for QEMU wrote once it runs."""
    deadline = time.monotonic() + 20
    while not pidfile.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    return int(pidfile.read_text())


def test_runner_powers_off_and_ends_when_its_parent_ends(tmp_path: Path) -> None:
    """A runner given --parent ends, and takes its QEMU with it, once that process ends:
    a killed test run leaves no VM behind."""
    import signal

    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    pidfile, console = tmp_path / "qemu.pid", tmp_path / "console.log"
    guest = (
        "import os, pathlib, sys, time; pathlib.Path(sys.argv[1]).write_text(str(os.getpid())); "
        "print('basalt-init: started', flush=True); time.sleep(120)"
    )
    runner = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "basalt.provision.qemu_runner",
            "--console",
            str(console),
            "--parent",
            str(owner.pid),
            "--",
            sys.executable,
            "-c",
            guest,
            str(pidfile),
        ]
    )
    try:
        guest_pid = _wait_for_pid(pidfile)
        owner.kill()
        owner.wait()
        runner.wait(timeout=10)  # it ends (with QEMU's code)
        assert "that owns this VM has ended; powering off" in console.read_text()
        with pytest.raises(ProcessLookupError):
            os.kill(guest_pid, 0)
    finally:
        for process in (owner, runner):
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
                process.wait()


def test_qemu_dies_with_a_killed_runner(tmp_path: Path) -> None:
    """SIGKILL of the runner (no handler runs) still ends its QEMU: PR_SET_PDEATHSIG."""
    pidfile, console = tmp_path / "qemu.pid", tmp_path / "console.log"
    guest = (
        "import os, pathlib, sys, time; pathlib.Path(sys.argv[1]).write_text(str(os.getpid())); "
        "time.sleep(120)"
    )
    qemu_argv = [sys.executable, "-c", guest, str(pidfile)]
    runner = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "basalt.provision.qemu_runner",
            "--console",
            str(console),
            "--",
            *qemu_argv,
        ]
    )
    guest_pid = _wait_for_pid(pidfile)
    runner.kill()
    runner.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(guest_pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(guest_pid, 9)
        pytest.fail("QEMU outlived its killed runner")


def test_runner_command_passes_the_harness_pid(monkeypatch: pytest.MonkeyPatch) -> None:
    node = NodeRecord(name="n", type="controlplane", address="127.0.0.11", node_dir="/tmp/n")
    monkeypatch.delenv(qemu.PARENT_ENV, raising=False)
    assert "--parent" not in qemu.runner_command(["qemu"], node)
    monkeypatch.setenv(qemu.PARENT_ENV, "4242")
    argv = qemu.runner_command(["qemu"], node)
    assert argv[argv.index("--parent") + 1] == "4242"
