"""``image.lock``: the exact Debian packages and Python wheels an image is built from.

The lock is written only by ``basaltctl image lock`` (``python -m basalt.imager lock``):
it asks apt for the candidate of every wanted package (resolving the kernel
meta-package to the versioned image package it depends on), downloads each ``.deb``
with ``apt-get download`` (apt checks it against the signed archive) and records its
version and sha256; wheels are pinned to the versions installed in the build venv.
``build`` only reads it, and refuses a lock that is missing or that no longer matches
what the build wants (:func:`check`).
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import yaml

from .errors import ImageLockError
from .stage import run_tool, sha256_file

FORMAT = 1
REPO_ROOT = Path(__file__).resolve().parents[3]
DEFAULT_LOCK = REPO_ROOT / "image.lock"

#: The kernel flavour: a meta-package whose one dependency is the versioned image package.
KERNEL_META = "linux-image-cloud-amd64"
#: The interpreter, the libraries its stdlib and our wheels link against, etcd, the
#: container runtime, mke2fs, systemd-boot and the packages of the shipped extensions.
DEBIAN_PACKAGES: tuple[str, ...] = (
    "python3.11-minimal",
    "libpython3.11-minimal",
    "libpython3.11-stdlib",
    "libc6",
    "libexpat1",
    "zlib1g",
    "libssl3",
    "libbz2-1.0",
    "libcrypt1",
    "libffi8",
    "liblzma5",
    "libsqlite3-0",
    "libuuid1",
    "media-types",
    "libgcc-s1",
    "libstdc++6",
    "etcd-server",
    # The container runtime: containerd (with its shim and ctr) and runc.
    "containerd",
    "runc",
    "libseccomp2",
    # mke2fs, which formats STATE and EPHEMERAL at install.
    "e2fsprogs",
    "libext2fs2",
    "libcom-err2",
    "libblkid1",
    # The UEFI boot manager copied onto the ESP of disk images (not into the root).
    "systemd-boot-efi",
    # The qemu-guest-agent system extension and the libraries it needs.
    "qemu-guest-agent",
    "libglib2.0-0",
    "libnuma1",
    "libudev1",
    "liburing2",
    "libmount1",
    "libpcre2-8-0",
    "libselinux1",
)
#: Basalt's dependencies that only the CLI uses; they stay out of the node image.
CLI_ONLY: tuple[str, ...] = ("typer", "rich", "textual")  # textual: basaltctl dashboard
#: Wheel tags of the target: CPython 3.11 on glibc 2.36 (Debian bookworm), x86_64. pip
#: expands a manylinux_2_36 platform to every older manylinux tag, manylinux2014 included.
WHEEL_PLATFORM = "manylinux_2_36_x86_64"
WHEEL_TAG_ARGS: tuple[str, ...] = (
    "--only-binary=:all:",
    "--platform",
    WHEEL_PLATFORM,
    "--platform",
    "manylinux2014_x86_64",
    "--python-version",
    "3.11",
    "--implementation",
    "cp",
    "--abi",
    "cp311",
)


@dataclass(frozen=True)
class LockedDeb:
    name: str
    version: str
    sha256: str
    file: str


@dataclass(frozen=True)
class LockedWheel:
    name: str
    version: str
    sha256: str
    file: str


@dataclass(frozen=True)
class Lock:
    kernel: str
    debs: tuple[LockedDeb, ...]
    wheels: tuple[LockedWheel, ...]
    wants: str

    def deb(self, name: str) -> LockedDeb:
        return next(d for d in self.debs if d.name == name)


def normalize(name: str) -> str:
    """PEP 503 name normalisation."""
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_pins(root: str = "basalt", exclude: tuple[str, ...] = CLI_ONLY) -> dict[str, str]:
    """``root``'s runtime dependencies (transitively, minus ``exclude``) pinned to the
    versions installed in this interpreter's environment."""
    from packaging.requirements import Requirement  # a dev dependency: images build there

    skip = {normalize(name) for name in exclude}
    pins: dict[str, str] = {}
    todo: list[tuple[str, list[str]]] = [(root, _root_requirements(root))]
    while todo:
        parent, requirements = todo.pop()
        for text in requirements:
            req = Requirement(text)
            name = normalize(req.name)
            if name in skip or name in pins:
                continue
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            try:
                pins[name] = metadata.version(req.name)
            except metadata.PackageNotFoundError:
                raise ImageLockError(
                    f"{req.name} (needed by {parent}) is not installed",
                    hint="run 'make install' so the venv holds Basalt's dependencies",
                ) from None
            todo.append((req.name, metadata.requires(req.name) or []))
    return dict(sorted(pins.items()))


def _root_requirements(root: str) -> list[str]:
    """Basalt's own requirements from pyproject.toml in a source tree (the installed
    metadata of an editable install lags behind it), else from the installed metadata."""
    pyproject = REPO_ROOT / "pyproject.toml"
    if root == "basalt" and pyproject.exists():
        import tomllib

        deps: list[str] = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
        return deps
    return metadata.requires(root) or []


def wants_digest(pins: dict[str, str]) -> str:
    """What the build wants, hashed: the package list and the wheel pins."""
    wants = {"kernel": KERNEL_META, "debian": sorted(DEBIAN_PACKAGES), "wheels": pins}
    return hashlib.sha256(json.dumps(wants, sort_keys=True).encode()).hexdigest()


def read(path: Path = DEFAULT_LOCK) -> Lock:
    """Parse ``path``; a missing or malformed lock is an :class:`ImageLockError`."""
    if not path.exists():
        raise ImageLockError(
            f"{path} does not exist: the image build needs pinned package versions",
            hint="run 'basaltctl image lock' (or 'python -m basalt.imager lock') and commit it",
        )
    try:
        doc = yaml.safe_load(path.read_text())
        if doc.get("format") != FORMAT:
            raise ValueError(f"format {doc.get('format')!r}, expected {FORMAT}")
        return Lock(
            kernel=doc["kernel"]["package"],
            debs=tuple(LockedDeb(name=k, **v) for k, v in sorted(doc["debian"].items())),
            wheels=tuple(LockedWheel(name=k, **v) for k, v in sorted(doc["wheels"].items())),
            wants=doc["wants"],
        )
    except (AttributeError, KeyError, TypeError, ValueError, yaml.YAMLError) as exc:
        raise ImageLockError(
            f"{path} is not a valid image lock: {exc}", hint="run 'basaltctl image lock'"
        ) from None


def check(lock: Lock, path: Path = DEFAULT_LOCK) -> None:
    """Refuse a lock that does not pin exactly what the build wants now."""
    pins = wheel_pins()
    problems = []
    locked = {w.name: w.version for w in lock.wheels}
    for name, version in pins.items():
        if locked.get(name) != version:
            problems.append(f"wheel {name}: venv has {version}, lock has {locked.get(name)}")
    problems += [f"wheel {name}: locked but no longer needed" for name in locked.keys() - pins]
    debs = {d.name for d in lock.debs}
    wanted = {*DEBIAN_PACKAGES, lock.kernel}
    problems += [f"debian package {name}: not locked" for name in sorted(wanted - debs)]
    problems += [f"debian package {name}: locked, not wanted" for name in sorted(debs - wanted)]
    if not problems and lock.wants != wants_digest(pins):
        problems.append("the wanted package list changed since the lock was written")
    if problems:
        raise ImageLockError(
            f"{path} is stale:\n  " + "\n  ".join(problems),
            hint="run 'basaltctl image lock', review the diff and commit it",
        )


def _deb_fields(path: Path) -> tuple[str, str]:
    out = run_tool(["dpkg-deb", "-f", str(path), "Package", "Version"], what="read .deb")
    fields = dict(line.split(": ", 1) for line in out.splitlines() if ": " in line)
    return fields["Package"], fields["Version"]


def resolve_kernel(meta: str = KERNEL_META) -> str:
    """The versioned image package the kernel meta-package depends on."""
    out = run_tool(["apt-cache", "show", "--no-all-versions", meta], what=f"resolve {meta}")
    depends = next((ln for ln in out.splitlines() if ln.startswith("Depends:")), "")
    for alternative in depends.removeprefix("Depends:").split(","):
        name = alternative.split("|")[0].split("(")[0].strip()
        if name.startswith("linux-image-"):
            return name
    raise ImageLockError(
        f"{meta} depends on no linux-image-* package ({depends or 'no Depends line'})",
        hint="run 'apt-get update' so apt knows the kernel packages",
    )


def download_debs(names: list[str], into: Path) -> dict[str, LockedDeb]:
    """``apt-get download`` each ``name`` (``pkg`` or ``pkg=version``) into ``into``."""
    into.chmod(0o777)  # apt drops privileges to _apt for downloads when it can
    run_tool(["apt-get", "download", "-q", *names], what="apt-get download", cwd=into)
    found: dict[str, LockedDeb] = {}
    for path in sorted(into.glob("*.deb")):
        name, version = _deb_fields(path)
        found[name] = LockedDeb(name, version, sha256_file(path), path.name)
    return found


def download_wheels(pins: dict[str, str], into: Path) -> dict[str, LockedWheel]:
    """``pip download`` the pinned wheels for the target's tags into ``into``."""
    specs = [f"{name}=={version}" for name, version in pins.items()]
    run_tool(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "--no-deps",
            *WHEEL_TAG_ARGS,
            "-d",
            str(into),
            *specs,
        ],
        what="pip download",
    )
    found: dict[str, LockedWheel] = {}
    for path in sorted(into.glob("*.whl")):
        name, version = path.name.split("-")[:2]
        found[normalize(name)] = LockedWheel(normalize(name), version, sha256_file(path), path.name)
    missing = pins.keys() - found.keys()
    if missing:
        raise ImageLockError(f"pip downloaded no wheel for {', '.join(sorted(missing))}")
    return found


def write(path: Path = DEFAULT_LOCK) -> Lock:
    """Resolve everything afresh and write ``path``. Network: Debian mirror and PyPI."""
    kernel = resolve_kernel()
    pins = wheel_pins()
    with tempfile.TemporaryDirectory(prefix="basalt-lock-") as tmp:
        debs = download_debs([kernel, *DEBIAN_PACKAGES], Path(tmp))
        missing = {kernel, *DEBIAN_PACKAGES} - debs.keys()
        if missing:
            raise ImageLockError(f"apt downloaded no package for {', '.join(sorted(missing))}")
        wheel_dir = Path(tmp) / "wheels"
        wheel_dir.mkdir()
        wheels = download_wheels(pins, wheel_dir)
    doc = {
        "format": FORMAT,
        "kernel": {"meta": KERNEL_META, "package": kernel},
        "wants": wants_digest(pins),
        "debian": {n: _fields(d) for n, d in sorted(debs.items())},
        "wheels": {n: _fields(w) for n, w in sorted(wheels.items())},
    }
    header = (
        "# Exact inputs of the Basalt system image. Written by 'basaltctl image lock';\n"
        "# do not edit by hand. 'basaltctl image build' refuses a stale lock.\n"
    )
    path.write_text(header + yaml.safe_dump(doc, sort_keys=True, width=120))
    return read(path)


def _fields(item: LockedDeb | LockedWheel) -> dict[str, str]:
    return {"version": item.version, "sha256": item.sha256, "file": item.file}
