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

In order: v1 -> v2 (``--reboot-mode kexec``) comes back on slot B healthy (the entry
marked good by renaming it on the ESP), by kexec: QEMU is not restarted; ``basaltctl
rollback --reboot-mode kexec`` boots slot A again, by kexec too; the broken build's first
try is a kexec, its failed gates reboot through the firmware, which counts the other two
tries and falls back to slot A by itself, which reports it. The URL and staged upgrades
reboot as by default: through the firmware.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
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

from basalt.imager.variant import SITE
from tests.fakes.releases import BROKEN_HEALTH
from tests.vm.bundle_server import BundleServer, tampered_copy
from tests.vm.conftest import Timings
from tests.vm.machine import call, uefi_disk_command
from tests.vm.test_metal_node import BASALTCTL, GUEST_ADDRESS, _empty

pytestmark = pytest.mark.vm

ADDRESS = "127.0.0.120"
DISK_SIZE = "4G"
BOOT_TIMEOUT = 300.0
BROKEN_TIMEOUT = 30


def _trust_patch(public_pem: str) -> str:
    indented = "".join(f"      {line}\n" for line in public_pem.splitlines())
    return (
        "apiVersion: basalt.dev/v1alpha1\nkind: ImageVerificationConfig\nkeys:\n"
        f"  - name: vm-release\n    publicKey: |\n{indented}"
    )


def _run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=True, **kwargs)


def _break(tree: Path) -> list[Path]:
    """The broken build's edits: a health check that always fails, and in its own init a
    short boot-assessment timeout."""
    health = tree / SITE / "basalt" / "machined" / "health.py"
    with health.open("a") as handle:
        handle.write(BROKEN_HEALTH)
    script = tree / "usr/sbin/init"
    before = script.read_text()
    after = before.replace(
        'main(["--platform", "metal"])',
        f'main(["--platform", "metal", "--boot-assessment-timeout", "{BROKEN_TIMEOUT}"])',
    )
    assert after != before
    script.write_text(after)
    return [health]


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
    from basalt.imager.variant import variant_bundle
    from basalt.machinery.images import generate_signing_key, load_signing_key

    work = tmp_path_factory.mktemp("bundles")
    private, public = generate_signing_key()
    (work / "release.key").write_text(private)
    # The imager signs its own bundle (cached stages: only the bundle is new).
    pipeline.build(image_dir, signing_key=work / "release.key")
    v1 = work / "v1.tar"
    shutil.copyfile(image_dir / pipeline.BUNDLE, v1)
    key = load_signing_key(private)
    v2 = variant_bundle(image_dir, work / "0.2.0.tar", "0.2.0", key)
    broken = variant_bundle(image_dir, work / "0.3.0-broken.tar", "0.3.0-broken", key, _break)
    return Bundles(work / "release.key", public, v1, v2, broken)


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
    #: More options of the user network (restrict=on, guestfwd=...).
    netdev_options: tuple[str, ...] = ()

    @property
    def endpoint(self) -> str:
        return f"{self.address}:{self.port}"

    def start(self) -> None:
        argv = uefi_disk_command(
            self.disk, self.port, address=self.address, netdev_options=self.netdev_options
        )
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

    def resets(self) -> int:
        """How many times the guest reset (qemu_runner started QEMU again)."""
        return self.console.read_bytes().count(b"qemu-runner: the guest rebooted")

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
    image_dir: Path,
    bundles: Bundles,
    work: Path,
    timings: Timings,
    address: str = ADDRESS,
    netdev_options: tuple[str, ...] = (),
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
    node.netdev_options = netdev_options
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
def bundle_server(bundles: Bundles) -> Iterator[BundleServer]:
    """The bundles over HTTP (``tampered.tar`` too), for the node to fetch."""
    tampered_copy(bundles.v2, bundles.v2.parent / "tampered.tar")
    server = BundleServer(bundles.v2.parent)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def node(
    image_dir: Path,
    bundles: Bundles,
    bundle_server: BundleServer,
    tmp_path_factory: pytest.TempPathFactory,
    timings: Timings,
) -> Iterator[Node]:
    from basalt.provision.qemu import relays_of

    work = tmp_path_factory.mktemp("metal-upgrade")
    options = bundle_server.netdev_options(work)
    node = install_node(image_dir, bundles, work, timings, netdev_options=options)
    try:
        yield node
    finally:
        node.stop()
        for pid in relays_of(str(work)):  # guest connections QEMU's end left behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_the_imager_signs_its_own_bundle(bundles: Bundles) -> None:
    from basalt.machinery.images import required_payload, verification_key, verify_bundle

    verified = verify_bundle(
        bundles.v1, [verification_key(bundles.public)], "x86_64", required=required_payload("metal")
    )
    assert verified.version == "0.1.0"
    assert [f.path for f in verified.manifest.files] == [
        "chunks.json",  # its chunk index: what an upgrade may leave out (ADR 0026)
        "initramfs",
        "kernel",
        "rootfs.squashfs",
    ]


def test_a_fresh_install_boots_slot_a_good(node: Node) -> None:
    status = node.boot_status()
    assert (status["slot"], status["version"], status["onTrial"]) == ("a", "0.1.0", False)


def test_upgrade_v1_to_v2_comes_back_on_slot_b_healthy(
    node: Node, bundles: Bundles, timings: Timings
) -> None:
    started = time.monotonic()
    resets = node.resets()
    done = node.ctl(
        "upgrade",
        "--image",
        str(bundles.v2),
        "--reboot-mode",
        "kexec",
        "--wait",
        "--timeout",
        "900",
    )
    assert done.returncode == 0, done.stdout + done.stderr + node.tail()
    timings.record("metal upgrade: v1 -> v2 healthy on slot b", time.monotonic() - started)
    assert node.resets() == resets  # kexec: the firmware did not run, QEMU was not restarted
    assert "verified bundle 0.2.0 (x86_64), signed by vm-release" in done.stderr
    # the node holds most of v2 in slot a (the image's chunk index): a delta goes
    assert re.search(r"sending \d+\.\d MB of the \d+\.\d MB bundle \(a delta", done.stderr)
    assert "running slot b (0.2.0); health gates passed" in done.stdout
    status = node.boot_status()
    assert (status["slot"], status["version"], status["onTrial"]) == ("b", "0.2.0", False)
    assert (status["previousSlot"], status["previousVersion"]) == ("a", "0.1.0")
    assert node.mtls().tag == "0.2.0"
    console = node.console.read_text(errors="replace")
    assert "rebooting by kexec into basalt-2-b-0.2.0+2-1.conf" in console
    assert "machined: kexec: stopping every process" in console
    assert "booted slot b (0.2.0) on trial (try 1 of 3)" in console
    assert "boot entry basalt-2-b-0.2.0+2-1.conf renamed to basalt-2-b-0.2.0.conf" in console
    assert "the boot names entry" not in console  # the command line named it, not the firmware
    assert any("slot b (0.2.0) passed its health gates: marked good" in e for e in node.events())


def test_rollback_boots_slot_a_again(node: Node, timings: Timings) -> None:
    started = time.monotonic()
    resets = node.resets()
    done = node.ctl("rollback", "--reboot-mode", "kexec")
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
    assert node.resets() == resets
    assert "rebooting by kexec into basalt-3-a-0.1.0.conf" in node.tail(200_000)


def test_a_broken_upgrade_falls_back_to_slot_a_by_itself(
    node: Node, bundles: Bundles, timings: Timings
) -> None:
    node.wait(lambda: node.mtls("Health").healthy, BOOT_TIMEOUT, "healthy before the upgrade")
    started = time.monotonic()
    resets = node.resets()
    done = node.ctl("upgrade", "--image", str(bundles.broken), "--reboot-mode", "kexec")
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
    # The first try by kexec; the failed gates reset through the firmware, which counts
    # the next two tries and then boots slot A.
    assert "rebooting by kexec into basalt-4-b-0.3.0-broken+2-1.conf" in console
    assert node.resets() == resets + 3
    assert any(
        "fell back from slot b (0.3.0-broken) because health gates did not pass" in e
        for e in node.events()
    )
    assert node.mtls().tag == "0.1.0"


# -- URL and staged upgrades ----------------------------------------------------------------


def _other_bundle(bundles: Bundles, running: str) -> tuple[Path, str]:
    """The good bundle of the version the node does not run."""
    return (bundles.v1, "0.1.0") if running == "0.2.0" else (bundles.v2, "0.2.0")


def _console_from(node: Node, offset: int) -> str:
    return node.console.read_bytes()[offset:].decode(errors="replace")


def _bundles_kept(node: Node, *directories: str) -> list[str]:
    """``.tar`` files below ``directories`` on the node (a missing directory holds none)."""
    found = []
    for directory in directories:
        listed = node.ctl("ls", "-r", directory, timeout=30)
        assert listed.returncode == 0 or "no such file" in listed.stderr.lower(), listed.stderr
        found += [line for line in listed.stdout.splitlines() if ".tar" in line]
    return found


def test_bundles_fetched_cut_short_or_tampered_are_refused_untouched(
    node: Node, bundles: Bundles, bundle_server: BundleServer
) -> None:
    node.wait(lambda: node.mtls("Health").healthy, BOOT_TIMEOUT, "healthy before the fetches")
    before, qemu = node.boot_status(), node.qemu_pid()
    offset = node.console.stat().st_size
    size = bundles.v2.stat().st_size
    cases = [
        (f"/cut/{bundles.v2.name}",
         f"the download ended after {size // 2} of the {size} bytes its Content-Length "
         "announced"),
        ("/tampered.tar",
         f"bundle from {bundle_server.guest_url('/tampered.tar')}: payload check failed: "
         "rootfs.squashfs: tampered: sha256"),
    ]  # fmt: skip
    for path, expected in cases:
        url = bundle_server.guest_url(path)
        done = node.ctl("upgrade", "--image", url, timeout=300)
        assert done.returncode != 0, done.stdout + done.stderr
        assert expected in done.stderr, done.stderr
        assert url in done.stderr
    # The node fetched both through the guestfwd, whole or cut as served.
    served = {(s.path, s.status, s.sent) for s in bundle_server.served}
    assert (f"/cut/{bundles.v2.name}", 200, size // 2) in served
    assert ("/tampered.tar", 200, size) in served
    # Untouched: same boot state, no reboot, nothing kept, still healthy.
    assert node.boot_status() == before
    assert node.qemu_pid() == qemu
    console = _console_from(node, offset)
    assert "reboot: Restarting system" not in console
    assert " in slot " not in console and "staged" not in console, console
    upload_dir = node.ctl("ls", "/var/upgrade", timeout=30)  # made by the first fetch
    assert upload_dir.returncode == 0, upload_dir.stderr
    assert _bundles_kept(node, "/var/upgrade", "/var/lib/basalt/staged") == []
    assert node.mtls("Health").healthy


def test_upgrade_from_a_url_the_node_fetches_itself(
    node: Node, bundles: Bundles, bundle_server: BundleServer, timings: Timings
) -> None:
    node.wait(lambda: node.mtls("Health").healthy, BOOT_TIMEOUT, "healthy before the upgrade")
    before = node.boot_status()
    bundle, version = _other_bundle(bundles, before["version"])
    target = "b" if before["slot"] == "a" else "a"
    url = bundle_server.guest_url(f"/{bundle.name}")
    started = time.monotonic()
    resets = node.resets()
    done = node.ctl("upgrade", "--image", url, "--wait", "--timeout", "900")
    assert done.returncode == 0, done.stdout + done.stderr + node.tail()
    assert node.resets() == resets + 1  # through the firmware: the default
    timings.record(f"metal upgrade: URL -> {version} healthy on slot {target}",
                   time.monotonic() - started)  # fmt: skip
    assert f"fetching {url}" in done.stderr
    assert f"verified bundle {version} (x86_64), signed by vm-release" in done.stderr
    assert f"running slot {target} ({version}); health gates passed" in done.stdout
    assert any(s.path == f"/{bundle.name}" and s.sent == bundle.stat().st_size
               for s in bundle_server.served)  # fmt: skip
    status = node.boot_status()
    assert (status["slot"], status["version"], status["onTrial"]) == (target, version, False)
    previous = (status["previousSlot"], status["previousVersion"])
    assert previous == (before["slot"], before["version"])
    assert node.mtls().tag == version


def test_a_staged_upgrade_is_installed_early_in_the_next_boot(
    node: Node, bundles: Bundles, timings: Timings
) -> None:
    node.wait(lambda: node.mtls("Health").healthy, BOOT_TIMEOUT, "healthy before staging")
    before = node.boot_status()
    bundle, version = _other_bundle(bundles, before["version"])
    target = "b" if before["slot"] == "a" else "a"
    offset = node.console.stat().st_size
    started = time.monotonic()
    # the other bundle may be the older one: this test is about staging, not versions
    done = node.ctl("upgrade", "--stage", "--allow-downgrade", "--image", str(bundle))
    assert done.returncode == 0, done.stdout + done.stderr + node.tail()
    assert f"verified bundle {version} (x86_64), signed by vm-release" in done.stderr
    assert f"staged {version}: it is installed early in the next boot; rebooting" in done.stdout

    def good_on_target() -> dict[str, Any] | None:
        status = node.boot_status()
        good = (status["slot"], status["version"], status["onTrial"]) == (target, version, False)
        return status if good else None

    status = node.wait(good_on_target, 2 * BOOT_TIMEOUT, f"slot {target} ({version}) good")
    timings.record(f"metal upgrade: --stage -> {version} healthy on slot {target}",
                   time.monotonic() - started)  # fmt: skip
    previous = (status["previousSlot"], status["previousVersion"])
    assert previous == (before["slot"], before["version"])
    assert node.mtls().tag == version
    # The order on the console: the stage answered, the node rebooted, wrote the slot
    # early in the next boot (the old slot still running) and rebooted again, then the
    # new slot booted on trial and passed its gates.
    console = _console_from(node, offset)
    marks = [
        "reboot: Restarting system",
        f"booted slot {before['slot']} ({before['version']})",
        f"staged upgrade: installed {version} in slot {target}",
        "reboot: Restarting system",
        f"booted slot {target} ({version}) on trial (try 1 of 3)",
        f"slot {target} ({version}) passed its health gates: marked good",
    ]
    at = 0
    for mark in marks:
        found = console.find(mark, at)
        assert found >= 0, f"{mark!r} not after offset {at}:\n{console[-6000:]}"
        at = found + len(mark)
    early = console[: console.find(f"staged upgrade: installed {version}")]
    early = early[early.rfind(f"booted slot {before['slot']}") :]
    assert "boot: staged upgrade: phase started" in early, early
    assert "API listening" not in early and "boot: services: phase started" not in early, early
    assert console.count("qemu-runner: the guest rebooted") == 2
    assert _bundles_kept(node, "/var/lib/basalt/staged") == []  # installed, then removed


def test_the_node_updates_itself_from_a_channel(
    node: Node, bundles: Bundles, bundle_server: BundleServer, image_dir: Path, timings: Timings
) -> None:
    """An UpdateConfig (applied live) follows the stable channel of a TUF repository the
    node reaches over HTTP: it takes the newer release by itself, through the same A/B
    path, and reports itself up to date on it."""
    from basalt.imager.variant import variant_bundle
    from basalt.machinery.images import load_signing_key
    from basalt.machinery.releases.repository import Repository

    node.wait(lambda: node.mtls("Health").healthy, BOOT_TIMEOUT, "healthy before the channel")
    before = node.boot_status()
    repo = Repository.init(bundles.v2.parent / "repo")
    key = load_signing_key(bundles.key.read_text())
    newer = variant_bundle(image_dir, bundles.v2.parent / "0.4.0.tar", "0.4.0", key)
    repo.publish(newer, "0.4.0", "x86_64", "stable")
    root = (repo.metadata / "1.root.json").read_text()
    update = {
        "apiVersion": "basalt.dev/v1alpha1",
        "kind": "UpdateConfig",
        "repository": bundle_server.guest_url("/repo/"),
        "root": root,
        "mode": "auto",
        "interval": "10s",
    }
    started = time.monotonic()
    done = node.ctl("patch", "machineconfig", "-p", json.dumps(update), timeout=120)
    assert done.returncode == 0 and "applies live" in done.stdout, done.stdout + done.stderr

    def updated() -> bool:
        status = node.boot_status()
        return status["version"] == "0.4.0" and not status["onTrial"]

    node.wait(updated, 900, "0.4.0 taken from the channel and healthy")
    timings.record("metal auto-update: config -> 0.4.0 healthy", time.monotonic() - started)
    target = "b" if before["slot"] == "a" else "a"
    assert node.boot_status()["slot"] == target
    got = node.ctl("get", "updatestatus", "-o", "json", timeout=30)
    spec = json.loads(got.stdout.splitlines()[0])["spec"]
    assert (spec["current"], spec["mode"], spec["channel"]) == ("0.4.0", "auto", "stable")
    node.wait(
        lambda: json.loads(node.ctl("get", "updatestatus", "-o", "json", timeout=30)
                           .stdout.splitlines()[0])["spec"]["state"] == "up-to-date",
        120, "up to date",
    )  # fmt: skip
    assert any(s.path.startswith("/repo/metadata/") for s in bundle_server.served)
    assert any(s.path == "/repo/targets/stable/basalt-0.4.0-x86_64.tar"
               for s in bundle_server.served)  # fmt: skip
