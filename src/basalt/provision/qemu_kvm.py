"""Whether KVM works here: a probe guest with a deadline (on some hosts /dev/kvm opens
and the guest then hangs), cached until the host reboots or QEMU changes."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from basalt.machinery.fileio import write_atomic

from .common import ProvisionError

ACCELERATORS = ("auto", "kvm", "tcg")
PROBE_TIMEOUT = 10.0
#: The probe boots the image's kernel with no root: it ends in this panic, then
#: ``panic=-1`` + ``-no-reboot`` end QEMU. Seeing it proves guest code ran under KVM.
PROBE_PROOF = b"Kernel panic"


@dataclass(frozen=True)
class KvmProbe:
    usable: bool
    reason: str


def probe_command(qemu: str, kernel: Path) -> list[str]:
    """A KVM guest that boots the image's kernel without a root: it must panic and end."""
    return [
        qemu,
        "-accel",
        "kvm",
        "-M",
        "microvm,x-option-roms=off,rtc=on,isa-serial=on",
        "-cpu",
        "max",
        "-m",
        "128",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-serial",
        "stdio",
        "-monitor",
        "none",
        "-no-reboot",
        "-kernel",
        str(kernel),
        "-append",
        "console=ttyS0 panic=-1 tsc_early_khz=2000000 no_timer_check",
    ]


def probe_kvm(
    qemu: str, kernel: Path, *, timeout: float = PROBE_TIMEOUT, device: Path = Path("/dev/kvm")
) -> KvmProbe:
    """Whether a KVM guest really runs here, found out in a child QEMU with a deadline.

    On some hosts ``/dev/kvm`` exists and opens, and the guest then hangs forever: only a
    guest that boots its kernel within ``timeout`` counts.
    """
    if not device.exists():
        return KvmProbe(False, f"{device} does not exist")
    if not os.access(device, os.R_OK | os.W_OK):
        return KvmProbe(False, f"{device} is not readable and writable by this user")
    try:
        child = subprocess.Popen(
            probe_command(qemu, kernel),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    except OSError as exc:
        return KvmProbe(False, f"cannot run {qemu}: {exc}")
    try:
        output, _ = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.communicate(timeout=5)
        return KvmProbe(False, f"a KVM guest did not boot within {timeout:g}s (KVM hangs here)")
    if child.returncode == 0 and PROBE_PROOF in output:
        return KvmProbe(True, "a KVM guest booted its kernel")
    last = output.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
    return KvmProbe(False, f"a KVM guest failed (exit {child.returncode}): {last[0][:200]}")


def _probe_key(qemu: str, kernel: Path) -> str:
    """Same boot of this host, same QEMU binary, same kernel: the same answer."""
    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot_id = "unknown"
    binary = shutil.which(qemu) or qemu
    facts = [boot_id, binary]
    for path in (Path(binary), kernel):
        with contextlib.suppress(OSError):
            stat = path.stat()
            facts += [str(stat.st_size), str(stat.st_mtime_ns)]
    return hashlib.sha256("\0".join(facts).encode()).hexdigest()


def cached_probe(
    cache: Path | None, qemu: str, kernel: Path, probe: Callable[[], KvmProbe]
) -> KvmProbe:
    """``probe()``, remembered in ``cache`` until the host reboots or QEMU changes."""
    key = _probe_key(qemu, kernel)
    if cache is not None:
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            data = json.loads(cache.read_text())
            if data["key"] == key:
                return KvmProbe(bool(data["usable"]), str(data["reason"]) + " (cached)")
    result = probe()
    if cache is not None:
        with contextlib.suppress(OSError):
            cache.parent.mkdir(parents=True, exist_ok=True)
            payload = {"key": key, "usable": result.usable, "reason": result.reason}
            write_atomic(cache, json.dumps(payload) + "\n")
    return result


def choose_accel(requested: str, probe: Callable[[], KvmProbe]) -> tuple[str, str]:
    """(accelerator, why): TCG unless KVM was asked for or a probe shows it works."""
    if requested not in ACCELERATORS:
        raise ProvisionError(f"--accel {requested!r}: expected one of {', '.join(ACCELERATORS)}")
    if requested == "tcg":
        return "tcg", "TCG requested"
    result = probe()
    if requested == "kvm":
        if not result.usable:
            raise ProvisionError(
                f"--accel kvm: KVM does not work here: {result.reason}",
                hint="use --accel tcg (or auto, which falls back to TCG)",
            )
        return "kvm", result.reason
    return ("kvm", result.reason) if result.usable else ("tcg", result.reason)
