"""Runs metal-platform code inside namespaces that test_metal_network.py made.

``python metal_child.py COMMAND ARGS...``; prints one JSON object on its last line.
Always started inside a network namespace of the test's own (``ip netns exec``) and a
UTS and mount namespace (``unshare``), so the host's links, host name and mounts are
never touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from basalt.machined.platform.metal import MetalPlatform

METAL_CONTROLLERS = ("network", "resolvers", "hostname-apply", "sysctls", "kernel-modules")


def _node(root: Path, *, init: bool = False) -> Any:
    """A metal node below ``root``; with ``init``, prepare() mounts as PID 1 would (this
    process is in a mount namespace of its own), so /proc/sys below ``root`` is real."""
    from basalt.machined.assemble import build_node

    platform = MetalPlatform.create(address="0.0.0.0", hostname="child-node", root=root, init=init)
    return build_node(platform)


def _bundle(text: str) -> Any:
    from basalt.machinery.config import load_bundle

    return load_bundle(text, "test")


async def links(root: Path, *configs: str) -> dict[str, Any]:
    """Reconcile each LinkConfig in turn, printing NodeAddresses and waiting for a line on
    stdin in between, so the test can look at the kernel's state after each one."""
    from basalt.machined.controllers.network import NetworkConfigError, NetworkController

    node = _node(root)
    controller = NetworkController(node)
    for step, text in enumerate(configs):
        node.use_config(_bundle(text))
        error = None
        try:
            await controller.reconcile(node.store)
        except NetworkConfigError as exc:
            error = str(exc)
        first = _addresses(node)
        with contextlib.suppress(NetworkConfigError):
            await controller.reconcile(node.store)  # a second run changes nothing
        print(
            json.dumps(
                {"step": step, "addresses": first, "again": _addresses(node), "error": error}
            )
        )
        sys.stdout.flush()
        await asyncio.to_thread(sys.stdin.readline)
    return {"done": True}


def _addresses(node: Any) -> list[str] | None:
    resource = node.store.get("NodeAddresses", "current")
    return None if resource is None else list(resource.spec.addresses)


async def dhcp(root: Path, config: str) -> dict[str, Any]:
    """The whole controller engine with DHCP (no LinkConfig: the default link)."""
    from basalt.machined.controllers import start_engine
    from basalt.machined.controllers.network import NetworkController, wait_for_address

    node = _node(root, init=True)
    await asyncio.to_thread(node.platform.prepare)
    if config:
        node.use_config(_bundle(config))
    engine = start_engine(node)
    address = await asyncio.wait_for(wait_for_address(node), 30)
    network = next(c for c in engine.controllers if isinstance(c, NetworkController))
    while not network.leases.items():  # a static address may come first
        await asyncio.sleep(0.1)
    (_, lease), *_ = network.leases.items()
    first = lease.acquired
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # wait for a renewal at T1
        (_, current), *_ = network.leases.items()
        if current.acquired != first:
            break
        await asyncio.sleep(0.2)
    etc = node.platform.generated_etc
    out = {
        "address": address,
        "lease": str(lease.address),
        "renewed": current.acquired - first,
        "renewal_time": lease.renewal_time,
        "resolv_conf": (etc / "resolv.conf").read_text(),
        "hosts": (etc / "hosts").read_text(),
        "hostname_file": (etc / "hostname").read_text(),
        "kernel_hostname": os.uname().nodename,
        "errors": {k: v for k, v in engine.errors.items() if k in METAL_CONTROLLERS},
    }
    await engine.stop()
    await node.stop_background()
    return out


async def dhcp_first(root: Path) -> dict[str, Any]:
    """A first boot's network: the gate the boot closes before its maintenance API opens
    is closed, so DHCP starts from sysfs and the lease goes on the link through
    rtnetlink directly; the kernel's state then, and whether pyroute2 was imported."""
    from basalt.machined.controllers import start_engine
    from basalt.machined.controllers.network import NetworkController, wait_for_address

    node = _node(root, init=True)
    await asyncio.to_thread(node.platform.prepare)
    node.api_first.clear()
    engine = start_engine(node)
    network = next(c for c in engine.controllers if isinstance(c, NetworkController))
    deadline = time.monotonic() + 30
    while not network.leases.items() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    before = {
        "pyroute2": "pyroute2" in sys.modules,
        "published": node.store.get("NodeAddresses", "current") is not None,
        "addresses": json.loads(_ip("-4", "address", "show", "dev", "eth0")),
        "routes": json.loads(_ip("-4", "route")),
    }
    node.api_first.set()  # the API listens: netlink goes on
    address = await asyncio.wait_for(wait_for_address(node), 30)
    out = {
        "before": before,
        "address": address,
        "pyroute2": "pyroute2" in sys.modules,
        "errors": {k: v for k, v in engine.errors.items() if k in METAL_CONTROLLERS},
    }
    await engine.stop()
    await node.stop_background()
    return out


def _ip(*args: str) -> str:
    return subprocess.run(["ip", "-j", *args], capture_output=True, text=True, check=True).stdout


async def sysctls(root: Path, config: str) -> dict[str, Any]:
    from basalt.machined.controllers.sysctls import SysctlError, SysctlsController

    node = _node(root)
    node.use_config(_bundle(config))
    error = None
    try:
        await SysctlsController(node).reconcile(node.store)
    except SysctlError as exc:
        error = str(exc)
    return {"error": error}


async def prepare(root: Path) -> dict[str, Any]:
    """MetalPlatform.prepare() as if PID 1, below ``root`` (in a private mount namespace)."""
    from basalt.machined.sys.mount import mounted_targets

    platform = MetalPlatform.create(address="0.0.0.0", hostname="m1", root=root, init=True)
    platform.prepare()
    platform.prepare()  # again: nothing is mounted twice
    targets = sorted(t for t in mounted_targets() if t.startswith(str(root)))
    etc = root / "etc" / "resolv.conf"
    try:
        etc.write_text("nameserver 192.0.2.1\n")
        write_error = None
    except OSError as exc:
        write_error = exc.strerror
    (platform.generated_etc / "resolv.conf").write_text("nameserver 192.0.2.53\n")
    return {
        "targets": targets,
        "mount_count": len([t for t in _mountinfo() if t.startswith(str(root))]),
        "write_error": write_error,
        "through_bind": etc.read_text(),
        "hostname_file": (root / "etc" / "hostname").read_text(),
        "fstypes": {t: f for t, f, _ in _mountinfo_full() if t.startswith(str(root))},
    }


def _mountinfo() -> list[str]:
    return [t for t, _, _ in _mountinfo_full()]


def _mountinfo_full() -> list[tuple[str, str, str]]:
    from basalt.machined.sys.mount import parse_mountinfo

    return parse_mountinfo(Path("/proc/self/mountinfo").read_text())


async def reaper() -> dict[str, Any]:
    """As PID 1 of a PID namespace: orphans are reaped, owned children keep their status."""
    from basalt.machined.sys.reaper import Reaper

    assert os.getpid() == 1
    reap = Reaper(grace=0.3, interval=1.0)
    reap.install()
    # Orphans: a shell-free double fork whose middle process exits at once.
    orphan_code = "import os,time\nif os.fork()==0:\n    time.sleep(0.3); os._exit(7)\nos._exit(0)"
    for _ in range(5):
        await (await asyncio.create_subprocess_exec(sys.executable, "-c", orphan_code)).wait()
    # Owned children: asyncio's and a thread's subprocess.run keep their exit codes.
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "import time,sys; time.sleep(0.5); sys.exit(3)"
    )
    threaded: list[int] = []

    def in_thread() -> None:
        script = "import time,sys; time.sleep(0.7); sys.exit(5)"
        threaded.append(subprocess.run([sys.executable, "-c", script], check=False).returncode)

    thread = threading.Thread(target=in_thread)
    thread.start()
    async_code = await proc.wait()
    await asyncio.to_thread(thread.join)
    deadline = time.monotonic() + 10
    while len(reap.reaped) < 5 and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    zombies = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "stat").read_text().rpartition(")")[2].split()[0] == "Z":
                    zombies.append(int(entry.name))
    await reap.stop()
    return {
        "reaped_codes": sorted(os.waitstatus_to_exitcode(s) for _, s in reap.reaped),
        "async_code": async_code,
        "threaded_code": threaded[0],
        "zombies": zombies,
    }


def main() -> None:
    command, *args = sys.argv[1:]
    if command == "power":
        # As PID 1 of a PID namespace: run_as_init ends the namespace by reboot(2).
        from basalt.machined.platform.metal import run_as_init

        code = int(args[0])

        def agent() -> int:
            if code < 0:
                raise RuntimeError("the agent crashed")
            subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
            return code

        run_as_init(agent, fatal_delay=0.5)
        return
    handlers = {
        "links": links,
        "dhcp": dhcp,
        "dhcp_first": dhcp_first,
        "sysctls": sysctls,
        "prepare": prepare,
    }
    if command == "reaper":
        result = asyncio.run(reaper())
    else:
        result = asyncio.run(handlers[command](Path(args[0]), *args[1:]))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
