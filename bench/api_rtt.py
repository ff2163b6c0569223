"""API round trip: `basaltctl version -n NODE` against `ssh NODE uname -a` to a real
OpenSSH server, measured in the same run.

The script creates a 1+0 process cluster and starts Debian's /usr/sbin/sshd on another
loopback address with throwaway keys and config (installing openssh-server when it is
missing). Both CLIs pay a fresh process, connection and handshake per call; ssh ignores
any user config (-F /dev/null), so no connection sharing, and the remote shell skips
the account's ~/.bashrc. The third figure is the node API seen from inside one process:
one `Client.connect`, then repeated `Version` calls (also with the `nodes` metadata of
`-n NODE`, which the endpoint forwards like any targeted request).
Targets: the CLI at most 1x ssh; the in-process call at most 0.1x ssh.

Everything listens on loopback only (127.0.0.0/8).

    python bench/api_rtt.py [--runs N] [--calls N] [--check]
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TARGET_CLI_RATIO = 1.0
TARGET_IN_PROCESS_RATIO = 0.1
SSHD = Path("/usr/sbin/sshd")
SSH_OPTIONS = [
    "-F",
    "/dev/null",
    "-o",
    "StrictHostKeyChecking=no",
    "-o",
    "UserKnownHostsFile=/dev/null",
    "-o",
    "BatchMode=yes",
    "-o",
    "LogLevel=ERROR",
    "-o",
    "IdentitiesOnly=yes",
]


POLICY_RC = Path("/usr/sbin/policy-rc.d")


def ensure_openssh() -> None:
    """Install openssh-server and -client unless sshd is there; never start a system sshd.

    invoke-rc.d reads /usr/sbin/policy-rc.d: a temporary one that exits 101 keeps the
    package's own sshd (listening on every address) from starting; any existing policy
    is put back afterwards.
    """
    if SSHD.exists() and shutil.which("ssh") is not None:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        return
    saved = POLICY_RC.read_bytes() if POLICY_RC.exists() else None
    POLICY_RC.write_text("#!/bin/sh\nexit 101\n")
    POLICY_RC.chmod(0o755)
    try:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "-q", "openssh-server", "openssh-client"]
        if subprocess.run(install, check=False, env=env).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], check=True, env=env)
            subprocess.run(install, check=True, env=env)
    finally:
        if saved is None:
            POLICY_RC.unlink(missing_ok=True)
        else:
            POLICY_RC.write_bytes(saved)
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)


def wait_for_port(address: str, port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"sshd exited with {process.returncode}:\n{log.read_text()}")
        with socket.socket() as probe:
            if probe.connect_ex((address, port)) == 0:
                return
        time.sleep(0.05)
    raise SystemExit(f"sshd did not listen on {address}:{port} within 10 s:\n{log.read_text()}")


@contextmanager
def sshd(tmp: Path, address: str, port: int) -> Iterator[list[str]]:
    """A real sshd on ``address:port`` for this run; yields the ssh command prefix."""
    ensure_openssh()
    for name in ("host_key", "client_key"):
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp / name)],
            check=True,
        )
    authorized = tmp / "authorized_keys"
    authorized.write_text((tmp / "client_key.pub").read_text())
    authorized.chmod(0o600)
    config = tmp / "sshd_config"
    # SHLVL=1 keeps this account's ~/.bashrc out of the figure: Debian's bash sources it
    # for ssh commands unless nested, and a developer's rc (pyenv init, ...) can cost
    # more than ssh itself. The peer is ssh, not this machine's shell set-up.
    config.write_text(
        f"ListenAddress {address}\nPort {port}\nHostKey {tmp / 'host_key'}\n"
        f"PidFile {tmp / 'sshd.pid'}\nAuthorizedKeysFile {authorized}\n"
        "UsePAM no\nStrictModes no\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n"
        "SetEnv SHLVL=1\n"
    )
    subprocess.run([str(SSHD), "-t", "-f", str(config)], check=True)
    log = tmp / "sshd.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(SSHD), "-D", "-e", "-f", str(config)], stdout=out, stderr=subprocess.STDOUT
        )
    try:
        wait_for_port(address, port, process, log)
        key = str(tmp / "client_key")
        yield ["ssh", "-p", str(port), "-i", key, *SSH_OPTIONS, f"{getpass.getuser()}@{address}"]
    finally:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def cluster(basaltctl: str, tmp: Path, address: str) -> Iterator[Path]:
    """A 1+0 process cluster on ``address``; yields its client config."""
    config = tmp / "basaltconfig"
    common = [basaltctl, "--basaltconfig", str(config), "cluster"]
    where = ["--name", "bench-rtt", "--state-dir", str(tmp / "cluster")]
    create = [*common, "create", *where, "--controlplanes", "1", "--workers", "0"]
    try:
        done = subprocess.run(
            [*create, "--base-address", address], check=False, capture_output=True, text=True
        )
        if done.returncode != 0:
            raise SystemExit(f"cluster create failed:\n{done.stderr.strip()}")
        yield config
    finally:
        if (tmp / "cluster" / "cluster.json").exists():
            subprocess.run([*common, "destroy", *where], check=True, capture_output=True)


def timed(argv: list[str], runs: int) -> list[float]:
    subprocess.run(argv, check=True, capture_output=True)  # warm caches and the server
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True)
        samples.append(time.perf_counter() - start)
    return samples


async def in_process(config: Path, calls: int, node: str) -> tuple[list[float], list[float]]:
    """Version RTTs on one connection: addressed to the endpoint, and with ``nodes`` = node."""
    from basalt.machinery.api import common_pb2
    from basalt.machinery.client.client import Client
    from basalt.machinery.client.config import load_client_config

    _, context = load_client_config(config).current()
    client = await Client.connect(
        context.endpoints[0], ca=context.ca, crt=context.crt, key=context.key, nodes=[node]
    )
    try:
        direct: list[float] = []
        targeted: list[float] = []
        for samples, metadata in ((direct, ()), (targeted, client.metadata())):
            await client.machine.Version(common_pb2.Empty(), metadata=metadata)  # warm
            for _ in range(calls):
                start = time.perf_counter()
                await client.machine.Version(common_pb2.Empty(), metadata=metadata)
                samples.append(time.perf_counter() - start)
        return direct, targeted
    finally:
        await client.close()


def top_imports(basaltctl: str, config: Path, node: str, count: int = 12) -> list[str]:
    """The slowest top-level imports of one `basaltctl version`, from -X importtime."""
    argv = [basaltctl, "--basaltconfig", str(config), "version", "-n", node]
    done = subprocess.run(
        [sys.executable, "-X", "importtime", *argv],
        check=True,
        capture_output=True,
        text=True,
    )
    rows = []
    for line in done.stderr.splitlines():
        fields = line.removeprefix("import time:").split("|")
        if len(fields) != 3 or not fields[1].strip().isdigit():
            continue  # the header, or output that is not importtime's
        name = fields[2]
        if len(name) - len(name.lstrip()) == 1:  # nesting is shown by indentation
            rows.append((int(fields[1]), name.strip()))
    rows.sort(reverse=True)
    total = sum(us for us, _ in rows)
    lines = [f"{us / 1000:>8.1f}ms  {name}" for us, name in rows[:count]]
    return [*lines, f"{total / 1000:>8.1f}ms  all imports"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15, help="CLI and ssh runs")
    parser.add_argument("--calls", type=int, default=200, help="in-process Version calls")
    parser.add_argument("--node-address", default="127.0.0.211")
    parser.add_argument("--ssh-address", default="127.0.0.212")
    parser.add_argument("--ssh-port", type=int, default=2222)
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args()

    basaltctl = str(Path(sys.executable).with_name("basaltctl"))
    node = args.node_address
    with tempfile.TemporaryDirectory(prefix="basalt-bench-") as name:
        tmp = Path(name)
        (tmp / "ssh").mkdir(mode=0o700)
        with (
            sshd(tmp / "ssh", args.ssh_address, args.ssh_port) as ssh,
            cluster(basaltctl, tmp, node) as config,
        ):
            cli = [basaltctl, "--basaltconfig", str(config), "version"]
            medians = {
                "ssh uname -a (peer)": statistics.median(timed([*ssh, "uname", "-a"], args.runs)),
                "basaltctl version -n": statistics.median(timed([*cli, "-n", node], args.runs)),
                "basaltctl version --client": statistics.median(
                    timed([*cli, "--client"], args.runs)
                ),
            }
            direct, targeted = asyncio.run(in_process(config, args.calls, node))
            medians["in-process Version"] = statistics.median(direct)
            medians["in-process, nodes=NODE"] = statistics.median(targeted)
            peer = medians["ssh uname -a (peer)"]
            cli_ratio = medians["basaltctl version -n"] / peer
            missed = cli_ratio > TARGET_CLI_RATIO
            imports = top_imports(basaltctl, config, node) if missed else []

    print(f"{'call':<26} {'median':>9} {'ratio':>8}   ({args.runs} runs, {args.calls} calls)")
    for label, value in medians.items():
        print(f"{label:<26} {value * 1000:>7.2f}ms {value / peer:>7.3f}x")
    in_process_ratio = medians["in-process Version"] / peer
    checks = [
        ("basaltctl version -n NODE", cli_ratio, TARGET_CLI_RATIO),
        ("in-process Version", in_process_ratio, TARGET_IN_PROCESS_RATIO),
    ]
    ok = True
    for label, ratio, target in checks:
        verdict = "meets" if ratio <= target else "MISSES"
        ok = ok and ratio <= target
        print(f"{label} is {ratio:.3f}x ssh: {verdict} the {target:g}x target")
    if imports:
        print("\nwhere basaltctl's time goes: slowest top-level imports (-X importtime):")
        print("\n".join(imports))
    return 0 if ok or not args.check else 1


if __name__ == "__main__":
    sys.exit(main())
