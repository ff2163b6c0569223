"""Power cuts of an installed metal node in QEMU, during upgrades and config applies.

Marked ``vm_cuts``, not ``vm``: each cut costs a boot under TCG (a minute or more), so
20 cuts take most of an hour. Run with ``pytest -q -s -m vm_cuts tests/vm/test_power_cuts.py``
(``BASALT_VM_POWER_CUTS`` sets the number, default 20; ``BASALT_VM_CUT_SEED`` the seed).

One node, installed as in ``test_upgrade.py`` (its API on 127.0.0.121). Each round starts
an ``upgrade`` (to the version the node does not run: the imager's own bundle 0.1.0, or
0.2.0) or an ``apply-config`` (its EnvironmentConfig ``CUT`` set to the round number), and
at a random moment SIGKILLs QEMU (every other upgrade: 0-30 s after the node starts
writing the slot, seen on its console; the others reboot with ``--reboot-mode kexec``, so
a cut may fall while the next kernel is loaded and its try counted, or in the boot after
the jump): the guest loses everything it had not written to its disk, as in a power cut.
QEMU is started again (``qemu_runner`` then restarts it across the guest's own reboots),
and the node must:

- answer the API over mTLS (else it is **bricked**, and the run stops);
- settle on a slot that is good (a cut upgrade leaves the previous slot, or the new one
  on trial, which must pass its gates or fall back);
- run the last committed config: the one before the cut, or the one in flight when the
  node had written it; an apply whose RPC answered before the cut must be there (else a
  **lost config**).

It prints ``N cuts, B bricked, L lost configs``.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.vm.conftest import Timings
from tests.vm.test_metal_node import BASALTCTL
from tests.vm.test_upgrade import BOOT_TIMEOUT, Bundles, Node, bundles, install_node

# vm: needs the image and QEMU; vm_cuts: tens of minutes, so `make vm-test` leaves it out.
pytestmark = [pytest.mark.vm, pytest.mark.vm_cuts]

__all__ = ["bundles"]  # the fixture, shared with test_upgrade.py

CUTS = int(os.environ.get("BASALT_VM_POWER_CUTS", "20"))
ADDRESS = "127.0.0.121"
#: Seconds after the request starts within which the cut falls (upload, verify and the
#: slot write of an upgrade take ~2 min under TCG; an apply a few seconds).
UPGRADE_WINDOW = (5.0, 150.0)
APPLY_WINDOW = (0.0, 5.0)
#: Every other upgrade is cut while the node writes the slot: this long after its console
#: shows the install phase starting (the slot write takes 10-40 s under TCG).
INSTALL_MARK = b"upgrade: install: phase started"
INSTALL_WINDOW = (0.0, 30.0)
INSTALL_TIMEOUT = 400.0
SETTLE_TIMEOUT = 900.0


def _environment(value: str) -> dict[str, object]:
    return {
        "apiVersion": "basalt.dev/v1alpha1",
        "kind": "EnvironmentConfig",
        "variables": {"CUT": value},
    }


def _with_cut(config_yaml: str, value: str) -> str:
    documents = [d for d in yaml.safe_load_all(config_yaml) if d]
    documents = [d for d in documents if d.get("kind") != "EnvironmentConfig"]
    documents.append(_environment(value))
    return yaml.safe_dump_all(documents, sort_keys=False)


def _cut_value(config_yaml: str) -> str:
    for document in yaml.safe_load_all(config_yaml):
        if document and document.get("kind") == "EnvironmentConfig":
            return str(document.get("variables", {}).get("CUT", ""))
    return ""


def _running_config(node: Node) -> str:
    done = node.ctl("get", "machineconfigs", "-o", "json", timeout=30)
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    (running,) = [r for r in records if r["metadata"]["id"] == "v1alpha1"]
    return str(running["spec"]["yaml"])


def _background(node: Node, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "BASALTCONFIG": str(node.basaltconfig)}
    return subprocess.Popen(
        [*BASALTCTL, *args, "-e", node.endpoint],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _cut(node: Node) -> None:
    """SIGKILL the QEMU this node's runner started (the runner then ends too)."""
    pid = node.qemu_pid()
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert node.runner is not None
    try:
        node.runner.wait(timeout=30)
    except subprocess.TimeoutExpired:
        node.runner.send_signal(signal.SIGTERM)
        node.runner.wait(timeout=30)


def _wait_for_install(node: Node, offset: int, request: subprocess.Popen[str]) -> bool:
    """Until the console (after ``offset``) shows the install phase; False if the request
    ended first or it never came."""
    deadline = time.monotonic() + INSTALL_TIMEOUT
    while time.monotonic() < deadline:
        with node.console.open("rb") as stream:
            stream.seek(offset)
            if INSTALL_MARK in stream.read():
                return True
        if request.poll() is not None:
            return False
        time.sleep(0.1)
    return False


def _answers(node: Node) -> bool:
    try:
        node.wait(node.mtls, BOOT_TIMEOUT, "mTLS API after the cut")
    except AssertionError:
        return False
    return True


def _settled(node: Node) -> str:
    """'' once the running slot is good; else what it is."""
    try:
        status = node.wait(
            lambda: (s := node.boot_status()) and not s["onTrial"] and s,
            SETTLE_TIMEOUT,
            "a good slot",
        )
    except AssertionError as exc:
        return str(exc).splitlines()[0]
    return "" if status else "no boot status"


def test_power_cuts_during_upgrades_and_applies(
    image_dir: Path,
    bundles: Bundles,
    tmp_path_factory: pytest.TempPathFactory,
    timings: Timings,
) -> None:
    seed = int(os.environ.get("BASALT_VM_CUT_SEED", str(int(time.time()))))
    rng = random.Random(seed)
    work = tmp_path_factory.mktemp("vm-cuts")
    node = install_node(image_dir, bundles, work, timings, address=ADDRESS)
    cuts, bricked, lost, log = 0, [], [], []
    started = time.monotonic()
    try:
        committed = _running_config(node)
        for round_ in range(CUTS):
            kind = "upgrade" if round_ % 2 == 0 else "apply"
            targeted = kind == "upgrade" and round_ % 4 == 0
            offset = node.console.stat().st_size
            if kind == "upgrade":
                running = node.boot_status()["version"]
                bundle = bundles.v2 if running != "0.2.0" else bundles.v1
                mode = "powercycle" if targeted else "kexec"
                request = _background(  # every other upgrade goes back: --allow-downgrade
                    node,
                    "upgrade",
                    "--image",
                    str(bundle),
                    "--reboot-mode",
                    mode,
                    "--allow-downgrade",
                )
                window = UPGRADE_WINDOW
                if mode == "kexec":
                    kind = "upgrade (kexec)"
                candidate = committed
            else:
                candidate = _with_cut(committed, str(round_))
                path = work / f"config-{round_}.yaml"
                path.write_text(candidate)
                request = _background(node, "apply-config", "-f", str(path))
                window = APPLY_WINDOW
            delay = rng.uniform(*window)
            if targeted:
                kind = "upgrade (slot write)"
                delay = rng.uniform(*INSTALL_WINDOW)
                if not _wait_for_install(node, offset, request):
                    kind = "upgrade (install phase not seen)"
            deadline = time.monotonic() + delay
            while time.monotonic() < deadline and request.poll() is None:
                time.sleep(0.1)
            answered = request.poll() == 0
            if answered and kind.startswith("upgrade"):
                time.sleep(max(0.0, deadline - time.monotonic()))  # may cut the reboot itself
            _cut(node)
            request.kill()
            request.communicate()
            cuts += 1
            node.start()
            if not _answers(node):
                bricked.append(f"cut {cuts}: {kind} at {delay:.1f} s: no mTLS answer")
                break
            problem = _settled(node)
            if problem:
                bricked.append(f"cut {cuts}: {kind} at {delay:.1f} s: {problem}")
                break
            value = _cut_value(_running_config(node))
            allowed = (
                {_cut_value(candidate)}
                if answered
                else {
                    _cut_value(committed),
                    _cut_value(candidate),
                }
            )
            if value not in allowed:
                lost.append(f"cut {cuts}: {kind}: CUT={value!r}, expected one of {allowed}")
            if kind == "apply" and value == _cut_value(candidate):
                committed = candidate
            status = node.boot_status()
            log.append(
                f"cut {cuts}: {kind} at {delay:.1f} s ({'answered' if answered else 'in flight'})"
                f" -> slot {status['slot']} ({status['version']}), CUT={value!r}"
            )
            print(log[-1], flush=True)
    finally:
        node.stop()
    elapsed = time.monotonic() - started
    summary = f"{cuts} cuts, {len(bricked)} bricked, {len(lost)} lost configs"
    print(f"\n{summary} in {elapsed:.0f} s (seed {seed})")
    for line in bricked + lost:
        print(f"  {line}")
    timings.record(f"vm power cuts: {summary}", elapsed)
    assert not bricked and not lost, (summary, bricked, lost, node.tail())
    assert cuts == CUTS
