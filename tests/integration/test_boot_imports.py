"""What machined imports before its maintenance API opens.

Under TCG a metal node's first boot pays seconds for every import on the way to its
first API answer (bench/boot), so the way there imports what serving the API needs and
nothing of what comes later: the config models (pydantic's schemas for every document
kind), YAML, bundle signatures, the Kubernetes renderers, applying or installing a
config. This starts a real machined in container mode with ``-X importtime`` and reads
which modules it had imported when it logged "API listening".
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

ADDRESS = "127.0.0.250"
#: Not needed before the maintenance API answers (each pulls in others).
LATER = (
    "basalt.machinery.config",
    "yaml",
    "jsonpatch",
    "basalt.machinery.images.keys",
    "basalt.machinery.images.verify",
    "basalt.machinery.kubernetes.render",
    "basalt.machined.apply",
    "basalt.machined.install",
    "basalt.machined.identity",
)


def imported_before_api(node_dir: Path) -> list[str]:
    argv = [sys.executable, "-X", "importtime", "-m", "basalt.machined"]
    argv += ["--platform", "container", "--node-dir", str(node_dir)]
    argv += ["--address", ADDRESS, "--hostname", "imports"]
    process = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
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
