"""The process launcher: plays the machine (and its firmware) for one container-mode node.

It runs machined as a child and follows its exit code like firmware follows a machine:
``EXIT_REBOOT`` starts it again, ``EXIT_SHUTDOWN`` ends the launcher, anything else is a
crash and starts it again after a delay. SIGTERM to the launcher is passed to machined
(a graceful shutdown) and then ends the launcher.

Like systemd-boot, before each start it picks the A/B slot to boot and counts the try
(``apply(state, Boot())`` on ``<node-dir>/slots/boot.json``), then runs machined from that
slot's source tree (first on PYTHONPATH), telling it which slot it is
(``BASALT_BOOTED_SLOT``) and its version (``BASALT_VERSION_OVERRIDE``). A slot on trial
that keeps failing runs out of tries and the good slot boots: the fallback. Slot a
without a directory is the Basalt this launcher runs from (the first boot).

    python -m basalt.provision.launcher --node-dir D --address A --hostname H [-- extra]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from basalt.machinery.launch import EXIT_REBOOT, EXIT_SHUTDOWN

CRASH_DELAY = 2.0
STOP_TIMEOUT = 20.0
#: Environment telling machined which slot it was started from, and that slot's version.
BOOTED_SLOT_ENV = "BASALT_BOOTED_SLOT"
VERSION_ENV = "BASALT_VERSION_OVERRIDE"


def log(message: str) -> None:
    print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} launcher: {message}", flush=True)


@dataclass(frozen=True)
class BootChoice:
    """What to start: a slot (or none: the installed Basalt) and what to tell machined."""

    slot: str | None
    version: str | None
    python_path: Path | None
    message: str


def choose_boot(node_dir: Path, installed_version: str) -> BootChoice:
    """The firmware's part of a boot: pick a slot, count the try, persist the state."""
    from basalt.machinery.boot import (
        Action,
        Boot,
        BootEntryError,
        GatesFailed,
        apply,
        initial_state,
    )
    from basalt.machinery.boot.slots import SlotDirectories

    slots = SlotDirectories.of_node(node_dir)
    try:
        state = slots.load() or initial_state(installed_version)
    except BootEntryError as exc:
        return BootChoice(None, None, None, f"boot state unusable ({exc}); booting installed")
    notes: list[str] = []
    for _ in range(64):  # each pass either boots or uses up a try of a slot with no files
        outcome = apply(state, Boot())
        if outcome.refused or outcome.slot is None:
            return BootChoice(None, None, None, f"{outcome.message}; booting installed")
        state = outcome.state
        slot = state.slot(outcome.slot)
        python = slots.python_path(slot.name)
        if python is not None or slots.runs_installed(slot):
            slots.save(state)
            text = "; ".join([*notes, outcome.message])
            return BootChoice(slot.name.value, slot.version, python, text)
        # The state names an image whose files are gone: a failed boot, like firmware
        # that cannot load a kernel. Its tries run out and the other slot boots.
        failed = apply(state, GatesFailed(f"{slot.label}: slot files are missing"))
        state = failed.state
        notes.append(failed.message)
        if failed.action is not Action.REBOOT:
            break
    slots.save(state)
    return BootChoice(None, None, None, "; ".join([*notes, "booting installed"]))


def record_crash(node_dir: Path, slot: str | None, code: int) -> str | None:
    """A crash of a slot on trial counts against it with the exit code as the reason."""
    from basalt.machinery.boot import BootEntryError, GatesFailed, SlotHealth, apply
    from basalt.machinery.boot.slots import SlotDirectories

    slots = SlotDirectories.of_node(node_dir)
    try:
        state = slots.load()
    except BootEntryError:
        return None
    if slot is None or state is None or state.booted is None or state.booted.value != slot:
        return None
    if state.slot(state.booted).health is SlotHealth.GOOD:
        return None
    outcome = apply(state, GatesFailed(f"machined exited with code {code}"))
    slots.save(outcome.state)
    return outcome.message


def child_env(choice: BootChoice) -> dict[str, str]:
    env = dict(os.environ)
    for name in (BOOTED_SLOT_ENV, VERSION_ENV):
        env.pop(name, None)
    if choice.slot is not None:
        env[BOOTED_SLOT_ENV] = choice.slot
    if choice.python_path is not None and choice.version is not None:
        env[VERSION_ENV] = choice.version
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(choice.python_path), env.get("PYTHONPATH", "")) if p
        )
    return env


def _wait(child: subprocess.Popen[bytes]) -> int:
    """The child's exit code; waits in short steps so signal handlers run meanwhile."""
    while True:
        try:
            return child.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            continue


def main(argv: list[str] | None = None) -> int:
    import basalt

    parser = argparse.ArgumentParser(prog="basalt-launcher")
    parser.add_argument("--node-dir", type=Path, required=True)
    parser.add_argument("--address", required=True)
    parser.add_argument("--hostname", required=True)
    parser.add_argument("extra", nargs="*", help="more machined arguments (after --)")
    args = parser.parse_args(argv)

    command = [
        sys.executable,
        "-m",
        "basalt.machined",
        "--platform",
        "container",
        "--node-dir",
        str(args.node_dir),
        "--address",
        args.address,
        "--hostname",
        args.hostname,
        *args.extra,
    ]
    child: subprocess.Popen[bytes] | None = None
    stopping = False

    def on_term(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    boots = 0
    while not stopping:
        boots += 1
        choice = choose_boot(args.node_dir, basalt.__version__)
        where = f"slot {choice.slot}" if choice.python_path else "the installed Basalt"
        log(f"boot {boots}: {choice.message}; starting machined from {where}")
        child = subprocess.Popen(command, stdin=subprocess.DEVNULL, env=child_env(choice))
        (args.node_dir / "machined.pid").write_text(f"{child.pid}\n")
        code = _wait(child)
        if stopping:
            log(f"machined stopped ({code}); launcher exits")
            break
        if code == EXIT_REBOOT:
            log("machined asked for a reboot")
            continue
        if code == EXIT_SHUTDOWN:
            log("machined shut down")
            break
        recorded = record_crash(args.node_dir, choice.slot, code)
        log(f"machined crashed with {code}; restarting in {CRASH_DELAY:g}s")
        if recorded:
            log(recorded)
        time.sleep(CRASH_DELAY)
    if child is not None and child.poll() is None:
        child.send_signal(signal.SIGTERM)
        try:
            child.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    (args.node_dir / "machined.pid").unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
