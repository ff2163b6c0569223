"""System extensions in a real guest: an image built with a schematic that names
qemu-guest-agent boots in QEMU (TCG) with a guest agent channel; the host talks to the
agent over its socket, and the node's API shows the extension service running and the
schematic id. One boot serves the module.

The image is built from ``examples/schematic-qemu.yaml`` into ``_out/image-qemu-ga``
(stages shared with the default image through ``_out/cache``).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.vm.conftest import TOOLS, Timings
from tests.vm.machine import Vm, call

pytestmark = pytest.mark.vm

REPO = Path(__file__).resolve().parents[2]
SCHEMATIC = REPO / "examples" / "schematic-qemu.yaml"
IMAGE = REPO / "_out" / "image-qemu-ga"
SERVICE = "ext-qemu-guest-agent"
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
        [*BASALTCTL, *args], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, (args, result.stdout, result.stderr)
    return result.stdout


@pytest.fixture(scope="module")
def image() -> dict[str, Any]:
    """The qemu-guest-agent image (built or reused), as ``image.json`` describes it."""
    import shutil

    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed: run 'make image-deps' as root")
    from basalt.imager import pipeline
    from basalt.machinery.schematic import read_schematic

    return pipeline.build(IMAGE, schematic=read_schematic(SCHEMATIC))


@dataclass
class Node:
    vm: Vm
    qga: Path
    basaltconfig: Path
    context: Any

    def ctl(self, *args: str) -> str:
        return _ctl(*args, "-e", self.vm.endpoint, config=self.basaltconfig)


@pytest.fixture(scope="module")
def node(
    image: dict[str, Any], tmp_path_factory: pytest.TempPathFactory, timings: Timings
) -> Iterator[Node]:
    """The guest with a guest agent channel, configured (mTLS) with a generated config."""
    from basalt.machinery.client.config import load_client_config

    work = tmp_path_factory.mktemp("ext")
    qga = work / "qga.sock"
    extra = " ".join(image["schematic"]["extraKernelArgs"])
    vm = Vm.boot(IMAGE, work, qga=qga, extra_cmdline=extra)
    try:
        vm.wait(
            lambda: call(vm.endpoint, "Version", _empty(), timeout=5),
            BOOT_TIMEOUT,
            "maintenance API",
        )
        timings.record("extensions: QEMU start -> maintenance API", vm.mark("maintenance"))
        out = work / "config"
        _ctl(
            *("gen", "config", "ext", f"https://{GUEST_ADDRESS}:6443", "-o", str(out)),
            *("--install-disk", "/dev/vda", "--additional-sans", "127.0.0.1"),
        )
        _, context = load_client_config(out / "basaltconfig").current()
        _ctl("apply-config", "--insecure", "-n", vm.endpoint, "-f", str(out / "controlplane.yaml"))
        vm.wait(
            lambda: call(vm.endpoint, "Version", _empty(), context=context, timeout=5),
            BOOT_TIMEOUT,
            "mTLS API after apply-config",
        )
        yield Node(vm, qga, out / "basaltconfig", context)
    finally:
        vm.stop()
        timings.timelines["extensions node"] = vm.timeline()


def _wait_running(node: Node) -> Any:
    async def running() -> Any:
        answer = await call(node.vm.endpoint, "ServiceList", _empty(), context=node.context)
        (services,) = answer.messages
        found = {s.id: s for s in services.services}
        assert SERVICE in found, sorted(found)
        assert found[SERVICE].state == "running", found[SERVICE]
        return found[SERVICE]

    return node.vm.wait(running, 60, f"{SERVICE} running", poll=0.5)


def _qga(path: Path, command: dict[str, Any], timeout: float = 30.0) -> Any:
    """One guest agent command over the host end of the channel; its ``return`` value.

    guest-sync with a fresh id first, so a reply left over from an earlier exchange is
    never taken for this one (the channel is a byte stream without framing)."""
    token = int(time.monotonic() * 1000) % 2**31
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        reader = sock.makefile("rb")
        sock.sendall(json.dumps({"execute": "guest-sync", "arguments": {"id": token}}).encode())
        while True:
            reply = json.loads(reader.readline())
            if reply.get("return") == token:
                break
        sock.sendall(json.dumps(command).encode())
        reply = json.loads(reader.readline())
    assert "return" in reply, reply
    return reply["return"]


def test_image_records_the_schematic_and_the_extension(image: dict[str, Any]) -> None:
    from basalt.machinery.schematic import read_schematic

    schematic = read_schematic(SCHEMATIC)
    assert image["schematic"]["id"] == schematic.id
    (extension,) = image["extensions"]
    assert extension["name"] == "qemu-guest-agent"
    assert extension["version"] == image["packages"]["qemu-guest-agent"]
    assert extension["executables"] == ["/usr/sbin/qemu-ga"]
    inspected = _ctl("image", "inspect", str(IMAGE))
    assert f"schematic:   {schematic.id}" in inspected
    assert f"qemu-guest-agent         {extension['version']}" in inspected
    assert f"({len(image['executables'])} in the root)" in inspected


def test_extension_squashfs_is_reproducible(image: dict[str, Any], tmp_path: Path) -> None:
    """The extension stage run again (its inputs from the cache) gives the same bytes."""
    from basalt.imager import lock as lockfile
    from basalt.imager import pipeline
    from basalt.imager.stage import Cache, sha256_file
    from basalt.machinery.schematic import read_schematic

    wired = pipeline.Pipeline.from_lock(lockfile.read(), read_schematic(SCHEMATIC))
    (stage,) = wired.extensions
    stage.run(tmp_path, Cache(pipeline.DEFAULT_CACHE))
    assert sha256_file(tmp_path / "qemu-guest-agent.sqfs") == image["extensions"][0]["sha256"]


def test_extension_service_runs_under_the_supervisor(node: Node) -> None:
    _wait_running(node)
    listing = node.ctl("services")
    rows = [line.split()[1:3] for line in listing.splitlines()[1:]]  # NODE SERVICE STATE ...
    assert [SERVICE, "RUNNING"] in rows, listing
    node.ctl("logs", SERVICE)  # its log exists (qemu-ga is quiet unless asked)


def test_host_talks_to_the_guest_agent(node: Node, image: dict[str, Any]) -> None:
    _wait_running(node)
    assert node.vm.wait(lambda: _async(_qga, node.qga, {"execute": "guest-ping"}), 60, "ping") == {}
    info = _qga(node.qga, {"execute": "guest-info"})
    upstream = image["packages"]["qemu-guest-agent"].split(":", 1)[-1].split("+")[0]
    assert info["version"].startswith(upstream), (info["version"], upstream)
    commands = {c["name"] for c in info["supported_commands"] if c["enabled"]}
    assert {"guest-ping", "guest-info", "guest-get-osinfo"} <= commands
    osinfo = _qga(node.qga, {"execute": "guest-get-osinfo"})
    assert osinfo["kernel-release"] == image["kernel"]["release"]
    guest_time = _qga(node.qga, {"execute": "guest-get-time"}) / 1e9
    assert abs(guest_time - time.time()) < 3600, guest_time
    interfaces = _qga(node.qga, {"execute": "guest-network-get-interfaces"})
    addresses = {a["ip-address"] for i in interfaces for a in i.get("ip-addresses", [])}
    assert GUEST_ADDRESS in addresses, interfaces


def test_node_reports_its_schematic(node: Node, image: dict[str, Any]) -> None:
    records = [
        json.loads(line) for line in node.ctl("get", "versions", "-o", "json").splitlines() if line
    ]
    (record,) = records
    spec = record["spec"]
    assert spec["schematic"] == image["schematic"]["id"]
    assert spec["extensions"] == [f"qemu-guest-agent {image['extensions'][0]['version']}"]


def test_extension_is_a_read_only_squashfs_on_a_read_only_tmpfs(node: Node) -> None:
    async def mounts() -> Any:
        answer = await call(node.vm.endpoint, "Mounts", _empty(), context=node.context)
        (listing,) = answer.messages
        return {m.mounted_on: m for m in listing.stats}

    found = asyncio.run(mounts())
    holder = found["/usr/lib/basalt/extensions"]
    assert holder.type == "tmpfs" and "ro" in holder.options.split(","), holder
    extension = found["/usr/lib/basalt/extensions/qemu-guest-agent"]
    assert extension.type == "squashfs" and "ro" in extension.options.split(","), extension
    assert extension.filesystem.startswith("/dev/loop"), extension
    assert "extension qemu-guest-agent" in node.vm.console_text()


async def _async(function: Any, *args: Any) -> Any:
    return await asyncio.to_thread(function, *args)
