"""The start-up bundle: the byte code of the modules machined imports as it boots, in one
file of the image, so a boot reads one file instead of hundreds.

Under emulation a first boot's start-up was a quarter file access (issue 22, measured
with ``basalt.profile=1``): each import stats its way along ``sys.path``, opens its
``.pyc`` and reads it, and the root is a squashfs, so reading one small ``.pyc``
decompresses the whole 256 KiB fragment block it sits in. The bundle holds the same
byte code (the image's own ``.pyc`` files, unchecked-hash, without their headers),
stored in import order in one file whose blocks are each decompressed once; each module
is read (``pread``) when imported, so what is not imported is never read, and nothing of
the file stays in machined's memory but its index.

- Built by the imager (:func:`build`, run by the image's own interpreter): it imports
  :data:`STARTUP_MODULES` (the way to a first boot's API), then :data:`BOOT_MODULES` (what
  the API's first call and a boot with a config import), and bundles every module that
  brought in from a source file of the image: those, their standard library and their
  packages (grpc, protobuf, pydantic...), first boot's first.
- Installed by ``/sbin/init`` before machined starts (:func:`install`): a finder first on
  ``sys.meta_path`` answers the bundled modules with an ordinary
  ``SourceFileLoader`` spec for the module's real file (``__file__``, tracebacks,
  package resources are as without the bundle) whose code comes from the bundle.
- Functions the standard library writes as it imports come compiled too: ``dataclasses``
  writes each class's ``__init__``, ``__repr__``, ``__eq__``... as source text and compiles
  it, which under emulation was most of what the start-up's ~50 dataclasses cost (the
  compiler, ~0.3 s). The build records every such text it sees with its compiled code;
  the served ``dataclasses`` module gets an ``exec`` that runs the recorded code for a
  text it has (the same code object ``exec`` would compile from it) and compiles any other
  text as before.
- Released when the start-up is over (:func:`release`, called by machined two minutes
  into its boot): the finder leaves ``sys.meta_path`` and the file is closed; later
  imports read files.

A module missing from the bundle is imported from its file as always, so a stale list
costs time, not correctness. The root is read-only and signed, so a file cannot differ
from the code bundled from it. (System extensions mount over ``/usr/local`` only once the
boot has imported most of these modules already, and ship programs, not Python.)
"""

# Imported before the bundle is installed, so from files: nothing here imports more than
# the interpreter has loaded already (no ``typing``, not even ``__future__``; the
# annotations are strings).
import marshal
import os
import sys
from importlib.machinery import ModuleSpec, SourceFileLoader

from basalt.machinery.image_layout import STARTUP_BUNDLE

TYPE_CHECKING = False
if TYPE_CHECKING:
    import types
    from collections.abc import Callable, Iterable, Sequence
    from typing import Any

#: First bytes of a bundle file (format 2: modules, and generated functions' code).
MAGIC = b"BSLTBND2"

#: The module whose generated functions the bundle holds compiled: it compiles them with
#: the ``exec`` its own globals name (the builtin unless one is put there).
GENERATING_MODULE = "dataclasses"

#: Basalt's modules that may be imported before the API opens (container and metal; a
#: first boot and a boot with a config): the bundle's roots, and the allow-list
#: ``tests/integration/test_boot_imports.py`` holds machined's start-up to.
STARTUP_MODULES = frozenset(
    """
    basalt basalt.machined basalt.machined.main basalt.machined.assemble
    basalt.machined.api basalt.machined.api.auth basalt.machined.api.dispatch
    basalt.machined.api.certificate_helper
    basalt.machined.api.errors basalt.machined.api.server basalt.machined.api.tls
    basalt.machined.boot basalt.machined.boot.esp_check basalt.machined.boot.esp_repair
    basalt.machined.boot.fat basalt.machined.boot.meta basalt.machined.boot.metal_slots
    basalt.machined.config_url basalt.machined.events basalt.machined.extensions
    basalt.machined.fleet basalt.machined.node basalt.machined.ports basalt.machined.updater
    basalt.machined.controllers basalt.machined.controllers.discovery
    basalt.machined.controllers.hostname basalt.machined.controllers.hostname_apply
    basalt.machined.controllers.kernel_modules basalt.machined.controllers.kernel_params
    basalt.machined.controllers.kubernetes basalt.machined.controllers.members
    basalt.machined.controllers.network basalt.machined.controllers.network_status
    basalt.machined.controllers.node_addresses basalt.machined.controllers.polling
    basalt.machined.controllers.resolvers basalt.machined.controllers.storage_status
    basalt.machined.controllers.sysctls basalt.machined.controllers.system_stats
    basalt.machined.controllers.timesync basalt.machined.controllers.version
    basalt.machined.platform basalt.machined.platform.etc basalt.machined.platform.metal
    basalt.machined.runtime basalt.machined.runtime.controller
    basalt.machined.runtime.sequencer basalt.machined.runtime.store
    basalt.machined.sequencer basalt.machined.sequencer.sequences
    basalt.machined.services basalt.machined.services.logs basalt.machined.services.runners
    basalt.machined.services.service basalt.machined.services.supervisor
    basalt.machined.startup_bundle
    basalt.machined.storage basalt.machined.storage.partitions basalt.machined.storage.state
    basalt.machined.sys basalt.machined.sys._libc basalt.machined.sys.clock
    basalt.machined.sys.cmdline basalt.machined.sys.dhcp basalt.machined.sys.dhcp.client
    basalt.machined.sys.dhcp.packet basalt.machined.sys.ifaces basalt.machined.sys.kexec
    basalt.machined.sys.kmod basalt.machined.sys.loop basalt.machined.sys.mount
    basalt.machined.sys.netlink basalt.machined.sys.power basalt.machined.sys.procstat
    basalt.machined.sys.pipes basalt.machined.sys.reaper basalt.machined.sys.rtnl
    basalt.machined.sys.sysctl
    basalt.machined.upgrade basalt.machined.upgrade.drain basalt.machined.upgrade.jobs
    basalt.machined.upgrade.receive basalt.machined.upgrade.slots
    basalt.machined.upgrade.upgrader
    basalt.machinery basalt.machinery.api basalt.machinery.api.common_pb2
    basalt.machinery.api.machine_pb2 basalt.machinery.api.machine_pb2_grpc
    basalt.machinery.api.resource_pb2 basalt.machinery.api.resource_pb2_grpc
    basalt.machinery.api.status basalt.machinery.api.trust_pb2
    basalt.machinery.api.trust_pb2_grpc
    basalt.machinery.boot basalt.machinery.boot.assessment basalt.machinery.boot.codecs
    basalt.machinery.boot.entries basalt.machinery.boot.esp basalt.machinery.boot.slots
    basalt.machinery.client basalt.machinery.client.client
    basalt.machinery.disk basalt.machinery.disk.gpt basalt.machinery.disk.layout
    basalt.machinery.disk.names
    basalt.machinery.elf basalt.machinery.errors basalt.machinery.fileio
    basalt.machinery.image_layout basalt.machinery.images basalt.machinery.images.errors
    basalt.machinery.images.manifest basalt.machinery.images.payload
    basalt.machinery.kubernetes basalt.machinery.kubernetes.paths basalt.machinery.launch
    basalt.machinery.lazy basalt.machinery.pki basalt.machinery.resources
    basalt.machinery.resources.definitions basalt.machinery.resources.record
    basalt.machinery.resources.specs
    basalt.machinery.roles basalt.machinery.schematic basalt.machinery.sntp
    """.split()  # noqa: SIM905 - a list of names reads better as words
)

#: Bundled too, after :data:`STARTUP_MODULES`: what the API's first call builds (the
#: machine and resource services), and what a boot with a config imports before its API
#: opens (the config models, apply, identities, etcd, containerd, the kubelet's files).
BOOT_MODULES = (
    "basalt.machined.api.machine",
    "basalt.machined.api.resources",
    "basalt.machined.api.trust",
    "basalt.machined.api.proxy",
    "basalt.machined.apply",
    "basalt.machined.identity",
    "basalt.machined.install",
    "basalt.machined.system_services",
    "basalt.machined.gates",
    "basalt.machined.health",
    "basalt.machined.etcd",
    "basalt.machined.containerd",
    "basalt.machined.kubernetes",
    "basalt.machined.certificates",
    "basalt.machinery.config",
    "basalt.machinery.kubernetes.render",
    "basalt.machinery.images.verify",
)
#: The finder :func:`install` put on sys.meta_path (None when not installed).
_installed: "BundleFinder | None" = None


class BundleError(Exception):
    """A bundle file that is not one (wrong magic, unreadable index)."""


class _BundledLoader(SourceFileLoader):
    """A module's file loader whose byte code comes from the bundle."""

    def __init__(self, fullname: str, path: str, code: bytes) -> None:
        super().__init__(fullname, path)
        self._code: bytes | None = code

    def get_code(self, fullname: str) -> "types.CodeType":
        data, self._code = self._code, None  # once: a reload reads the file
        if data is None:
            return super().get_code(fullname)  # type: ignore[return-value]
        code: types.CodeType = marshal.loads(data)
        return code


#: name -> (file, is a package, offset of its code after the index, length)
_Index = dict[str, tuple[str, bool, int, int]]
#: a generated function's source text -> (offset of its code after the index, length)
_Generated = dict[str, tuple[int, int]]


def _read_index(read: "Callable[[int, int], bytes]") -> "tuple[_Index, _Generated, int]":
    """A bundle's two indexes and where the code after them starts; ``read(size, offset)``."""
    start = len(MAGIC) + 4
    head = read(start, 0)
    if head[: len(MAGIC)] != MAGIC:
        raise BundleError("not a start-up bundle (bad magic)")
    index_length = int.from_bytes(head[len(MAGIC) :], "little")
    try:
        index, generated = marshal.loads(read(index_length, start))
        if not isinstance(index, dict) or not isinstance(generated, dict):
            raise TypeError("not two tables")
    except (EOFError, ValueError, TypeError) as exc:
        raise BundleError(f"unreadable bundle index: {exc}") from None
    return index, generated, start + index_length


def _compiled(source: str) -> bytes:
    """What ``exec(source)`` compiles, marshalled. This module has no ``__future__``
    import, and ``dont_inherit`` leaves the caller's flags out: the plain compile."""
    return marshal.dumps(compile(source, "<string>", "exec", dont_inherit=True))


class _Recorder:
    """The build's ``exec`` for :data:`GENERATING_MODULE`: keeps each source text it runs
    with its compiled code."""

    def __init__(self) -> None:
        self.sources: dict[str, bytes] = {}

    def __call__(self, source: object, globals: object = None, locals: object = None) -> None:
        if type(source) is str and source not in self.sources:
            self.sources[source] = _compiled(source)
        exec(source, globals, locals)  # type: ignore[arg-type]


class _GeneratingLoader(_BundledLoader):
    """Loads :data:`GENERATING_MODULE` from the bundle, its ``exec`` the finder's."""

    def __init__(self, fullname: str, path: str, code: bytes, finder: "BundleFinder") -> None:
        super().__init__(fullname, path, code)
        self._finder = finder

    def exec_module(self, module: "types.ModuleType") -> None:
        super().exec_module(module)
        module.exec = self._finder.exec_generated  # type: ignore[attr-defined]


class BundleFinder:
    """Answers the bundled modules from a bundle file (an open descriptor)."""

    def __init__(self, fd: int) -> None:
        self._index, self._generated, self._base = _read_index(
            lambda size, offset: os.pread(fd, size, offset)
        )
        self._fd = fd
        self.served = 0
        #: Generated functions run from their recorded code (exec_generated).
        self.generated_served = 0

    def __len__(self) -> int:
        return len(self._index)

    def find_spec(
        self, fullname: str, path: "Sequence[str] | None" = None, target: object = None
    ) -> "ModuleSpec | None":
        entry = self._index.pop(fullname, None)  # served once
        if entry is None:
            return None
        origin, package, offset, length = entry
        try:
            code = os.pread(self._fd, length, self._base + offset)
        except OSError:
            return None  # closed, or unreadable: the module's own file then
        loader = (
            _GeneratingLoader(fullname, origin, code, self)
            if fullname == GENERATING_MODULE and self._generated
            else _BundledLoader(fullname, origin, code)
        )
        spec = ModuleSpec(fullname, loader, origin=origin, is_package=package)
        spec.has_location = True
        if package:
            spec.submodule_search_locations = [origin.rsplit("/", 1)[0]]
        self.served += 1
        return spec

    def exec_generated(self, source: object, globals: object = None, locals: object = None) -> None:
        """``exec`` for :data:`GENERATING_MODULE`: a source text the bundle holds runs
        from its recorded code; anything else (or an unreadable bundle) as ``exec`` would."""
        entry = self._generated.get(source) if type(source) is str else None
        if entry is not None:
            try:
                data = os.pread(self._fd, entry[1], self._base + entry[0])
            except OSError:
                data = b""
            if data:
                source = marshal.loads(data)
                self.generated_served += 1
        exec(source, globals, locals)  # type: ignore[arg-type]

    def close(self) -> None:
        self._index.clear()
        self._generated.clear()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def install(path: str = STARTUP_BUNDLE) -> "BundleFinder | None":
    """Put the bundle at ``path`` first on ``sys.meta_path``; None (and nothing changed)
    when there is no usable bundle there."""
    global _installed  # noqa: PLW0603 - one bundle per process
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        finder = BundleFinder(fd)
    except (BundleError, OSError):
        os.close(fd)
        return None
    sys.meta_path.insert(0, finder)
    _installed = finder
    return finder


def served() -> int:
    """How many modules the installed bundle has served so far (0 without one)."""
    return _installed.served if _installed is not None else 0


def release() -> int:
    """Take the installed bundle off ``sys.meta_path`` and close its file; returns how
    many modules it served (0 when none was installed)."""
    global _installed
    finder, _installed = _installed, None
    if finder is None:
        return 0
    if finder in sys.meta_path:
        sys.meta_path.remove(finder)
    generating = sys.modules.get(GENERATING_MODULE)
    if getattr(generating, "exec", None) == finder.exec_generated:
        del generating.exec  # type: ignore[union-attr]  # the builtin again
    finder.close()
    return finder.served


def served_generated() -> int:
    """How many generated functions the installed bundle has run from recorded code."""
    return _installed.generated_served if _installed is not None else 0


def pack(
    modules: "Iterable[tuple[str, str, bool, bytes]]",
    generated: "Iterable[tuple[str, bytes]]" = (),
) -> bytes:
    """A bundle file from (name, file, is a package, marshalled code) in import order,
    and (source text, marshalled code) of generated functions."""
    index: _Index = {}
    table: _Generated = {}
    blobs: list[bytes] = []
    offset = 0
    for name, origin, package, code in modules:
        index[name] = (origin, package, offset, len(code))
        blobs.append(code)
        offset += len(code)
    for source, code in generated:
        table[source] = (offset, len(code))
        blobs.append(code)
        offset += len(code)
    head = marshal.dumps((index, table))
    return b"".join([MAGIC, len(head).to_bytes(4, "little"), head, *blobs])


def without(data: bytes, origins: "Iterable[str]") -> bytes:
    """The bundle ``data`` without the modules of the files ``origins`` (paths in the
    image): what a tool that edits a module of a built root must do, or the bundle's copy
    of the code would win over the edit."""
    index, generated, base = _read_index(lambda size, offset: data[offset : offset + size])
    dropped = set(origins)
    return pack(
        (
            (name, origin, package, data[base + offset : base + offset + length])
            for name, (origin, package, offset, length) in index.items()
            if origin not in dropped
        ),
        # Keyed by their text: an edited class writes another text, compiled as usual.
        ((source, data[base + at : base + at + size]) for source, (at, size) in generated.items()),
    )


def build(output: str, root: str, roots: "Iterable[str] | None" = None) -> list[str]:
    """Import ``roots`` in order and bundle every module that came from a ``.py`` file
    under ``root`` (the image's tree, as this interpreter runs it), named by its path in
    the image, in the order they were imported; returns their names. Runs in the image's
    own interpreter (its byte code, its magic number), its ``.pyc`` files compiled.
    ``roots`` by default: :data:`STARTUP_MODULES`, then :data:`BOOT_MODULES`."""
    import importlib
    import importlib.util

    if roots is None:
        roots = (*sorted(STARTUP_MODULES), *BOOT_MODULES)
    before = set(sys.modules)
    generating = importlib.import_module(GENERATING_MODULE)  # bundled: not in ``before``
    recorder = _Recorder()
    generating.exec = recorder  # type: ignore[attr-defined]
    try:
        for name in roots:
            importlib.import_module(name)
    finally:
        del generating.exec
    prefix = root.rstrip("/") + "/"
    found: list[tuple[str, str, bool, bytes]] = []
    for name, module in list(sys.modules.items()):
        spec: Any = getattr(module, "__spec__", None)
        origin = getattr(spec, "origin", None)
        if (
            name in before
            or not isinstance(spec, ModuleSpec)
            or not isinstance(spec.loader, SourceFileLoader)
            or not isinstance(origin, str)
            or not origin.startswith(prefix)
        ):
            continue
        with open(importlib.util.cache_from_source(origin), "rb") as stream:
            code = stream.read()[16:]  # the .pyc header: magic, flags, hash
        package = spec.submodule_search_locations is not None
        found.append((name, "/" + origin[len(prefix) :], package, code))
    with open(output, "wb") as stream:
        stream.write(pack(found, recorder.sources.items()))
    return [name for name, *_ in found]


if __name__ == "__main__":  # the imager: python -m basalt.machined.startup_bundle OUT ROOT
    print(f"{len(build(sys.argv[1], sys.argv[2]))} modules bundled")
