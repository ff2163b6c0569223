"""CLI start-up cost: basaltctl against bare CPython start, measured in the same run.

Every basaltctl command pays its start-up, so heavy imports stay inside commands.
Target: `basaltctl --help` at most 0.25 s above `python -c pass`.

    python bench/cli_startup.py [--runs N] [--check]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_HELP_OVERHEAD_S = 0.25


def timed(argv: list[str], runs: int) -> list[float]:
    subprocess.run(argv, check=True, capture_output=True)  # warm the page cache
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True)
        samples.append(time.perf_counter() - start)
    return samples


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--check", action="store_true", help="exit 1 when the target is missed")
    args = parser.parse_args()

    basaltctl = str(Path(sys.executable).with_name("basaltctl"))
    with tempfile.TemporaryDirectory() as tmp:
        secrets = Path(tmp) / "secrets.yaml"
        subprocess.run(
            [basaltctl, "gen", "secrets", "-o", str(secrets)], check=True, capture_output=True
        )
        cases = {
            "python -c pass (peer)": [sys.executable, "-c", "pass"],
            "basaltctl --help": [basaltctl, "--help"],
            "basaltctl gen config": [
                basaltctl,
                "gen",
                "config",
                "bench",
                "https://127.0.0.11:6443",
                "--with-secrets",
                str(secrets),
                "--version-contract",
                "0.1",
                "-o",
                str(Path(tmp) / "out"),
                "--force",
            ],
        }
        medians = {name: statistics.median(timed(argv, args.runs)) for name, argv in cases.items()}

    peer = medians["python -c pass (peer)"]
    print(f"{'command':<24} {'median':>9} {'above peer':>11} {'ratio':>7}   ({args.runs} runs)")
    for name, value in medians.items():
        above = (value - peer) * 1000
        print(f"{name:<24} {value * 1000:>7.1f}ms {above:>9.1f}ms {value / peer:>6.1f}x")
    overhead = medians["basaltctl --help"] - peer
    ok = overhead <= TARGET_HELP_OVERHEAD_S
    verdict = "meets" if ok else "MISSES"
    print(
        f"basaltctl --help is {overhead:.3f} s above bare Python start: {verdict} the "
        f"{TARGET_HELP_OVERHEAD_S:.2f} s target"
    )
    return 0 if ok or not args.check else 1


if __name__ == "__main__":
    sys.exit(main())
