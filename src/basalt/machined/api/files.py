"""Read-only access to the node's filesystem view, for ``ls``, ``read`` and ``copy``.

Every path a client sends is an absolute path *inside the node's view* ``root`` (a
directory in container mode, ``/`` on metal). :func:`resolve` is the one gate: it refuses
NUL bytes, ``..`` above ``/`` and symlinks that lead out of the view, so nothing here
ever touches a file outside it. Symlink targets are followed the way the kernel follows
them (an absolute target is a host path); a target that ends up outside the view is
refused rather than reinterpreted.

Filesystem work runs in worker threads; the event loop only moves results along.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import posixpath
import stat
import tarfile
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import IO, TypeVar

from basalt.machinery.api import machine_pb2

from .errors import AccessDeniedError, InvalidRequestError, NotFoundError

__all__ = [
    "MAX_LIST_ENTRIES",
    "SENSITIVE_PREFIXES",
    "copy_tree",
    "is_sensitive",
    "list_files",
    "normalise",
    "read_file",
    "resolve",
]

#: Paths (in the node view) that hold the machine config and keys (the OS's and
#: Kubernetes'): admins only.
SENSITIVE_PREFIXES: tuple[str, ...] = ("/system/state", "/system/secrets")

#: A listing stops after this many entries, with a last entry saying so.
MAX_LIST_ENTRIES = 100_000

_ESCAPES = "path escapes the node's filesystem"
_ESCAPES_HINT = "paths are absolute inside the node; `..` above `/` and links out of it are refused"
_LIST_BATCH = 512
_COPY_QUEUE_CHUNKS = 8

_T = TypeVar("_T")
_Skip = Callable[[str], bool]


def normalise(path: str) -> str:
    """``path`` as a clean absolute path in the node view (relative means from ``/``).

    Raises :class:`AccessDeniedError` for NUL bytes and for ``..`` that climbs above ``/``.
    """
    if "\x00" in path:
        raise AccessDeniedError(f"{_ESCAPES}: {_display(path)}", hint=_ESCAPES_HINT)
    parts: list[str] = []
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                raise AccessDeniedError(f"{_ESCAPES}: {_display(path)}", hint=_ESCAPES_HINT)
            parts.pop()
        else:
            parts.append(part)
    return "/" + "/".join(parts)


def resolve(root: Path, path: str) -> Path:
    """The host path of ``path`` in the node view ``root``, symlinks resolved.

    Raises :class:`AccessDeniedError` when the path (or a symlink on the way) leaves the
    view, :class:`NotFoundError` when it does not exist. Blocking: call it from a thread.
    """
    view = normalise(path)
    base = os.path.realpath(root)
    real = os.path.realpath(_host(base, view))
    if not _within(real, base):
        raise AccessDeniedError(f"{_ESCAPES}: {view}", hint=_ESCAPES_HINT)
    try:
        os.stat(real)
    except (FileNotFoundError, NotADirectoryError):
        raise NotFoundError(
            f"no such file or directory on the node: {view}",
            hint="check the path with `basaltctl ls` on its parent directory",
        ) from None
    except PermissionError:
        raise AccessDeniedError(f"cannot access {view} on the node: permission denied") from None
    except OSError as exc:
        raise InvalidRequestError(f"cannot access {view} on the node: {_reason(exc)}") from None
    return Path(real)


def is_sensitive(root: Path, path: str) -> bool:
    """Whether ``path`` is (or resolves into) one of :data:`SENSITIVE_PREFIXES`.

    Never raises and never reveals whether the path exists. A path :func:`normalise`
    refuses counts as not sensitive: :func:`resolve` refuses it anyway.
    """
    try:
        view = normalise(path)
    except AccessDeniedError:
        return False
    if any(_within(view, prefix) for prefix in SENSITIVE_PREFIXES):
        return True
    base = os.path.realpath(root)
    real = os.path.realpath(_host(base, view))
    return any(_within(real, prefix) for prefix in _sensitive_hosts(base))


async def list_files(
    root: Path,
    path: str,
    *,
    recurse: bool,
    max_depth: int,
    include_sensitive: bool = False,
    limit: int = MAX_LIST_ENTRIES,
) -> AsyncIterator[machine_pb2.FileInfo]:
    """The entry ``path`` (relative name ``.``) and what lies under it, depth first.

    Without ``recurse`` only direct children; with it, down to ``max_depth`` levels
    (0: no limit). Symlinks are reported (``link``), never followed. An entry that
    cannot be read carries ``error`` and the listing goes on. Directories under
    :data:`SENSITIVE_PREFIXES` are not descended into unless ``include_sensitive`` or
    ``path`` itself is sensitive (the caller has then authorized it). After ``limit``
    entries a last entry with ``error`` says the listing stopped.
    """
    if max_depth < 0:
        raise InvalidRequestError(f"max_depth must be 0 (no limit) or more, got {max_depth}")
    host = await asyncio.to_thread(resolve, root, path)
    skip = await asyncio.to_thread(sensitive_filter, root, path, include_sensitive)
    depth = (max_depth or None) if recurse else 1
    entries = _walk_listing(str(host), normalise(path), depth, skip, limit)
    while batch := await asyncio.to_thread(_take, entries, _LIST_BATCH):
        for info in batch:
            yield info


async def read_file(root: Path, path: str, chunk: int = 64 * 1024) -> AsyncIterator[bytes]:
    """The contents of the regular file ``path``, in chunks of at most ``chunk`` bytes."""
    if chunk < 1:
        raise ValueError(f"chunk must be positive, got {chunk}")
    fd = await asyncio.to_thread(_open_regular, root, path)
    try:
        while data := await asyncio.to_thread(os.read, fd, chunk):
            yield data
    finally:
        os.close(fd)


async def copy_tree(
    root: Path, path: str, chunk: int = 64 * 1024, *, include_sensitive: bool = False
) -> AsyncIterator[bytes]:
    """A tar stream of the file or directory ``path``, named relative to its parent.

    Symlinks are stored as symlinks. Entries that vanish or cannot be read are left out;
    a file that shrinks while it is read is padded with zeros so the stream stays valid.
    Sensitive subtrees are left out as in :func:`list_files`. A worker thread writes the
    archive into a bounded queue, so memory stays bounded whatever the tree's size.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be positive, got {chunk}")
    host = await asyncio.to_thread(resolve, root, path)
    skip = await asyncio.to_thread(sensitive_filter, root, path, include_sensitive)
    arcname = posixpath.basename(normalise(path)) or "."
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[bytes | BaseException | None] = asyncio.Queue(_COPY_QUEUE_CHUNKS)
    stop = threading.Event()
    finished = loop.create_future()
    writer = _QueueWriter(loop, queue, stop, chunk)
    worker = threading.Thread(
        target=_tar_worker,
        args=(str(host), arcname, skip, writer, lambda: _resolve_later(loop, finished)),
        name=f"basalt-copy:{arcname}",
        daemon=True,
    )
    worker.start()
    try:
        while (item := await queue.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while not finished.done():  # unblock a worker waiting on a full queue
            _drain(queue)
            await asyncio.wait([finished], timeout=0.05)


# -- paths --------------------------------------------------------------------------


def _display(path: str) -> str:
    return path.replace("\x00", "\\x00")


def _host(base: str, view: str) -> str:
    return os.path.join(base, view.lstrip("/"))


def _within(path: str, prefix: str) -> bool:
    return prefix in ("/", path) or path.startswith(prefix + "/")


def _sensitive_hosts(base: str) -> list[str]:
    return [os.path.realpath(_host(base, prefix)) for prefix in SENSITIVE_PREFIXES]


def sensitive_filter(root: Path, path: str, include_sensitive: bool) -> _Skip:
    """Which host paths a walk below ``path`` must leave out."""
    if include_sensitive or is_sensitive(root, path):
        return lambda _host_path: False
    hosts = _sensitive_hosts(os.path.realpath(root))
    return lambda host_path: any(_within(host_path, prefix) for prefix in hosts)


def _reason(exc: OSError) -> str:
    return (exc.strerror or str(exc)).lower()


def _list_dir(path: str) -> list[str]:
    with os.scandir(path) as entries:
        return sorted(entry.name for entry in entries)


def _take(items: Iterator[_T], count: int) -> list[_T]:
    return list(itertools.islice(items, count))


# -- list ---------------------------------------------------------------------------


def _walk_listing(
    host: str, view: str, max_depth: int | None, skip: _Skip, limit: int
) -> Iterator[machine_pb2.FileInfo]:
    stack: list[tuple[str, str, int]] = [(host, ".", 0)]
    emitted = 0
    while stack:
        if emitted >= limit:
            yield machine_pb2.FileInfo(
                name=view,
                relative_name=".",
                error=f"listing stopped after {limit} entries; "
                "list a narrower path or a smaller depth",
            )
            return
        host_path, relative, depth = stack.pop()
        name = view if relative == "." else posixpath.join(view, relative)
        descend = max_depth is None or depth < max_depth
        info, children = _describe(host_path, name, relative, descend, skip)
        emitted += 1
        yield info
        prefix = "" if relative == "." else relative + "/"
        stack.extend(
            (os.path.join(host_path, child), prefix + child, depth + 1)
            for child in reversed(children)
        )


def _describe(
    host_path: str, name: str, relative: str, descend: bool, skip: _Skip
) -> tuple[machine_pb2.FileInfo, list[str]]:
    info = machine_pb2.FileInfo(name=name, relative_name=relative)
    try:
        st = os.lstat(host_path)
    except OSError as exc:
        info.error = _reason(exc)
        return info, []
    info.size = st.st_size
    info.mode = st.st_mode
    info.modified = st.st_mtime
    info.is_dir = stat.S_ISDIR(st.st_mode)
    if stat.S_ISLNK(st.st_mode):
        try:
            info.link = os.readlink(host_path)
        except OSError as exc:
            info.error = f"cannot read link: {_reason(exc)}"
    if not (info.is_dir and descend):
        return info, []
    if skip(host_path):
        info.error = "contents not listed: sensitive path"
        return info, []
    try:
        return info, _list_dir(host_path)
    except OSError as exc:
        info.error = f"cannot list directory: {_reason(exc)}"
        return info, []


# -- read ---------------------------------------------------------------------------


def _open_regular(root: Path, path: str) -> int:
    host = resolve(root, path)
    view = normalise(path)
    try:
        st = os.stat(host)
        _require_regular(st.st_mode, view)
        fd = os.open(host, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except PermissionError:
        raise AccessDeniedError(f"cannot read {view} on the node: permission denied") from None
    except OSError as exc:
        raise InvalidRequestError(f"cannot read {view} on the node: {_reason(exc)}") from None
    try:
        _require_regular(os.fstat(fd).st_mode, view)  # it may have been swapped meanwhile
    except BaseException:
        os.close(fd)
        raise
    return fd


def _require_regular(mode: int, view: str) -> None:
    if stat.S_ISDIR(mode):
        raise InvalidRequestError(
            f"{view} is a directory, not a file",
            hint="list it with `basaltctl ls` or fetch it as a tar archive with `basaltctl copy`",
        )
    if not stat.S_ISREG(mode):
        raise InvalidRequestError(
            f"{view} is not a regular file",
            hint="only regular files can be read; devices, pipes and sockets cannot",
        )


# -- copy ---------------------------------------------------------------------------


class _Stopped(Exception):
    """The reader went away; the worker stops writing."""


class _QueueWriter:
    """A write-only file for ``tarfile`` that hands ``chunk``-sized pieces to the loop."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        queue: asyncio.Queue[bytes | BaseException | None],
        stop: threading.Event,
        chunk: int,
    ) -> None:
        self._loop = loop
        self._queue = queue
        self._stop = stop
        self._chunk = chunk
        self._buffer = bytearray()
        self._written = 0

    def write(self, data: bytes, /) -> int:
        self._buffer += data
        self._written += len(data)
        while len(self._buffer) >= self._chunk:
            piece = bytes(self._buffer[: self._chunk])
            del self._buffer[: self._chunk]
            self.put(piece)
        return len(data)

    def flush(self) -> None:
        if self._buffer:
            piece = bytes(self._buffer)
            self._buffer.clear()
            self.put(piece)

    def put(self, item: bytes | BaseException | None) -> None:
        """Queue ``item`` for the reader; waits while the queue is full."""
        if self._stop.is_set() or self._loop.is_closed():
            raise _Stopped
        future = asyncio.run_coroutine_threadsafe(self._queue.put(item), self._loop)
        while True:
            try:
                future.result(timeout=0.5)
                return
            except TimeoutError:
                if self._stop.is_set() or self._loop.is_closed():
                    future.cancel()
                    raise _Stopped from None

    # The rest of the file protocol tarfile expects; a stream is never read or rewound.
    def tell(self) -> int:
        return self._written

    def read(self, size: int = -1, /) -> bytes:
        raise OSError("write-only stream")

    def seek(self, pos: int, /) -> int:
        raise OSError("unseekable stream")

    def close(self) -> None:
        pass


class _Padded:
    """Exactly ``size`` bytes of ``file``: zeros stand in for what shrank or failed to read."""

    def __init__(self, file: IO[bytes], size: int) -> None:
        self._file = file
        self._left = size
        self._eof = False

    def read(self, size: int = -1, /) -> bytes:
        want = self._left if size < 0 else min(size, self._left)
        data = bytearray()
        while len(data) < want and not self._eof:
            try:
                piece = self._file.read(want - len(data))
            except OSError:
                piece = b""
            if not piece:
                self._eof = True
            data += piece
        data += bytes(want - len(data))
        self._left -= want
        return bytes(data)


def _resolve_later(loop: asyncio.AbstractEventLoop, future: asyncio.Future[None]) -> None:
    def finish() -> None:
        if not future.done():
            future.set_result(None)

    with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
        loop.call_soon_threadsafe(finish)


def _drain(queue: asyncio.Queue[bytes | BaseException | None]) -> None:
    while not queue.empty():
        queue.get_nowait()


def _tar_worker(
    host: str, arcname: str, skip: _Skip, writer: _QueueWriter, done: Callable[[], None]
) -> None:
    try:
        with tarfile.open(fileobj=writer, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            for path, name in _walk_tree(host, arcname, skip):
                _add_entry(tar, path, name)
        writer.flush()
        writer.put(None)
    except _Stopped:
        pass
    except BaseException as exc:
        with contextlib.suppress(_Stopped):
            writer.put(exc)
    finally:
        done()


def _walk_tree(host: str, arcname: str, skip: _Skip) -> Iterator[tuple[str, str]]:
    """``(host path, archive name)`` of ``host`` and everything below it, parents first."""
    stack = [(host, arcname)]
    while stack:
        path, name = stack.pop()
        yield path, name
        try:
            if not stat.S_ISDIR(os.lstat(path).st_mode):
                continue
            children = _list_dir(path)
        except OSError:
            continue
        prefix = "" if name == "." else name + "/"
        stack.extend(
            (os.path.join(path, child), prefix + child)
            for child in reversed(children)
            if not skip(os.path.join(path, child))
        )


def _add_entry(tar: tarfile.TarFile, path: str, name: str) -> None:
    """Add one entry; one that vanished or cannot be read is left out."""
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            info = tar.gettarinfo(path, arcname=name)
            if info is not None and not info.isreg():  # None: a socket, tar has no type
                tar.addfile(info)
            return
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return
    with os.fdopen(fd, "rb") as file:
        try:
            info = tar.gettarinfo(arcname=name, fileobj=file)
        except OSError:
            return
        if info.isreg():
            tar.addfile(info, _Padded(file, info.size))
