"""Boot the image in QEMU (TCG) and talk to machined, PID 1 on a read-only squashfs root."""

from __future__ import annotations

import asyncio
import re
import subprocess
import time
from pathlib import Path

import pytest

import basalt
from basalt.imager.qemu import direct_kernel_command, free_port

pytestmark = pytest.mark.vm

BOOT_TIMEOUT = 120.0
_STAMP = re.compile(rb"\[\s*([0-9.]+)\] basalt-init: (.*)")


async def _first_version(port: int, qemu: subprocess.Popen[bytes], started: float) -> object:
    """Poll the maintenance API until Version answers; None if QEMU dies or time runs out."""
    from basalt.machinery.api import common_pb2
    from basalt.machinery.client.client import Client

    while time.monotonic() - started < BOOT_TIMEOUT:
        if qemu.poll() is not None:
            return None
        try:
            client = await Client.connect(f"127.0.0.1:{port}", insecure=True)
        except Exception:
            await asyncio.sleep(0.2)
            continue
        try:
            return await client.machine.Version(common_pb2.Empty(), timeout=5)
        except Exception:
            await asyncio.sleep(0.2)
        finally:
            await client.close()
    return None


@pytest.mark.parametrize("machine", ["microvm", "q35"])
def test_boots_into_maintenance_mode(image_dir: Path, tmp_path: Path, machine: str) -> None:
    port = free_port()
    console = tmp_path / "console.log"
    argv = direct_kernel_command(image_dir, port, machine=machine)
    with console.open("wb") as log:
        started = time.monotonic()
        qemu = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        try:
            answer = asyncio.run(_first_version(port, qemu, started))
            elapsed = time.monotonic() - started
        finally:
            qemu.kill()
            qemu.wait()
    text = console.read_bytes()
    assert answer is not None, f"no API answer within {BOOT_TIMEOUT:.0f} s; console:\n" + (
        text[-4000:].decode(errors="replace")
    )
    (info,) = answer.messages  # type: ignore[attr-defined]
    assert info.mode == "maintenance"
    assert info.tag == basalt.__version__
    assert info.hostname == "basalt"
    assert info.python.startswith("3.11.")
    print(f"\n{machine}: QEMU start -> first Version answer: {elapsed:.1f} s (host wall clock)")
    for uptime, what in _STAMP.findall(text):
        print(f"  kernel uptime {float(uptime):6.2f} s  {what.decode(errors='replace')}")


def test_root_has_no_shell(image_dir: Path) -> None:
    listing = subprocess.run(
        ["unsquashfs", "-l", "-d", "", str(image_dir / "root.sqfs")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    paths = {line.strip() for line in listing.splitlines() if line.strip()}
    assert {"/usr/bin/python3.11", "/usr/sbin/init", "/bin"} <= paths
    # /bin, /sbin are symlinks into /usr: a shell would be listed under /usr.
    for name in ("sh", "bash", "dash", "busybox", "ls", "mount", "apt", "dpkg", "pip"):
        for directory in ("/usr/bin", "/usr/sbin", "/bin", "/sbin"):
            assert f"{directory}/{name}" not in paths
    from basalt.imager import pipeline

    manifest = pipeline.inspect(image_dir)
    assert manifest["executables"] == ["/usr/bin/etcd", "/usr/bin/python3.11", "/usr/sbin/init"]
