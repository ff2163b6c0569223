"""``basaltctl pcap`` against real process nodes: real machined, real mTLS, a real raw
socket on ``lo``. Process nodes share the host's network namespace, so every capture
filters on ports this test owns and only traffic the test sends over 127.0.0.1 is
captured. The files are read back with a small pcap reader here and with ``tcpdump -r``.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

from basalt.machinery import bpf
from basalt.machinery.api import machine_pb2
from basalt.machinery.client.config import ClientConfig, issue_client_context, save_client_config
from basalt.machinery.pki import generate_ca
from basalt.machinery.roles import Role
from tests.fakes.cluster import LiveCluster, run, start_cluster, stop_cluster

pytestmark = pytest.mark.integration

BASE = "127.0.0.217"
_SCRIPT = Path(sys.executable).with_name("basaltctl")
BASALTCTL = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "basalt.cli.main"]
TCPDUMP = shutil.which("tcpdump")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveCluster]:
    live = start_cluster(tmp_path_factory.mktemp("pcap"), "pcap", BASE, workers=1)
    yield live
    stop_cluster(live)


def pcap_argv(node: str, *args: str) -> list[str]:
    """``basaltctl pcap -n NODE -i lo ARGS...``."""
    return [*BASALTCTL, "pcap", "-n", node, "-i", "lo", *args]


def role_config(cluster: LiveCluster, role: Role, path: Path) -> Path:
    context = issue_client_context(cluster.os_ca, endpoints=cluster.controlplanes, roles=[role])
    save_client_config(ClientConfig(context=role.value, contexts={role.value: context}), path)
    return path


def ctl_env(config: Path) -> dict[str, str]:
    return {**os.environ, "BASALTCONFIG": str(config)}


# -- reading pcap files ---------------------------------------------------------------------------


@dataclass
class Record:
    time: float
    data: bytes
    length: int


def read_pcap(blob: bytes) -> tuple[tuple[int, ...], list[Record]]:
    """(magic, major, minor, zone, sigfigs, snaplen, linktype), records; asserts validity."""
    assert len(blob) >= 24, "shorter than a pcap global header"
    header = struct.unpack_from("<IHHiIII", blob)
    assert header[0] == 0xA1B2C3D4 and header[1:3] == (2, 4), header
    records, at = [], 24
    while at < len(blob):
        assert at + 16 <= len(blob), "a record header is cut off"
        seconds, micros, caplen, length = struct.unpack_from("<IIII", blob, at)
        assert micros < 1_000_000 and caplen <= length and caplen <= header[5]
        assert at + 16 + caplen <= len(blob), "a record's data is cut off"
        records.append(Record(seconds + micros / 1e6, blob[at + 16 : at + 16 + caplen], length))
        at += 16 + caplen
    return header, records


def udp_payload(frame: bytes) -> tuple[int, bytes] | None:
    """(destination port, payload) of an Ethernet/IPv4/UDP frame; None for anything else."""
    if frame[12:14] != b"\x08\x00" or frame[23] != 17:
        return None
    start = 14 + 4 * (frame[14] & 0x0F)
    return struct.unpack_from("!H", frame, start + 2)[0], frame[start + 8 :]


def is_tcp(frame: bytes) -> bool:
    return frame[12:14] == b"\x08\x00" and frame[23] == 6


# -- traffic the test controls ------------------------------------------------------------------


def free_port(kind: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, kind)
    sock.bind(("127.0.0.1", 0))
    return sock


def tcp_exchange(listener: socket.socket) -> None:
    """One TCP connection to ``listener`` carrying bytes both ways."""
    port = listener.getsockname()[1]
    with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
        server, _ = listener.accept()
        with server:
            client.sendall(b"TCP-NOT-WANTED")
            server.recv(100)
            server.sendall(b"TCP-REPLY")
            client.recv(100)


def started(process: subprocess.Popen[bytes]) -> str:
    """Wait for the CLI's "capturing on" line (the node's socket is bound by then)."""
    assert process.stderr is not None
    line = process.stderr.readline().decode()
    assert line.startswith("capturing on"), line + process.stderr.read().decode()
    return line


# -- the tests ------------------------------------------------------------------------------------


def test_capture_on_lo_keeps_the_filtered_udp_markers_and_not_the_tcp(
    cluster: LiveCluster, tmp_path: Path
) -> None:
    config = role_config(cluster, Role.OPERATOR, tmp_path / "operator")
    receiver, listener = free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_STREAM)
    listener.listen()
    port = receiver.getsockname()[1]
    out = tmp_path / "capture.pcap"
    before = time.time()
    process = subprocess.Popen(
        pcap_argv(
            cluster.controlplanes[0],
            "--duration",
            "4s",
            "--bpf-filter",
            f"udp port {port}",
            "-o",
            str(out),
        ),
        env=ctl_env(config),
        stderr=subprocess.PIPE,
    )
    try:
        started(process)
        markers = [f"BASALT-PCAP-MARKER-{i}".encode() for i in range(5)]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            for marker in markers:
                sender.sendto(marker, ("127.0.0.1", port))
        tcp_exchange(listener)
        assert process.wait(timeout=30) == 0
    finally:
        process.kill()
        receiver.close()
        listener.close()
    after = time.time()
    assert process.stderr is not None
    summary = process.stderr.read().decode()
    assert "5 packets" in summary, summary

    header, records = read_pcap(out.read_bytes())
    assert header[5] == 65535 and header[6] == 1  # snaplen, LINKTYPE_ETHERNET
    seen = [udp_payload(r.data) for r in records]
    assert [s for s in seen if s] == [(port, m) for m in markers]  # each once: lo's
    assert not any(is_tcp(r.data) for r in records)  # outgoing copies are dropped
    times = [r.time for r in records]
    assert times == sorted(times) and before - 1 <= times[0] and times[-1] <= after + 1
    assert all(r.length == len(r.data) for r in records)
    assert out.stat().st_mode & 0o777 == 0o600
    console = (cluster.node_dir(cluster.controlplanes[0]) / "console.log").read_text()
    who = "CN=basaltctl,O=os:operator"
    instructions = len(bpf.compile_filter(f"udp port {port}"))
    assert f"capture started by {who} on lo ({instructions}-instruction filter" in console
    assert f"capture by {who} on lo stopped (done): 5 packets" in console

    if TCPDUMP:
        shown = subprocess.run(
            [TCPDUMP, "-nn", "-r", str(out)], capture_output=True, text=True, check=True
        ).stdout.splitlines()
        assert len(shown) == 5 and all(f"127.0.0.1.{port}: UDP, length" in s for s in shown)


def test_forwarded_capture_to_stdout_stops_at_count_with_a_snaplen(
    cluster: LiveCluster, tmp_path: Path
) -> None:
    """Through the control plane to the worker (-n WORKER), ``-o -`` into a pipe."""
    config = role_config(cluster, Role.OPERATOR, tmp_path / "operator")
    receiver = free_port(socket.SOCK_DGRAM)
    port = receiver.getsockname()[1]
    process = subprocess.Popen(
        pcap_argv(
            cluster.workers[0],
            "--count",
            "3",
            "--snaplen",
            "60",
            "--duration",
            "30s",
            "--bpf-filter",
            f"dst port {port}",
            "-o",
            "-",
        ),
        env=ctl_env(config),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    stop = threading.Event()

    def send() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            while not stop.wait(0.05):
                sender.sendto(b"x" * 200, ("127.0.0.1", port))

    try:
        started(process)
        threading.Thread(target=send, daemon=True).start()
        stdout, _ = process.communicate(timeout=30)
    finally:
        stop.set()
        process.kill()
        receiver.close()
    assert process.returncode == 0
    header, records = read_pcap(stdout)
    assert header[5] == 60 and len(records) == 3
    assert all(len(r.data) == 60 and r.length == 14 + 20 + 8 + 200 for r in records)
    if TCPDUMP:
        result = subprocess.run(
            [TCPDUMP, "-nn", "-r", "-"], input=stdout, capture_output=True, check=True
        )
        assert result.stdout.decode().count(f".{port}: UDP") == 3


def test_unknown_interface_is_not_found_naming_the_interfaces(
    cluster: LiveCluster, tmp_path: Path
) -> None:
    config = role_config(cluster, Role.OPERATOR, tmp_path / "operator")
    out = tmp_path / "never.pcap"
    result = subprocess.run(
        [
            *BASALTCTL,
            "pcap",
            "-n",
            cluster.controlplanes[0],
            "-i",
            "nosuch0",
            "--duration",
            "1s",
            "-o",
            str(out),
        ],
        env=ctl_env(config),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert "NOT_FOUND" in result.stderr and "'nosuch0' does not exist" in result.stderr
    assert "lo" in result.stderr.split("interfaces:")[1]
    assert "Traceback" not in result.stderr
    assert not out.exists()
    console = (cluster.node_dir(cluster.controlplanes[0]) / "console.log").read_text()
    assert "nosuch0" in console and "Traceback" not in console


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--bpf-filter", "udp prot 53"], "unexpected 'prot' at column 5"),
        (["--bpf-raw", "2,6 0 0 1"], "the count says 2"),
        (["--snaplen", "0"], "snapshot length 0 is out of range"),
        (["--duration", "soon"], "--duration 'soon' is not a duration"),
    ],
)
def test_bad_options_are_refused_before_any_call(
    tmp_path: Path, args: list[str], needle: str
) -> None:
    """The context points at a port nothing listens on: the error must come first."""
    context = issue_client_context(
        generate_ca("elsewhere"), endpoints=["127.0.0.1:9"], roles=[Role.OPERATOR]
    )
    config = tmp_path / "nowhere"
    save_client_config(ClientConfig(context="x", contexts={"x": context}), config)
    out = tmp_path / "never.pcap"
    result = subprocess.run(
        [*BASALTCTL, "pcap", "-i", "lo", *args, "-o", str(out)],
        env=ctl_env(config),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert needle in result.stderr and "hint:" in result.stderr
    assert "UNAVAILABLE" not in result.stderr
    assert not out.exists()


def test_a_reader_is_refused_and_nothing_is_written(cluster: LiveCluster, tmp_path: Path) -> None:
    config = role_config(cluster, Role.READER, tmp_path / "reader")
    out = tmp_path / "never.pcap"
    result = subprocess.run(
        pcap_argv(
            cluster.controlplanes[0],
            "--duration",
            "1s",
            "-o",
            str(out),
        ),
        env=ctl_env(config),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert "PERMISSION_DENIED" in result.stderr
    assert not out.exists()


def test_node_checks_limits_and_cancellation_frees_the_slot(cluster: LiveCluster) -> None:
    """Bad snaplen/duration -> INVALID_ARGUMENT; a third capture at once ->
    RESOURCE_EXHAUSTED; a cancelled capture frees its slot promptly."""
    program = [
        machine_pb2.BPFInstruction(op=i.op, jt=i.jt, jf=i.jf, k=i.k)
        for i in bpf.compile_filter("udp port 9")  # discard: nothing of ours listens there
    ]

    def request(**fields: object) -> machine_pb2.PacketCaptureRequest:
        base: dict[str, object] = {"interface": "lo", "bpf_filter": program}
        return machine_pb2.PacketCaptureRequest(**{**base, **fields})  # type: ignore[arg-type]

    async def code_of(client: object, req: machine_pb2.PacketCaptureRequest) -> grpc.StatusCode:
        call = client.machine.PacketCapture(req, timeout=10)  # type: ignore[attr-defined]
        try:
            async for _ in call:
                pass
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK

    async def check() -> None:
        client = await cluster.client()
        try:
            invalid = grpc.StatusCode.INVALID_ARGUMENT
            assert await code_of(client, request(snap_len=300_000)) == invalid
            assert await code_of(client, request(duration_seconds=-1)) == invalid
            assert await code_of(client, request(duration_seconds=7200)) == invalid
            calls = [client.machine.PacketCapture(request(duration_seconds=60)) for _ in range(2)]
            for call in calls:
                await call.read()  # the global header: the capture runs
            third = await code_of(client, request(duration_seconds=1))
            assert third == grpc.StatusCode.RESOURCE_EXHAUSTED
            for call in calls:
                call.cancel()
            deadline = time.monotonic() + 5
            while True:  # the slots come back once the node has closed the sockets
                code = await code_of(client, request(duration_seconds=0.3))
                if code == grpc.StatusCode.OK or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.1)
            assert code == grpc.StatusCode.OK
        finally:
            await client.close()

    run(check())


def test_ctrl_c_ends_an_open_capture_with_a_whole_file_and_leaves_promiscuous_mode(
    cluster: LiveCluster, tmp_path: Path
) -> None:
    """No --duration: SIGINT (Ctrl-C) ends it, exit 0, the file is whole; the node stops
    capturing (its log says the client went away) and lo leaves promiscuous mode."""
    config = role_config(cluster, Role.OPERATOR, tmp_path / "operator")
    receiver = free_port(socket.SOCK_DGRAM)
    port = receiver.getsockname()[1]
    out = tmp_path / "open.pcap"
    flags = Path("/sys/class/net/lo/flags")
    process = subprocess.Popen(
        pcap_argv(
            cluster.controlplanes[0],
            "--promiscuous",
            "--bpf-filter",
            f"udp dst port {port}",
            "-o",
            str(out),
        ),
        env=ctl_env(config),
        stderr=subprocess.PIPE,
    )
    try:
        assert "Ctrl-C to stop" in started(process)
        assert int(flags.read_text(), 16) & 0x100  # IFF_PROMISC while it runs
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            for i in range(3):
                sender.sendto(b"OPEN-%d" % i, ("127.0.0.1", port))
        time.sleep(1.0)  # a flush interval and then some
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0
    finally:
        process.kill()
        receiver.close()
    _, records = read_pcap(out.read_bytes())
    assert [udp_payload(r.data) for r in records] == [(port, b"OPEN-%d" % i) for i in range(3)]
    console = cluster.node_dir(cluster.controlplanes[0]) / "console.log"
    deadline = time.monotonic() + 10
    while "stopped (cancelled by the client): 3 packets" not in console.read_text():
        assert time.monotonic() < deadline, console.read_text()[-2000:]
        time.sleep(0.1)
    assert not int(flags.read_text(), 16) & 0x100


async def read(call: Any) -> Any:
    """The next chunk's bytes, None at the end of the stream."""
    message = await call.read()
    return None if message is grpc.aio.EOF else message.bytes  # type: ignore[attr-defined]


def test_packets_are_batched_into_few_messages(cluster: LiveCluster) -> None:
    receiver = free_port(socket.SOCK_DGRAM)
    port = receiver.getsockname()[1]
    program = [
        machine_pb2.BPFInstruction(op=i.op, jt=i.jt, jf=i.jf, k=i.k)
        for i in bpf.compile_filter(f"udp dst port {port}")
    ]
    request = machine_pb2.PacketCaptureRequest(
        interface="lo", bpf_filter=program, duration_seconds=3, max_packets=200
    )

    async def capture() -> list[Any]:
        client = await cluster.client()
        try:
            call = client.machine.PacketCapture(request, timeout=30)
            chunks = [await read(call)]  # the header: the socket is bound
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
                for i in range(200):
                    sender.sendto(b"B%d" % i, ("127.0.0.1", port))
            while (chunk := await read(call)) is not None:
                chunks.append(chunk)
            return chunks
        finally:
            await client.close()

    try:
        chunks = run(capture())
    finally:
        receiver.close()
    _, records = read_pcap(b"".join(chunks))
    assert len(records) == 200
    assert len(chunks) - 1 < 20, len(chunks)  # batched, not one message per packet
    for chunk in chunks[1:]:
        read_pcap(chunks[0] + chunk)  # every chunk holds whole records


def test_several_nodes_at_once_are_refused(cluster: LiveCluster, tmp_path: Path) -> None:
    config = role_config(cluster, Role.OPERATOR, tmp_path / "operator")
    out = tmp_path / "never.pcap"
    result = subprocess.run(
        pcap_argv(
            f"{cluster.controlplanes[0]},{cluster.workers[0]}",
            "--duration",
            "1s",
            "-o",
            str(out),
        ),
        env=ctl_env(config),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1 and "one node at a time" in result.stderr
    assert not out.exists()


def test_show_program_prints_the_ddd_form_without_a_call(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            *BASALTCTL,
            "pcap",
            "-i",
            "lo",
            "--bpf-filter",
            "tcp port 80",
            "--show-program",
            "-o",
            str(tmp_path / "never.pcap"),
        ],
        env={**os.environ, "BASALTCONFIG": str(tmp_path / "no-config")},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert bpf.parse_raw(result.stdout) == bpf.compile_filter("tcp port 80")


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv"
)
def test_without_cap_net_raw_the_refusal_is_a_clear_failed_precondition() -> None:
    """machined's socket code in a process whose bounding set lacks CAP_NET_RAW."""
    script = (
        "from basalt.machined.api import pcap\n"
        "from basalt.machinery.api import machine_pb2\n"
        "from basalt.machinery.errors import BasaltError\n"
        "plan = pcap.plan_capture(machine_pb2.PacketCaptureRequest(interface='lo'))\n"
        "try:\n"
        "    pcap.open_capture(plan)\n"
        "except BasaltError as exc:\n"
        "    print(exc.kind.name, exc.render())\n"
    )
    result = subprocess.run(
        [
            "setpriv",
            "--bounding-set=-net_raw",
            "--inh-caps=-net_raw",
            "--",
            sys.executable,
            "-c",
            script,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert result.stdout.startswith("FAILED_PRECONDITION capturing needs CAP_NET_RAW"), result
    assert "hint:" in result.stdout


def test_a_reader_that_closes_the_pipe_ends_the_capture_cleanly(
    cluster: LiveCluster, tmp_path: Path
) -> None:
    """``basaltctl pcap -o - | tcpdump -r - -c 1``: when the reader exits, so does pcap."""
    config = role_config(cluster, Role.OPERATOR, tmp_path / "operator")
    receiver = free_port(socket.SOCK_DGRAM)
    port = receiver.getsockname()[1]
    process = subprocess.Popen(
        pcap_argv(
            cluster.controlplanes[0],
            "--duration",
            "60s",
            "--bpf-filter",
            f"udp dst port {port}",
            "-o",
            "-",
        ),
        env=ctl_env(config),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        started(process)
        assert process.stdout is not None
        assert len(process.stdout.read(24)) == 24  # the global header
        process.stdout.close()
        begin = time.monotonic()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            while process.poll() is None and time.monotonic() - begin < 20:
                sender.sendto(b"after the reader left", ("127.0.0.1", port))
                time.sleep(0.1)
        assert process.wait(timeout=10) == 0
    finally:
        process.kill()
        receiver.close()
    assert process.stderr is not None
    assert "error" not in process.stderr.read().decode()
    assert time.monotonic() - begin < 20
