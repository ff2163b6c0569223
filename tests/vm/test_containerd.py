"""The runtime lane on a metal node in QEMU (TCG): containerd is a child of PID 1 with
its CRI plugin answering on /run/containerd/containerd.sock; an image tar built by the
test (no registry) is imported through the API, run to completion on the overlayfs
snapshotter, and its output read back through the API.

``BASALT_VM_IMAGE=DIR`` boots an image built elsewhere (``python -m basalt.imager build
--out DIR``) instead of building ``_out/image``.
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

from tests.fakes.oci import oci_layout_tar
from tests.vm.conftest import Timings
from tests.vm.machine import Vm, call

pytestmark = pytest.mark.vm

BOOT_TIMEOUT = 180.0
CONFIGURED_TIMEOUT = 180.0
CONTAINERD_TIMEOUT = 120.0
GUEST_ADDRESS = "10.0.2.15"
IMAGE = "example.org/basalt/hello:1.0"
PROGRAMS = {"/hello": (b"hello from basalt\n", 0), "/fail": (b"failing on purpose\n", 3)}
_SCRIPT = Path(sys.executable).with_name("basaltctl")
BASALTCTL = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "basalt.cli.main"]


def _empty() -> Any:
    from basalt.machinery.api import common_pb2

    return common_pb2.Empty()


def _ctl(*args: str, config: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **({"BASALTCONFIG": str(config)} if config else {})}
    return subprocess.run(
        [*BASALTCTL, *args], env=env, capture_output=True, text=True, timeout=300, check=False
    )


@dataclass
class Node:
    vm: Vm
    basaltconfig: Path
    context: Any

    def ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        """basaltctl dialing the forwarded port (-e goes before a ``--``)."""
        cut = args.index("--") if "--" in args else len(args)
        argv = (*args[:cut], "-e", self.vm.endpoint, *args[cut:])
        return _ctl(*argv, config=self.basaltconfig)

    def ok(self, *args: str) -> str:
        result = self.ctl(*args)
        assert result.returncode == 0, (args, result.stdout, result.stderr)
        return result.stdout

    def call(self, method: str, request: Any = None) -> Any:
        return asyncio.run(
            call(self.vm.endpoint, method, request or _empty(), context=self.context, timeout=30)
        )


@pytest.fixture(scope="module")
def image(request: pytest.FixtureRequest) -> Path:
    prebuilt = os.environ.get("BASALT_VM_IMAGE")
    if prebuilt:
        return Path(prebuilt)
    built: Path = request.getfixturevalue("image_dir")
    return built


@pytest.fixture(scope="module")
def node(image: Path, tmp_path_factory: pytest.TempPathFactory, timings: Timings) -> Iterator[Node]:
    """A configured metal node whose containerd service is running and healthy."""
    from basalt.machinery.client.config import load_client_config

    vm = Vm.boot(image, tmp_path_factory.mktemp("containerd-vm"))
    try:
        vm.wait(
            lambda: call(vm.endpoint, "Version", _empty(), timeout=5),
            BOOT_TIMEOUT,
            "maintenance API",
        )
        out = tmp_path_factory.mktemp("config")
        generated = _ctl(
            *("gen", "config", "vm", f"https://{GUEST_ADDRESS}:6443", "-o", str(out)),
            *("--install-disk", "/dev/vda", "--additional-sans", "127.0.0.1"),
        )
        assert generated.returncode == 0, generated.stderr
        _, context = load_client_config(out / "basaltconfig").current()
        applied = _ctl(
            "apply-config", "--insecure", "-n", vm.endpoint, "-f", str(out / "controlplane.yaml")
        )
        assert applied.returncode == 0, applied.stderr
        vm.wait(
            lambda: call(vm.endpoint, "Version", _empty(), context=context, timeout=5),
            CONFIGURED_TIMEOUT,
            "mTLS API after apply-config",
        )
        configured = time.monotonic()

        async def healthy() -> None:
            answer = await call(vm.endpoint, "ServiceList", _empty(), context=context)
            found = {s.id: s for s in answer.messages[0].services}
            service = found.get("containerd")
            assert service is not None, sorted(found)
            state = (service.state, service.health)
            events = [e.message for e in service.events][-3:]
            assert state == ("running", "healthy"), (state, service.message, events)

        try:
            vm.wait(healthy, CONTAINERD_TIMEOUT, "containerd healthy", poll=1.0)
        except AssertionError as exc:
            logs = _ctl("logs", "containerd", "-e", vm.endpoint, config=out / "basaltconfig")
            raise AssertionError(f"{exc}\ncontainerd log:\n{logs.stdout[-6000:]}") from None
        timings.record("microvm: mTLS API -> containerd healthy", time.monotonic() - configured)
        yield Node(vm, out / "basaltconfig", context)
    finally:
        vm.stop()


def test_containerd_is_a_child_of_pid_1_with_cri_answering(node: Node) -> None:
    (listing,) = node.call("Processes").messages
    processes = [p for p in listing.processes if p.args.startswith("/usr/bin/containerd ")]
    assert [p.ppid for p in processes] == [1], processes
    logs = node.ok("logs", "containerd")
    assert "/run/containerd/containerd.sock" in logs
    # healthy means Version answered and so did the CRI's runtime.v1 Version (kubelet's)
    assert "io.containerd.grpc.v1.cri" in logs


def test_import_and_run_through_the_api(node: Node, tmp_path: Path) -> None:
    archive = tmp_path / "hello.tar"
    archive.write_bytes(oci_layout_tar(IMAGE, PROGRAMS, ["/hello"]))
    imported = node.ok("containers", "import", str(archive))
    assert f"imported {IMAGE} (sha256:" in imported
    assert IMAGE in node.ok("containers", "images")

    ran = node.ctl("containers", "run", IMAGE)
    assert (ran.returncode, ran.stdout) == (0, "hello from basalt\n"), ran.stderr
    log_id = ran.stderr.rsplit("(log ", 1)[1].split(")")[0]
    assert node.ok("logs", log_id) == "hello from basalt\n"

    failed = node.ctl("containers", "run", IMAGE, "--", "/fail")
    assert (failed.returncode, failed.stdout) == (3, "failing on purpose\n"), failed.stderr

    # unpacked on the overlayfs snapshotter, under /var/lib/containerd
    snapshots = node.ok(
        "ls", "/var/lib/containerd/io.containerd.snapshotter.v1.overlayfs/snapshots"
    )
    assert len(snapshots.splitlines()) >= 2, snapshots


def test_cri_reads_cni_configs_from_a_writable_etc_cni(node: Node) -> None:
    """The image's /etc is read-only; /etc/cni is a tmpfs the CRI plugin creates net.d in
    and reads CNI configs from (none yet: no CNI is installed)."""
    (answer,) = node.call("Mounts").messages
    mounts = {m.mounted_on: m for m in answer.stats}
    assert mounts["/etc/cni"].type == "tmpfs", mounts.get("/etc/cni")
    assert "rw" in mounts["/etc/cni"].options.split(","), mounts["/etc/cni"]
    assert "net.d" in node.ok("ls", "/etc/cni").split()  # made by the CRI plugin
    logs = node.ok("logs", "containerd")
    assert "NetworkPluginConfDir:/etc/cni/net.d" in logs, logs[-3000:]
    assert "no network config found in /etc/cni/net.d" in logs, logs[-3000:]
    assert "/var/lib/cni" not in logs
