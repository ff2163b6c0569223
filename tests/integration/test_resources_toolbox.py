"""The toolbox's resource types, ``get -o wide|jsonpath=`` and ``inspect dependencies`` on
a real process node (127.0.0.214, one control plane with a SysctlConfig), read by the
installed ``basaltctl`` with an ``os:reader`` certificate.

Process nodes share the host's network namespace: their links, addresses and routes are
the host's, so the test asks only for what every Linux host has (lo, 127.0.0.1/8).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from basalt.machinery.client.config import ClientConfig, issue_client_context, save_client_config
from basalt.machinery.config import parse_patch
from basalt.machinery.roles import Role
from tests.fakes.cluster import start_cluster, stop_cluster

pytestmark = pytest.mark.integration

ADDRESS = "127.0.0.214"
_SCRIPT = Path(sys.executable).with_name("basaltctl")
BASALTCTL = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "basalt.cli.main"]
SYSCTL_PATCH = """\
apiVersion: basalt.dev/v1alpha1
kind: SysctlConfig
sysctls:
  net.ipv4.ip_forward: "1"
"""


@dataclass
class Reader:
    config: Path

    def ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*BASALTCTL, *args],
            env={**os.environ, "BASALTCONFIG": str(self.config)},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def ok(self, *args: str) -> str:
        result = self.ctl(*args)
        assert result.returncode == 0, (args, result.stdout, result.stderr)
        return result.stdout

    def records(self, type_: str, *args: str) -> list[dict[str, Any]]:
        out = self.ok("get", type_, *args, "-o", "json", "-n", ADDRESS)
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def eventually(self, type_: str, timeout: float = 30.0) -> dict[str, dict[str, Any]]:
        """The resources of ``type_`` by id, once there are some."""
        deadline = time.monotonic() + timeout
        while True:
            records = self.records(type_)
            if records or time.monotonic() > deadline:
                return {r["metadata"]["id"]: r for r in records}
            time.sleep(0.5)


@pytest.fixture(scope="module")
def reader(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Reader]:
    tmp = tmp_path_factory.mktemp("toolbox-resources")
    live = start_cluster(
        tmp,
        "toolres",
        ADDRESS,
        workers=0,
        patches=(parse_patch(SYSCTL_PATCH, "sysctl"),),
    )
    try:
        context = issue_client_context(live.os_ca, endpoints=[ADDRESS], roles=[Role.READER])
        config = tmp / "reader-config"
        save_client_config(ClientConfig(context="reader", contexts={"reader": context}), config)
        yield Reader(config)
    finally:
        stop_cluster(live)


def test_links_addresses_and_routes_show_the_loopback(reader: Reader) -> None:
    links = reader.eventually("links")
    lo = links["lo"]["spec"]
    assert lo["type"] == "loopback" and "LOOPBACK" in lo["flags"] and lo["index"] >= 1
    assert links["lo"]["metadata"]["namespace"] == "network"

    addresses = reader.eventually("addresses")
    mine = addresses["lo/127.0.0.1/8"]["spec"]
    assert mine == {**mine, "link": "lo", "address": "127.0.0.1/8", "family": "inet"}
    assert mine["scope"] == "host"

    routes = reader.eventually("routes").values()
    loopback = [r["spec"] for r in routes if r["spec"]["destination"] == "127.0.0.0/8"]
    assert loopback and loopback[0]["link"] == "lo" and loopback[0]["table"] == "local"

    table = reader.ok("get", "addresses", "-n", ADDRESS)
    assert re.search(r"lo/127\.0\.0\.1/8 .* lo +127\.0\.0\.1/8 +inet", table), table


def test_disks_and_volumes_answer_with_sane_values(reader: Reader) -> None:
    disks = reader.eventually("blockdevices")
    for name, record in disks.items():
        spec = record["spec"]
        assert spec["device"] == f"/dev/{name}" and spec["size"] > 0
        for part in spec["partitions"]:
            assert part["start"] >= 0 and 0 < part["size"] <= spec["size"]

    volumes = reader.eventually("volumes")
    assert set(volumes) == {"STATE", "EPHEMERAL"}
    state = volumes["STATE"]["spec"]
    assert state["path"].endswith("/system/state") and state["mounted"]
    assert state["size"] > 0 and 0 < state["used"] <= state["size"] and state["free"] > 0
    assert state["contents"] > 0  # the committed config is there
    assert volumes["EPHEMERAL"]["spec"]["path"].endswith("/var")


def test_kernel_params_show_the_sysctl_the_config_sets(reader: Reader) -> None:
    params = reader.eventually("kernelparams")
    forward = params["net.ipv4.ip_forward"]["spec"]
    expected = Path("/proc/sys/net/ipv4/ip_forward").read_text().strip()
    assert forward == {
        "value": expected,
        "wanted": "1",
        "source": "config",
        "applied": False,  # a process node does not own the host's kernel
        "error": "",
    }
    assert params["net.ipv4.conf.all.promote_secondaries"]["spec"]["source"] == "default"


def test_jsonpath_and_wide_output(reader: Reader) -> None:
    reader.eventually("addresses")
    one = reader.ok(
        "get", "addresses", "lo/127.0.0.1/8", "-n", ADDRESS, "-o", "jsonpath={.spec.address}"
    )
    assert one == "127.0.0.1/8\n"

    listing = reader.ok(
        "get",
        "links",
        "-n",
        ADDRESS,
        "-o",
        'jsonpath={range .items[*]}{.metadata.id}={.spec.type}{"\\n"}{end}',
    )
    assert "lo=loopback\n" in listing
    ids = reader.ok("get", "links", "-n", ADDRESS, "-o", "jsonpath={.items[*].metadata.id}")
    assert "lo" in ids.split()

    narrow = reader.ok("get", "links", "lo", "-n", ADDRESS)
    wide = reader.ok("get", "links", "lo", "-n", ADDRESS, "-o", "wide")
    assert "MAC" not in narrow.splitlines()[0]
    assert wide.splitlines()[0].split()[-3:] == ["MAC", "KIND", "FLAGS"]
    assert "LOOPBACK" in wide.splitlines()[1]

    bad = reader.ctl("get", "links", "-n", ADDRESS, "-o", "jsonpath={.items[}")
    assert bad.returncode == 1 and "position" in bad.stderr and "Traceback" not in bad.stderr
    unknown = reader.ctl("get", "links", "-n", ADDRESS, "-o", "jsonpathx")
    assert unknown.returncode == 1 and "wide" in unknown.stderr


def _dot_edges(dot: str) -> set[tuple[str, str, str]]:
    """(source, target, style) of each edge in the dot text."""
    pattern = re.compile(r'^\s*"([^"]+)" -> "([^"]+)" \[style="(\w+)"', re.MULTILINE)
    return {(m.group(1), m.group(2), m.group(3)) for m in pattern.finditer(dot)}


def test_inspect_dependencies_prints_the_controller_graph(reader: Reader) -> None:
    reader.eventually("links")
    dot = reader.ok("inspect", "dependencies", "-n", ADDRESS, "--with-resources")
    assert dot.startswith("digraph ") and dot.rstrip().endswith("}")
    edges = _dot_edges(dot)
    assert ("resource:MachineConfigs", "controller:hostname", "dashed") in edges
    assert ("controller:hostname", "resource:Hostnames", "solid") in edges
    assert ("controller:network-status", "resource:Links", "solid") in edges
    assert ("resource:MachineConfigs", "controller:kernel-params", "dashed") in edges
    # Written outside the controller engine, found in the store by owner.
    assert any(s == "dotted" and t == "resource:MachineStatuses" for _, t, s in edges), dot
    assert "undeclared" not in dot  # every controller writes only what it declares
    assert re.search(r'label="Links\\n\d+"', dot), dot

    if shutil.which("dot"):
        svg = subprocess.run(
            ["dot", "-Tsvg"], input=dot, capture_output=True, text=True, timeout=60, check=False
        )
        assert svg.returncode == 0, svg.stderr
        assert "<svg" in svg.stdout and "hostname" in svg.stdout
