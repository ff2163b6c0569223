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

from basalt.machined.startup_bundle import STARTUP_MODULES

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


#: Basalt's modules that may be imported before the API opens (container and metal): the
#: start-up bundle's list (basalt/machined/startup_bundle.py).
ALLOWED_BASALT = STARTUP_MODULES

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
