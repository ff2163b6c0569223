"""The Debian peer of `bench/boot.py`: a minimal bookworm with systemd and openssh-server,
built with debootstrap into an ext4 image plus its own kernel and initramfs.

The result is cached under ``_out/bench/debian-<key>/`` where ``key`` hashes everything
the image is made from (suite, mirror, package list and the files written into it), so
a re-run only boots it. Nothing here is committed. Building needs root (debootstrap,
chroot) and ``mkfs.ext4`` with ``-d`` (e2fsprogs >= 1.43); no loop mounts are used.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

SUITE = "bookworm"
INCLUDE = (
    "systemd-sysv",
    "openssh-server",
    "linux-image-cloud-amd64",
    "initramfs-tools",
    "udev",
)
#: Root on virtio-blk and the NIC on virtio-pci: make sure the initramfs has them.
INITRAMFS_MODULES = ("virtio_pci", "virtio_blk", "virtio_net", "ext4")
#: Kernel command line of the peer: the same console and panic handling as Basalt's.
CMDLINE = "console=ttyS0 quiet panic=-1 root=/dev/vda rw"
#: Files written into the root after debootstrap (path -> content).
FILES = {
    "etc/hostname": "debian-bench\n",
    "etc/hosts": "127.0.0.1 localhost\n127.0.1.1 debian-bench\n",
    "etc/fstab": "/dev/vda / ext4 rw,relatime 0 1\n",
    "etc/systemd/network/10-en.network": "[Match]\nName=en*\n\n[Network]\nDHCP=ipv4\n",
    "etc/initramfs-tools/modules": "".join(f"{name}\n" for name in INITRAMFS_MODULES),
}
#: Units enabled in the chroot (systemctl works offline there).
ENABLE = ("systemd-networkd.service", "ssh.service")
ROOT_SIZE = "1536M"
#: Bump when the build steps change in a way the key above does not capture.
RECIPE = 1

DEFAULT_CACHE = Path(__file__).resolve().parents[1] / "_out" / "bench"


def mirror() -> str:
    """The Debian mirror this host's apt uses for ``SUITE`` (from /etc/apt/sources.list*)."""
    sources = [Path("/etc/apt/sources.list")]
    parts = Path("/etc/apt/sources.list.d")
    if parts.is_dir():
        sources += sorted(parts.iterdir())
    for path in sources:
        if not path.is_file():
            continue
        text = path.read_text(errors="replace")
        if path.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields = {}
                for line in stanza.splitlines():
                    if ":" in line and not line.lstrip().startswith("#"):
                        name, _, value = line.partition(":")
                        fields[name.strip().lower()] = value.split()
                if "deb" in fields.get("types", []) and SUITE in fields.get("suites", []):
                    uris = fields.get("uris", [])
                    if uris:
                        return uris[0]
        else:
            for line in text.splitlines():
                words = line.split("#", 1)[0].split()
                if words[:1] != ["deb"]:
                    continue
                words = [w for w in words[1:] if not w.startswith("[")]
                if len(words) >= 2 and words[1] == SUITE:
                    return words[0]
    raise SystemExit(
        f"no 'deb' source for {SUITE} in /etc/apt/sources.list or /etc/apt/sources.list.d: "
        "add one (e.g. http://deb.debian.org/debian) or pass --mirror"
    )


def key(mirror_url: str) -> str:
    recipe = {
        "suite": SUITE,
        "mirror": mirror_url,
        "include": INCLUDE,
        "files": FILES,
        "enable": ENABLE,
        "cmdline": CMDLINE,
        "size": ROOT_SIZE,
        "recipe": RECIPE,
    }
    canonical = json.dumps(recipe, sort_keys=True).encode()
    return hashlib.sha256(canonical).hexdigest()[:16]


def _run(argv: list[str], log: Path, **kwargs: object) -> None:
    with log.open("ab") as out:
        out.write(f"\n$ {' '.join(argv)}\n".encode())
        out.flush()
        done = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, check=False, **kwargs)  # type: ignore[call-overload]
    if done.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise SystemExit(f"{argv[0]} failed ({done.returncode}); see {log}:\n{tail}")


def _chroot(root: Path, argv: list[str], log: Path) -> None:
    env = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "DEBIAN_FRONTEND": "noninteractive",
        "LC_ALL": "C",
    }
    _run(["chroot", str(root), *argv], log, env=env)


def build(cache: Path = DEFAULT_CACHE, mirror_url: str | None = None) -> Path:
    """The cached peer image directory (``vmlinuz``, ``initrd.img``, ``root.ext4``),
    built first when missing."""
    url = mirror_url or mirror()
    out = cache / f"debian-{key(url)}"
    if (out / "image.json").exists():
        return out
    missing = [t for t in ("debootstrap", "mkfs.ext4", "chroot") if shutil.which(t) is None]
    if missing:
        raise SystemExit(f"{', '.join(missing)} missing: run 'make bench-boot' (installs them)")
    if os.geteuid() != 0:
        raise SystemExit("building the Debian peer image needs root (debootstrap, chroot)")
    cache.mkdir(parents=True, exist_ok=True)
    work = cache / f"debian-{key(url)}.tmp"
    if work.exists():
        shutil.rmtree(work)
    root = work / "root"
    root.mkdir(parents=True)
    log = work / "build.log"
    debs = cache / "debs"  # downloaded packages, shared by rebuilds
    debs.mkdir(exist_ok=True)
    started = time.monotonic()
    print(f"building the Debian peer image in {work} (log: {log}) from {url}", file=sys.stderr)
    _run(
        [
            "debootstrap",
            "--variant=minbase",
            f"--include={','.join(INCLUDE)}",
            f"--cache-dir={debs}",
            SUITE,
            str(root),
            url,
        ],
        log,
    )
    for name, content in FILES.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
    _chroot(root, ["systemctl", "enable", *ENABLE], log)
    # A fixed machine id: each boot is an ordinary boot, not systemd's first boot.
    _chroot(root, ["systemd-machine-id-setup"], log)
    if not list((root / "etc/ssh").glob("ssh_host_*_key")):
        _chroot(root, ["ssh-keygen", "-A"], log)
    _chroot(root, ["update-initramfs", "-u", "-k", "all"], log)
    (root / "var/cache/apt/archives").mkdir(parents=True, exist_ok=True)
    for deb in (root / "var/cache/apt/archives").glob("*.deb"):
        deb.unlink()
    kernels = sorted((root / "boot").glob("vmlinuz-*"))
    if len(kernels) != 1:
        raise SystemExit(f"expected one kernel in {root / 'boot'}, found {kernels}")
    release = kernels[0].name.removeprefix("vmlinuz-")
    initrd = root / "boot" / f"initrd.img-{release}"
    listing = subprocess.run(
        ["chroot", str(root), "lsinitramfs", f"/boot/{initrd.name}"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    for module in ("virtio_pci", "virtio_blk"):
        if f"/{module}.ko" not in listing:
            raise SystemExit(f"{initrd} lacks {module}.ko; see {log}")
    shutil.copy2(kernels[0], work / "vmlinuz")
    shutil.copy2(initrd, work / "initrd.img")
    image = work / "root.ext4"
    _run(
        ["mkfs.ext4", "-q", "-F", "-L", "debian-bench", "-d", str(root), str(image), ROOT_SIZE],
        log,
    )
    shutil.rmtree(root)
    (work / "image.json").write_text(
        json.dumps(
            {
                "suite": SUITE,
                "mirror": url,
                "include": list(INCLUDE),
                "kernel": release,
                "cmdline": CMDLINE,
                "build_seconds": round(time.monotonic() - started, 1),
            },
            indent=2,
        )
        + "\n"
    )
    if out.exists():
        shutil.rmtree(out)
    work.rename(out)
    print(f"built {out} in {time.monotonic() - started:.0f} s", file=sys.stderr)
    return out


if __name__ == "__main__":
    print(build())
