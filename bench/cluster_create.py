"""Cluster creation: `basaltctl cluster create` until every node is ready, against the
floor of starting as many Python agents, measured in the same run.

Each run is the real CLI in a subprocess with its own client config and state directory;
the command returns once every node reports itself ready, then `cluster destroy` runs.
The peer starts the same number of bare `python -c "import grpc, cryptography, yaml,
pydantic"` processes in parallel and waits for them: no node agent can be ready sooner.
While a 3+1 cluster runs, each node's machined resident memory is read from /proc.
Target: 3 control planes + 1 worker ready in at most 10 s (the slowest run), without etcd
(`--skip-bootstrap`). The same shape with etcd bootstrapped and both other control planes
joined is printed too (bench/etcd_cluster.py holds its own target and timeline): etcd
takes one learner at a time, so the control planes join one after the other (ADR 0024
says why no 5-second wait comes between them any more).

Nodes use loopback only: --base-address and the addresses after it (127.0.0.0/8).

    python bench/cluster_create.py [--runs N] [--base-address 127.0.0.201] [--check]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

TARGET_3P1_S = 10.0
#: (control planes, workers, bootstrap etcd)
SHAPES = ((1, 1, False), (3, 1, False), (3, 1, True))
PEER_CODE = "import grpc, cryptography, yaml, pydantic"


@dataclass
class NodeMemory:
    name: str
    machined_pid: int
    machined_kib: int
    launcher_kib: int


def run_cli(argv: list[str]) -> None:
    """Run basaltctl; a failure stops the benchmark with the CLI's own message."""
    done = subprocess.run(argv, check=False, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv[1:])} failed ({done.returncode}):\n{done.stderr.strip()}")


def rss_kib(pid: int) -> int:
    """VmRSS of ``pid`` in KiB, or 0 when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def node_memory(state_dir: Path) -> list[NodeMemory]:
    """Each node's machined (the launcher's child, from ``machined.pid``) and launcher RSS."""
    record = json.loads((state_dir / "cluster.json").read_text())
    rows = []
    for node in record["nodes"]:
        machined = int((Path(node["node_dir"]) / "machined.pid").read_text())
        rows.append(
            NodeMemory(node["name"], machined, rss_kib(machined), rss_kib(node["launcher_pid"]))
        )
    return rows


def create_once(
    basaltctl: str, shape: tuple[int, int, bool], base_address: str, with_memory: bool
) -> tuple[float, list[NodeMemory]]:
    """Seconds from `cluster create` to its return (all nodes ready); destroys the cluster."""
    controlplanes, workers, bootstrap = shape
    memory: list[NodeMemory] = []
    with tempfile.TemporaryDirectory(prefix="basalt-bench-") as tmp:
        state_dir = Path(tmp) / "cluster"
        common = [basaltctl, "--basaltconfig", str(Path(tmp) / "basaltconfig"), "cluster"]
        where = ["--name", "bench", "--state-dir", str(state_dir)]
        try:
            start = time.perf_counter()
            run_cli(
                [
                    *common,
                    "create",
                    *where,
                    "--controlplanes",
                    str(controlplanes),
                    "--workers",
                    str(workers),
                    "--base-address",
                    base_address,
                    *([] if bootstrap else ["--skip-bootstrap"]),
                ]
            )
            elapsed = time.perf_counter() - start
            if with_memory:
                memory = node_memory(state_dir)
        finally:
            if (state_dir / "cluster.json").exists():
                run_cli([*common, "destroy", *where])
    return elapsed, memory


def start_agents(count: int) -> float:
    """Seconds to start ``count`` bare Python processes with the agent's heavy imports."""
    start = time.perf_counter()
    processes = [subprocess.Popen([sys.executable, "-c", PEER_CODE]) for _ in range(count)]
    if any(p.wait() != 0 for p in processes):
        raise SystemExit(f"the peer failed: python -c {PEER_CODE!r}")
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--base-address", default="127.0.0.201", help="first node address")
    parser.add_argument("--check", action="store_true", help="exit 1 when the target is missed")
    args = parser.parse_args()

    basaltctl = str(Path(sys.executable).with_name("basaltctl"))
    start_agents(1)  # warm the page cache
    results = {}
    memory: list[NodeMemory] = []
    for shape in SHAPES:
        nodes = shape[0] + shape[1]
        created, peers = [], []
        for index in range(args.runs):
            peers.append(start_agents(nodes))
            seconds, seen = create_once(
                basaltctl,
                shape,
                args.base_address,
                with_memory=shape == (3, 1, True) and index == 0,
            )
            created.append(seconds)
            memory = seen or memory
        results[shape] = (created, peers)

    print(
        f"{'cluster':<8} {'median':>8} {'max':>8} {'peer median':>12} {'ratio':>7}"
        f"   ({args.runs} runs; peer: as many `python -c {PEER_CODE!r}` in parallel)"
    )
    for (controlplanes, workers, bootstrap), (created, peers) in results.items():
        median, peer = statistics.median(created), statistics.median(peers)
        label = f"{controlplanes}+{workers}" + (" etcd" if bootstrap else "")
        print(
            f"{label:<8} {median:>7.2f}s {max(created):>7.2f}s "
            f"{peer:>11.2f}s {median / peer:>6.1f}x"
        )
    print("\nwhile the 3+1 cluster ran (VmRSS):")
    print(f"{'NODE':<24} {'MACHINED PID':>12} {'MACHINED':>10} {'LAUNCHER':>10}")
    for row in memory:
        print(
            f"{row.name:<24} {row.machined_pid:>12} {row.machined_kib / 1024:>7.1f}MiB "
            f"{row.launcher_kib / 1024:>7.1f}MiB"
        )
    slowest = max(results[(3, 1, False)][0])
    ok = slowest <= TARGET_3P1_S
    verdict = "meets" if ok else "MISSES"
    print(
        f"\n3+1 cluster (no etcd) ready in at most {slowest:.2f} s over {args.runs} runs: "
        f"{verdict} the {TARGET_3P1_S:.0f} s target"
    )
    return 0 if ok or not args.check else 1


if __name__ == "__main__":
    sys.exit(main())
