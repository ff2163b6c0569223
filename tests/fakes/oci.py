"""Small OCI images built in Python for tests: no registry, no compiler, no downloads.

The one layer holds static x86-64 ELF programs assembled here from bytes: each writes a
fixed message to stdout with write(2) and ends with exit_group(2) and a fixed code.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import struct
import tarfile
from pathlib import Path

BASE = 0x400000
_HEADERS = 64 + 56


#: ``exit_code`` for a program that never exits (it spins after writing its message).
SPIN = -1


def elf_program(message: bytes, exit_code: int = 0) -> bytes:
    """A static ELF that prints ``message`` to stdout and exits with ``exit_code``
    (:data:`SPIN`: loops forever instead)."""
    if not (0 <= exit_code <= 255 or exit_code == SPIN):
        raise ValueError("exit code must be 0..255 or SPIN")
    end = (
        b"\xeb\xfe" + b"\x90" * 10  # jmp to itself (12 bytes, like the exit below)
        if exit_code == SPIN
        else b"".join(
            [
                b"\xb8\xe7\x00\x00\x00",  # mov eax, 231 (exit_group)
                b"\xbf" + struct.pack("<I", exit_code),  # mov edi, code
                b"\x0f\x05",  # syscall
            ]
        )
    )
    code = b"".join(
        [
            b"\xb8\x01\x00\x00\x00",  # mov eax, 1 (write)
            b"\xbf\x01\x00\x00\x00",  # mov edi, 1 (stdout)
            b"\x48\x8d\x35" + struct.pack("<i", 19),  # lea rsi, [rip + 19] -> message
            b"\xba" + struct.pack("<I", len(message)),  # mov edx, len
            b"\x0f\x05",  # syscall
            end,
        ]
    )
    assert len(code) == 36
    body = code + message
    size = _HEADERS + len(body)
    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)  # 64-bit, little endian, SysV
    header = ident + struct.pack(
        "<HHIQQQIHHHHHH",
        2,  # ET_EXEC
        0x3E,  # x86-64
        1,  # version
        BASE + _HEADERS,  # entry
        64,  # program headers at
        0,  # no section headers
        0,  # flags
        64,  # header size
        56,  # program header size
        1,  # one program header
        64,  # section header size
        0,
        0,
    )
    segment = struct.pack(
        "<IIQQQQQQ",
        1,  # PT_LOAD
        5,  # R + X
        0,  # from file offset 0
        BASE,
        BASE,
        size,
        size,
        0x1000,
    )
    return header + segment + body


def _tar(files: dict[str, tuple[bytes, int]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, (data, mode) in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = mode
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _json(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":"), sort_keys=True).encode()


def layer_files(programs: dict[str, tuple[bytes, int]]) -> dict[str, tuple[bytes, int]]:
    """``{"/hello": (message, code)}`` -> the layer's files (programs, mode 0755)."""
    return {
        name.lstrip("/"): (elf_program(msg, code), 0o755) for name, (msg, code) in programs.items()
    }


def _config(diff_id: str, cmd: list[str], repeat: int = 1) -> bytes:
    return _json(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Cmd": cmd, "Env": ["PATH=/"], "WorkingDir": "/"},
            "rootfs": {"type": "layers", "diff_ids": [diff_id] * repeat},
        }
    )


def oci_layout_tar(
    name: str,
    programs: dict[str, tuple[bytes, int]],
    cmd: list[str],
    *,
    annotate: bool = True,
    repeat: int = 1,
) -> bytes:
    """An OCI image layout (as a tar) with one gzip layer holding ``programs`` (listed
    ``repeat`` times in the manifest)."""
    layer = _tar(layer_files(programs))
    compressed = gzip.compress(layer, mtime=0)
    config = _config(_digest(layer), cmd, repeat)
    manifest = _json(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": _digest(config),
                "size": len(config),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": _digest(compressed),
                    "size": len(compressed),
                }
            ]
            * repeat,
        }
    )
    entry: dict[str, object] = {
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": _digest(manifest),
        "size": len(manifest),
    }
    if annotate:
        entry["annotations"] = {
            "io.containerd.image.name": name,
            "org.opencontainers.image.ref.name": name.rsplit(":", 1)[-1],
        }
    index = _json({"schemaVersion": 2, "manifests": [entry]})
    files = {
        "oci-layout": (_json({"imageLayoutVersion": "1.0.0"}), 0o644),
        "index.json": (index, 0o644),
    }
    for blob in (compressed, config, manifest):
        files[f"blobs/sha256/{_digest(blob)[7:]}"] = (blob, 0o644)
    return _tar(files)


def docker_archive_tar(
    name: str, programs: dict[str, tuple[bytes, int]], cmd: list[str], *, repeat: int = 1
) -> bytes:
    """The same image as ``docker save`` writes it (uncompressed layer, manifest.json)."""
    layer = _tar(layer_files(programs))
    config = _config(_digest(layer), cmd, repeat)
    config_name = f"{_digest(config)[7:]}.json"
    layer_name = f"{_digest(layer)[7:]}/layer.tar"
    layers = [layer_name] * repeat
    manifest = _json([{"Config": config_name, "RepoTags": [name], "Layers": layers}])
    return _tar(
        {
            "manifest.json": (manifest, 0o644),
            config_name: (config, 0o644),
            layer_name: (layer, 0o644),
        }
    )


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path
