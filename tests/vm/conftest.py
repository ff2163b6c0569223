"""Shared fixtures of the VM tests: the image is built once per session (stages cached),
and boot timings are collected, printed at the end of the run and written to
``_out/vm-timings.json``."""

from __future__ import annotations

import json
import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

import pytest

TOOLS = ("qemu-system-x86_64", "mksquashfs", "unsquashfs", "apt-get", "dpkg-deb")
TIMINGS_FILE = Path(__file__).resolve().parents[2] / "_out" / "vm-timings.json"

_timings = pytest.StashKey[dict[str, float]]()
_timelines = pytest.StashKey[dict[str, list[tuple[float, str]]]]()


class Timings:
    """Boot timings of this run: seconds by name, and console timelines by boot."""

    def __init__(self, config: pytest.Config) -> None:
        self.values = config.stash.setdefault(_timings, {})
        self.timelines = config.stash.setdefault(_timelines, {})

    def record(self, name: str, seconds: float) -> None:
        self.values[name] = round(seconds, 2)
        print(f"\n[vm timing] {name}: {seconds:.1f} s")


def _terminated(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@pytest.fixture(scope="session", autouse=True)
def owned_vms() -> Iterator[None]:
    """VMs die with this run: SIGTERM tears the fixtures (and their QEMUs) down as ^C
    does, and the provisioner's QEMU runners are told this process is their owner
    (they power off and end when it is gone, even after a SIGKILL)."""
    from basalt.provision.qemu_runner import PARENT_ENV

    os.environ[PARENT_ENV] = str(os.getpid())
    previous = signal.signal(signal.SIGTERM, _terminated)
    yield
    signal.signal(signal.SIGTERM, previous)
    os.environ.pop(PARENT_ENV, None)


@pytest.fixture(scope="session")
def timings(request: pytest.FixtureRequest) -> Timings:
    return Timings(request.config)


@pytest.fixture(scope="session")
def image_dir() -> Path:
    """Build (or reuse from ``_out/cache``) the image from image.lock into ``_out/image``."""
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed: run 'make image-deps' as root")
    from basalt.imager import pipeline

    # BASALT_VM_IMAGE_DIR: build into another directory (parallel runs of the VM tests).
    out = Path(os.environ.get("BASALT_VM_IMAGE_DIR") or pipeline.DEFAULT_OUT)
    pipeline.build(out)
    return out


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    config = terminalreporter.config
    values = config.stash.get(_timings, {})
    timelines = config.stash.get(_timelines, {})
    if not values:
        return
    terminalreporter.section("VM boot timings (host wall clock from QEMU start)")
    for name, seconds in values.items():
        terminalreporter.write_line(f"{seconds:7.1f} s  {name}")
    for boot, lines in timelines.items():
        # The guest's clock: under TCG it runs a little off the host's.
        terminalreporter.write_line(f"{boot}: console lines by guest kernel uptime")
        for uptime, text in lines:
            terminalreporter.write_line(f"  {uptime:8.2f} s  {text}")
    TIMINGS_FILE.parent.mkdir(parents=True, exist_ok=True)
    TIMINGS_FILE.write_text(
        json.dumps({"timings": values, "timelines": timelines}, indent=2) + "\n"
    )
    terminalreporter.write_line(f"written to {TIMINGS_FILE}")
