"""A real PostgreSQL server for tests (Debian's binaries, a cluster of the test's own).

Not a fake: ``initdb`` makes a throw-away cluster in a temporary directory and
``pg_ctl`` starts it on one loopback address and port, with its socket in that
directory. As root the server runs as the ``postgres`` user (PostgreSQL refuses root).
Skips when the binaries are missing (``make install`` installs them as root).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest


def _bindir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass
class PostgresServer:
    directory: Path
    host: str
    port: int
    bindir: Path
    user: str | None

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://basalt@{self.host}:{self.port}/basalt"

    def _run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        command = [str(self.bindir / argv[0]), *argv[1:]]
        if self.user is not None:
            command = ["runuser", "-u", self.user, "--", *command]
        return subprocess.run(command, check=check, capture_output=True, text=True, timeout=120)

    def start(self) -> None:
        options = (
            f"-c listen_addresses={self.host} -p {self.port} -k {self.directory} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
            "-c max_connections=200"
        )
        result = self._run(
            "pg_ctl", "-D", str(self.directory / "data"), "-l", str(self.directory / "log"),
            "-o", options, "-w", "-t", "60", "start", check=False,
        )  # fmt: skip
        if result.returncode != 0:
            log = (self.directory / "log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"PostgreSQL did not start: {result.stderr}\n{log}")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.directory / "data"), "-m", mode, "stop", check=False)

    def create_database(self, name: str) -> str:
        self._run("createdb", "-h", self.host, "-p", str(self.port), "-U", "basalt", name)
        return f"postgresql+psycopg://basalt@{self.host}:{self.port}/{name}"


def start_postgres(host: str = "127.0.0.1") -> PostgresServer:
    bindir = _bindir()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (make install installs it as root)")
    user = None
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no postgres user to run PostgreSQL as")
        user = "postgres"
    directory = Path(tempfile.mkdtemp(prefix="basalt-pg-"))
    os.chmod(directory, 0o755)
    if user is not None:
        shutil.chown(directory, user, user)
    server = PostgresServer(directory, host, _free_port(host), bindir, user)
    server._run(
        "initdb", "-D", str(directory / "data"), "-U", "basalt", "--auth=trust", "-E", "UTF8",
        "--no-sync",
    )  # fmt: skip
    server.start()
    server._run("createdb", "-h", host, "-p", str(server.port), "-U", "basalt", "basalt")
    return server


def remove_postgres(server: PostgresServer) -> None:
    server.stop("immediate")
    shutil.rmtree(server.directory, ignore_errors=True)
