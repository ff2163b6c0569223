"""One metal node in QEMU (TCG): machined is PID 1 on the read-only squashfs root.

A single boot serves the whole module: maintenance mode answers on the DHCP-configured
network; a config generated for metal (``install.disk`` set) is applied with
``apply-config --insecure``; the node skips install (a direct-kernel boot has no disk to
install from; tests/vm/test_install.py boots the disk image),
runs from RAM and answers with mTLS; etcd is bootstrapped through the API and runs as a
child of PID 1; logs, dmesg, ls and mounts work. Boot timings are recorded (see
conftest.py). Every client call goes to the forwarded API port on 127.0.0.1, which the
node's certificate covers through ``--additional-sans 127.0.0.1``.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import basalt
from tests.vm.conftest import Timings
from tests.vm.machine import Vm, call

pytestmark = pytest.mark.vm

BOOT_TIMEOUT = 120.0
CONFIGURED_TIMEOUT = 120.0
ETCD_TIMEOUT = 120.0
#: QEMU's user network: the guest's DHCP address, and the name machined derives from the
#: default MAC 52:54:00:12:34:56.
GUEST_ADDRESS = "10.0.2.15"
HOSTNAME = "basalt-123456"
_SCRIPT = Path(sys.executable).with_name("basaltctl")
BASALTCTL = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "basalt.cli.main"]


def _empty() -> Any:
    from basalt.machinery.api import common_pb2

    return common_pb2.Empty()


def _ctl(*args: str, config: Path | None = None) -> str:
    env = {**os.environ, **({"BASALTCONFIG": str(config)} if config else {})}
    result = subprocess.run(
        [*BASALTCTL, *args], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, (args, result.stdout, result.stderr)
    return result.stdout


@dataclass
class Booted:
    vm: Vm
    #: The maintenance API's first Version answer.
    version: Any


@pytest.fixture(scope="module")
def booted(
    image_dir: Path, tmp_path_factory: pytest.TempPathFactory, timings: Timings
) -> Iterator[Booted]:
    """The guest, once its maintenance API has answered Version."""
    machine = Vm.boot(image_dir, tmp_path_factory.mktemp("metal"))
    try:
        answer = machine.wait(
            lambda: call(machine.endpoint, "Version", _empty(), timeout=5),
            BOOT_TIMEOUT,
            "maintenance API",
        )
        timings.record("microvm: QEMU start -> maintenance API answer", machine.mark("maintenance"))
        yield Booted(machine, answer)
    finally:
        machine.stop()
        timings.timelines["microvm metal node"] = machine.timeline()


@dataclass
class Configured:
    vm: Vm
    basaltconfig: Path
    context: Any

    def ctl(self, *args: str) -> str:
        """basaltctl with the generated client config, dialing the forwarded port."""
        return _ctl(*args, "-e", self.vm.endpoint, config=self.basaltconfig)

    def call(self, method: str, request: Any = None) -> Any:
        return asyncio.run(
            call(self.vm.endpoint, method, request or _empty(), context=self.context)
        )


@pytest.fixture(scope="module")
def configured(
    booted: Booted, tmp_path_factory: pytest.TempPathFactory, timings: Timings
) -> Configured:
    """The node after ``apply-config --insecure`` of a generated control plane config,
    once it answers with mTLS."""
    from basalt.machinery.client.config import load_client_config

    vm = booted.vm
    out = tmp_path_factory.mktemp("config")
    _ctl(
        *("gen", "config", "vm", f"https://{GUEST_ADDRESS}:6443", "-o", str(out)),
        *("--install-disk", "/dev/vda", "--additional-sans", "127.0.0.1"),
    )
    _, context = load_client_config(out / "basaltconfig").current()
    applied = time.monotonic()
    _ctl("apply-config", "--insecure", "-n", vm.endpoint, "-f", str(out / "controlplane.yaml"))
    answer = vm.wait(
        lambda: call(vm.endpoint, "Version", _empty(), context=context, timeout=5),
        CONFIGURED_TIMEOUT,
        "mTLS API after apply-config",
    )
    (info,) = answer.messages
    assert info.mode == "normal"
    timings.record("microvm: apply-config -> mTLS API answer", time.monotonic() - applied)
    timings.record("microvm: QEMU start -> mTLS API answer (incl. apply)", vm.mark("mtls"))
    return Configured(vm, out / "basaltconfig", context)


@pytest.fixture(scope="module")
def etcd(configured: Configured, timings: Timings) -> Configured:
    """The node after ``basaltctl bootstrap``, once the etcd service is healthy."""
    started = time.monotonic()
    assert "bootstrap started" in configured.ctl("bootstrap")

    async def healthy() -> None:
        answer = await call(
            configured.vm.endpoint, "ServiceList", _empty(), context=configured.context
        )
        (listing,) = answer.messages
        states = {s.id: (s.state, s.health) for s in listing.services}
        assert states.get("etcd") == ("running", "healthy"), states

    configured.vm.wait(healthy, ETCD_TIMEOUT, "etcd healthy", poll=0.5)
    timings.record("microvm: bootstrap -> etcd healthy", time.monotonic() - started)
    return configured


def test_maintenance_mode_answers_on_the_dhcp_network(booted: Booted) -> None:
    (info,) = booted.version.messages
    assert info.mode == "maintenance"
    assert info.platform == "metal"
    assert info.tag == basalt.__version__
    assert info.hostname == HOSTNAME
    assert info.python.startswith("3.11.")
    console = booted.vm.console_text()
    assert "API listening on 0.0.0.0:50000 (maintenance)" in console
    assert "loaded kernel modules: failover, net_failover, virtio_net" in console


def test_config_applies_skips_install_and_answers_with_mtls(configured: Configured) -> None:
    (info,) = configured.call("Version").messages
    assert (info.mode, info.machine_type, info.hostname) == ("normal", "controlplane", HOSTNAME)
    events = configured.ctl("events")
    assert "not booted from a Basalt disk" in events  # a direct-kernel boot: from RAM
    assert "/dev/vda left untouched" in events
    assert f"eth0: DHCP lease {GUEST_ADDRESS}" in events
    assert f"node address is {GUEST_ADDRESS}" in events


def test_etcd_is_a_child_of_pid_1_next_to_apid_and_trustd(etcd: Configured) -> None:
    services = etcd.ctl("services")
    rows = {line.split()[1]: line.split()[2:4] for line in services.splitlines()[1:]}
    for service in ("apid", "trustd", "etcd"):
        assert rows[service] == ["RUNNING", "healthy"], services
    assert rows["kubelet"][0] == "SKIPPED"
    (listing,) = etcd.call("Processes").messages
    by_pid = {p.pid: p for p in listing.processes}
    assert by_pid[1].args == "/usr/bin/python3.11 -I /sbin/init", by_pid[1]
    etcd_processes = [p for p in by_pid.values() if p.args.startswith("/usr/bin/etcd ")]
    assert [p.ppid for p in etcd_processes] == [1], etcd_processes


def test_logs_of_machined(configured: Configured) -> None:
    logs = configured.ctl("logs", "machined")
    assert f"API listening on {GUEST_ADDRESS}:50000 (mTLS)" in logs
    assert "boot: finished" in logs
    assert "Read-only file system" not in logs  # /etc/kubernetes is a tmpfs


def test_dmesg_returns_the_kernel_log(configured: Configured) -> None:
    dmesg = configured.ctl("dmesg")
    assert "Linux version" in dmesg
    assert "Command line: console=ttyS0" in dmesg


def test_the_root_has_no_shell(configured: Configured) -> None:
    listing = configured.ctl("ls", "/bin")
    names = {line.split()[-1] for line in listing.splitlines()[1:]} - {"."}
    assert names == {"etcd", "python3.11", "containerd", "containerd-shim-runc-v2"}, listing
    assert "sh" not in names
    sbin = {line.split()[-1] for line in configured.ctl("ls", "/sbin").splitlines()[1:]}
    assert sbin - {"."} == {"init", "runc", "mke2fs"}


def test_root_is_a_read_only_squashfs_and_etc_files_are_read_only_binds(
    configured: Configured,
) -> None:
    (answer,) = configured.call("Mounts").messages
    mounts = {m.mounted_on: m for m in answer.stats}
    root = mounts["/"]
    assert root.type == "squashfs", root
    assert "ro" in root.options.split(","), root
    for name in ("hostname", "hosts", "resolv.conf"):
        assert "ro" in mounts[f"/etc/{name}"].options.split(","), mounts[f"/etc/{name}"]
    for writable in ("/var", "/system", "/tmp", "/run", "/etc/kubernetes"):
        assert mounts[writable].type == "tmpfs", mounts[writable]


# Last: it ends the module's machine.
def test_shutdown_powers_the_machine_off(configured: Configured, timings: Timings) -> None:
    """PID 1 stops the services, ends every process, syncs and calls reboot(2): QEMU
    (``-no-reboot``) exits by itself."""
    asked = time.monotonic()
    configured.ctl("shutdown")
    try:
        code = configured.vm.process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("QEMU still runs 60 s after shutdown:\n" + configured.vm.console_tail())
    timings.record("microvm: shutdown -> QEMU exited", time.monotonic() - asked)
    assert code == 0
    console = configured.vm.console_text()
    assert "machined: poweroff: stopping every process" in console
    assert "reboot: Power down" in console
