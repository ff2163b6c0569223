"""A/B upgrades of an installed metal node in QEMU (TCG, q35, OVMF, systemd-boot).

One node for the module: the image's disk (through a 4 GiB qcow2 overlay) boots into
maintenance mode, a control-plane config that trusts a test signing key installs it to
/dev/vda, and etcd is bootstrapped. QEMU runs under ``basalt.provision.qemu_runner``,
which starts it again after each guest reboot (``-no-reboot``), as the qemu provisioner
does: every reboot, fallback included, happens with no help from the test. The API is
forwarded to 127.0.0.120 (this module's loopback address).

Bundles: the imager's own ``bundle.tar`` (v1, built with ``--signing-key``); v2 is the
same image with its root repacked so that Basalt says 0.2.0; a broken build (0.3.0-broken)
adds a health check that always fails and, in its own init, a 30 s boot-assessment
timeout, so its three tries take minutes rather than six.

In order: v1 -> v2 comes back on slot B healthy (the entry marked good by renaming it on
the ESP); ``basaltctl rollback`` boots slot A again; the broken build fails its gates
three times and the firmware falls back to slot A by itself, which reports it.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.vm.conftest import Timings
from tests.vm.machine import call, uefi_disk_command
from tests.vm.test_metal_node import BASALTCTL, GUEST_ADDRESS, _empty

pytestmark = pytest.mark.vm

ADDRESS = "127.0.0.120"
DISK_SIZE = "4G"
BOOT_TIMEOUT = 300.0
SITE = "usr/lib/python3/dist-packages"
BROKEN_TIMEOUT = 30
BROKEN_HEALTH = '''

_working_checks = run_checks


async def run_checks(node: Node) -> list[Check]:  # type: ignore[no-redef]
    """A deliberately broken build: one health check always fails."""
    return [*(await _working_checks(node)), Check("broken", False, "deliberately broken build")]
'''


def _trust_patch(public_pem: str) -> str:
    indented = "".join(f"      {line}\n" for line in public_pem.splitlines())
    return (
        "apiVersion: basalt.dev/v1alpha1\nkind: ImageVerificationConfig\nkeys:\n"
        f"  - name: vm-release\n    publicKey: |\n{indented}"
    )


def _run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=True, **kwargs)


def _repack(image_dir: Path, work: Path, version: str, broken: bool) -> Path:
    """The image's root with Basalt saying ``version`` (and, ``broken``, failing a gate)."""
    tree = work / f"root-{version}"
    _run(["unsquashfs", "-q", "-n", "-d", str(tree), str(image_dir / "root.sqfs")])
    package = tree / SITE / "basalt"
    init = package / "__init__.py"
    text = init.read_text()
    assert '"0.1.0"' in text
    init.write_text(text.replace('"0.1.0"', f'"{version}"'))
    changed = [init]
    if broken:
        health = package / "machined" / "health.py"
        with health.open("a") as handle:
            handle.write(BROKEN_HEALTH)
        changed.append(health)
        script = tree / "usr/sbin/init"
        before = script.read_text()
        after = before.replace(
            'main(["--platform", "metal"])',
            f'main(["--platform", "metal", "--boot-assessment-timeout", "{BROKEN_TIMEOUT}"])',
        )
        assert after != before
        script.write_text(after)
    for source in changed:  # the root's .pyc are unchecked: drop the stale ones
        for pyc in (source.parent / "__pycache__").glob(f"{source.stem}.*.pyc"):
            pyc.unlink()
    root = work / f"root-{version}.sqfs"
    _run(
        ["mksquashfs", str(tree), str(root), "-noappend", "-no-progress", "-quiet",
         "-comp", "zstd", "-Xcompression-level", "3", "-all-root", "-b", "256K"]
    )  # fmt: skip
    shutil.rmtree(tree)
    return root


@dataclass
class Bundles:
    key: Path
    public: str
    v1: Path
    v2: Path
    broken: Path


@pytest.fixture(scope="module")
def bundles(image_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Bundles:
    from basalt.imager import pipeline
    from basalt.machinery.images import create_bundle, generate_signing_key, load_signing_key

    work = tmp_path_factory.mktemp("bundles")
    private, public = generate_signing_key()
    (work / "release.key").write_text(private)
    # The imager signs its own bundle (cached stages: only the bundle is new).
    pipeline.build(image_dir, signing_key=work / "release.key")
    v1 = work / "v1.tar"
    shutil.copyfile(image_dir / pipeline.BUNDLE, v1)
    key = load_signing_key(private)
    made = {}
    for version, broken in (("0.2.0", False), ("0.3.0-broken", True)):
        files = {
            "kernel": image_dir / "vmlinuz",
            "initramfs": image_dir / "initrd.img",
            "rootfs.squashfs": _repack(image_dir, work, version, broken),
        }
        made[version] = work / f"{version}.tar"
        create_bundle(made[version], files, version, "default", "x86_64", key, platform="metal")
    return Bundles(work / "release.key", public, v1, made["0.2.0"], made["0.3.0-broken"])


@dataclass
class Node:
    """One installed node, its QEMU under qemu_runner (which restarts it on reboots)."""

    workdir: Path
    disk: Path
    console: Path
    port: int
    basaltconfig: Path
    context: Any
    runner: subprocess.Popen[bytes] | None = None
    address: str = ADDRESS

    @property
    def endpoint(self) -> str:
        return f"{self.address}:{self.port}"

    def start(self) -> None:
        argv = uefi_disk_command(self.disk, self.port)
        argv = [a.replace("hostfwd=tcp:127.0.0.1:", f"hostfwd=tcp:{self.address}:") for a in argv]
        runner = [sys.executable, "-m", "basalt.provision.qemu_runner"]
        self.runner = subprocess.Popen(
            [*runner, "--console", str(self.console), "--", *argv],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def stop(self) -> None:
        if self.runner is not None and self.runner.poll() is None:
            self.runner.send_signal(signal.SIGTERM)  # it powers its QEMU off
            try:
                self.runner.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.runner.pid, signal.SIGKILL)
                self.runner.wait()

    def qemu_pid(self) -> int | None:
        """The QEMU the runner runs now (its only child), if any."""
        assert self.runner is not None
        try:
            children = Path(f"/proc/{self.runner.pid}/task/{self.runner.pid}/children")
            pids = children.read_text().split()
        except OSError:
            return None
        return int(pids[0]) if pids else None

    def tail(self, chars: int = 8000) -> str:
        return self.console.read_bytes().decode(errors="replace")[-chars:]

    def ctl(self, *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "BASALTCONFIG": str(self.basaltconfig)}
        return subprocess.run(
            [*BASALTCTL, *args, "-e", self.endpoint],
            env=env, capture_output=True, text=True, timeout=timeout, check=False,
        )  # fmt: skip

    def wait(self, check: Callable[[], Any], timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            assert self.runner is not None
            if self.runner.poll() is not None:
                break
            try:
                result = check()
            except Exception as exc:
                last = exc
            else:
                if result:
                    return result
                last = result
            time.sleep(2)
        raise AssertionError(f"{what}: not within {timeout:.0f} s; last: {last!r}\n{self.tail()}")

    def mtls(self, method: str = "Version") -> Any:
        answer = asyncio.run(call(self.endpoint, method, _empty(), context=self.context))
        return answer.messages[0]

    def boot_status(self) -> dict[str, Any]:
        done = self.ctl("get", "bootstatuses", "-o", "json", timeout=30)
        assert done.returncode == 0, done.stderr
        spec: dict[str, Any] = json.loads(done.stdout.splitlines()[0])["spec"]
        return spec

    def events(self) -> list[str]:
        done = self.ctl("events", timeout=30)
        return done.stdout.splitlines()


def install_node(
    image_dir: Path, bundles: Bundles, work: Path, timings: Timings, address: str = ADDRESS
) -> Node:
    """A node booted from the image's disk, installed as a control plane that trusts the
    test key, etcd bootstrapped and healthy; its QEMU under qemu_runner."""
    from basalt.imager.qemu import free_port
    from basalt.machinery.client.config import load_client_config
    from tests.vm.test_metal_node import _ctl

    disk = work / "node.qcow2"
    _run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(image_dir / "disk.raw"),
         "-F", "raw", str(disk), DISK_SIZE]
    )  # fmt: skip
    patch = work / "trust.yaml"
    patch.write_text(_trust_patch(bundles.public))
    out = work / "config"
    _ctl(
        *("gen", "config", "upg", f"https://{GUEST_ADDRESS}:6443", "-o", str(out)),
        *("--install-disk", "/dev/vda", "--additional-sans", address),
        *("--config-patch", f"@{patch}"),
    )
    _, context = load_client_config(out / "basaltconfig").current()
    node = Node(work, disk, work / "console.log", free_port(), out / "basaltconfig", context)
    node.address = address
    started = time.monotonic()
    node.start()
    try:
        node.wait(
            lambda: asyncio.run(call(node.endpoint, "Version", _empty(), timeout=5)),
            BOOT_TIMEOUT,
            "maintenance API",
        )
        env = {**os.environ, "BASALTCONFIG": str(node.basaltconfig)}
        applied = subprocess.run(
            [*BASALTCTL, "apply-config", "--insecure", "-n", node.endpoint,
             "-f", str(out / "controlplane.yaml")],
            env=env, capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        assert applied.returncode == 0, applied.stdout + applied.stderr + node.tail()
        node.wait(node.mtls, BOOT_TIMEOUT, "mTLS API after install")
        done = node.ctl("bootstrap", timeout=60)
        assert done.returncode == 0, done.stderr
        node.wait(lambda: node.mtls("Health").healthy, BOOT_TIMEOUT, "healthy after bootstrap")
    except BaseException:
        node.stop()
        raise
    elapsed = time.monotonic() - started
    timings.record("metal upgrade: QEMU start -> installed, healthy", elapsed)
    return node


@pytest.fixture(scope="module")
def node(
    image_dir: Path,
    bundles: Bundles,
    tmp_path_factory: pytest.TempPathFactory,
    timings: Timings,
) -> Iterator[Node]:
    node = install_node(image_dir, bundles, tmp_path_factory.mktemp("metal-upgrade"), timings)
    try:
        yield node
    finally:
        node.stop()


def test_the_imager_signs_its_own_bundle(bundles: Bundles) -> None:
    from basalt.machinery.images import required_payload, verification_key, verify_bundle

    verified = verify_bundle(
        bundles.v1, [verification_key(bundles.public)], "x86_64", required=required_payload("metal")
    )
    assert verified.version == "0.1.0"
    assert [f.path for f in verified.manifest.files] == ["initramfs", "kernel", "rootfs.squashfs"]


def test_a_fresh_install_boots_slot_a_good(node: Node) -> None:
    status = node.boot_status()
    assert (status["slot"], status["version"], status["onTrial"]) == ("a", "0.1.0", False)


def test_upgrade_v1_to_v2_comes_back_on_slot_b_healthy(
    node: Node, bundles: Bundles, timings: Timings
) -> None:
    started = time.monotonic()
    done = node.ctl("upgrade", "--image", str(bundles.v2), "--wait", "--timeout", "900")
    assert done.returncode == 0, done.stdout + done.stderr + node.tail()
    timings.record("metal upgrade: v1 -> v2 healthy on slot b", time.monotonic() - started)
    assert "verified bundle 0.2.0 (x86_64), signed by vm-release" in done.stderr
    assert "running slot b (0.2.0); health gates passed" in done.stdout
    status = node.boot_status()
    assert (status["slot"], status["version"], status["onTrial"]) == ("b", "0.2.0", False)
    assert (status["previousSlot"], status["previousVersion"]) == ("a", "0.1.0")
    assert node.mtls().tag == "0.2.0"
    console = node.console.read_text(errors="replace")
    assert "booted slot b (0.2.0) on trial (try 1 of 3)" in console
    assert "boot entry basalt-2-b-0.2.0+2-1.conf renamed to basalt-2-b-0.2.0.conf" in console
    assert any("slot b (0.2.0) passed its health gates: marked good" in e for e in node.events())


def test_rollback_boots_slot_a_again(node: Node, timings: Timings) -> None:
    started = time.monotonic()
    done = node.ctl("rollback")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "rolling back from slot b (0.2.0) to slot a" in done.stdout
    status = node.wait(
        lambda: (s := node.boot_status())["slot"] == "a" and s,
        BOOT_TIMEOUT,
        "slot a after rollback",
    )
    timings.record("metal upgrade: rollback -> slot a answers", time.monotonic() - started)
    assert status["version"] == "0.1.0" and not status["onTrial"]
    assert "rolled back from slot b (0.2.0)" in status["reason"]
    assert node.mtls().tag == "0.1.0"


def test_a_broken_upgrade_falls_back_to_slot_a_by_itself(
    node: Node, bundles: Bundles, timings: Timings
) -> None:
    node.wait(lambda: node.mtls("Health").healthy, BOOT_TIMEOUT, "healthy before the upgrade")
    started = time.monotonic()
    done = node.ctl("upgrade", "--image", str(bundles.broken))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "installed 0.3.0-broken in slot b" in done.stdout + done.stderr

    def fell_back() -> dict[str, Any] | None:
        status = node.boot_status()
        return status if status.get("fellBackFrom") == "b" else None

    status = node.wait(fell_back, 1500, "fallback to slot a")
    timings.record("metal upgrade: broken v3 -> fell back to slot a", time.monotonic() - started)
    assert (status["slot"], status["version"], status["onTrial"]) == ("a", "0.1.0", False)
    assert "waiting for broken: deliberately broken build" in status["reason"]
    assert status["reason"].endswith("its 3 boot tries ran out")
    console = node.console.read_text(errors="replace")
    assert console.count("booted slot b (0.3.0-broken) on trial") == 3
    assert any(
        "fell back from slot b (0.3.0-broken) because health gates did not pass" in e
        for e in node.events()
    )
    assert node.mtls().tag == "0.1.0"
