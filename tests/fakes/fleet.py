"""A real ``basalt-fleet`` process for tests, and ``basaltctl fleet`` run as a user would.

Not a fake: the fleet runs as its own process on one loopback address with its data
directory in the test's temporary directory; the CLI runs as a subprocess with its own
client config.
"""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class FleetProcess:
    data_dir: Path
    host: str
    port: int
    log: Path
    extra: tuple[str, ...] = ()
    process: subprocess.Popen[bytes] | None = None
    client_config: Path = field(init=False)

    def __post_init__(self) -> None:
        self.client_config = self.data_dir.parent / "basaltconfig"

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> None:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable, "-m", "basalt.fleet", "serve",
                    "--data-dir", str(self.data_dir),
                    "--listen", f"{self.host}:{self.port}",
                    *self.extra,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"basalt-fleet exited: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=2, context=context):
                    return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"basalt-fleet did not answer: {self.log.read_text()[-2000:]}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            os.killpg(self.process.pid, sig)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        self.process = None

    def ctl(
        self, *args: str, check: bool = True, timeout: float = 600
    ) -> subprocess.CompletedProcess[str]:
        """``basaltctl ARGS`` with this fleet's client config."""
        env = {**os.environ, "BASALTCONFIG": str(self.client_config)}
        result = subprocess.run(
            [sys.executable, "-m", "basalt.cli.main", *args],
            check=False,
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"basaltctl {' '.join(args)} exited {result.returncode}:\n"
                f"{result.stdout}\n{result.stderr}"
            )
        return result

    def login(self, token_file: Path | None = None) -> None:
        """Log in as the first admin (another replica's token file for a replica that
        did not make the admin)."""
        self.ctl(
            "fleet", "login", self.url,
            "--token-file", str(token_file or self.data_dir / "admin-token"),
            "--ca", str(self.data_dir / "ca.crt"),
        )  # fmt: skip

    def get(self, path: str) -> Any:
        """One REST GET with the logged-in token."""
        from basalt.cli.fleet import request
        from basalt.machinery.client.config import load_client_config

        login = load_client_config(self.client_config).fleet
        assert login is not None
        return request(login.url, login.token, login.ca, "GET", path)

    def machines(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = json.loads(self.ctl("fleet", "machines", "-o", "json").stdout)
        return rows

    def wait_machines(
        self, count: int, timeout: float = 60.0, **wanted: Any
    ) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        rows: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            rows = [m for m in self.machines() if all(m.get(k) == v for k, v in wanted.items())]
            if len(rows) >= count:
                return rows
            time.sleep(0.5)
        raise AssertionError(f"{count} machines with {wanted} expected; got {rows}")
