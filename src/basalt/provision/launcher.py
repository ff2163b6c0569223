"""The process launcher: plays the machine for one container-mode node.

It runs machined as a child and follows its exit code like firmware follows a machine:
``EXIT_REBOOT`` starts it again, ``EXIT_SHUTDOWN`` ends the launcher, anything else is a
crash and starts it again after a delay. SIGTERM to the launcher is passed to machined
(a graceful shutdown) and then ends the launcher.

    python -m basalt.provision.launcher --node-dir D --address A --hostname H [-- extra]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

from basalt.machinery.launch import EXIT_REBOOT, EXIT_SHUTDOWN

CRASH_DELAY = 2.0
STOP_TIMEOUT = 20.0


def log(message: str) -> None:
    print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} launcher: {message}", flush=True)


def main(argv: list[str] | None = None) -> int:
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
        log(f"boot {boots}: starting machined")
        child = subprocess.Popen(command, stdin=subprocess.DEVNULL)
        (args.node_dir / "machined.pid").write_text(f"{child.pid}\n")
        while True:
            try:
                code = child.wait(timeout=1.0)
                break
            except subprocess.TimeoutExpired:
                continue
        if stopping:
            log(f"machined stopped ({code}); launcher exits")
            break
        if code == EXIT_REBOOT:
            log("machined asked for a reboot")
            continue
        if code == EXIT_SHUTDOWN:
            log("machined shut down")
            break
        log(f"machined crashed with {code}; restarting in {CRASH_DELAY:g}s")
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
