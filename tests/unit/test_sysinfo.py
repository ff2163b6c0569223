"""System information and the kernel log, checked against this very test process."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import AsyncGenerator, Iterator
from pathlib import Path

import psutil
import pytest

from basalt.machined.api import sysinfo
from basalt.machined.api.errors import UnavailableError
from basalt.machined.sys import kmsg

ADDRESS = "127.0.0.77"


# -- processes and memory -----------------------------------------------------------


def test_processes_of_the_tree_include_this_process() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(10)"])
    try:
        tree = sysinfo.process_tree(os.getpid())
        assert {os.getpid(), child.pid} <= tree
        found = {p.pid: p for p in sysinfo.processes(tree)}
    finally:
        child.kill()
        child.wait()
    me = found[os.getpid()]
    assert me.ppid == os.getppid()
    assert me.command and me.args
    assert "python" in me.args.lower() or "pytest" in me.args
    assert me.threads >= 1 and me.resident_memory > 0 and me.virtual_memory >= me.resident_memory
    assert me.state in {"R", "S"}
    assert found[child.pid].ppid == os.getpid()


def test_processes_skip_what_is_gone() -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    assert sysinfo.process_tree(gone.pid) == set()
    assert [p.pid for p in sysinfo.processes({gone.pid, os.getpid()})] == [os.getpid()]
    assert os.getpid() in {p.pid for p in sysinfo.processes(None)}


def test_memory_of_the_node_and_the_agent() -> None:
    mem = sysinfo.memory(os.getpid())
    assert mem.total > 0 and mem.available > 0 and mem.free > 0 and mem.cached > 0
    assert mem.total >= mem.available and mem.swap_total >= mem.swap_free
    assert 0 < mem.agent_rss < mem.total
    assert not mem.HasField("metadata")


# -- mounts -------------------------------------------------------------------------


def test_mounts_include_root_with_its_size() -> None:
    mounts = {m.mounted_on: m for m in sysinfo.mounts()}
    assert mounts["/"].size > 0 and mounts["/"].type
    assert mounts["/"].available <= mounts["/"].size


def test_mounts_unescape_and_survive_unreadable_ones(tmp_path: Path) -> None:
    table = tmp_path / "mounts"
    table.write_text(
        f"tmpfs {tmp_path} tmpfs rw,nosuid 0 0\n"
        "server:/x /mnt/with\\040space nfs4 ro 0 0\n"
        "garbage\n"
    )
    first, second = sysinfo.mounts(table)
    assert (first.mounted_on, first.options) == (str(tmp_path), "rw,nosuid") and first.size > 0
    assert (second.mounted_on, second.filesystem) == ("/mnt/with space", "server:/x")
    assert second.size == 0


# -- sockets ------------------------------------------------------------------------


@pytest.fixture
def sockets() -> Iterator[dict[str, socket.socket]]:
    made = {
        "listener": socket.create_server((ADDRESS, 0)),
        "udp": socket.socket(socket.AF_INET, socket.SOCK_DGRAM),
        "other": socket.create_server(("127.0.0.78", 0)),
        "wildcard": socket.create_server(("0.0.0.0", 0)),
    }
    made["udp"].bind((ADDRESS, 0))
    yield made
    for sock in made.values():
        sock.close()


def _port(sock: socket.socket) -> int:
    port: int = sock.getsockname()[1]
    return port


def test_connections_of_the_node_address(sockets: dict[str, socket.socket]) -> None:
    found = sysinfo.connections(ADDRESS, {os.getpid()})
    by_port = {(c.l4proto, c.local_port): c for c in found}
    listener = by_port[("tcp", _port(sockets["listener"]))]
    assert (listener.local_ip, listener.state, listener.pid) == (ADDRESS, "LISTEN", os.getpid())
    assert listener.process == psutil.Process().name()
    assert by_port[("udp", _port(sockets["udp"]))].state == "NONE"
    assert ("tcp", _port(sockets["wildcard"])) in by_port  # a wildcard this process owns
    assert ("tcp", _port(sockets["other"])) not in by_port
    assert all(c.local_ip in {ADDRESS, "0.0.0.0", "::"} for c in found)

    strangers = sysinfo.connections(ADDRESS, {1})
    assert ("tcp", _port(sockets["wildcard"])) not in {(c.l4proto, c.local_port) for c in strangers}
    everything = sysinfo.connections(None, None)
    assert _port(sockets["other"]) in {c.local_port for c in everything}


def test_connections_fall_back_to_proc_net(
    sockets: dict[str, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    def denied(kind: str = "inet") -> list[object]:
        raise psutil.AccessDenied(os.getpid())

    monkeypatch.setattr(psutil, "net_connections", denied)
    found = {(c.l4proto, c.local_port): c for c in sysinfo.connections(ADDRESS, {os.getpid()})}
    listener = found[("tcp", _port(sockets["listener"]))]
    assert (listener.local_ip, listener.state, listener.pid) == (ADDRESS, "LISTEN", 0)
    assert ("udp", _port(sockets["udp"])) in found
    assert ("tcp", _port(sockets["wildcard"])) not in found  # no owner known: not the node's


@pytest.mark.skipif(sys.byteorder != "little", reason="/proc/net words are in host order")
def test_proc_net_addresses_decode() -> None:
    assert sysinfo._proc_net_address("0100007F:1F90") == ("127.0.0.1", 8080)
    assert sysinfo._proc_net_address("00000000000000000000000001000000:0016") == ("::1", 22)
    line = "   0: 4D00007F:0050 0200007F:D431 01 00000000:00000000 00:00000000 00000000 0 0 1"
    conn = sysinfo._parse_proc_net_line("tcp", line)
    assert conn is not None
    assert (conn.local_ip, conn.local_port, conn.state) == (ADDRESS, 80, "ESTABLISHED")
    assert (conn.remote_ip, conn.remote_port) == ("127.0.0.2", 54321)


# -- disks --------------------------------------------------------------------------


def test_disks_of_this_machine() -> None:
    found = sysinfo.disks()
    assert isinstance(found, list)
    for disk in found:
        assert disk.path.startswith("/dev/") and disk.size > 0
        assert not re.match(r"/dev/(loop|ram|zram)", disk.path)


def test_disks_from_a_sys_block_tree(tmp_path: Path) -> None:
    sys_block = tmp_path / "sys" / "block"

    def device(name: str, files: dict[str, str]) -> None:
        for rel, text in files.items():
            (sys_block / name / rel).parent.mkdir(parents=True, exist_ok=True)
            (sys_block / name / rel).write_text(text + "\n")

    device("vda", {"size": "2048", "ro": "0", "queue/rotational": "1", "serial": "VIRT1"})
    sda_files = {"size": "100", "ro": "1", "device/model": "QEMU HARDDISK   "}
    device("sda", {**sda_files, "device/serial": "S1", "queue/rotational": "0"})
    device("loop0", {"size": "4096"})
    device("sr0", {"size": "0"})
    vda, sda = sorted(sysinfo.disks(tmp_path), key=lambda d: d.path, reverse=True)
    assert (vda.path, vda.size, vda.serial) == ("/dev/vda", 2048 * 512, "VIRT1")
    assert (vda.readonly, vda.rotational) == (False, True)
    assert (sda.model, sda.serial) == ("QEMU HARDDISK", "S1")
    assert (sda.readonly, sda.rotational) == (True, False)
    assert sysinfo.disks(tmp_path / "missing") == []


# -- kernel log ---------------------------------------------------------------------

LINE = re.compile(rb"^\[ *\d+\.\d{6}\] ")


def test_format_record() -> None:
    record = b"6,42,12345678,-,caller=T1;hello \\x1b world\n SUBSYSTEM=net\n DEVICE=n2\n"
    assert kmsg.format_record(record) == b"[   12.345678] hello \\x1b world"
    assert kmsg.format_record(b"4,1,5,-;x") == b"[    0.000005] x"
    assert kmsg.format_record(b"no header") is None
    assert kmsg.format_record(b"6,1,abc,-;x") is None


def test_kmsg_reads_or_says_it_cannot() -> None:
    async def run() -> list[bytes]:
        return [line async for line in kmsg.read_kmsg(follow=False, tail=False)]

    try:
        lines = asyncio.run(asyncio.wait_for(run(), timeout=5))
    except UnavailableError as exc:
        assert "kernel log is not readable here" in str(exc) and exc.hint
        return
    assert lines and all(LINE.match(line) for line in lines)


def test_kmsg_tail_without_follow_ends_at_once() -> None:
    async def run() -> list[bytes]:
        return [line async for line in kmsg.read_kmsg(follow=False, tail=True)]

    try:
        lines = asyncio.run(asyncio.wait_for(run(), timeout=5))
    except UnavailableError:
        return
    assert len(lines) < 5  # only what the kernel logged in between, usually nothing


def test_kmsg_follow_waits_without_spinning() -> None:
    async def run() -> bytes | None:
        stream = kmsg.read_kmsg(follow=True, tail=True)
        assert isinstance(stream, AsyncGenerator)  # so it can be closed
        try:
            return await asyncio.wait_for(anext(stream), timeout=0.5)
        except TimeoutError:
            return None
        finally:
            await stream.aclose()

    started = time.process_time()
    try:
        line = asyncio.run(run())
    except UnavailableError:
        return
    assert line is None or LINE.match(line)
    assert time.process_time() - started < 0.3  # waited on the loop, not in a busy loop


def test_kmsg_unavailable_before_anything_is_yielded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kmsg, "KMSG", "/nonexistent/kmsg")

    async def run() -> list[bytes]:
        return [line async for line in kmsg.read_kmsg(follow=True, tail=False)]

    with pytest.raises(UnavailableError, match="not readable here: no such file") as caught:
        asyncio.run(asyncio.wait_for(run(), timeout=5))
    assert "/dev/kmsg" in (caught.value.hint or "")
