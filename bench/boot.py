"""Boot: Basalt from QEMU start to its first maintenance API answer, against a Debian
minimal + systemd + openssh-server image to its first SSH banner, under identical QEMU
flags in the same run.

Both guests get the same machine (TCG, q35, `-cpu max,-avx2`, 512 MiB, 2 vCPUs, virtio-rng),
a virtio-blk root, a virtio-net NIC on QEMU user networking with one port forwarded to a
host loopback address, and a direct kernel boot (`-kernel -initrd -append`), each with
its own distribution kernel and initramfs. Basalt boots `_out/image` (root.sqfs
read-only); Debian boots an image this bench builds with debootstrap (bench/_debian.py,
cached under `_out/bench/`; building it needs root). Runs alternate which guest boots
first; the figure is the median, with the range. Targets (issue 22): Basalt <= 0.5x Debian
(stretch 0.4x); machined exec -> API socket open <= 2.5 s, exec -> first log line <= 0.5 s,
machined RSS when the API opened <= 45 MiB.

Basalt's answer is a Version call to the insecure maintenance API through
`basalt.machinery.client` (what `basaltctl` does); Debian's is its `SSH-2.0` banner line.
QEMU accepts a forwarded connection at once and holds it while the guest has no address,
so until the guest answers or refuses, a fresh probe starts every 0.5 s (each dropped
after 4 s); a refusal drops the probes QEMU still holds (they would reach the guest
only on a TCP retransmission, 1-4 s later); from then on one probe at a time, never
dropped (see `_first_answer`).

Also printed, from the Basalt console (lines stamped with the guest's uptime): kernel to
PID 1 (the initramfs init's first line), machined's start to its API socket (from the
initramfs' switch to the root, where it hands /sbin/init its interpreter (before issue
22: exec'd it; the labels still say "exec"), to "API listening"), machined's RSS then (its own "API
open" line), and from `image.json` the compressed root size and the executable count.
The load average is printed with the figures: a measurement on a busy host is not one.

With ``--importtime`` one more Basalt boot runs with ``basalt.importtime=1`` (its
initramfs execs machined under ``python -X importtime``) and the bench prints what
machined imported before its API opened, at this guest's speed: the total, and the
costliest imports. ``--runs 0 --importtime`` does only that. Without ``--importtime``,
that profiling boot runs anyway after the measured ones when machined's start-up missed
its target, so a miss comes with what it imported. With ``--profile`` one more boot runs
with ``basalt.profile=1``: PID 1 runs under cProfile until its API opens and prints its
costliest calls (cumulative and own time) on the console, which the bench prints.

    python bench/boot.py [--runs N] [--image DIR] [--build] [--check] [--importtime] [--profile]

Figures (2026-12-06, afternoon, this 2-core host otherwise idle, 7 runs each, medians):
Basalt 5.52 s [5.19-6.02] against Debian 11.84 s [10.72-12.26], 0.47x (0.88x when issue
22 was filed); kernel -> PID 1 1.87 s; exec -> first log line 0.38 s (3.39 s when
filed); exec -> API socket 2.36 s [2.21-2.45] (7.96 s when filed, 2.80 s the evening
before); RSS 41.1 MiB (62.8 MiB). What changed is in ADR 0025: resource specs without
pydantic (5.78 -> 3.92 s, 53.6 -> 43.1 MiB), the start-up bundle (the byte code of the
start-up read from one file: file access had been a quarter of it) and in it the
functions ``@dataclass`` writes, compiled; modules nothing before the API uses left out
(``uuid`` and ``platform`` among them); the kernel modules loaded by a child process;
the collector off the start-up heap; the kernel's crypto self-tests skipped; and this
bench's own probes (a refusal now drops the probes QEMU still holds; they had answered
only on a SYN retransmission, 1-3 s late, in 2 runs of 5, for both guests). What is left,
from ``--profile``: importing asyncio (and ssl through it), grpc (its extension module
about 0.2 s), protobuf and machine_pb2, the controllers' first round and the gRPC
server's creation. The host's own speed moves these figures by up to 25 % from one run
to the next (one image gave exec -> API 2.47 s and 2.95 s in two 5-run sets, with
Debian at 12.5 s and 13.3 s; the final one 2.36 s and 3.16 s in two 7-run sets, Debian
11.84 s and 15.34 s, 0.47x both): compare figures from one run, and the ratio above all.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _debian
from basalt.provision import qemu

REPO = Path(__file__).resolve().parents[1]
TARGET_RATIO = 0.5
STRETCH_RATIO = 0.4
#: machined's own figures, from the guest's console (seconds, MiB).
TARGET_STARTUP = 2.5
TARGET_FIRST_LINE = 0.5
TARGET_RSS = 45.0
TARGET_ROOT_MB = 60.0
TARGET_EXECUTABLES = 12
#: The QEMU flags both guests share (the drive, NIC and kernel follow).
QEMU_COMMON = [
    *("qemu-system-x86_64", "-accel", "tcg", "-M", "q35", "-cpu", qemu.TCG_CPU),
    *("-m", "512", "-smp", "2", "-nographic", "-no-reboot", "-device", "virtio-rng-pci"),
]
#: microvm-only kernel arguments (it has no PIT to calibrate the TSC against).
MICROVM_ONLY = ("tsc_early_khz=", "no_timer_check")
BASALT_ADDRESS = "127.0.0.231"
DEBIAN_ADDRESS = "127.0.0.232"
PROBE_INTERVAL = 0.5
PROBE_TIMEOUT = 4.0
RETRY_INTERVAL = 0.1
ANSWER_TIMEOUT = 60.0
#: Basalt console lines: "[  uptime] basalt-init: ..." or "[  uptime] machined: INFO x: ..."
#: (not anchored: the first one follows the firmware's terminal escapes on its line).
STAMP = re.compile(r"\[\s*([0-9.]+)\] (basalt-init|machined): (?:\w+ \S+: )?(.*)$", re.M)
#: ``python -X importtime`` lines: self and cumulative microseconds, two spaces per level.
IMPORT_LINE = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \| ( *)(\S+)")


@dataclass
class Boot:
    """One guest boot: host seconds from QEMU start to the first answer, and its console.
    ``others`` is the CPU time (in CPUs) everything but this QEMU and this bench used
    meanwhile: what the guest competed with."""

    seconds: float
    console: str
    load: float
    others: float
    stamps: dict[str, float] = field(default_factory=dict)


def busy_seconds() -> float:
    """CPU seconds the host spent busy (all CPUs, not idle or iowait) since boot."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
    user, nice, system, _idle, _iowait, irq, softirq = fields
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` (its threads included)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    utime, stime = stat.rsplit(")", 1)[1].split()[11:13]
    return (int(utime) + int(stime)) / os.sysconf("SC_CLK_TCK")


def own_seconds() -> float:
    usage = os.times()
    return usage.user + usage.system


def basalt_cmdline(image: dict[str, object]) -> str:
    words = [w for w in str(image["cmdline"]).split() if not w.startswith(MICROVM_ONLY)]
    return " ".join([*words, "basalt.root=/dev/vda"])


def qemu_argv(
    kernel: Path, initrd: Path, cmdline: str, drive: str, address: str, port: int, guest: int
) -> list[str]:
    return [
        *QEMU_COMMON,
        *("-kernel", str(kernel), "-initrd", str(initrd), "-append", cmdline),
        *("-drive", f"id=d0,format=raw,if=none,{drive}", "-device", "virtio-blk-pci,drive=d0"),
        *("-netdev", f"user,id=n0,hostfwd=tcp:{address}:{port}-:{guest}"),
        *("-device", "virtio-net-pci,netdev=n0,romfile="),
    ]


def free_port(address: str) -> int:
    import socket

    with socket.socket() as sock:
        sock.bind((address, 0))
        port: int = sock.getsockname()[1]
        return port


class Refused(Exception):
    """The guest itself turned the connection away (its network is up, the service not)."""


#: A probe: True once it got the answer; raises :class:`Refused` when the guest turned
#: it away; calls ``reached()`` as soon as it knows the guest's service took the
#: connection (from then on it is given all the time it needs).
Attempt = Callable[[Callable[[], None]], Coroutine[Any, Any, bool]]


async def _first_answer(
    attempt: Attempt, process: subprocess.Popen[bytes], started: float, timeout: float
) -> float:
    """Seconds from ``started`` until an ``attempt`` answers.

    Until the guest is reached, a probe starts every PROBE_INTERVAL and is dropped after
    PROBE_TIMEOUT: QEMU accepts every forwarded connection at once and holds it while the
    guest has no address, so only a fresh one sees the guest come up. When the guest
    refuses one (its network is up, the service not yet), the probes started before are
    dropped: QEMU holds their connections until TCP retransmits the SYN, seconds later.
    Once the guest took or refused a connection, probes run one at a time and are never
    dropped: a storm of abandoned connections would load the guest (sshd forks and execs
    itself for each) and delay the very answer being measured.
    """
    reached = asyncio.Event()
    probes: dict[asyncio.Task[bool], float] = {}
    next_start = time.monotonic()
    try:
        while True:
            now = time.monotonic()
            if process.poll() is not None:
                raise RuntimeError(f"QEMU exited with {process.returncode} before answering")
            if now - started > timeout:
                raise RuntimeError(f"no answer within {timeout:.0f} s")
            if not reached.is_set():
                for task, begun in probes.items():
                    if now - begun > PROBE_TIMEOUT:
                        task.cancel()
            if now >= next_start and not (reached.is_set() and probes):
                probes[asyncio.create_task(attempt(reached.set))] = now
                next_start = now + PROBE_INTERVAL
            wait = max(0.01, next_start - now)
            if not probes:
                await asyncio.sleep(wait)
                continue
            done, _ = await asyncio.wait(probes, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                del probes[task]
                if task.cancelled():
                    continue
                error = task.exception()
                if error is None and task.result():
                    return time.monotonic() - started
                if isinstance(error, Refused):
                    reached.set()
                    # The guest's network is up now; probes started before it was are
                    # held by QEMU, and reach the guest only when TCP retransmits their
                    # SYN (1 s, 2 s, 4 s later): drop them, probe afresh.
                    for stale in probes:
                        stale.cancel()
                    next_start = min(next_start, time.monotonic() + RETRY_INTERVAL)
    finally:
        for task in probes:
            task.cancel()
        await asyncio.gather(*probes, return_exceptions=True)


async def grpc_version(endpoint: str, reached: Callable[[], None]) -> bool:
    """Version from the insecure maintenance API, as `basaltctl` would call it."""
    from basalt.machinery.api import common_pb2
    from basalt.machinery.client.client import Client
    from basalt.machinery.errors import BasaltError

    try:
        client = await Client.connect(endpoint, insecure=True)
    except BasaltError as exc:
        # The certificate fetch failed: QEMU's own refusal (no forward yet) is not the
        # guest's; a reset or EOF is the guest's kernel answering for a closed port.
        text = str(exc)
        if "refused" not in text and ("reset" in text or "EOF" in text):
            raise Refused(text) from None
        raise
    reached()  # the node's API served its certificate
    try:
        await client.machine.Version(common_pb2.Empty(), timeout=ANSWER_TIMEOUT)
        return True
    finally:
        await client.close()


async def ssh_banner(address: str, port: int, reached: Callable[[], None]) -> bool:
    """The server's identification line, the first thing an SSH server sends."""
    reader, writer = await asyncio.open_connection(address, port)
    try:
        line = await reader.readline()
        if not line:
            raise Refused("connection closed before any banner")
        reached()
        return line.startswith(b"SSH-2.0")
    finally:
        writer.close()


def boot(
    argv: list[str],
    attempt: Attempt,
    console: Path,
    timeout: float,
) -> Boot:
    """Start QEMU, wait for the first answer, stop QEMU; the console goes to ``console``."""
    load = os.getloadavg()[0]

    async def measure(process: subprocess.Popen[bytes], started: float) -> float:
        # Insecure connects fetch the node's certificate in a thread; overlapping probes
        # must not queue behind the default executor's few workers.
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(max_workers=64))
        return await _first_answer(attempt, process, started, timeout)

    with console.open("wb") as out:
        busy, own = busy_seconds(), own_seconds()
        started = time.monotonic()
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        try:
            seconds = asyncio.run(measure(process, started))
            guest = cpu_seconds(process.pid)
            others = busy_seconds() - busy - guest - (own_seconds() - own)
            others /= time.monotonic() - started
        except RuntimeError as exc:
            tail = console.read_bytes().decode(errors="replace")[-3000:]
            kernel = argv[argv.index("-kernel") + 1]
            raise SystemExit(f"{kernel}: {exc}; console:\n{tail}") from None
        finally:
            if process.poll() is None:
                process.kill()
            process.wait()
    return Boot(seconds, console.read_bytes().decode(errors="replace"), load, max(0.0, others))


def basalt_stamps(console: str) -> dict[str, float]:
    """Guest uptimes of the Basalt console lines the figures are made of."""
    wanted = {
        "init": "initramfs: started",
        "exec": "switching root",
        "machined": "PID 1: machined",
        "api": "API listening",
        "dhcp": "DHCP lease",
        "address": "DHCP address",
    }
    stamps: dict[str, float] = {}
    for uptime, _who, message in STAMP.findall(console):
        for name, text in wanted.items():
            if name not in stamps and text in message:
                stamps[name] = float(uptime)
        if "rss" not in stamps and (
            found := re.search(r"API open: machined RSS ([0-9.]+)", message)
        ):
            stamps["rss"] = float(found.group(1))
    return stamps


def import_profile(console: str, top: int = 12) -> list[str]:
    """What machined imported before "API listening", from a ``basalt.importtime=1``
    boot's console: the total, the costliest top-level imports and the costliest
    modules by their own time."""
    end = console.find("API listening")
    rows = [
        (int(own), int(total), len(indent) // 2, name)
        for own, total, indent, name in IMPORT_LINE.findall(console[: max(end, 0)])
    ]
    if end < 0 or not rows:
        return ["no importtime lines before 'API listening' on the console"]
    lines = [f"  {len(rows)} modules, {sum(r[0] for r in rows) / 1e6:.2f} s importing in all"]
    lines.append("  costliest top-level imports (cumulative):")
    for _own, total, _depth, name in sorted((r for r in rows if r[2] == 0), key=lambda r: -r[1])[
        :top
    ]:
        lines.append(f"    {total / 1e6:6.2f} s  {name}")
    lines.append("  costliest modules (own time):")
    for own, _total, _depth, name in sorted(rows, key=lambda r: -r[0])[:top]:
        lines.append(f"    {own / 1e6:6.2f} s  {name}")
    return lines


def profile_boot(argv: list[str], attempt: Attempt, logs: Path, timeout: float) -> None:
    """Boot Basalt once with ``basalt.importtime=1`` and print its import profile."""
    argv = list(argv)
    argv[argv.index("-append") + 1] += " basalt.importtime=1"
    profiled = boot(argv, attempt, logs / "basalt-importtime.log", timeout)
    print(f"basalt under -X importtime: first answer after {profiled.seconds:.2f} s")
    print("\n".join(import_profile(profiled.console)))


def startup_profile(console: str) -> str:
    """The cProfile tables a ``basalt.profile=1`` boot printed when its API opened."""
    begin, end = console.find("machined profile begin"), console.find("machined profile end")
    if begin < 0 or end < begin:
        return "no profile on the console (did the API open?)"
    return console[begin:end].split("\n", 1)[1].replace("\r", "").rstrip()


def profiled_boot(argv: list[str], attempt: Attempt, logs: Path, timeout: float) -> None:
    """Boot Basalt once with ``basalt.profile=1`` and print where PID 1's start-up went."""
    argv = list(argv)
    argv[argv.index("-append") + 1] += " basalt.profile=1"
    profiled = boot(argv, attempt, logs / "basalt-profile.log", timeout)
    print(f"basalt under cProfile: first answer after {profiled.seconds:.2f} s")
    print(startup_profile(profiled.console))


def spread(values: list[float]) -> str:
    if not values:
        return "n/a"
    median = statistics.median(values)
    return f"{median:6.2f} s  [{min(values):.2f}-{max(values):.2f}]"


def other_qemus() -> list[int]:
    """PIDs of QEMU processes this bench did not start (they skew the figures)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().startswith("qemu-system"):
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="boots of each guest")
    parser.add_argument("--image", type=Path, default=REPO / "_out" / "image")
    parser.add_argument("--build", action="store_true", help="build (or reuse) the image first")
    parser.add_argument("--cache", type=Path, default=_debian.DEFAULT_CACHE)
    parser.add_argument("--mirror", help="Debian mirror (default: this host's apt source)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per boot")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="one more Basalt boot with PID 1 under cProfile until its API opens",
    )
    parser.add_argument(
        "--importtime",
        action="store_true",
        help="one more Basalt boot under python -X importtime: what start-up imports cost",
    )
    args = parser.parse_args()
    if args.runs < 1 and not (args.runs == 0 and (args.importtime or args.profile)):
        parser.error("--runs must be at least 1 (0 only with --importtime or --profile)")
    return args


def main() -> int:
    args = parse_args()
    if shutil.which("qemu-system-x86_64") is None:
        raise SystemExit("qemu-system-x86_64 missing: apt-get install qemu-system-x86")

    if args.build:
        from basalt.imager import pipeline

        pipeline.build(out=args.image)
    image_json = args.image / "image.json"
    if not image_json.exists():
        raise SystemExit(f"{image_json} missing: build the image (make image) or pass --build")
    image = json.loads(image_json.read_text())
    debian = _debian.build(args.cache, args.mirror)
    peer = json.loads((debian / "image.json").read_text())

    # Imported before any QEMU starts: the probe's own import is not the guest's time.
    import basalt.machinery.client.client  # noqa: F401

    logs = args.cache / "runs" / time.strftime("%Y%m%dT%H%M%S")
    logs.mkdir(parents=True)
    b_port, d_port = free_port(BASALT_ADDRESS), free_port(DEBIAN_ADDRESS)
    basalt_argv = qemu_argv(
        args.image / "vmlinuz",
        args.image / "initrd.img",
        basalt_cmdline(image),
        f"file={args.image / 'root.sqfs'},readonly=on",
        BASALT_ADDRESS,
        b_port,
        50000,
    )
    debian_argv = qemu_argv(
        debian / "vmlinuz",
        debian / "initrd.img",
        peer["cmdline"],
        f"file={debian / 'root.ext4'},snapshot=on",  # writes go to a throwaway overlay
        DEBIAN_ADDRESS,
        d_port,
        22,
    )
    others = other_qemus()
    load_before = os.getloadavg()
    guests: dict[str, tuple[list[str], Attempt]] = {
        "basalt": (basalt_argv, lambda seen: grpc_version(f"{BASALT_ADDRESS}:{b_port}", seen)),
        "debian": (debian_argv, lambda seen: ssh_banner(DEBIAN_ADDRESS, d_port, seen)),
    }
    if args.importtime:
        profile_boot(basalt_argv, guests["basalt"][1], logs, args.timeout)
    if args.profile:
        profiled_boot(basalt_argv, guests["basalt"][1], logs, args.timeout)
    if args.runs == 0:
        return 0
    results: dict[str, list[Boot]] = {"basalt": [], "debian": []}
    for run in range(args.runs):
        order = ["basalt", "debian"] if run % 2 == 0 else ["debian", "basalt"]
        for name in order:
            argv, attempt = guests[name]
            result = boot(argv, attempt, logs / f"{name}-{run + 1}.log", args.timeout)
            if name == "basalt":
                result.stamps = basalt_stamps(result.console)
            results[name].append(result)
            print(
                f"run {run + 1} {name:<6} {result.seconds:6.2f} s  (load average "
                f"{result.load:.2f}; other processes used {result.others:.2f} CPUs meanwhile)",
                file=sys.stderr,
            )
    load_after = os.getloadavg()
    ok = report(args.runs, image, peer, results, (load_before[0], load_after[0]), len(others))
    if not args.importtime and not startup_met(results["basalt"]):
        print(f"machined's start-up missed its target ({TARGET_STARTUP:g} s): what it imported")
        profile_boot(basalt_argv, guests["basalt"][1], logs, args.timeout)
    save_results(logs, results, (load_before[0], load_after[0]))
    return 0 if ok or not args.check else 1


def save_results(logs: Path, results: dict[str, list[Boot]], loads: tuple[float, float]) -> None:
    raw: dict[str, object] = {
        name: [
            {"seconds": b.seconds, "load": b.load, "others_cpus": b.others, **b.stamps}
            for b in boots
        ]
        for name, boots in results.items()
    }
    raw["load_before_after"] = list(loads)
    (logs / "results.json").write_text(json.dumps(raw, indent=2) + "\n")
    print(f"consoles and results.json: {logs}")


def startup_met(boots: list[Boot]) -> bool:
    """machined exec -> API socket open within TARGET_STARTUP (median of the boots)."""
    spans = [
        b.stamps["api"] - b.stamps["exec"] for b in boots if {"api", "exec"} <= b.stamps.keys()
    ]
    return bool(spans) and statistics.median(spans) <= TARGET_STARTUP


def _verdict(values: list[float], target: float) -> tuple[str, bool]:
    """' PASS (<= target)' or ' MISS (...)' for the median of ``values``."""
    if not values:
        return "  (no figure)", False
    met = statistics.median(values) <= target
    return f"  target <= {target:g}: {'PASS' if met else 'MISS'}", met


def report(
    runs: int,
    image: dict[str, Any],
    peer: dict[str, Any],
    results: dict[str, list[Boot]],
    loads: tuple[float, float],
    others: int,
) -> bool:
    """Print the figures; True when every target is met."""
    basalt_s = [b.seconds for b in results["basalt"]]
    debian_s = [b.seconds for b in results["debian"]]
    ratio = statistics.median(basalt_s) / statistics.median(debian_s)
    stamps = [b.stamps for b in results["basalt"]]

    def derived(first: str, last: str | None = None) -> list[float]:
        if last is None:
            return [s[first] for s in stamps if first in s]
        return [s[last] - s[first] for s in stamps if first in s and last in s]

    root_mb = image["files"]["root.sqfs"]["bytes"] / 1e6
    executables = len(image["executables"])
    rss = derived("rss")
    counted = f"{runs} runs" if runs > 1 else "1 run"
    print(f"boot to first answer, host wall clock from QEMU start ({counted}, median [range])")
    print(f"  debian ssh banner (peer)   {spread(debian_s)}   kernel {peer['kernel']}")
    print(f"  basalt maintenance API     {spread(basalt_s)}   kernel {image['kernel']['release']}")
    verdict = "PASS" if ratio <= TARGET_RATIO else "MISS"
    stretch = "met" if ratio <= STRETCH_RATIO else "not met"
    print(
        f"  ratio basalt/debian        {ratio:6.3f}x   target <= {TARGET_RATIO}x: {verdict} "
        f"(stretch <= {STRETCH_RATIO}x: {stretch})"
    )
    print("basalt, from its console (guest uptime; the kernel's clock starts after QEMU's)")
    print(f"  kernel -> PID 1 (initramfs init's first line)   {spread(derived('init'))}")
    print(f"  initramfs (first line -> exec of machined)      {spread(derived('init', 'exec'))}")
    first_line, first_ok = _verdict(derived("exec", "machined"), TARGET_FIRST_LINE)
    startup, startup_ok = _verdict(derived("exec", "api"), TARGET_STARTUP)
    print(
        f"  machined exec -> first log line                 {spread(derived('exec', 'machined'))}"
        + first_line
    )
    print(
        f"  machined exec -> API socket open (start-up)     {spread(derived('exec', 'api'))}"
        + startup
    )
    print(f"  kernel -> API socket open (uptime)              {spread(derived('api'))}")
    print(f"  kernel -> DHCP lease (uptime; no answer before) {spread(derived('dhcp'))}")
    print(f"  kernel -> DHCP address on the link (uptime)     {spread(derived('address'))}")
    print(f"  API socket open -> DHCP address on the link     {spread(derived('api', 'address'))}")
    rss_text = f"{statistics.median(rss):.1f} MiB" if rss else "n/a (no 'API open' line)"
    rss_verdict, rss_ok = _verdict(rss, TARGET_RSS)
    print(f"  machined RSS when the API opened                {rss_text}" + rss_verdict)
    root_ok = "meets" if root_mb <= TARGET_ROOT_MB else "MISSES"
    exe_ok = "meets" if executables <= TARGET_EXECUTABLES else "MISSES"
    print(
        f"basalt image: root.sqfs {root_mb:.1f} MB ({image['root']['compression']}), "
        f"{root_ok} <= {TARGET_ROOT_MB:g} MB; {executables} executables, {exe_ok} <= "
        f"{TARGET_EXECUTABLES}"
    )
    contention = max(b.others for bs in results.values() for b in bs)
    print(
        f"host: load average {loads[0]:.2f} before the first boot, {loads[1]:.2f} "
        f"after the last ({os.cpu_count()} CPUs; the bench's own QEMU adds ~2); other "
        f"processes used up to {contention:.2f} CPUs during a boot"
        + (f"; {others} other QEMU processes were running" if others else "")
    )
    if others or contention > 0.2:
        print("WARNING: the host was busy: not a measurement; rerun on an idle host")
    return (
        ratio <= TARGET_RATIO
        and first_ok
        and startup_ok
        and rss_ok
        and root_mb <= TARGET_ROOT_MB
        and executables <= TARGET_EXECUTABLES
    )


if __name__ == "__main__":
    sys.exit(main())
