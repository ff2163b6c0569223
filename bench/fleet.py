"""Basalt Fleet under load: N machine links held by a load generator, and the tunnel.

The load generator is not machined: it runs N copies of the link agent machined runs
(``basalt.machinery.fleetlink.agent.FleetAgent``) in one process, each with its own
key, enrolment, TLS connection and stream, sending its inventory and heartbeats. The
fleet runs as its own process (``basalt-fleet serve``, SQLite), and its CPU is read
from /proc over a steady window once every link is up. Then, under that load, the
latency of REST list (``GET /v1/machines?limit=100``) and get (``GET /v1/machines/ID``)
calls over HTTPS from a client with a kept connection.

The tunnel: ``basaltctl version`` of a maintenance-mode node through the fleet
(``basaltctl fleet version UUID``: the CLI, the REST API, the link, the node) against
``basaltctl version --insecure`` straight to the node, fresh processes each time.

Targets (issue W2 3/9): 2,000 links on a 2-core host with the fleet's steady CPU under
25 % of one core and p99 under 100 ms; the tunnel at most 1.5x the direct call.
Everything listens on loopback.

    python bench/fleet.py [--machines N] [--window S] [--calls N] [--runs N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from basalt.machinery.api import fleet_pb2
from basalt.machinery.fleetlink import agent as link_agent
from basalt.machinery.fleetlink.agent import FleetAgent
from basalt.machinery.fleetlink.url import parse_fleet_url

HOST = "127.0.0.150"
PORT = 18700
TARGET_CPU = 25.0  # % of one core at 2,000 links
TARGET_P99_MS = 100.0
TARGET_TUNNEL = 1.5
NODE_ADDRESS = "127.0.0.151"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


class Fleet:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.process: subprocess.Popen[bytes] | None = None
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self.context.check_hostname = False

    def start(self) -> None:
        log = open(self.root / "fleet.log", "wb")  # noqa: SIM115 (the child's)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "basalt.fleet", "serve", "--data-dir", str(self.root / "data"),
             "--listen", f"{HOST}:{PORT}"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        for _ in range(200):
            if (self.root / "data" / "ca.crt").exists():
                try:
                    self.context.load_verify_locations(cafile=str(self.root / "data" / "ca.crt"))
                    self.get("/healthz", auth=False)
                    return
                except OSError:
                    pass
            time.sleep(0.1)
        raise SystemExit("basalt-fleet did not start: see fleet.log")

    @property
    def token(self) -> str:
        return (self.root / "data" / "admin-token").read_text().strip()

    def get(self, path: str, auth: bool = True) -> Any:
        headers = {"Authorization": f"Bearer {self.token}"} if auth else {}
        request = urllib.request.Request(f"https://{HOST}:{PORT}{path}", headers=headers)
        with urllib.request.urlopen(request, timeout=30, context=self.context) as answer:
            return json.loads(answer.read())

    def post(self, path: str, body: dict[str, Any]) -> Any:
        request = urllib.request.Request(
            f"https://{HOST}:{PORT}{path}",
            data=json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30, context=self.context) as answer:
            return json.loads(answer.read())

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(30)


def inventory(index: int) -> fleet_pb2.Inventory:
    return fleet_pb2.Inventory(
        hostname=f"load-{index:05d}",
        arch="x86_64",
        cpus=4,
        memory=8 << 30,
        disks=[fleet_pb2.Disk(name="vda", size=64 << 30, model="virt")],
        links=[fleet_pb2.Link(name="eth0", mac="52:54:00:00:00:01", addresses=["192.0.2.1"])],
        api_address="127.0.0.1",
        api_port=50000,
        version="0.1.0",
        stage="maintenance",
    )


async def hold_links(url: str, count: int, root: Path, stop: asyncio.Event) -> list[FleetAgent]:
    parsed = parse_fleet_url(url)
    agents = []
    for index in range(count):
        snapshot = inventory(index)
        agents.append(
            FleetAgent(
                url=parsed,
                directory=root / "agents" / str(index),
                machine_uuid=str(uuid.uuid4()),
                inventory=lambda s=snapshot: s,  # type: ignore[misc]
                api_host="127.0.0.1",
                api_port=1,  # no node behind these links: tunnels are not used here
            )
        )
    tasks = [asyncio.create_task(a.run()) for a in agents]
    await stop.wait()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return agents


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def load_figures(args: argparse.Namespace, root: Path) -> tuple[float, float, float]:
    fleet = Fleet(root)
    fleet.start()
    assert fleet.process is not None
    url = fleet.post("/v1/join-tokens", {"uses": args.machines, "ttl": 3600})["url"]
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    import threading

    def generator() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(hold_links(url, args.machines, root, stop))

    thread = threading.Thread(target=generator, daemon=True)
    started = time.monotonic()
    thread.start()
    try:
        while True:
            metrics = urllib.request.Request(
                f"https://{HOST}:{PORT}/metrics", headers={"Authorization": f"Bearer {fleet.token}"}
            )
            with urllib.request.urlopen(metrics, timeout=30, context=fleet.context) as answer:
                text = answer.read().decode()
            links = next(
                float(line.split()[1]) for line in text.splitlines()
                if line.startswith("basalt_fleet_links ")
            )  # fmt: skip
            if links >= args.machines:
                break
            if time.monotonic() - started > 900:
                raise SystemExit(f"only {links:.0f} of {args.machines} links after 900 s")
            time.sleep(2)
        print(f"{args.machines} links up in {time.monotonic() - started:.0f} s")
        time.sleep(5)  # let enrolment's tail settle
        before, at = cpu_seconds(fleet.process.pid), time.monotonic()
        time.sleep(args.window)
        cpu = (cpu_seconds(fleet.process.pid) - before) / (time.monotonic() - at) * 100
        machines = fleet.get("/v1/machines?limit=100")
        ids = [m["uuid"] for m in machines]
        lists, gets = [], []
        import http.client

        connection = http.client.HTTPSConnection(HOST, PORT, context=fleet.context, timeout=30)
        headers = {"Authorization": f"Bearer {fleet.token}"}

        def call(path: str) -> float:
            t = time.perf_counter()
            connection.request("GET", path, headers=headers)
            answer = connection.getresponse()
            json.loads(answer.read())
            assert answer.status == 200, answer.status
            return (time.perf_counter() - t) * 1000

        for n in range(args.calls):
            lists.append(call("/v1/machines?limit=100"))
            gets.append(call(f"/v1/machines/{ids[n % len(ids)]}"))
        connection.close()
        return cpu, percentile(lists, 0.99), percentile(gets, 0.99)
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(60)
        fleet.stop()


def tunnel_figures(args: argparse.Namespace, root: Path) -> tuple[float, float]:
    from basalt.provision.process import create_machines, destroy

    fleet = Fleet(root)
    fleet.start()
    env = {**os.environ, "BASALTCONFIG": str(root / "basaltconfig")}
    ctl = [sys.executable, "-m", "basalt.cli.main"]
    try:
        subprocess.run(
            [*ctl, "fleet", "login", f"https://{HOST}:{PORT}", "--token", fleet.token,
             "--ca", str(root / "data" / "ca.crt")],
            check=True, env=env, capture_output=True,
        )  # fmt: skip
        url = fleet.post("/v1/join-tokens", {"uses": 1})["url"]
        record = asyncio.run(
            create_machines("bench", 1, root / "machines", lambda *_: None,
                            base_address=NODE_ADDRESS, machined_args=("--fleet", url))
        )  # fmt: skip
        try:
            for _ in range(100):
                rows = fleet.get("/v1/machines")
                if rows and rows[0]["connected"]:
                    break
                time.sleep(0.2)
            machine = rows[0]["uuid"]
            through, direct = [], []
            for _ in range(args.runs):
                t = time.perf_counter()
                subprocess.run([*ctl, "fleet", "version", machine], check=True, env=env,
                               capture_output=True)  # fmt: skip
                through.append(time.perf_counter() - t)
                t = time.perf_counter()
                subprocess.run([*ctl, "version", "--insecure", "-e", NODE_ADDRESS], check=True,
                               env=env, capture_output=True)  # fmt: skip
                direct.append(time.perf_counter() - t)
            return statistics.median(through) * 1000, statistics.median(direct) * 1000
        finally:
            asyncio.run(destroy(record))
    finally:
        fleet.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--machines", type=int, default=2000)
    parser.add_argument("--window", type=float, default=30.0, help="seconds of steady CPU")
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    link_agent.HEARTBEAT = 10.0
    with tempfile.TemporaryDirectory(prefix="basalt-bench-fleet-") as tmp:
        root = Path(tmp)
        (root / "load").mkdir()
        (root / "tunnel").mkdir()
        cpu, p99_list, p99_get = load_figures(args, root / "load")
        through, direct = tunnel_figures(args, root / "tunnel")
    per_thousand = cpu / args.machines * 1000
    print(f"fleet steady CPU with {args.machines} links: {cpu:.1f} % of one core "
          f"({per_thousand:.1f} % per 1,000 machines)")  # fmt: skip
    print(f"REST under that load: p99 list {p99_list:.1f} ms, p99 get {p99_get:.1f} ms")
    ratio = through / direct
    print(f"basaltctl version through the fleet {through:.0f} ms, direct {direct:.0f} ms: "
          f"{ratio:.2f}x")  # fmt: skip
    scaled = per_thousand * 2
    verdicts = [
        ("CPU at 2,000 links", scaled <= TARGET_CPU, f"{scaled:.1f} % <= {TARGET_CPU:.0f} %"),
        ("p99 list/get", max(p99_list, p99_get) <= TARGET_P99_MS,
         f"{max(p99_list, p99_get):.1f} ms <= {TARGET_P99_MS:.0f} ms"),
        ("tunnel", ratio <= TARGET_TUNNEL, f"{ratio:.2f}x <= {TARGET_TUNNEL}x"),
    ]  # fmt: skip
    for name, ok, text in verdicts:
        print(f"{name}: {text}: {'meets' if ok else 'MISSES'} the target")
    print(f"load average: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
