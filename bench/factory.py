"""The image factory serving a cached artefact, against Python's own ``http.server``
serving the same file from the same directory, measured in the same run.

The factory (``basalt-factory serve``, its real process: uvicorn) gets a state directory
with one schematic whose image is already built: the files of ``_out/image`` (from
``make image``; hard links) or, without one, files of the same sizes. The peer is
``python -m http.server`` (a ThreadingHTTPServer) on the image directory itself. Both
listen on loopback; each request is a fresh connection, as a download tool makes one.

Figures, medians over --runs: the factory's own decision time (its ``Server-Timing``:
schematic, version, artefact, ETag and Range checks) for a cached artefact, which must
stay under 50 ms; the time to the first byte and to the last byte of the small
(vmlinuz) and the large (disk.qcow2) artefact for both servers, with the factory's time
as a ratio of the peer's. Target: server time < 50 ms, whole downloads <= 1.5x the peer.

    python bench/factory.py [--runs N] [--check]
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from basalt import __version__ as VERSION
from basalt.factory.store import ARTEFACTS_FILE, Store
from basalt.factory.worker import describe_artefacts
from basalt.machinery.schematic import parse_schematic

REPO = Path(__file__).resolve().parents[1]

HOST = "127.0.0.117"
TARGET_SERVER_MS = 50.0
TARGET_RATIO = 1.5
SCHEMATIC = "customization:\n  systemExtensions:\n    officialExtensions: [qemu-guest-agent]\n"
#: What is measured, and the size it has when there is no built image to take.
FILES = {"vmlinuz": 14 << 20, "disk.qcow2": 80 << 20}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        port: int = probe.getsockname()[1]
        return port


def prepare(state: Path) -> tuple[str, Path]:
    """A factory state with one built image; (schematic id, the image's directory)."""
    store = Store(state)
    schematic = parse_schematic(SCHEMATIC)
    store.save_schematic(schematic)
    image = store.image_dir(schematic.id, VERSION)
    image.mkdir(parents=True)
    built = REPO / "_out" / "image"
    for name, size in FILES.items():
        source = built / name
        if source.is_file():
            try:
                os.link(source, image / name)
            except OSError:
                shutil.copyfile(source, image / name)
        else:
            with (image / name).open("wb") as sink:
                for _ in range(size >> 20):
                    sink.write(os.urandom(1 << 20))
    (image / ARTEFACTS_FILE).write_text(json.dumps(describe_artefacts(image, {})))
    return schematic.id, image


@contextlib.contextmanager
def running(argv: list[str], port: int) -> Iterator[None]:
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection((HOST, port), timeout=1).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"{argv[0]} did not start") from None
                time.sleep(0.05)
        yield
    finally:
        process.terminate()
        process.wait(10)


def fetch(port: int, path: str) -> tuple[float, float, int, str]:
    """One GET on a new connection: (first byte s, last byte s, bytes, Server-Timing)."""
    started = time.perf_counter()
    connection = http.client.HTTPConnection(HOST, port, timeout=60)
    connection.request("GET", path)
    answer = connection.getresponse()
    first = time.perf_counter() - started
    size = 0
    while block := answer.read(1 << 20):
        size += len(block)
    last = time.perf_counter() - started
    timing = answer.getheader("server-timing") or ""
    connection.close()
    if answer.status != 200:
        raise SystemExit(f"GET {path}: {answer.status}")
    return first, last, size, timing


def measure(port: int, path: str, runs: int) -> dict[str, float]:
    fetch(port, path)  # warm: the page cache, the server's first request
    firsts, lasts, server = [], [], []
    for _ in range(runs):
        first, last, _size, timing = fetch(port, path)
        firsts.append(first)
        lasts.append(last)
        if "dur=" in timing:
            server.append(float(timing.partition("dur=")[2]) / 1000)
    figures = {"first": statistics.median(firsts), "last": statistics.median(lasts)}
    if server:
        figures["server"] = statistics.median(server)
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args()
    factory_cmd = Path(sys.executable).with_name("basalt-factory")
    with tempfile.TemporaryDirectory(prefix="basalt-bench-factory-", dir=REPO / "_out") as tmp:
        state = Path(tmp) / "state"
        schematic_id, image = prepare(state)
        ours, peer = free_port(), free_port()
        serve = [str(factory_cmd), "serve", "--listen", f"{HOST}:{ours}", "--state", str(state)]
        http_server = [
            sys.executable,
            "-m",
            "http.server",
            "--bind",
            HOST,
            "--directory",
            str(image),
            str(peer),
        ]
        results: dict[str, tuple[dict[str, float], dict[str, float], int]] = {}
        with running(serve, ours), running(http_server, peer):
            for name in FILES:
                size = (image / name).stat().st_size
                factory_figures = measure(
                    ours, f"/image/{schematic_id}/{VERSION}/{name}", args.runs
                )
                peer_figures = measure(peer, f"/{name}", args.runs)
                results[name] = (factory_figures, peer_figures, size)
    ok = True
    print(f"{'artefact':<12} {'size':>9} {'':<12} {'factory':>10} {'http.server':>12} {'ratio':>7}")
    for name, (mine, theirs, size) in results.items():
        for label, key in (("first byte", "first"), ("last byte", "last")):
            ratio = mine[key] / theirs[key]
            print(
                f"{name:<12} {size / 2**20:>7.1f}Mi {label:<12} {mine[key] * 1000:>8.2f}ms "
                f"{theirs[key] * 1000:>10.2f}ms {ratio:>6.2f}x"
            )
        ok = ok and mine["last"] / theirs["last"] <= TARGET_RATIO
        server_ms = mine.get("server", float("inf")) * 1000
        print(f"{name:<12} {'':>9} {'server time':<12} {server_ms:>8.2f}ms  (Server-Timing)")
        ok = ok and server_ms < TARGET_SERVER_MS
    verdict = "meets" if ok else "MISSES"
    print(
        f"{verdict} the targets: server time < {TARGET_SERVER_MS:g} ms, whole downloads "
        f"<= {TARGET_RATIO:g}x http.server ({args.runs} runs each)"
    )
    return 0 if ok or not args.check else 1


if __name__ == "__main__":
    sys.exit(main())
