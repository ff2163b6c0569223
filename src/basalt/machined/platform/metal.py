"""The metal platform: machined as PID 1 on a real or virtual machine.

As PID 1 the agent mounts the pseudo filesystems, reaps orphans, turns SIGTERM into a
shutdown and SIGINT (Ctrl-Alt-Del) into a reboot, and never exits: when it is done it
ends every other process, syncs and calls reboot(2); a fatal error is printed to the
console and the machine reboots after a delay.

The root filesystem stays read-only. The /etc files the agent generates (hostname,
hosts, resolv.conf) live in /run/basalt/etc and are bind-mounted read-only over the
image's /etc files; controllers rewrite them in place. On an installed disk the ext4
partitions named STATE and EPHEMERAL are mounted on /system/state and /var (see
basalt/machined/install.py); until an install provides them, /system and /var are
tmpfs: a node in maintenance mode runs from memory.

Started as ``--platform metal`` by a process that is not PID 1 (a developer's shell, a
test), none of the machine-wide steps happen: no mounts, no reaper, plain exit codes.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from basalt.machinery.image_layout import (
    GENERATED_ETC_FILES,
    IMAGE_MODULES,
    IMAGE_MOUNT_DIRECTORIES,
    IMAGE_MOUNT_FILES,
    IMAGE_MOUNT_POINTS,
)
from basalt.machinery.launch import EXIT_REBOOT, EXIT_SHUTDOWN

from ..extensions import mount_and_log
from ..sys import kexec, kmod, mount, power
from ..sys.pipes import HelperAnswerError, fork_helper, read_answer
from ..sys.reaper import Reaper
from . import NodePaths, Platform, PlatformMode, PowerAction
from .etc import render_hosts, write_generated

if TYPE_CHECKING:
    from ..sys.clock import Clock

__all__ = [
    "IMAGE_MODULES",
    "IMAGE_MOUNT_DIRECTORIES",
    "IMAGE_MOUNT_FILES",
    "IMAGE_MOUNT_POINTS",
    "RUNTIME_FILESYSTEMS",
    "MetalPlatform",
    "console",
    "kernel_hostname",
    "load_image_modules",
    "run_as_init",
]

log = logging.getLogger(__name__)

#: The host name of a node whose command line and config give none, without a NIC.
FALLBACK_HOSTNAME = "basalt"

#: How long a fatal error stays on the console before the machine reboots.
FATAL_DELAY = 10.0


#: Writable places on the read-only root. Until install mounts the STATE and EPHEMERAL
#: partitions on /system/state and /var, the node runs from memory. /etc/kubernetes
#: (static pod manifests, the kubelet config) is rendered from the config at every boot.
#: /etc/cni is where the CRI plugin reads CNI configs (net.d) and where CNI daemonsets
#: write them through a hostPath; they write them again at every start, so memory will do.
RUNTIME_FILESYSTEMS = (
    mount.MountPoint("tmpfs", "/tmp", "tmpfs", "nosuid,nodev,mode=1777"),
    mount.MountPoint("tmpfs", "/var", "tmpfs", "nosuid,nodev,mode=0755"),
    mount.MountPoint("tmpfs", "/system", "tmpfs", "nosuid,nodev,mode=0755"),
    mount.MountPoint("tmpfs", "/etc/kubernetes", "tmpfs", "nosuid,nodev,noexec,mode=0755"),
    mount.MountPoint("tmpfs", "/etc/cni", "tmpfs", "nosuid,nodev,noexec,mode=0755"),
)


def kernel_hostname(cmdline: Path) -> str:
    """``basalt.hostname=NAME`` from the kernel command line, '' when absent or not a
    valid host name. It names a node before any config does (a provisioner that boots
    many VMs from one image passes it); a HostnameConfig still wins."""
    try:
        words = cmdline.read_text().split()
    except OSError:
        return ""
    for word in reversed(words):  # the last one wins, as for the kernel's own arguments
        key, sep, value = word.partition("=")
        if key == "basalt.hostname" and sep:
            from basalt.machinery.config._types import is_hostname

            if is_hostname(value.lower()):
                return value.lower()
            log.warning("ignoring kernel argument basalt.hostname=%s: not a host name", value)
            return ""
    return ""


def default_hostname(sys_class_net: Path) -> str:
    """``basalt-`` and the last three bytes of the first Ethernet link's MAC (by index):
    stable across reboots and distinct between machines."""
    found = []
    try:
        entries = list(sys_class_net.iterdir())
    except OSError:
        entries = []
    for entry in entries:
        try:
            if (entry / "type").read_text().strip() != "1":  # ARPHRD_ETHER
                continue
            mac = (entry / "address").read_text().strip()
            index = int((entry / "ifindex").read_text())
        except (OSError, ValueError):
            continue
        if len(mac) == 17 and mac != "00:00:00:00:00:00":
            found.append((index, mac))
    if not found:
        return FALLBACK_HOSTNAME
    return f"{FALLBACK_HOSTNAME}-{min(found)[1][9:].replace(':', '')}"


@dataclass
class MetalPlatform(Platform):
    """PID 1 on a machine; ``init`` says whether the machine-wide steps happen."""

    init: bool = field(default_factory=lambda: os.getpid() == 1)
    reaper: Reaper | None = None
    #: The STATE partition mounted on /system/state ('' when running from memory).
    state_device: str = ""
    #: Set when maintenance mode installed to disk: the boot's install phase reboots.
    installed_to: str = ""
    #: True while maintenance mode installs (a second apply-config is refused).
    installing: bool = False
    #: The image's extensions that were not used at boot, as ``NAME: reason``.
    extensions_skipped: list[str] = field(default_factory=list)
    #: The child loading the image's kernel modules from begin() on (PID 1 only):
    #: prepare() takes its answer.
    module_loader: ModuleLoader | None = None

    @property
    def fleet_dir(self) -> Path:
        return self.paths.state / "fleet"

    def machine_uuid(self) -> str:
        """The firmware's (SMBIOS) UUID; a kept random one when the firmware has none."""
        import uuid

        dmi = self.system_root / "sys" / "class" / "dmi" / "id" / "product_uuid"
        try:
            value = uuid.UUID(dmi.read_text().strip())
        except (OSError, ValueError):
            value = None
        if value is not None and value.int not in (0, (1 << 128) - 1):
            return str(value)
        from . import stored_uuid

        return stored_uuid(self.paths.state / "machine-uuid")

    def kernel_arg(self, name: str) -> str:
        from ..sys.cmdline import kernel_arg

        return kernel_arg(name, self.system_root / "proc" / "cmdline")

    @classmethod
    def create(
        cls, *, address: str, hostname: str, root: Path = Path("/"), init: bool | None = None
    ) -> MetalPlatform:
        return cls(
            mode=PlatformMode.METAL,
            paths=NodePaths.under(root),
            address=address,
            hostname=hostname,
            system_root=root,
            init=os.getpid() == 1 if init is None else init,
        )

    def prepare(self) -> None:
        root = self.system_root
        if self.init:
            mounted = mount.mount_pseudo_filesystems(root)
            mounted += mount.mount_all(self._runtime_filesystems(), root)
            if mounted:
                log.info("mounted %s", ", ".join(mounted))
            self._load_image_modules()
            self.extensions, self.extensions_skipped = mount_and_log(root)
            try:
                power.set_ctrl_alt_del(False)  # Ctrl-Alt-Del becomes SIGINT: a clean reboot
            except power.PowerError as exc:
                log.info("Ctrl-Alt-Del stays as it is: %s", exc)
        if not self.hostname:
            self.hostname = kernel_hostname(root / "proc" / "cmdline") or default_hostname(
                root / "sys" / "class" / "net"
            )
        hostname, _, domain = self.hostname.partition(".")
        initial = {
            "hostname": f"{hostname}\n",
            "hosts": render_hosts(hostname, domain, self.address),
            "resolv.conf": "# no name servers configured yet\n",
        }
        for name in GENERATED_ETC_FILES:
            path = self.generated_etc / name
            if not path.exists():
                write_generated(self.generated_etc, name, initial[name])
            if self.init:
                self._bind_etc(name)

    def _runtime_filesystems(self) -> list[mount.MountPoint]:
        """RUNTIME_FILESYSTEMS, with STATE and EPHEMERAL when this disk is installed."""
        points = list(RUNTIME_FILESYSTEMS)
        if self.system_root != Path("/"):
            return points  # a test's node directory: never the machine's disks
        from ..storage.partitions import installed_devices

        state, ephemeral = installed_devices()
        if ephemeral is not None:
            points = [p for p in points if p.target != "/var"]
            points.append(mount.MountPoint(ephemeral, "/var", "ext4", "nosuid,nodev,noatime"))
        if state is not None:
            points.append(
                mount.MountPoint(state, "/system/state", "ext4", "nosuid,nodev,noexec,noatime")
            )
            self.state_device = state
        return points

    def _load_image_modules(self) -> None:
        """The child's answer (begin()), else the modules loaded here and now."""
        loader, self.module_loader = self.module_loader, None
        answer = None
        if loader is not None:
            try:
                answer = loader.result()
            except ModuleLoaderError as exc:
                log.warning("%s; loading them in machined", exc)
        loaded, failed = answer or load_image_modules(self.system_root)
        if loaded:
            log.info("loaded kernel modules: %s", ", ".join(loaded))
        for reason in failed:
            log.error("%s", reason)

    def _bind_etc(self, name: str) -> None:
        target = self.system_root / "etc" / name
        if mount.is_mounted(target):
            return
        if not target.exists():
            try:
                target.touch()
            except OSError as exc:
                log.warning(
                    "/etc/%s is not in the image and cannot be created (%s): "
                    "processes will not see the generated one",
                    name,
                    exc.strerror,
                )
                return
        mount.bind_read_only(self.generated_etc / name, target)

    def begin(self) -> None:
        if self.init and self.module_loader is None:
            self.module_loader = ModuleLoader.fork(self.system_root)

    def start(self) -> None:
        if self.init:
            self.reaper = Reaper()
            self.reaper.install()

    def clock(self) -> Clock:
        """PID 1 owns the machine's clock; run any other way it only reads it."""
        from ..sys.clock import ObservingClock, SystemClock

        return SystemClock() if self.init else ObservingClock()

    def power_signals(self) -> dict[signal.Signals, PowerAction]:
        # As for any init: SIGTERM asks for a power-off, SIGINT (what the kernel sends
        # PID 1 for Ctrl-Alt-Del once it is told to) for a reboot.
        return {signal.SIGTERM: "shutdown", signal.SIGINT: "reboot"}


#: Image modules that only load when a path exists below the root (else they are skipped).
_MODULE_NEEDS = {"efivarfs": "sys/firmware/efi"}


def load_image_modules(
    root: Path, loader: kmod.Loader = kmod.finit_module
) -> tuple[list[str], list[str]]:
    """Load the modules :data:`IMAGE_MODULES` names below ``root``, dependencies first.

    Returns (modules loaded now, one reason per module that failed): a failure does not
    stop the boot (the node may then lack a NIC, which its console and API will show).
    """
    try:
        listing = (root / IMAGE_MODULES).read_text()
    except FileNotFoundError:
        return [], []
    names = [n.strip() for n in listing.splitlines() if n.strip() and not n.startswith("#")]
    index = kmod.ModuleIndex(
        root / "lib" / "modules" / os.uname().release, sysfs=root / "sys" / "module"
    )
    loaded: list[str] = []
    failed: list[str] = []
    for name in names:
        needs = _MODULE_NEEDS.get(name)
        if needs is not None and not (root / needs).exists():
            continue  # efivarfs on a boot without UEFI: the kernel refuses it (ENODEV)
        try:
            loaded += kmod.load_module(name, index=index, loader=loader)
        except kmod.KernelModuleError as exc:
            failed.append(str(exc))
    return loaded, failed


#: How long prepare() waits for the module-loading child's answer before loading them itself.
MODULE_ANSWER_TIMEOUT = 60.0


class ModuleLoaderError(Exception):
    """The module-loading child gave no usable answer."""


class ModuleLoader:
    """The image's kernel modules, loaded by a child that PID 1 forks before most of its
    imports (no thread exists yet): the child's reading of module files and the kernel's
    work (virtio-net probes its device) run on the other CPU, without the interpreter
    lock PID 1 imports under. It answers (modules loaded, failures) through a pipe and
    exits; the reaper collects it. A thread did the same from start() until 2026-12-06:
    started earlier, it slowed PID 1's imports by more than it saved (ADR 0025)."""

    def __init__(self, pid: int, answers: int) -> None:
        self.pid = pid
        self._answers: int | None = answers

    @classmethod
    def fork(
        cls,
        root: Path,
        load: Callable[[Path], tuple[list[str], list[str]]] = load_image_modules,
    ) -> ModuleLoader | None:
        """Start the child; None when the system refuses (prepare() loads them itself)."""

        def work() -> dict[str, object]:
            loaded, failed = load(root)
            return {"loaded": loaded, "failed": failed}

        started = fork_helper(work, "kernel-module child")
        return None if started is None else cls(*started)

    def result(self, timeout: float = MODULE_ANSWER_TIMEOUT) -> tuple[list[str], list[str]]:
        """(modules loaded, one reason per failure), as :func:`load_image_modules`;
        ModuleLoaderError when the child did not answer or failed as a whole."""
        fd, self._answers = self._answers, None
        if fd is None:
            raise ModuleLoaderError("the kernel-module child was asked already")
        try:
            reply = read_answer(fd, timeout, "kernel-module child")
            return [str(n) for n in reply["loaded"]], [str(r) for r in reply["failed"]]
        except HelperAnswerError as exc:
            raise ModuleLoaderError(str(exc)) from None
        except (TypeError, KeyError):
            raise ModuleLoaderError("the kernel-module child gave no answer") from None


def console(message: str) -> None:
    """Print to the machine's console (stderr when there is none)."""
    line = message if message.endswith("\n") else message + "\n"
    try:
        fd = os.open("/dev/console", os.O_WRONLY | os.O_APPEND | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        sys.stderr.write(line)
        sys.stderr.flush()
        return
    try:
        os.write(fd, line.encode(errors="replace"))
    finally:
        os.close(fd)


def run_as_init(main: Callable[[], int], *, fatal_delay: float = FATAL_DELAY) -> int:
    """Run the agent; as PID 1, turn its end into a reboot or power-off, never an exit.

    ``main`` returns the exit code container mode would use (EXIT_REBOOT,
    EXIT_SHUTDOWN, anything else is fatal). Not PID 1: its code is returned as is.
    """
    if os.getpid() != 1:
        return main()
    try:
        code = main()
    except BaseException:  # PID 1 must not die, whatever happened
        console("machined: fatal error:\n" + traceback.format_exc())
        code = -1
    if code == EXIT_REBOOT:
        # A kernel loaded for kexec means this reboot was asked to skip the firmware
        # (an upgrade or rollback prepared it last, after its boot entry was counted).
        action = power.PowerAction.KEXEC if kexec.loaded() else power.PowerAction.REBOOT
    elif code == EXIT_SHUTDOWN:
        action = power.PowerAction.POWEROFF
    else:
        console(f"machined: fatal error (exit code {code}); rebooting in {fatal_delay:g} s")
        time.sleep(fatal_delay)
        action = power.PowerAction.REBOOT
    return _power(action)


def _power(action: power.PowerAction) -> NoReturn:
    console(f"machined: {action}: stopping every process")
    try:
        left = power.terminate_all()
        if left:
            console(f"machined: killed {len(left)} processes that ignored SIGTERM")
        power.power(action)
    except BaseException:
        console("machined: " + traceback.format_exc())
    if action is power.PowerAction.KEXEC:  # the firmware boots what the entries say
        console("machined: kexec failed; rebooting through the firmware")
        action = power.PowerAction.REBOOT
        try:
            power.power(action)
        except BaseException:
            console("machined: " + traceback.format_exc())
    while True:  # reboot(2) failed: PID 1 may not exit (the kernel would panic)
        console(f"machined: {action} failed; retrying in 60 s")
        time.sleep(60)
        try:
            power.power(action)
        except BaseException:
            console("machined: " + traceback.format_exc())
