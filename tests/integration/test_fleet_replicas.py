"""Two fleet replicas on one real PostgreSQL serve one fleet.

Replica a (127.0.0.141) starts first and leads; replica b (127.0.0.142) shares the
database and the secrets key. A machine links to a; a call to it through b is forwarded
to a. Killing a (SIGKILL) hands the controllers to b within 15 s.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from basalt.provision.process import create_machines, destroy
from tests.fakes.fleet import FleetProcess
from tests.fakes.postgres import remove_postgres, start_postgres

pytestmark = [pytest.mark.integration, pytest.mark.slow]

HANDOVER_TARGET = 15.0


@pytest.fixture
def replicas(tmp_path: Path) -> Iterator[tuple[FleetProcess, FleetProcess]]:
    server = start_postgres("127.0.0.140")
    key = tmp_path / "secrets.key"
    key.write_bytes(os.urandom(32))
    key.chmod(0o600)
    common = ("--database", server.url, "--secrets-key", str(key))
    a = FleetProcess(
        tmp_path / "a" / "fleet",
        "127.0.0.141",
        18800,
        tmp_path / "a.log",
        (*common, "--replica", "a"),
    )
    b = FleetProcess(
        tmp_path / "b" / "fleet",
        "127.0.0.142",
        18810,
        tmp_path / "b.log",
        (*common, "--replica", "b"),
    )
    for fleet in (a, b):
        fleet.data_dir.parent.mkdir(parents=True)
    try:
        a.start()
        b.start()
        a.login()
        b.login(token_file=a.data_dir / "admin-token")
        yield a, b
    finally:
        a.stop()
        b.stop()
        remove_postgres(server)


def leader(fleet: FleetProcess) -> str:
    rows = fleet.get("/v1/replicas")
    return next((r["name"] for r in rows if r["leader"]), "")


def test_calls_are_forwarded_and_the_leader_hands_over(
    replicas: tuple[FleetProcess, FleetProcess], tmp_path: Path
) -> None:
    a, b = replicas
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and leader(a) != "a":
        time.sleep(0.5)
    assert leader(a) == "a" and leader(b) == ""
    assert {r["name"] for r in b.get("/v1/replicas") if r["alive"]} == {"a", "b"}

    url = a.ctl("fleet", "token", "create", "--uses", "1").stdout.strip()
    record = asyncio.run(
        create_machines("rep", 1, tmp_path / "machines", lambda *_: None,
                        base_address="127.0.0.143", machined_args=("--fleet", url))
    )  # fmt: skip
    try:
        (machine,) = a.wait_machines(1, connected=True)
        # b sees the machine linked (to a) and reaches it through a.
        assert b.wait_machines(1, connected=True)[0]["uuid"] == machine["uuid"]
        assert "maintenance" in b.ctl("fleet", "version", machine["uuid"]).stdout

        assert a.process is not None
        os.killpg(a.process.pid, signal.SIGKILL)
        killed = time.monotonic()
        while time.monotonic() - killed < 60 and leader(b) != "b":
            time.sleep(0.25)
        handover = time.monotonic() - killed
        print(f"leader handed over {handover:.1f}s after the leader was killed")
        assert leader(b) == "b"
        assert handover <= HANDOVER_TARGET
        a.process = None
    finally:
        asyncio.run(destroy(record))
