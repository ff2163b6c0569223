"""What the node runs and holds: processes, memory, mounts, sockets, disks.

Each function is synchronous and reads psutil, ``/proc`` or ``/sys``; call it with
:func:`asyncio.to_thread`. Answers are snapshots: a process or socket that goes away
while it is read is simply left out.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import sys
from pathlib import Path

import psutil

from basalt.machinery.api import machine_pb2

__all__ = ["connections", "disks", "memory", "mounts", "process_tree", "processes"]

_PROCESS_ATTRS = [
    "ppid",
    "status",
    "num_threads",
    "cpu_times",
    "memory_info",
    "name",
    "cmdline",
]

#: psutil's status words as ``ps`` shows them.
_STATE_LETTERS = {
    psutil.STATUS_RUNNING: "R",
    psutil.STATUS_SLEEPING: "S",
    psutil.STATUS_DISK_SLEEP: "D",
    psutil.STATUS_STOPPED: "T",
    psutil.STATUS_TRACING_STOP: "t",
    psutil.STATUS_ZOMBIE: "Z",
    psutil.STATUS_DEAD: "X",
    psutil.STATUS_WAKING: "W",
    psutil.STATUS_PARKED: "P",
    psutil.STATUS_IDLE: "I",
}

#: TCP states in /proc/net/tcp{,6}, named as psutil names them.
_TCP_STATES = {
    0x01: "ESTABLISHED",
    0x02: "SYN_SENT",
    0x03: "SYN_RECV",
    0x04: "FIN_WAIT1",
    0x05: "FIN_WAIT2",
    0x06: "TIME_WAIT",
    0x07: "CLOSE",
    0x08: "CLOSE_WAIT",
    0x09: "LAST_ACK",
    0x0A: "LISTEN",
    0x0B: "CLOSING",
    0x0C: "SYN_RECV",
}
_UDP_STATE = "NONE"  # UDP has no connection state (psutil's name for that)
_WILDCARDS = {ipaddress.ip_address("0.0.0.0"), ipaddress.ip_address("::")}

_MOUNT_ESCAPE = re.compile(r"\\([0-7]{3})")


# -- processes ----------------------------------------------------------------------


def process_tree(root_pid: int) -> set[int]:
    """``root_pid`` and all its descendants; empty when ``root_pid`` is gone."""
    try:
        children = psutil.Process(root_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return set()
    return {root_pid, *(child.pid for child in children)}


def processes(pids: set[int] | None) -> list[machine_pb2.ProcessInfo]:
    """Every process (or only ``pids``), by pid. Fields the agent may not read stay empty."""
    found = []
    for pid in sorted(psutil.pids() if pids is None else pids):
        info = _process_info(pid)
        if info is not None:
            found.append(info)
    return found


def _process_info(pid: int) -> machine_pb2.ProcessInfo | None:
    try:
        process = psutil.Process(pid)
        with process.oneshot():
            attrs = process.as_dict(_PROCESS_ATTRS, ad_value=None)
    except psutil.NoSuchProcess:
        return None
    info = machine_pb2.ProcessInfo(
        pid=pid,
        ppid=attrs["ppid"] or 0,
        state=_STATE_LETTERS.get(attrs["status"], attrs["status"] or ""),
        threads=attrs["num_threads"] or 0,
        command=attrs["name"] or "",
        args=" ".join(attrs["cmdline"] or ()),
    )
    if (times := attrs["cpu_times"]) is not None:
        info.cpu_time = times.user + times.system
    if (mem := attrs["memory_info"]) is not None:
        info.virtual_memory = mem.vms
        info.resident_memory = mem.rss
    return info


# -- memory -------------------------------------------------------------------------


def memory(agent_pid: int) -> machine_pb2.Memory:
    """The node's memory and swap in bytes, and the agent's resident size."""
    virtual = psutil.virtual_memory()
    swap = psutil.swap_memory()
    try:
        agent_rss = psutil.Process(agent_pid).memory_info().rss
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        agent_rss = 0
    return machine_pb2.Memory(
        total=virtual.total,
        available=virtual.available,
        free=virtual.free,
        buffers=getattr(virtual, "buffers", 0),
        cached=getattr(virtual, "cached", 0),
        shared=getattr(virtual, "shared", 0),
        swap_total=swap.total,
        swap_free=swap.free,
        agent_rss=agent_rss,
    )


# -- mounts -------------------------------------------------------------------------


def mounts(table: Path = Path("/proc/self/mounts")) -> list[machine_pb2.MountInfo]:
    """Every mount of this mount namespace; size 0 where the filesystem cannot be stat'ed."""
    found = []
    for line in table.read_text(errors="surrogateescape").splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        device, mounted_on, fstype, options = (_unescape_mount(f) for f in fields[:4])
        info = machine_pb2.MountInfo(
            filesystem=device, mounted_on=mounted_on, type=fstype, options=options
        )
        try:
            vfs = os.statvfs(mounted_on)
        except OSError:
            pass
        else:
            info.size = vfs.f_blocks * vfs.f_frsize
            info.available = vfs.f_bavail * vfs.f_frsize
        found.append(info)
    return found


def _unescape_mount(field: str) -> str:
    # The kernel writes space, tab, newline and backslash in mount fields as \ooo.
    return _MOUNT_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


# -- sockets ------------------------------------------------------------------------


def connections(address: str | None, pids: set[int] | None) -> list[machine_pb2.Connection]:
    """TCP and UDP sockets, sorted by protocol, local address and port.

    With ``address``, only sockets bound to it, plus wildcard ones (``0.0.0.0``, ``::``)
    owned by ``pids`` (by anyone when ``pids`` is None). When psutil may not map sockets
    to processes, ``/proc/net`` is read instead and pids stay 0.
    """
    try:
        found = _psutil_connections()
    except (psutil.AccessDenied, PermissionError):
        found = _proc_net_connections()
    if address is not None:
        wanted = _ip(address)
        found = [c for c in found if _keep(c, wanted, pids)]
    found.sort(key=lambda c: (c.l4proto, c.local_ip, c.local_port, c.remote_ip, c.remote_port))
    return found


def _keep(
    conn: machine_pb2.Connection,
    wanted: ipaddress.IPv4Address | ipaddress.IPv6Address | None,
    pids: set[int] | None,
) -> bool:
    local = _ip(conn.local_ip)
    if local is not None and local == wanted:
        return True
    if local not in _WILDCARDS:
        return False
    return pids is None or (conn.pid != 0 and conn.pid in pids)


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _psutil_connections() -> list[machine_pb2.Connection]:
    names: dict[int, str] = {}
    found = []
    for conn in psutil.net_connections(kind="inet"):
        if not conn.laddr:
            continue
        tcp = conn.type == socket.SOCK_STREAM
        v6 = conn.family == socket.AF_INET6
        info = machine_pb2.Connection(
            l4proto=("tcp" if tcp else "udp") + ("6" if v6 else ""),
            local_ip=conn.laddr.ip,
            local_port=conn.laddr.port,
            state=conn.status if tcp else _UDP_STATE,
            pid=conn.pid or 0,
        )
        if conn.raddr:
            info.remote_ip = conn.raddr.ip
            info.remote_port = conn.raddr.port
        if conn.pid:
            info.process = _process_name(conn.pid, names)
        found.append(info)
    return found


def _process_name(pid: int, cache: dict[int, str]) -> str:
    if pid not in cache:
        try:
            cache[pid] = psutil.Process(pid).name()
        except psutil.Error:
            cache[pid] = ""
    return cache[pid]


def _proc_net_connections(net: Path = Path("/proc/net")) -> list[machine_pb2.Connection]:
    """Sockets from ``/proc/net/{tcp,tcp6,udp,udp6}``, without owners."""
    found = []
    for proto in ("tcp", "tcp6", "udp", "udp6"):
        try:
            lines = (net / proto).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            conn = _parse_proc_net_line(proto, line)
            if conn is not None:
                found.append(conn)
    return found


def _parse_proc_net_line(proto: str, line: str) -> machine_pb2.Connection | None:
    # "  0: 0100007F:1F90 00000000:0000 0A ..." -> local, remote, state
    fields = line.split()
    if len(fields) < 4:
        return None
    try:
        local_ip, local_port = _proc_net_address(fields[1])
        remote_ip, remote_port = _proc_net_address(fields[2])
        state = int(fields[3], 16)
    except ValueError:
        return None
    conn = machine_pb2.Connection(
        l4proto=proto,
        local_ip=local_ip,
        local_port=local_port,
        state=_TCP_STATES.get(state, "UNKNOWN") if proto.startswith("tcp") else _UDP_STATE,
    )
    if remote_port or _ip(remote_ip) not in _WILDCARDS:
        conn.remote_ip = remote_ip
        conn.remote_port = remote_port
    return conn


def _proc_net_address(field: str) -> tuple[str, int]:
    """``0100007F:1F90`` -> ``("127.0.0.1", 8080)``: 32-bit words in host byte order."""
    hex_ip, hex_port = field.split(":")
    if len(hex_ip) not in (8, 32):
        raise ValueError(f"unexpected address {field!r}")
    raw = b"".join(
        int(hex_ip[i : i + 8], 16).to_bytes(4, sys.byteorder) for i in range(0, len(hex_ip), 8)
    )
    return str(ipaddress.ip_address(raw)), int(hex_port, 16)


# -- disks --------------------------------------------------------------------------


def disks(root: Path = Path("/")) -> list[machine_pb2.Disk]:
    """Block devices from ``root``/sys/block, leaving out loop, ram and zram devices and
    empty ones (what the Disks resource lists, without reading partition tables)."""
    from ..controllers.storage_status import read_disks

    return [
        machine_pb2.Disk(
            path=spec.device,
            size=spec.size,
            model=spec.model,
            serial=spec.serial,
            readonly=spec.readonly,
            rotational=spec.rotational,
        )
        for spec in read_disks(root, read_tables=False).values()
    ]
