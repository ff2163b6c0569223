"""The OCI runtime spec of a one-shot container: containerd's usual defaults, own
namespaces for everything (its own empty network namespace too), no extra privileges."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

SPEC_TYPE_URL = "types.containerd.io/opencontainers/runtime-spec/1/Spec"
DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

CAPABILITIES = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
]
MASKED = [
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
]
READONLY = [
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
]


def command(config: dict[str, Any], args: Sequence[str]) -> list[str]:
    """The process to run: the image's entrypoint with ``args`` in place of its cmd."""
    settings = config.get("config") or {}
    entrypoint = list(settings.get("Entrypoint") or [])
    cmd = list(args) if args else list(settings.get("Cmd") or [])
    argv = entrypoint + cmd
    if not argv:
        raise ValueError("the image has no entrypoint or cmd: give the command to run")
    return argv


def environment(config: dict[str, Any], env: Sequence[str]) -> list[str]:
    """The image's environment, then ``env`` (NAME=value; later names win)."""
    merged: dict[str, str] = {}
    image_env = list((config.get("config") or {}).get("Env") or [])
    for item in [*image_env, *env]:
        key, sep, _ = item.partition("=")
        if not key or not sep:
            raise ValueError(f"environment entry {item!r} is not NAME=value")
        merged[key] = item
    merged.setdefault("PATH", DEFAULT_PATH)
    return list(merged.values())


def runtime_spec(
    container_id: str,
    argv: Sequence[str],
    env: Sequence[str],
    cwd: str = "/",
    cgroup_parent: str = "/basalt",
) -> bytes:
    mounts = [
        _mount("/proc", "proc", "proc", ["nosuid", "noexec", "nodev"]),
        _mount("/dev", "tmpfs", "tmpfs", ["nosuid", "strictatime", "mode=755", "size=65536k"]),
        _mount(
            "/dev/pts",
            "devpts",
            "devpts",
            ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"],
        ),
        _mount(
            "/dev/shm", "tmpfs", "shm", ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]
        ),
        _mount("/dev/mqueue", "mqueue", "mqueue", ["nosuid", "noexec", "nodev"]),
        _mount("/sys", "sysfs", "sysfs", ["nosuid", "noexec", "nodev", "ro"]),
    ]
    spec = {
        "ociVersion": "1.0.2-dev",
        "process": {
            "terminal": False,
            "user": {"uid": 0, "gid": 0},
            "args": list(argv),
            "env": list(env),
            "cwd": cwd or "/",
            "capabilities": dict.fromkeys(("bounding", "effective", "permitted"), CAPABILITIES),
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": True,
        },
        "root": {"path": "rootfs"},
        "hostname": container_id[:63],
        "mounts": mounts,
        "linux": {
            "resources": {"devices": [{"allow": False, "access": "rwm"}]},
            "cgroupsPath": f"{cgroup_parent}/{container_id}",
            "namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount", "network")],
            "maskedPaths": MASKED,
            "readonlyPaths": READONLY,
        },
    }
    return json.dumps(spec, separators=(",", ":")).encode()


def _mount(destination: str, kind: str, source: str, options: list[str]) -> dict[str, Any]:
    return {"destination": destination, "type": kind, "source": source, "options": options}
