"""The imager's pure parts: stage ids and the cache, ELF and module reading, the cpio
writer, the lock checks, executable detection and the guest init's parsing."""

from __future__ import annotations

import io
import shutil
import stat
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from basalt.imager import cpio, init, kmod
from basalt.imager import lock as lockfile
from basalt.imager.errors import ImageBuildError, ImageLockError
from basalt.imager.pipeline import executables
from basalt.imager.stage import Cache, Stage
from basalt.machinery import elf


@dataclass(frozen=True)
class Leaf(Stage):
    name = "leaf"
    text: str
    runs: list[str]  # not hashable by design: the test counts runs through it

    def canonical_form(self) -> dict[str, object]:
        return {"stage": self.name, "version": self.version, "options": {"text": self.text}}

    def run(self, out: Path, cache: Cache) -> None:
        self.runs.append(self.text)
        (out / "text").write_text(self.text)


@dataclass(frozen=True)
class Upper(Stage):
    name = "upper"
    leaf: Leaf

    def run(self, out: Path, cache: Cache) -> None:
        text = (cache.output(self.leaf) / "text").read_text()
        (out / "text").write_text(text.upper())


@dataclass(frozen=True)
class Broken(Stage):
    name = "broken"

    def run(self, out: Path, cache: Cache) -> None:
        (out / "half").write_text("x")
        raise RuntimeError("boom")


def test_stage_id_follows_options_and_inputs() -> None:
    runs: list[str] = []
    assert Leaf("a", runs).stage_id() == Leaf("a", []).stage_id()
    assert Leaf("a", runs).stage_id() != Leaf("b", runs).stage_id()
    assert Upper(Leaf("a", runs)).stage_id() != Upper(Leaf("b", runs)).stage_id()
    assert Upper(Leaf("a", runs)).inputs() == [Leaf("a", runs)]


def test_cache_reuses_complete_outputs_and_drops_failed_ones(tmp_path: Path) -> None:
    runs: list[str] = []
    cache = Cache(tmp_path)
    out = cache.output(Upper(Leaf("hi", runs)))
    assert (out / "text").read_text() == "HI"
    assert (out / "stage.json").exists()
    assert Cache(tmp_path).output(Upper(Leaf("hi", runs))) == out
    assert runs == ["hi"]
    with pytest.raises(RuntimeError):
        cache.output(Broken())
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("broken")] == []


def _relocatable(sections: dict[str, bytes]) -> bytes:
    """A minimal ELF64 relocatable object holding ``sections`` (like a ``.ko``)."""
    names = b"\0" + b"".join(name.encode() + b"\0" for name in [*sections, ".shstrtab"])
    blobs = [*sections.values(), names]
    offset, body, headers = 64, b"", [b"\0" * 64]
    name_at = 1
    for name, blob in zip([*sections, ".shstrtab"], blobs, strict=True):
        headers.append(
            struct.pack("<IIQQQQIIQQ", name_at, 1, 0, 0, offset + len(body), len(blob), 0, 0, 1, 0)
        )
        name_at += len(name) + 1
        body += blob
    shoff = offset + len(body)
    ident = b"\x7fELF\x02\x01\x01" + b"\0" * 9
    header = ident + struct.pack(
        "<HHIQQQIHHHHHH", 1, 62, 1, 0, 0, shoff, 0, 64, 0, 0, 64, len(headers), len(headers) - 1
    )
    return header + body + b"".join(headers)


def test_module_info_reads_modinfo(tmp_path: Path) -> None:
    ko = tmp_path / "virtio_net.ko"
    ko.write_bytes(
        _relocatable(
            {".text": b"\x90" * 8, ".modinfo": b"name=virtio_net\0depends=virtio,net_failover\0"}
        )
    )
    assert elf.modinfo(ko.read_bytes()) == {
        "name": ["virtio_net"],
        "depends": ["virtio,net_failover"],
    }


def test_read_elf_of_this_interpreter() -> None:
    info = elf.read_elf(Path(sys.executable).resolve())
    assert info.is_program and info.interpreter and info.interpreter.startswith("/lib")
    with pytest.raises(elf.ElfFormatError):
        elf._dynamic(b"not an elf at all" * 8)


def test_module_load_order_puts_dependencies_first() -> None:
    deps = {
        "virtio_net": ["virtio", "net_failover"],
        "net_failover": ["failover"],
        "virtio": ["virtio_ring"],
    }
    known = {"virtio_net", "net_failover", "failover", "virtio", "virtio_ring", "virtio_blk"}
    order = kmod.load_order(["virtio-net", "virtio_blk"], lambda n: deps.get(n, []), known)
    assert order.index("virtio_ring") < order.index("virtio") < order.index("virtio_net")
    assert order.index("failover") < order.index("net_failover") < order.index("virtio_net")
    assert len(order) == len(set(order)) == 6
    with pytest.raises(ImageBuildError, match="not in the kernel"):
        kmod.load_order(["nope"], lambda n: [], known)
    with pytest.raises(ImageBuildError, match="cycle"):
        kmod.load_order(["a"], lambda n: ["b"] if n == "a" else ["a"], {"a", "b"})


def _read_newc(data: bytes) -> list[tuple[str, int, bytes]]:
    entries, at = [], 0
    while True:
        fields = [int(data[at + 6 + 8 * i : at + 14 + 8 * i], 16) for i in range(13)]
        name_size, size, mode = fields[11], fields[6], fields[1]
        name = data[at + 110 : at + 110 + name_size - 1].decode()
        at = (at + 110 + name_size + 3) & ~3
        body = data[at : at + size]
        at = (at + size + 3) & ~3
        if name == cpio.TRAILER:
            return entries
        entries.append((name, mode, body))


def test_cpio_is_sorted_reproducible_and_carries_nodes(tmp_path: Path) -> None:
    (tmp_path / "usr/bin").mkdir(parents=True)
    (tmp_path / "init").write_text("#!/usr/bin/python3.11 -IS\n")
    (tmp_path / "init").chmod(0o755)
    (tmp_path / "bin").symlink_to("usr/bin")
    archives = []
    for _ in range(2):
        stream = io.BytesIO()
        cpio.write(tmp_path, stream, 315532800, (cpio.Node("dev/console", 0o600, 5, 1),))
        archives.append(stream.getvalue())
    assert archives[0] == archives[1]
    entries = _read_newc(archives[0])
    assert [name for name, _, _ in entries] == ["bin", "init", "usr", "usr/bin", "dev/console"]
    modes = {name: mode for name, mode, _ in entries}
    assert stat.S_ISLNK(modes["bin"]) and stat.S_ISCHR(modes["dev/console"])
    assert stat.S_IMODE(modes["init"]) == 0o755
    assert {n: b for n, _, b in entries}["bin"] == b"usr/bin"


def test_missing_lock_says_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(ImageLockError) as caught:
        lockfile.read(tmp_path / "image.lock")
    assert "basaltctl image lock" in (caught.value.hint or "")
    (tmp_path / "bad.lock").write_text("format: 1\ndebian: []\n")
    with pytest.raises(ImageLockError, match="not a valid image lock"):
        lockfile.read(tmp_path / "bad.lock")


def _lock(wheels: dict[str, str], debs: tuple[str, ...]) -> lockfile.Lock:
    return lockfile.Lock(
        kernel="linux-image-6.1.0-1-cloud-amd64",
        debs=tuple(lockfile.LockedDeb(n, "1", "0" * 64, f"{n}.deb") for n in debs),
        wheels=tuple(lockfile.LockedWheel(n, v, "0" * 64, f"{n}.whl") for n, v in wheels.items()),
        wants=lockfile.wants_digest(wheels),
    )


def test_lock_check_lists_every_stale_entry() -> None:
    pins = lockfile.wheel_pins()
    assert "grpcio" in pins and "typer" not in pins and "rich" not in pins
    debs = (*lockfile.DEBIAN_PACKAGES, "linux-image-6.1.0-1-cloud-amd64")
    lockfile.check(_lock(pins, debs))  # fresh: no error
    stale = {**pins, "grpcio": "0.0.1", "left-over": "1.0"}
    with pytest.raises(ImageLockError) as caught:
        lockfile.check(_lock(stale, debs[1:]))
    text = str(caught.value)
    assert "wheel grpcio: venv has" in text
    assert "wheel left-over: locked but no longer needed" in text
    assert f"debian package {debs[0]}: not locked" in text


def test_executables_are_programs_and_scripts_with_x_bits(tmp_path: Path) -> None:
    (tmp_path / "usr/bin").mkdir(parents=True)
    shutil.copy(Path(sys.executable).resolve(), tmp_path / "usr/bin/python")
    (tmp_path / "usr/bin/tool").write_text("#!/usr/bin/python\n")
    (tmp_path / "usr/bin/tool").chmod(0o755)
    (tmp_path / "usr/bin/module.py").write_text("#!/usr/bin/python\n")  # no x bit
    (tmp_path / "usr/bin/data").write_bytes(b"\0\0")
    (tmp_path / "usr/bin/data").chmod(0o755)
    assert executables(tmp_path) == ["/usr/bin/python", "/usr/bin/tool"]


def test_init_reads_basalt_kernel_args_over_defaults() -> None:
    args = init.parse_kernel_args("console=ttyS0 quiet basalt.root=/dev/vdb basalt.other=x")
    assert args["root"] == "/dev/vdb" and args["other"] == "x"
    assert init.parse_kernel_args("console=ttyS0")["root"] == init.DEFAULTS["root"]


def test_init_execs_the_roots_init_or_its_interpreter_with_importtime(tmp_path: Path) -> None:
    script = tmp_path / "init"
    script.write_text("#!/usr/bin/python3.11 -I\nimport sys\n")
    assert init.init_argv(False, str(script)) == [str(script)]
    assert init.init_argv(True, str(script)) == [
        *("/usr/bin/python3.11", "-I", "-X", "importtime", str(script))
    ]
    script.write_bytes(b"\x7fELF")  # not a script: exec'd as it is
    assert init.init_argv(True, str(script)) == [str(script)]


def test_init_hands_over_to_the_roots_init_in_the_same_interpreter(tmp_path: Path) -> None:
    """hand_over runs the root's init as __main__ in the interpreter the initramfs started
    (python -S, like the initramfs'): with site's directories, the script's argv, and
    directory listings read afresh, as a fresh ``python -I`` would see them."""
    import subprocess

    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "early.py").write_text("")
    script = tmp_path / "init"
    script.write_text(
        "import sys, late\n"
        "print(__name__, __file__ == sys.argv[0], late.VALUE, sys.flags.no_site)\n"
        "print(any(p.endswith(('site-packages', 'dist-packages')) for p in sys.path))\n"
        "sys.exit(3)\n"
    )
    # The initramfs imported from a directory the root then holds more modules in, with
    # the same mtime (both images use one fixed epoch): a cached listing would miss them.
    driver = (
        "import os, sys\n"
        f"sys.path.insert(0, {str(lib)!r})\n"
        "import early\n"
        f"stamp = os.stat({str(lib)!r}).st_mtime_ns\n"
        f"open({str(lib / 'late.py')!r}, 'w').write('VALUE = 42')\n"
        f"os.utime({str(lib)!r}, ns=(stamp, stamp))\n"
        f"sys.path.insert(0, {str(Path(init.__file__).parent)!r})\n"
        "import init\n"
        f"init.hand_over({str(script)!r})\n"
    )
    done = subprocess.run(
        [sys.executable, "-S", "-c", driver],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 3, done.stderr
    assert done.stdout.splitlines() == ["__main__ True 42 1", "True"]


def test_init_refuses_to_run_outside_an_initramfs() -> None:
    with pytest.raises(SystemExit, match="refusing to run"):
        init.main()


# -- the signed upgrade bundle --------------------------------------------------------------------


def _image_files(out: Path) -> None:
    out.mkdir()
    for name, content in (("vmlinuz", b"kernel"), ("initrd.img", b"initrd"), ("root.sqfs", b"r")):
        (out / name).write_bytes(content * 1000)


def test_the_image_bundle_is_signed_verifiable_and_reproducible(tmp_path: Path) -> None:
    import types

    from basalt.imager.pipeline import BUNDLE, write_bundle
    from basalt.machinery.images import (
        generate_signing_key,
        load_signing_key,
        required_payload,
        verification_key,
        verify_bundle,
    )
    from basalt.machinery.schematic import EMPTY

    private, public = generate_signing_key()
    key = load_signing_key(private)
    fake = types.SimpleNamespace(schematic=EMPTY, lock=_lock({}, ()))
    _image_files(tmp_path / "one")
    described = write_bundle(tmp_path / "one", fake, key)  # type: ignore[arg-type]
    verified = verify_bundle(
        tmp_path / "one" / BUNDLE,
        [verification_key(public)],
        "x86_64",
        required=required_payload("metal"),
    )
    assert verified.version == described["version"]
    assert verified.manifest.schematic_id == EMPTY.id == described["schematicId"]
    sizes = {f.path: f.size for f in verified.manifest.files}
    assert sizes.pop("chunks.json") > 0
    assert sizes == {
        "initramfs": 6000,
        "kernel": 6000,
        "rootfs.squashfs": 1000,
    }
    _image_files(tmp_path / "two")
    write_bundle(tmp_path / "two", fake, key)  # type: ignore[arg-type]
    assert (tmp_path / "one" / BUNDLE).read_bytes() == (tmp_path / "two" / BUNDLE).read_bytes()


def test_a_bad_signing_key_stops_the_build_before_any_work(tmp_path: Path) -> None:
    from basalt.imager.errors import ImageError
    from basalt.imager.pipeline import build, bundle_architecture
    from basalt.machinery.images import SigningKeyError

    with pytest.raises(ImageError, match=r"signing key .*missing.key: No such file"):
        build(
            tmp_path / "out",
            tmp_path / "cache",
            tmp_path / "no.lock",
            signing_key=tmp_path / "missing.key",
        )
    (tmp_path / "bad.key").write_text("not a key\n")
    with pytest.raises(SigningKeyError, match=r"bad\.key is not a PEM private key"):
        build(
            tmp_path / "out",
            tmp_path / "cache",
            tmp_path / "no.lock",
            signing_key=tmp_path / "bad.key",
        )
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()
    assert bundle_architecture("linux-image-6.1.0-27-cloud-arm64") == "aarch64"
    with pytest.raises(ImageError, match="names no known architecture"):
        bundle_architecture("linux-image-6.1.0-27-cloud-mips")


@pytest.mark.skipif(shutil.which("strip") is None, reason="binutils not installed")
def test_unstripped_wheel_modules_lose_their_symbol_tables_only(tmp_path: Path) -> None:
    import yaml._yaml

    from basalt.imager.rootfs import _strip
    from basalt.machinery.elf import section

    original = Path(yaml._yaml.__file__)
    if section(original.read_bytes(), ".symtab") is None:
        pytest.skip("this PyYAML wheel ships its extension stripped")
    copy = tmp_path / "site" / "yaml" / original.name
    copy.parent.mkdir(parents=True)
    shutil.copyfile(original, copy)
    (tmp_path / "site" / "yaml" / "__init__.py").write_text("")
    assert _strip(tmp_path, "site") == [f"site/yaml/{original.name}"]
    data = copy.read_bytes()
    assert section(data, ".symtab") is None
    assert len(data) < original.stat().st_size // 2
    dynstr = section(data, ".dynstr")
    assert dynstr is not None and b"PyInit__yaml" in dynstr  # what the import looks up
    assert _strip(tmp_path, "site") == []  # nothing left to strip


def test_a_build_refuses_imager_code_changed_since_it_was_imported(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from basalt.imager import rootfs

    rootfs.check_imager_unchanged()  # the files are what this process imported
    monkeypatch.setattr(rootfs, "IMPORTED_IMAGER", "0" * 64)
    with pytest.raises(ImageBuildError, match="changed after this process loaded it"):
        rootfs.check_imager_unchanged()
