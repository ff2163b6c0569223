"""What machined imports before its maintenance API opens.

Under TCG a metal node's first boot pays seconds for every import on the way to its
first API answer (bench/boot), so the way there imports what serving the API needs and
nothing of what comes later: the config models (pydantic's schemas for every document
kind), YAML, bundle signatures, the Kubernetes renderers, applying or installing a
config. This starts a real machined in container mode with ``-X importtime`` and reads
which modules it had imported when it logged "API listening"; where the host allows it,
also a metal one as PID 1 of its own namespaces (pid, mount, network, UTS), the way a
machine's first boot runs it.

Besides the modules that must not come early (:data:`LATER`), every module imported
before the API opens must be on an allow-list (:data:`ALLOWED_BASALT`,
:data:`ALLOWED_PACKAGES`): a new import on that path fails here, so start-up does not
grow silently. When it does, import the module where it is first used; add it to the
list only when the API cannot open without it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ADDRESS = "127.0.0.250"
#: Not needed before the maintenance API answers (each pulls in others).
LATER = (
    "basalt.machinery.config",
    "pydantic",
    "yaml",
    "jsonpatch",
    "basalt.machinery.images.keys",
    "basalt.machinery.images.verify",
    "basalt.machinery.kubernetes.render",
    "basalt.machined.apply",
    "basalt.machined.install",
    "basalt.machined.identity",
)


def _names(text: str) -> frozenset[str]:
    return frozenset(text.split())


#: Basalt's modules that may be imported before the API opens (container and metal).
ALLOWED_BASALT = _names(
    """
    basalt basalt.machined basalt.machined.main basalt.machined.assemble
    basalt.machined.api basalt.machined.api.auth basalt.machined.api.dispatch
    basalt.machined.api.certificate_helper
    basalt.machined.api.errors basalt.machined.api.server basalt.machined.api.tls
    basalt.machined.boot basalt.machined.boot.esp_check basalt.machined.boot.esp_repair
    basalt.machined.boot.fat basalt.machined.boot.meta basalt.machined.boot.metal_slots
    basalt.machined.config_url basalt.machined.events basalt.machined.extensions
    basalt.machined.fleet basalt.machined.node basalt.machined.ports basalt.machined.updater
    basalt.machined.controllers basalt.machined.controllers.discovery
    basalt.machined.controllers.hostname basalt.machined.controllers.hostname_apply
    basalt.machined.controllers.kernel_modules basalt.machined.controllers.kernel_params
    basalt.machined.controllers.kubernetes basalt.machined.controllers.members
    basalt.machined.controllers.network basalt.machined.controllers.network_status
    basalt.machined.controllers.node_addresses basalt.machined.controllers.polling
    basalt.machined.controllers.resolvers basalt.machined.controllers.storage_status
    basalt.machined.controllers.sysctls basalt.machined.controllers.system_stats
    basalt.machined.controllers.timesync basalt.machined.controllers.version
    basalt.machined.platform basalt.machined.platform.etc basalt.machined.platform.metal
    basalt.machined.runtime basalt.machined.runtime.controller
    basalt.machined.runtime.sequencer basalt.machined.runtime.store
    basalt.machined.sequencer basalt.machined.sequencer.sequences
    basalt.machined.services basalt.machined.services.logs basalt.machined.services.runners
    basalt.machined.services.service basalt.machined.services.supervisor
    basalt.machined.storage basalt.machined.storage.partitions basalt.machined.storage.state
    basalt.machined.sys basalt.machined.sys._libc basalt.machined.sys.clock
    basalt.machined.sys.cmdline basalt.machined.sys.dhcp basalt.machined.sys.dhcp.client
    basalt.machined.sys.dhcp.packet basalt.machined.sys.ifaces basalt.machined.sys.kexec
    basalt.machined.sys.kmod basalt.machined.sys.loop basalt.machined.sys.mount
    basalt.machined.sys.netlink basalt.machined.sys.power basalt.machined.sys.procstat
    basalt.machined.sys.reaper basalt.machined.sys.rtnl basalt.machined.sys.sysctl
    basalt.machined.upgrade basalt.machined.upgrade.drain basalt.machined.upgrade.jobs
    basalt.machined.upgrade.receive basalt.machined.upgrade.slots
    basalt.machined.upgrade.upgrader
    basalt.machinery basalt.machinery.api basalt.machinery.api.common_pb2
    basalt.machinery.api.machine_pb2 basalt.machinery.api.machine_pb2_grpc
    basalt.machinery.api.resource_pb2 basalt.machinery.api.resource_pb2_grpc
    basalt.machinery.api.status basalt.machinery.api.trust_pb2
    basalt.machinery.api.trust_pb2_grpc
    basalt.machinery.boot basalt.machinery.boot.assessment basalt.machinery.boot.codecs
    basalt.machinery.boot.entries basalt.machinery.boot.esp basalt.machinery.boot.slots
    basalt.machinery.client basalt.machinery.client.client
    basalt.machinery.disk basalt.machinery.disk.gpt basalt.machinery.disk.layout
    basalt.machinery.elf basalt.machinery.errors basalt.machinery.fileio
    basalt.machinery.image_layout basalt.machinery.images basalt.machinery.images.errors
    basalt.machinery.images.manifest basalt.machinery.images.payload
    basalt.machinery.kubernetes basalt.machinery.kubernetes.paths basalt.machinery.launch
    basalt.machinery.lazy basalt.machinery.pki basalt.machinery.resources
    basalt.machinery.resources.definitions basalt.machinery.resources.record
    basalt.machinery.resources.specs
    basalt.machinery.roles basalt.machinery.schematic basalt.machinery.sntp
    """
)
#: Other top-level packages (the standard library's are all allowed): gRPC and protobuf
#: serve the API, cryptography makes its certificate. Not pydantic: resource specs are
#: dataclasses (basalt.machinery.resources.record); the config models load with a config.
ALLOWED_PACKAGES = frozenset(
    {
        "grpc",
        "google",
        "cryptography",
        "_cffi_backend",
        "typing_extensions",  # grpc.aio's
        # Looked for and absent in the image: grpc's and cryptography's optional
        # companions, the host's site hooks, platform's Java probe.
        "grpc_tools",
        "grpc_health",
        "grpc_reflection",
        "bcrypt",
        "sitecustomize",
        "usercustomize",
        "_distutils_hack",
        "org",
    }
)
#: Container mode only: its network status controller reads links (pyroute2) in a
#: thread from the start; on metal the network waits for the maintenance API. And its
#: maintenance certificate is made in process: as PID 1, machined leaves cryptography to
#: the helper it forks at start (api/certificate_helper.py).
CONTAINER_ONLY_PACKAGES = frozenset({"pyroute2", "cryptography", "_cffi_backend"})
METAL_PACKAGES = ALLOWED_PACKAGES - CONTAINER_ONLY_PACKAGES
SLOT_MODULES = ("basalt.machinery.boot", "basalt.machined.boot")


def outside_allow_list(modules: list[str], packages: frozenset[str]) -> list[str]:
    stdlib = sys.stdlib_module_names
    found = set()
    for name in modules:
        top = name.split(".")[0]
        if top == "basalt":
            if name not in ALLOWED_BASALT:
                found.add(name)
        elif top not in stdlib and top not in packages and not top.startswith("_sysconfigdata"):
            found.add(name)
    return sorted(found)


def imported_before_api(node_dir: Path) -> list[str]:
    argv = [sys.executable, "-X", "importtime", "-m", "basalt.machined"]
    argv += ["--platform", "container", "--node-dir", str(node_dir)]
    argv += ["--address", ADDRESS, "--hostname", "imports"]
    return _read_imports(argv)


def _read_imports(argv: list[str]) -> list[str]:
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    modules: list[str] = []
    deadline = time.monotonic() + 60
    try:
        assert process.stderr is not None
        for line in process.stderr:
            if "API listening" in line:
                return modules
            if line.startswith("import time:") and "cumulative" not in line:
                modules.append(line.rsplit("|", 1)[1].strip())
            assert time.monotonic() < deadline, "machined did not open its API in 60 s"
        raise AssertionError(f"machined exited ({process.wait()}) before its API opened")
    finally:
        process.kill()
        process.wait()


def test_the_maintenance_api_opens_before_config_models_and_signatures(tmp_path: Path) -> None:
    modules = imported_before_api(tmp_path / "node")
    assert "grpc" in modules and "basalt.machined.api.server" in modules  # it did measure
    early = sorted(name for name in LATER if name in modules)
    assert early == [], f"imported before the maintenance API opened: {early}"


def test_only_allowed_modules_come_before_the_api(tmp_path: Path) -> None:
    modules = imported_before_api(tmp_path / "node")
    assert "grpc" in modules  # it did measure
    outside = outside_allow_list(modules, ALLOWED_PACKAGES | CONTAINER_ONLY_PACKAGES)
    assert outside == [], f"imported before the API opened, not on the allow-list: {outside}"


def _namespaces_work() -> bool:
    if shutil.which("unshare") is None:
        return False
    done = subprocess.run(
        ["unshare", "--kill-child", "-fpmnu", "--mount-proc", "true"],
        check=False,
        capture_output=True,
        timeout=30,
    )
    return done.returncode == 0


def test_a_metal_first_boot_imports_only_allowed_modules_before_its_api(tmp_path: Path) -> None:
    """machined as PID 1 (of its own pid, mount, network and UTS namespaces: what it mounts,
    names and configures stays there), no config: the maintenance API a first boot opens."""
    if not _namespaces_work():
        pytest.skip("needs unshare with pid, mount, network and UTS namespaces (root)")
    node_dir = tmp_path / "node"
    node_dir.mkdir()
    argv = ["unshare", "--kill-child", "-fpmnu", "--mount-proc"]
    argv += [sys.executable, "-X", "importtime", "-m", "basalt.machined", "--platform", "metal"]
    argv += ["--node-dir", str(node_dir), "--hostname", "imports"]
    modules = _read_imports(argv)
    assert "basalt.machined.platform.metal" in modules  # it did boot as metal
    early = sorted(name for name in LATER if name in modules)
    assert early == [], f"imported before the maintenance API opened: {early}"
    # No slots on a first boot from memory: the boot-state model and the metal slots
    # (the ESP, META, systemd-boot entries) wait until there are some.
    slots = [m for m in modules if m.startswith(SLOT_MODULES)]
    assert slots == [], f"imported before a first boot's API opened: {slots}"
    outside = outside_allow_list(modules, METAL_PACKAGES)
    assert outside == [], f"imported before the API opened, not on the allow-list: {outside}"


def test_the_metal_platform_and_its_controllers_import_no_config_models() -> None:
    """Container mode does not start the metal controllers (network, kernel modules,
    sysctls, resolvers, time): their modules must not pull the config models in either."""
    script = (
        "import sys\n"
        "import basalt.machined.platform.metal, basalt.machined.controllers\n"
        "from basalt.machined.controllers import (hostname_apply, kernel_modules, network,\n"
        "    resolvers, sysctls, timesync)\n"
        f"print(' '.join(m for m in {list(LATER)!r} if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == []
