"""Read-only file access inside the node's view: real trees, real symlinks, real tar."""

from __future__ import annotations

import asyncio
import io
import os
import tarfile
import threading
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import TypeVar

import pytest

from basalt.machined.api import files
from basalt.machined.api.errors import AccessDeniedError, InvalidRequestError, NotFoundError
from basalt.machinery.api import machine_pb2

T = TypeVar("T")
BIG = bytes(range(256)) * 1024 + b"tail"  # 256 KiB + 4: several chunks, a partial last one


def collect(items: AsyncIterator[T]) -> list[T]:
    async def run() -> list[T]:
        return [item async for item in items]

    return asyncio.run(asyncio.wait_for(run(), timeout=10))


def listing(root: Path, path: str, **kwargs: object) -> list[machine_pb2.FileInfo]:
    kwargs.setdefault("recurse", False)
    kwargs.setdefault("max_depth", 0)
    return collect(files.list_files(root, path, **kwargs))  # type: ignore[arg-type]


def untar(data: bytes) -> dict[str, tuple[tarfile.TarInfo, bytes | None]]:
    members = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for info in tar:
            handle = tar.extractfile(info) if info.isreg() else None
            members[info.name] = (info, handle.read() if handle else None)
    return members


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A node view with files, a secret state dir, and links that stay in or leave it."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("host secret\n")
    root = tmp_path / "node"
    for directory in ("etc", "var/log", "system/state"):
        (root / directory).mkdir(parents=True)
    (root / "etc" / "hostname").write_text("node1\n")
    (root / "var" / "log" / "big.bin").write_bytes(BIG)
    (root / "system" / "state" / "config.yaml").write_text("machine: keys\n")
    (root / "etc" / "rel-link").symlink_to("hostname")
    (root / "abs-inside").symlink_to(root / "etc")
    (root / "escape-rel").symlink_to("../outside/secret.txt")
    (root / "escape-abs").symlink_to(outside / "secret.txt")
    (root / "etc" / "escape-dir").symlink_to("../../outside")
    (root / "var" / "state-link").symlink_to("../system/state")
    (root / "dangling").symlink_to("nowhere")
    (root / "loop-a").symlink_to("loop-b")
    (root / "loop-b").symlink_to("loop-a")
    return root


# -- resolve / is_sensitive ---------------------------------------------------------


@pytest.mark.parametrize(
    "path", ["/etc/hostname", "etc/hostname", "//etc/./hostname/", "/var/../etc/hostname"]
)
def test_resolve_normalises_inside_the_view(tree: Path, path: str) -> None:
    assert files.resolve(tree, path) == (tree / "etc" / "hostname").resolve()


def test_resolve_follows_links_that_stay_inside(tree: Path) -> None:
    hostname = (tree / "etc" / "hostname").resolve()
    assert files.resolve(tree, "/etc/rel-link") == hostname
    assert files.resolve(tree, "/abs-inside/hostname") == hostname
    assert files.resolve(tree, "/") == tree.resolve()
    assert files.resolve(tree, "") == tree.resolve()


@pytest.mark.parametrize(
    "path",
    [
        "/..",
        "/../outside/secret.txt",
        "/etc/../../outside",
        "/escape-rel",
        "/escape-abs",
        "/etc/escape-dir",
        "/etc/escape-dir/secret.txt",
        "/etc/escape-dir/missing",  # refused, not "not found": says nothing about the host
        "/etc/hostname\x00",
    ],
)
def test_resolve_refuses_escapes(tree: Path, path: str) -> None:
    with pytest.raises(AccessDeniedError, match="path escapes the node's filesystem"):
        files.resolve(tree, path)


@pytest.mark.parametrize("path", ["/nope", "/etc/hostname/child", "/dangling"])
def test_resolve_missing_names_the_path(tree: Path, path: str) -> None:
    with pytest.raises(NotFoundError, match=path):
        files.resolve(tree, path)


def test_resolve_symlink_loop_is_a_bad_request(tree: Path) -> None:
    with pytest.raises(InvalidRequestError, match="/loop-a"):
        files.resolve(tree, "/loop-a")


@pytest.mark.parametrize(
    ("path", "sensitive"),
    [
        ("/system/state", True),
        ("system//state/", True),
        ("/system/state/config.yaml", True),
        ("/system/state/missing", True),
        ("/var/state-link", True),
        ("/var/state-link/config.yaml", True),
        ("/system", False),
        ("/system/statefile", False),
        ("/etc/hostname", False),
        ("/../system/state", False),  # refused by resolve anyway
    ],
)
def test_is_sensitive(tree: Path, path: str, sensitive: bool) -> None:
    assert files.is_sensitive(tree, path) is sensitive
    assert "/system/state" in files.SENSITIVE_PREFIXES


# -- list_files ---------------------------------------------------------------------


def test_list_directory_without_recursion(tree: Path) -> None:
    entries = listing(tree, "/etc")
    assert [(e.name, e.relative_name) for e in entries] == [
        ("/etc", "."),
        ("/etc/escape-dir", "escape-dir"),
        ("/etc/hostname", "hostname"),
        ("/etc/rel-link", "rel-link"),
    ]
    root, escape, hostname, link = entries
    assert root.is_dir and not root.error
    assert escape.link == "../../outside" and not escape.is_dir  # reported, not followed
    assert link.link == "hostname"
    st = os.lstat(tree / "etc" / "hostname")
    assert (hostname.size, hostname.mode, hostname.is_dir) == (6, st.st_mode, False)
    assert hostname.modified == pytest.approx(st.st_mtime)


def test_list_recursive_depths(tree: Path) -> None:
    names = {e.name for e in listing(tree, "/", recurse=True, max_depth=0)}
    assert {"/", "/var/log/big.bin", "/etc/hostname", "/escape-rel", "/loop-a"} <= names
    assert not any(name.startswith("/outside") for name in names)
    shallow = {e.name for e in listing(tree, "/var", recurse=True, max_depth=1)}
    assert shallow == {"/var", "/var/log", "/var/state-link"}
    assert shallow == {e.name for e in listing(tree, "/var")}
    deeper = {e.name for e in listing(tree, "/", recurse=True, max_depth=2)}
    assert "/var/log" in deeper
    assert "/var/log/big.bin" not in deeper
    big = next(e for e in listing(tree, "/var", recurse=True, max_depth=0) if e.size == len(BIG))
    assert (big.name, big.relative_name) == ("/var/log/big.bin", "log/big.bin")


def test_list_keeps_sensitive_contents_out_unless_asked(tree: Path) -> None:
    entries = {e.name: e for e in listing(tree, "/", recurse=True, max_depth=0)}
    assert "/system/state/config.yaml" not in entries
    assert "sensitive" in entries["/system/state"].error
    full = listing(tree, "/", recurse=True, max_depth=0, include_sensitive=True)
    assert "/system/state/config.yaml" in {e.name for e in full}
    # Naming the sensitive path itself means the caller has authorized it.
    direct = {e.name for e in listing(tree, "/system/state", recurse=True, max_depth=0)}
    assert "/system/state/config.yaml" in direct


def test_list_a_file_and_through_links(tree: Path) -> None:
    [entry] = listing(tree, "/etc/rel-link")
    assert (entry.name, entry.relative_name, entry.size) == ("/etc/rel-link", ".", 6)
    names = [e.name for e in listing(tree, "/abs-inside")]
    assert "/abs-inside/hostname" in names


def test_list_stops_at_the_limit(tree: Path) -> None:
    entries = listing(tree, "/", recurse=True, max_depth=0, limit=5)
    assert len(entries) == 6
    assert "stopped after 5 entries" in entries[-1].error
    assert all(not e.error for e in entries[:5] if e.name != "/system/state")


def test_list_reports_entries_that_vanish(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(files, "_LIST_BATCH", 1)  # walk one entry per step

    async def run() -> list[machine_pb2.FileInfo]:
        seen = []
        async for entry in files.list_files(tree, "/etc", recurse=False, max_depth=0):
            seen.append(entry)
            if entry.name == "/etc/escape-dir":
                (tree / "etc" / "hostname").unlink()  # listed already, not yet described
        return seen

    entries = {e.name: e for e in asyncio.run(run())}
    assert "no such file" in entries["/etc/hostname"].error
    assert not entries["/etc/rel-link"].error


def test_list_reports_unreadable_directories(tree: Path) -> None:
    locked = tree / "locked"
    locked.mkdir(mode=0)
    try:
        if os.access(locked, os.R_OK):
            pytest.skip("this process reads directories whatever their mode (root)")
        entries = {e.name: e for e in listing(tree, "/", recurse=True, max_depth=0)}
    finally:
        locked.chmod(0o700)
    assert "permission denied" in entries["/locked"].error
    assert "/etc/hostname" in entries


def test_list_refuses_bad_requests(tree: Path) -> None:
    with pytest.raises(AccessDeniedError):
        listing(tree, "/escape-abs")
    with pytest.raises(NotFoundError):
        listing(tree, "/nope")
    with pytest.raises(InvalidRequestError, match="max_depth"):
        listing(tree, "/", recurse=True, max_depth=-1)


# -- read_file ----------------------------------------------------------------------


def test_read_streams_in_chunks(tree: Path) -> None:
    chunks = collect(files.read_file(tree, "/var/log/big.bin", chunk=64 * 1024))
    assert b"".join(chunks) == BIG
    assert len(chunks) == 5 and all(len(c) <= 64 * 1024 for c in chunks)
    assert collect(files.read_file(tree, "/etc/rel-link")) == [b"node1\n"]


def test_read_refuses_what_is_not_a_regular_file(tree: Path) -> None:
    with pytest.raises(InvalidRequestError, match="is a directory") as caught:
        collect(files.read_file(tree, "/etc"))
    assert "ls" in (caught.value.hint or "") and "copy" in (caught.value.hint or "")
    os.mkfifo(tree / "fifo")  # opening a FIFO for reading would block: it must not
    with pytest.raises(InvalidRequestError, match="not a regular file"):
        collect(files.read_file(tree, "/fifo"))
    with pytest.raises(AccessDeniedError):
        collect(files.read_file(tree, "/escape-rel"))
    with pytest.raises(NotFoundError):
        collect(files.read_file(tree, "/etc/missing"))


def test_empty_file_reads_as_nothing(tree: Path) -> None:
    (tree / "empty").write_bytes(b"")
    assert collect(files.read_file(tree, "/empty")) == []


# -- copy_tree ----------------------------------------------------------------------


def test_copy_directory_as_tar(tree: Path) -> None:
    chunks = collect(files.copy_tree(tree, "/var", chunk=16 * 1024))
    assert all(len(c) <= 16 * 1024 for c in chunks) and len(chunks) > 1
    members = untar(b"".join(chunks))
    assert sorted(members) == ["var", "var/log", "var/log/big.bin", "var/state-link"]
    assert members["var"][0].isdir()
    assert members["var/log/big.bin"][1] == BIG
    link = members["var/state-link"][0]
    assert link.issym() and link.linkname == "../system/state"


def test_copy_root_stores_links_and_leaves_secrets_out(tree: Path) -> None:
    os.mkfifo(tree / "fifo")
    members = untar(b"".join(collect(files.copy_tree(tree, "/"))))
    assert members["etc/hostname"][1] == b"node1\n"
    for name, target in [("escape-rel", "../outside/secret.txt"), ("etc/rel-link", "hostname")]:
        info = members[name][0]
        assert info.issym() and info.linkname == target
    assert members["fifo"][0].isfifo()
    assert not any(data and b"host secret" in data for _, data in members.values())
    assert "system" in members
    assert not any(name.startswith("system/state") for name in members)

    full = untar(b"".join(collect(files.copy_tree(tree, "/", include_sensitive=True))))
    assert full["system/state/config.yaml"][1] == b"machine: keys\n"
    direct = untar(b"".join(collect(files.copy_tree(tree, "/system/state"))))
    assert sorted(direct) == ["state", "state/config.yaml"]


def test_copy_a_single_file_and_a_link_to_one(tree: Path) -> None:
    members = untar(b"".join(collect(files.copy_tree(tree, "/etc/hostname"))))
    assert list(members) == ["hostname"] and members["hostname"][1] == b"node1\n"
    members = untar(b"".join(collect(files.copy_tree(tree, "/etc/rel-link"))))
    assert members["rel-link"][1] == b"node1\n"  # the named path was resolved, then copied


def test_copy_refuses_bad_requests(tree: Path) -> None:
    with pytest.raises(AccessDeniedError):
        collect(files.copy_tree(tree, "/etc/escape-dir"))
    with pytest.raises(NotFoundError):
        collect(files.copy_tree(tree, "/nope"))


def _copy_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("basalt-copy")]


def test_copy_stops_its_worker_when_the_reader_goes_away(tree: Path) -> None:
    (tree / "var" / "huge.bin").write_bytes(os.urandom(4 * 1024 * 1024))

    async def run() -> tuple[bytes, int]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.001)

        beat = asyncio.create_task(ticker())
        stream = files.copy_tree(tree, "/var", chunk=4096)
        assert isinstance(stream, AsyncGenerator)  # so it can be closed
        first = await anext(stream)
        await asyncio.sleep(0.2)  # the worker fills the bounded queue, then waits
        await stream.aclose()
        beat.cancel()
        return first, ticks

    first, ticks = asyncio.run(asyncio.wait_for(run(), timeout=10))
    assert len(first) == 4096
    assert ticks > 20  # the loop kept running while the worker wrote
    assert not _copy_threads()
