"""cgroup usage, read from the kernel's interface files (``cgroups`` and ``stats``).

A *preset* names the values an operator wants (``cpu``, ``memory``, ``io``, ``pids``);
each value is keyed by the cgroup v2 interface file it comes from, with the key inside
a keyed file after a dot: ``memory.current``, ``cpu.stat.usage_usec``,
``io.stat.rbytes``. Values are the kernel's text (``max`` stays ``max``).

On a pure cgroup v2 host every value comes from the unified hierarchy. On a hybrid host
(controllers still bound to v1 hierarchies, as on some CI machines that run process
nodes) a controller missing from the unified hierarchy is read from its v1 hierarchy and
translated to the v2 key: ``memory.usage_in_bytes`` answers ``memory.current``,
``cpuacct.usage`` (ns) answers ``cpu.stat.usage_usec``, and so on; see :data:`_V1`.

Parsers take text and are tested without a kernel; readers never raise for a file that
is missing or unreadable (the value is left out), only for a bad request.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "PRESETS",
    "CgroupError",
    "Hierarchies",
    "parse_cgroup_file",
    "parse_io_stat",
    "parse_keyed",
    "parse_mountinfo",
    "preset_keys",
    "read_pid",
    "walk",
]

#: Preset -> the values it shows, by key (see the module docstring).
PRESETS: dict[str, tuple[str, ...]] = {
    "cpu": ("cpu.stat.usage_usec", "cpu.stat.user_usec", "cpu.stat.system_usec",
            "cpu.weight", "cpu.max"),
    "memory": ("memory.current", "memory.peak", "memory.max", "memory.stat.anon",
               "memory.stat.file"),
    "io": ("io.stat.rbytes", "io.stat.wbytes", "io.stat.rios", "io.stat.wios"),
    "pids": ("pids.current", "pids.max"),
}  # fmt: skip
#: Walks stop after this many cgroups (a node has a few hundred at most).
MAX_CGROUPS = 5000
#: The v1 memory limit that means "no limit" (page-rounded LONG_MAX, or close to it).
_V1_UNLIMITED = 1 << 62


class CgroupError(ValueError):
    """A request that cannot be answered: unknown preset, a path that is not a cgroup."""


def preset_keys(preset: str) -> tuple[str, ...]:
    """The keys of ``preset`` (``all`` or empty: every preset's). Raises CgroupError."""
    if preset in ("", "all"):
        return tuple(key for keys in PRESETS.values() for key in keys)
    if preset not in PRESETS:
        raise CgroupError(
            f"unknown cgroup preset {preset!r}; the presets are {', '.join(PRESETS)} and all"
        )
    return PRESETS[preset]


# -- parsers ---------------------------------------------------------------------------


def parse_keyed(text: str) -> dict[str, str]:
    """A flat keyed file (``cpu.stat``, ``memory.stat``): ``key value`` per line."""
    found = {}
    for line in text.splitlines():
        key, _, value = line.strip().partition(" ")
        if key and value:
            found[key] = value.strip()
    return found


def parse_io_stat(text: str) -> dict[str, str]:
    """v2 ``io.stat`` (``MAJ:MIN rbytes=1 wbytes=2 ...`` per device), summed over devices."""
    totals: dict[str, int] = {}
    for line in text.splitlines():
        for field in line.split()[1:]:
            key, _, value = field.partition("=")
            if value.isdigit():
                totals[key] = totals.get(key, 0) + int(value)
    return {key: str(value) for key, value in totals.items()}


def _parse_blkio(text: str) -> dict[str, int]:
    """v1 ``blkio.throttle.io_service_bytes``/``io_serviced``: Read and Write, summed."""
    totals = {"Read": 0, "Write": 0}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1] in totals and parts[2].isdigit():
            totals[parts[1]] += int(parts[2])
    return totals


def parse_cgroup_file(text: str) -> dict[str, str]:
    """``/proc/PID/cgroup`` -> hierarchy -> path: ``""`` is the v2 one, a v1 hierarchy
    appears under each of its controllers (``cpu,cpuacct`` gives two keys)."""
    found = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if not controllers:
            found[""] = path
        for controller in controllers.split(","):
            if controller:
                found[controller] = path
    return found


def parse_mountinfo(text: str) -> dict[str, str]:
    """``/proc/self/mountinfo`` -> cgroup hierarchy -> mount point, as in
    :func:`parse_cgroup_file` (the first mount of each wins)."""
    found: dict[str, str] = {}
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, rest = left.split(), right.split()
        if len(fields) < 5 or len(rest) < 3:
            continue
        point = fields[4].replace("\\040", " ")
        if rest[0] == "cgroup2":
            found.setdefault("", point)
        elif rest[0] == "cgroup":
            for option in rest[2].split(","):
                if option not in ("rw", "ro") and "=" not in option:
                    found.setdefault(option, point)
    return found


# -- where each value comes from -------------------------------------------------------

_Read = Callable[[Callable[[str], str | None]], str | None]


def _whole(name: str) -> _Read:
    return lambda read: read(name)


def _keyed(name: str, key: str) -> _Read:
    def value(read: Callable[[str], str | None]) -> str | None:
        text = read(name)
        return None if text is None else parse_keyed(text).get(key)

    return value


def _io(key: str) -> _Read:
    def value(read: Callable[[str], str | None]) -> str | None:
        text = read("io.stat")
        return None if text is None else parse_io_stat(text).get(key, "0")

    return value


def _v1_scaled(name: str, divisor: int) -> _Read:
    def value(read: Callable[[str], str | None]) -> str | None:
        text = read(name)
        return str(int(text) // divisor) if text and text.isdigit() else None

    return value


def _v1_limit(name: str) -> _Read:
    def value(read: Callable[[str], str | None]) -> str | None:
        text = read(name)
        if not text or not text.isdigit():
            return None
        return "max" if int(text) >= _V1_UNLIMITED else text

    return value


def _v1_weight(read: Callable[[str], str | None]) -> str | None:
    shares = read("cpu.shares")
    if not shares or not shares.isdigit():
        return None
    # The conversion container runtimes use between cpu.shares and cpu.weight.
    return str(1 + ((int(shares) - 2) * 9999) // 262142)


def _v1_cpu_max(read: Callable[[str], str | None]) -> str | None:
    quota, period = read("cpu.cfs_quota_us"), read("cpu.cfs_period_us")
    if quota is None or period is None:
        return None
    return f"{'max' if quota.startswith('-') else quota} {period}"


def _v1_blkio(name: str, direction: str) -> _Read:
    def value(read: Callable[[str], str | None]) -> str | None:
        text = read(name)
        return None if text is None else str(_parse_blkio(text)[direction])

    return value


#: key -> (v2 controller, how to read it on v2).
_V2: dict[str, tuple[str, _Read]] = {
    "cpu.stat.usage_usec": ("cpu", _keyed("cpu.stat", "usage_usec")),
    "cpu.stat.user_usec": ("cpu", _keyed("cpu.stat", "user_usec")),
    "cpu.stat.system_usec": ("cpu", _keyed("cpu.stat", "system_usec")),
    "cpu.weight": ("cpu", _whole("cpu.weight")),
    "cpu.max": ("cpu", _whole("cpu.max")),
    "memory.current": ("memory", _whole("memory.current")),
    "memory.peak": ("memory", _whole("memory.peak")),
    "memory.max": ("memory", _whole("memory.max")),
    "memory.stat.anon": ("memory", _keyed("memory.stat", "anon")),
    "memory.stat.file": ("memory", _keyed("memory.stat", "file")),
    "io.stat.rbytes": ("io", _io("rbytes")),
    "io.stat.wbytes": ("io", _io("wbytes")),
    "io.stat.rios": ("io", _io("rios")),
    "io.stat.wios": ("io", _io("wios")),
    "pids.current": ("pids", _whole("pids.current")),
    "pids.max": ("pids", _whole("pids.max")),
}
# cpu.stat's usage_usec counts every task on v2 even without the cpu controller enabled.
_V2_ALWAYS = ("cpu.stat.usage_usec", "cpu.stat.user_usec", "cpu.stat.system_usec")

#: key -> (v1 hierarchy, how to read it there).
_V1: dict[str, tuple[str, _Read]] = {
    "cpu.stat.usage_usec": ("cpuacct", _v1_scaled("cpuacct.usage", 1000)),
    "cpu.stat.user_usec": ("cpuacct", _v1_scaled("cpuacct.usage_user", 1000)),
    "cpu.stat.system_usec": ("cpuacct", _v1_scaled("cpuacct.usage_sys", 1000)),
    "cpu.weight": ("cpu", _v1_weight),
    "cpu.max": ("cpu", _v1_cpu_max),
    "memory.current": ("memory", _whole("memory.usage_in_bytes")),
    "memory.peak": ("memory", _whole("memory.max_usage_in_bytes")),
    "memory.max": ("memory", _v1_limit("memory.limit_in_bytes")),
    "memory.stat.anon": ("memory", _keyed("memory.stat", "rss")),
    "memory.stat.file": ("memory", _keyed("memory.stat", "cache")),
    "io.stat.rbytes": ("blkio", _v1_blkio("blkio.throttle.io_service_bytes", "Read")),
    "io.stat.wbytes": ("blkio", _v1_blkio("blkio.throttle.io_service_bytes", "Write")),
    "io.stat.rios": ("blkio", _v1_blkio("blkio.throttle.io_serviced", "Read")),
    "io.stat.wios": ("blkio", _v1_blkio("blkio.throttle.io_serviced", "Write")),
    "pids.current": ("pids", _whole("pids.current")),
    "pids.max": ("pids", _whole("pids.max")),
}


def _read_text(directory: str) -> Callable[[str], str | None]:
    cache: dict[str, str | None] = {}

    def read(name: str) -> str | None:
        if name not in cache:
            try:
                with open(os.path.join(directory, name), encoding="ascii", errors="replace") as f:
                    cache[name] = f.read().strip()
            except OSError:
                cache[name] = None
        return cache[name]

    return read


@dataclass(frozen=True)
class Hierarchies:
    """Where the cgroup hierarchies are mounted and where a process sits in them.

    ``mounts`` and ``own`` are keyed as by :func:`parse_mountinfo` (``""``: v2);
    ``v2_controllers`` are those enabled at the v2 root.
    """

    mounts: dict[str, str]
    own: dict[str, str]
    v2_controllers: frozenset[str]

    @classmethod
    def current(cls, proc: Path = Path("/proc")) -> Hierarchies:
        """This process's view (machined's): its mounts and its own cgroups."""
        try:
            mounts = parse_mountinfo((proc / "self" / "mountinfo").read_text())
            own = parse_cgroup_file((proc / "self" / "cgroup").read_text())
        except OSError:
            mounts, own = {}, {}
        controllers: frozenset[str] = frozenset()
        if "" in mounts:
            try:
                text = Path(mounts[""], "cgroup.controllers").read_text()
                controllers = frozenset(text.split())
            except OSError:
                pass
        return cls(mounts, own, controllers)

    def source(self, key: str) -> tuple[str, _Read] | None:
        """(hierarchy, reader) of one value: v2 when its controller is there, else v1."""
        controller, reader = _V2[key]
        hierarchy, v1_reader = _V1[key]
        if "" in self.mounts:
            if controller in self.v2_controllers:
                return "", reader
            if key in _V2_ALWAYS and hierarchy not in self.mounts:
                return "", reader
        if hierarchy in self.mounts:
            return hierarchy, v1_reader
        return None

    def base(self, hierarchy: str) -> str:
        """The node's own subtree in ``hierarchy`` (relative; ``""``: the whole tree)."""
        return self.own.get(hierarchy, "/").strip("/")


def _grouped(hierarchies: Hierarchies, keys: tuple[str, ...]) -> dict[str, list[tuple[str, _Read]]]:
    groups: dict[str, list[tuple[str, _Read]]] = {}
    for key in keys:
        found = hierarchies.source(key)
        if found is not None:
            groups.setdefault(found[0], []).append((key, found[1]))
    return groups


def _check_relative(path: str) -> str:
    clean = path.strip("/")
    if "\x00" in clean or any(part in ("..", ".") for part in clean.split("/") if clean):
        raise CgroupError(f"cgroup path {path!r} may not contain '.', '..' or NUL")
    return clean


def walk(
    hierarchies: Hierarchies, keys: tuple[str, ...], path: str = "", limit: int = MAX_CGROUPS
) -> tuple[list[tuple[str, dict[str, str]]], bool]:
    """Every cgroup under ``path`` (relative to the hierarchy root; empty: the node's own
    subtree, see :meth:`Hierarchies.base`), parents first, with its values of ``keys``.

    Returns (rows, truncated). Raises CgroupError when ``path`` is no cgroup anywhere.
    """
    relative = _check_relative(path)
    rows: dict[str, dict[str, str]] = {}
    found_any = False
    truncated = False
    for hierarchy, readers in _grouped(hierarchies, keys).items():
        start = relative if path else hierarchies.base(hierarchy)
        top = os.path.join(hierarchies.mounts[hierarchy], start)
        if not os.path.isdir(top):
            continue
        found_any = True
        for rel, directory in _directories(top, start, limit):
            if rel not in rows and len(rows) >= limit:
                truncated = True
                break
            read = _read_text(directory)
            values = rows.setdefault(rel, {})
            for key, reader in readers:
                value = reader(read)
                if value is not None:
                    values[key] = value
    if not found_any and path:
        raise CgroupError(f"no cgroup {relative!r} on this node")
    return sorted(rows.items()), truncated


def _directories(top: str, start: str, limit: int) -> Iterator[tuple[str, str]]:
    stack = [(start, top)]
    seen = 0
    while stack and seen <= limit:
        rel, directory = stack.pop()
        seen += 1
        yield rel, directory
        try:
            with os.scandir(directory) as entries:
                children = sorted(e.name for e in entries if e.is_dir(follow_symlinks=False))
        except OSError:
            continue
        for name in reversed(children):
            stack.append((f"{rel}/{name}" if rel else name, os.path.join(directory, name)))


def read_pid(hierarchies: Hierarchies, pid: int, keys: tuple[str, ...]) -> dict[str, str]:
    """The values of ``keys`` for the cgroups process ``pid`` is in ({} when it is gone)."""
    try:
        own = parse_cgroup_file(Path(f"/proc/{pid}/cgroup").read_text())
    except OSError:
        return {}
    values: dict[str, str] = {}
    for hierarchy, readers in _grouped(hierarchies, keys).items():
        if hierarchy not in own:
            continue
        read = _read_text(os.path.join(hierarchies.mounts[hierarchy], own[hierarchy].strip("/")))
        for key, reader in readers:
            value = reader(read)
            if value is not None:
                values[key] = value
    return values
