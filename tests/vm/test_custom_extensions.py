"""A custom system extension in a real guest (QEMU, TCG): built from a source directory
by ``basaltctl extension build``, signed, pinned in a schematic and booted.

The extension (``hello``, tests/fixtures/extensions/hello/manifest.yaml) carries a
service with its own environment and provides ``/usr/local/bin/kubelet`` at its fixed
path; both programs are ``standin.c``, a small static program built here that prints
its arguments and, as ``kubelet``, serves ``ok`` on the kubelet's healthz port. It is a
stand-in that proves the wiring (machined starts the file at that path with the rendered
kubelet arguments), not a kubelet. The guest's initramfs also gets a second, damaged
extension appended (as a later cpio segment): the node must skip it, say why, and boot.
One boot serves the module.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.extensions import build_standin, hello_source
from tests.vm.conftest import TOOLS, Timings
from tests.vm.machine import Vm, call

pytestmark = pytest.mark.vm

REPO = Path(__file__).resolve().parents[2]
IMAGE = REPO / "_out" / "image-custom-ext"
BOOT_TIMEOUT = 150.0
GUEST_ADDRESS = "10.0.2.15"
_SCRIPT = Path(sys.executable).with_name("basaltctl")
BASALTCTL = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "basalt.cli.main"]


def _empty() -> Any:
    from basalt.machinery.api import common_pb2

    return common_pb2.Empty()


def _ctl(*args: str, config: Path | None = None) -> str:
    env = {**os.environ, **({"BASALTCONFIG": str(config)} if config else {})}
    result = subprocess.run(
        [*BASALTCTL, *args], env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert result.returncode == 0, (args, result.stdout, result.stderr)
    return result.stdout


@dataclass
class Built:
    image: dict[str, Any]
    directory: Path
    sha256: str


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """The extension (from source, with a fresh key), the image, and a copy of the
    image whose initramfs also carries a damaged extension."""
    missing = [tool for tool in (*TOOLS, "gcc") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed: run 'make image-deps' as root")
    from basalt.imager import pipeline
    from basalt.imager.custom import ExtensionSources
    from basalt.imager.extensions import append_segment, schematic_json, with_digests
    from basalt.machinery.images import generate_signing_key, verification_key
    from basalt.machinery.schematic import parse_schematic

    work = tmp_path_factory.mktemp("custom-ext")
    source = hello_source(work / "hello", build_standin(work / "standin"))
    private, public = generate_signing_key()
    (work / "ext.key").write_text(private)
    (work / "ext.pub").write_text(public)
    out = work / "hello.sqfs"
    key = str(work / "ext.key")
    printed = _ctl("extension", "build", str(source), "-o", str(out), "--signing-key", key)
    sha256 = printed.strip().splitlines()[-1]
    schematic_text = (
        "customization:\n"
        "  systemExtensions:\n"
        "    customExtensions:\n"
        f"      - path: hello.sqfs\n        sha256: {sha256}\n"
    )
    (work / "schematic.yaml").write_text(schematic_text)
    schematic = parse_schematic(schematic_text, str(work / "schematic.yaml"))
    sources = ExtensionSources(trusted=(verification_key(public, "test"),), base=work)
    image = pipeline.build(IMAGE, schematic=schematic, extension_sources=sources)
    # A copy whose initramfs gets one more segment: a damaged "broken.sqfs" (the
    # kernel unpacks segments in order, so it lands next to hello.sqfs).
    booted = work / "image"
    booted.mkdir()
    for name in ("vmlinuz", "initrd.img", "root.sqfs"):
        shutil.copyfile(IMAGE / name, booted / name)
    broken = work / "broken.sqfs"
    broken.write_bytes(b"not a squashfs\n" * 100)
    record = with_digests(schematic_json(schematic), [out])
    append_segment(booted / "initrd.img", [out, broken], record, work)
    return Built(image, booted, sha256)


@dataclass
class Node:
    vm: Vm
    basaltconfig: Path
    context: Any

    def ctl(self, *args: str) -> str:
        return _ctl(*args, "-e", self.vm.endpoint, config=self.basaltconfig)

    def call(self, method: str) -> Any:
        async def one() -> Any:
            answer = await call(self.vm.endpoint, method, _empty(), context=self.context)
            (message,) = answer.messages
            return message

        return asyncio.run(one())


@pytest.fixture(scope="module")
def node(
    built: Built, tmp_path_factory: pytest.TempPathFactory, timings: Timings
) -> Iterator[Node]:
    """The guest, configured as a control plane (its kubelet service is wanted)."""
    from basalt.machinery.client.config import load_client_config

    work = tmp_path_factory.mktemp("custom-node")
    vm = Vm.boot(built.directory, work)
    try:
        vm.wait(
            lambda: call(vm.endpoint, "Version", _empty(), timeout=5),
            BOOT_TIMEOUT,
            "maintenance API",
        )
        timings.record("custom extension: QEMU start -> maintenance API", vm.mark("maintenance"))
        out = work / "config"
        _ctl(
            *("gen", "config", "custom", f"https://{GUEST_ADDRESS}:6443", "-o", str(out)),
            *("--install-disk", "/dev/vda", "--additional-sans", "127.0.0.1"),
        )
        _, context = load_client_config(out / "basaltconfig").current()
        _ctl("apply-config", "--insecure", "-n", vm.endpoint, "-f", str(out / "controlplane.yaml"))
        vm.wait(
            lambda: call(vm.endpoint, "Version", _empty(), context=context, timeout=5),
            BOOT_TIMEOUT,
            "mTLS API after apply-config",
        )
        yield Node(vm, out / "basaltconfig", context)
    finally:
        vm.stop()
        timings.timelines["custom extension node"] = vm.timeline()


def _services(node: Node) -> dict[str, Any]:
    return {s.id: s for s in node.call("ServiceList").services}


def _wait_state(node: Node, service: str, state: str) -> Any:
    async def reached() -> Any:
        answer = await call(node.vm.endpoint, "ServiceList", _empty(), context=node.context)
        (listing,) = answer.messages
        found = {s.id: s for s in listing.services}
        assert service in found, sorted(found)
        assert found[service].state == state, found[service]
        return found[service]

    return node.vm.wait(reached, 120, f"{service} {state}", poll=0.5)


def test_image_records_the_custom_extension(built: Built) -> None:
    (extension,) = built.image["extensions"]
    assert extension["name"] == "hello" and extension["custom"] is True
    assert extension["sha256"] == built.sha256
    assert extension["provides"] == ["/usr/local/bin/kubelet"]
    assert extension["executables"] == ["/usr/bin/hello", "/usr/local/bin/kubelet"]
    inspected = _ctl("image", "inspect", str(IMAGE))
    assert "hello (2): /usr/bin/hello /usr/local/bin/kubelet" in inspected
    assert f"({len(built.image['executables'])} in the root)" in inspected


def test_extension_service_runs_with_its_environment(node: Node) -> None:
    _wait_state(node, "ext-hello", "running")
    logs = node.vm.wait(
        lambda: _async(lambda: node.ctl("logs", "ext-hello")),
        30,
        "ext-hello log",
    )
    assert "standin: hello started with 1 arguments" in logs, logs
    assert "standin: arg --from=extension" in logs, logs
    assert "standin: greeting hello from an extension" in logs, logs


def test_kubelet_service_starts_the_extension_file(node: Node) -> None:
    """The node's own kubelet service runs /usr/local/bin/kubelet with the kubelet
    arguments machined renders, instead of reporting 'kubelet binary not in image'."""
    _wait_state(node, "kubelet", "running")
    logs = node.ctl("logs", "kubelet")
    assert "standin: kubelet started" in logs, logs
    assert "standin: arg --config=" in logs or "standin: arg --kubeconfig=" in logs, logs
    assert "standin: serving healthz on 127.0.0.1:10248" in logs, logs
    # netstat lists the node address's sockets only; the healthz socket is on loopback,
    # and the log line above is printed once it is bound. The process is the file at
    # the fixed path:
    processes = node.ctl("ps")
    assert "/usr/local/bin/kubelet" in processes, processes


def test_fixed_path_is_a_read_only_overlay_and_root_stays_read_only(node: Node) -> None:
    mounts = {m.mounted_on: m for m in node.call("Mounts").stats}
    root = mounts["/"]
    assert "ro" in root.options.split(","), root
    overlay = mounts["/usr/local/bin"]
    assert overlay.type == "overlay" and "ro" in overlay.options.split(","), overlay
    assert "/usr/local/sbin" not in mounts  # only directories an extension fills
    listing = node.ctl("ls", "/usr/local/bin")
    assert "kubelet" in listing, listing


def test_damaged_extension_is_skipped_and_reported(node: Node) -> None:
    records = [
        json.loads(line) for line in node.ctl("get", "versions", "-o", "json").splitlines() if line
    ]
    (record,) = records
    spec = record["spec"]
    assert spec["extensions"] == ["hello 1.0.0"], spec
    skipped = spec.get("extensionsSkipped") or spec.get("extensions_skipped")
    assert skipped and any("broken" in line for line in skipped), spec
    assert "broken" in node.vm.console_text()


async def _async(function: Any) -> Any:
    return await asyncio.to_thread(function)
