"""basaltctl's node verbs against a real cluster: real processes, real mTLS, real exit codes.

One control plane and one worker from ``basaltctl cluster create``; every command runs
the installed ``basaltctl`` in a subprocess and targets both nodes through the control
plane (``-n CP,WORKER``) unless the verb takes one node.
"""

from __future__ import annotations

import io
import os
import shlex
import stat
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.integration

NAME = "cliverbs"
BASE_ADDRESS = "127.0.0.71"
_SCRIPT = Path(sys.executable).with_name("basaltctl")
BASALTCTL = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "basalt.cli.main"]


@dataclass
class Cluster:
    root: Path
    config: Path
    cp: str
    worker: str
    node_dirs: dict[str, Path]

    @property
    def both(self) -> str:
        return f"{self.cp},{self.worker}"

    def ctl(
        self, *args: str, config: Path | None = None, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[bytes]:
        environment = {**os.environ, "BASALTCONFIG": str(config or self.config), **(env or {})}
        return subprocess.run(
            [*BASALTCTL, *args], env=environment, capture_output=True, timeout=60, check=False
        )

    def ok(self, *args: str, **kwargs: Any) -> str:
        """Run basaltctl, require exit 0, return stdout as text."""
        result = self.ctl(*args, **kwargs)
        assert result.returncode == 0, (args, result.stdout.decode(), result.stderr.decode())
        return result.stdout.decode()

    def configs(self) -> dict[str, list[dict[str, Any]]]:
        """Each node's running config documents, via ``get machineconfig v1alpha1 -o yaml``."""
        out = self.ok("get", "machineconfig", "v1alpha1", "-o", "yaml", "-n", self.both)
        records = [r for r in yaml.safe_load_all(out) if r]
        return {r["node"]: list(yaml.safe_load_all(r["spec"]["yaml"])) for r in records}


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("cli-verbs")
    state = root / "state"
    config = root / "basaltconfig"

    def destroy() -> None:
        subprocess.run(
            [*BASALTCTL, "cluster", "destroy", "--name", NAME, "--state-dir", str(state)],
            env={**os.environ, "BASALTCONFIG": str(config)},
            capture_output=True,
            timeout=60,
            check=False,
        )

    request.addfinalizer(destroy)  # before creating: a half-created cluster is torn down too
    created = subprocess.run(
        [
            *BASALTCTL,
            "--basaltconfig",
            str(config),
            "cluster",
            "create",
            "--name",
            NAME,
            "--controlplanes",
            "1",
            "--workers",
            "1",
            "--state-dir",
            str(state),
            "--base-address",
            BASE_ADDRESS,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert created.returncode == 0, created.stderr
    nodes = [line.split("\t") for line in created.stdout.splitlines() if line.count("\t") == 2]
    by_type = {kind: address for _, kind, address in nodes}
    yield Cluster(
        root=root,
        config=config,
        cp=by_type["controlplane"],
        worker=by_type["worker"],
        node_dirs={address: state / name for name, _, address in nodes},
    )


def _lines(out: str, node: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith(node + " ")]


# -- diagnostics ----------------------------------------------------------------------


def _bytes(value: str, unit: str) -> float:
    return float(value) * 1024.0 ** ["B", "KiB", "MiB", "GiB", "TiB"].index(unit)


def test_ps_lists_each_nodes_python_agent_largest_first(cluster: Cluster) -> None:
    out = cluster.ok("ps", "-n", cluster.both)
    header, *rows = out.splitlines()
    assert header.split()[:4] == ["NODE", "PID", "STATE", "THREADS"]
    assert "RESMEM" in header and "COMMAND" in header
    for node in (cluster.cp, cluster.worker):
        mine = _lines(out, node)
        assert any("python" in line and "basalt.machined" in line for line in mine), out
    # NODE PID STATE THREADS CPU-TIME VIRT UNIT RES UNIT COMMAND...
    resident = [_bytes(*row.split()[7:9]) for row in rows]
    assert resident == sorted(resident, reverse=True)
    assert resident[0] > 1024 * 1024  # a Python agent holds megabytes, printed as MiB


def test_memory_in_mib_with_agent_rss(cluster: Cluster) -> None:
    out = cluster.ok("memory", "-n", cluster.both)
    header = out.splitlines()[0].split()
    assert header == [
        "NODE",
        "TOTAL",
        "USED",
        "FREE",
        "SHARED",
        "BUFFERS",
        "CACHE",
        "AVAILABLE",
        "AGENT-RSS",
    ]
    for node in (cluster.cp, cluster.worker):
        (line,) = _lines(out, node)
        row = dict(zip(header[1:], map(int, line.split()[1:]), strict=True))
        assert row["TOTAL"] > 100  # MiB
        assert row["USED"] + row["AVAILABLE"] == pytest.approx(row["TOTAL"], abs=2)
        assert 5 <= row["AGENT-RSS"] < row["TOTAL"]


def test_mounts_show_root_filesystem(cluster: Cluster) -> None:
    out = cluster.ok("mounts", "-n", cluster.both)
    assert out.splitlines()[0].split() == [
        "NODE",
        "FILESYSTEM",
        "SIZE(GB)",
        "USED(GB)",
        "USED%",
        "MOUNTED",
        "ON",
    ]
    for node in (cluster.cp, cluster.worker):
        roots = [line.split() for line in _lines(out, node) if line.split()[-1] == "/"]
        assert roots, out
        size, used, percent = roots[0][2:5]
        assert float(size) > 0 and float(used) <= float(size) and percent.endswith("%")


def test_netstat_shows_each_api_listener_and_owner(cluster: Cluster) -> None:
    out = cluster.ok("netstat", "-n", cluster.both)
    assert out.splitlines()[0].split() == [
        "NODE",
        "PROTO",
        "LOCAL",
        "REMOTE",
        "STATE",
        "PID/PROGRAM",
    ]
    for node in (cluster.cp, cluster.worker):
        listeners = [
            line.split()
            for line in _lines(out, node)
            if f" {node}:50000 " in line and " LISTEN " in line
        ]
        assert listeners, out
        pid, _, program = listeners[0][-1].partition("/")
        assert pid.isdigit() and program.startswith("python")


def test_dmesg_reads_kernel_log_or_says_why_not(cluster: Cluster) -> None:
    result = cluster.ctl("dmesg", "-n", cluster.both)
    err = result.stderr.decode()
    if result.returncode == 0:
        out = result.stdout.decode()
        for node in (cluster.cp, cluster.worker):
            assert any(line.startswith(f"{node}: [") for line in out.splitlines()), out
    else:  # no /dev/kmsg access here: each node must say so, as UNAVAILABLE
        assert result.returncode == 1
        for node in (cluster.cp, cluster.worker):
            assert f"{node}: UNAVAILABLE: kernel log is not readable" in err, err
    # --tail skips what is buffered; without --follow nothing is left to print
    tail = cluster.ctl("dmesg", "--tail", "-n", cluster.cp)
    assert tail.returncode == result.returncode and tail.stdout == b""


def test_events_show_the_boot_sequence_and_filter(cluster: Cluster) -> None:
    out = cluster.ok("events", "-n", cluster.both)
    assert out.splitlines()[0].split() == ["NODE", "ID", "TIME", "TYPE", "ACTOR", "MESSAGE"]
    for node in (cluster.cp, cluster.worker):
        mine = "\n".join(_lines(out, node))
        for step in ("boot: started", "phase=services", "stage running", "boot: finished"):
            assert step in mine, (node, step, mine)

    tail = cluster.ok("events", "--tail", "2", "-n", cluster.both)
    assert len(_lines(tail, cluster.cp)) == 2 and len(_lines(tail, cluster.worker)) == 2

    recent = cluster.ok("events", "--since", "1h", "-n", cluster.cp)
    assert "boot: started" in recent
    assert _lines(cluster.ok("events", "--since", "0h", "-n", cluster.cp), cluster.cp) == []

    first = _lines(out, cluster.cp)[0].split()[1]
    after = _lines(cluster.ok("events", "--since", first, "-n", cluster.cp), cluster.cp)
    ids = [line.split()[1] for line in after]
    assert ids and first not in ids and all(i > first for i in ids)

    bad = cluster.ctl("events", "--since", "yesterday")
    assert bad.returncode == 1 and b"neither a duration nor an event id" in bad.stderr


# -- files ------------------------------------------------------------------------------


def _place(cluster: Cluster, node: str, relative: str, data: bytes) -> Path:
    path = cluster.node_dirs[node] / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_ls_shows_system_state_to_admin(cluster: Cluster) -> None:
    out = cluster.ok("ls", "/system", "-n", cluster.both)
    for node in (cluster.cp, cluster.worker):
        assert [line.split()[1] for line in _lines(out, node)] == [".", "secrets", "state"]

    _place(cluster, cluster.worker, "var/lsdemo/deep/file.txt", b"12345")
    deep = cluster.ok("ls", "/var/lsdemo", "-r", "-l", "-n", cluster.worker)
    rows = {line.split()[-1]: line.split() for line in _lines(deep, cluster.worker)}
    assert rows["deep/file.txt"][1:3] == ["-rw-r--r--", "5"]
    assert rows["deep"][1].startswith("d")

    shallow = cluster.ok("ls", "/var/lsdemo", "--depth", "1", "-n", cluster.worker)
    assert "deep/file.txt" not in shallow and "deep" in shallow

    missing = cluster.ctl("ls", "/no/such/dir", "-n", cluster.both)
    assert missing.returncode == 1
    assert f"{cluster.worker}: NOT_FOUND".encode() in missing.stderr


def test_read_returns_exact_bytes_from_one_node(cluster: Cluster) -> None:
    data = bytes(range(256)) * 1000  # binary, NULs included, several 64 KiB chunks
    _place(cluster, cluster.worker, "var/readdemo/blob.bin", data)
    result = cluster.ctl("read", "/var/readdemo/blob.bin", "-n", cluster.worker)
    assert result.returncode == 0, result.stderr
    assert result.stdout == data

    both = cluster.ctl("read", "/var/readdemo/blob.bin", "-n", cluster.both)
    assert both.returncode == 1 and both.stdout == b""
    assert b"one node at a time" in both.stderr

    directory = cluster.ctl("read", "/var/readdemo", "-n", cluster.worker)
    assert directory.returncode == 1 and b"is a directory" in directory.stderr


def test_copy_round_trips_a_directory(cluster: Cluster, tmp_path: Path) -> None:
    files = {"tree/a.txt": b"alpha\n", "tree/sub/b.bin": bytes(range(256)) * 300}
    for relative, data in files.items():
        _place(cluster, cluster.worker, f"var/{relative}", data)
    (cluster.node_dirs[cluster.worker] / "var/tree/sub/to-a").symlink_to("../a.txt")

    out = tmp_path / "copied"
    result = cluster.ctl("copy", "/var/tree", str(out), "-n", cluster.worker)
    assert result.returncode == 0, result.stderr
    for relative, data in files.items():
        assert (out / relative).read_bytes() == data
    link = out / "tree/sub/to-a"
    assert link.is_symlink() and os.readlink(link) == "../a.txt"
    assert link.read_bytes() == b"alpha\n"

    raw = cluster.ctl("copy", "/var/tree", "-", "-n", cluster.worker)
    assert raw.returncode == 0
    with tarfile.open(fileobj=io.BytesIO(raw.stdout)) as tar:
        names = set(tar.getnames())
    assert {"tree", "tree/a.txt", "tree/sub", "tree/sub/b.bin", "tree/sub/to-a"} <= names

    both = cluster.ctl("copy", "/var/tree", str(tmp_path / "x"), "-n", cluster.both)
    assert both.returncode == 1 and b"one node at a time" in both.stderr
    assert not (tmp_path / "x").exists()


def _tar(*members: tuple[str, str, str]) -> io.BytesIO:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, kind, target in members:
            info = tarfile.TarInfo(name)
            if kind == "file":
                info.size = len(target)
                tar.addfile(info, io.BytesIO(target.encode()))
            else:
                info.type = tarfile.SYMTYPE if kind == "sym" else tarfile.LNKTYPE
                info.linkname = target
                tar.addfile(info)
    buffer.seek(0)
    return buffer


def test_copy_refuses_archives_that_escape(tmp_path: Path) -> None:
    from basalt.cli.files import extract
    from basalt.machinery.errors import BasaltError

    archive = _tar(
        ("ok/file", "file", "fine"),
        ("/etc/evil", "file", "x"),
        ("ok/../../evil", "file", "x"),
        ("ok/abs", "sym", "/etc/passwd"),
        ("ok/up", "sym", "../../outside"),
        ("ok/hard", "hard", "../outside"),
    )
    with pytest.raises(BasaltError) as caught:
        extract(archive, tmp_path / "dest")
    message = caught.value.render()
    for name in ("/etc/evil", "ok/../../evil", "ok/abs", "ok/up", "ok/hard"):
        assert name in message
    assert "ok/file" not in message
    assert not (tmp_path / "dest").exists()

    extract(_tar(("ok/file", "file", "fine"), ("ok/in", "sym", "file")), tmp_path / "dest")
    assert (tmp_path / "dest/ok/in").read_text() == "fine"


# -- client configs -------------------------------------------------------------------


def test_config_new_reader_can_read_but_not_reboot(cluster: Cluster) -> None:
    reader = cluster.root / "reader-config"
    cluster.ok("config", "new", str(reader), "--roles", "os:reader", "--crt-ttl", "1h")
    assert stat.S_IMODE(reader.stat().st_mode) == 0o600
    assert "os:reader" in cluster.ok("config", "info", config=reader)

    services = cluster.ok("services", "-n", cluster.both, config=reader)
    assert _lines(services, cluster.cp) and _lines(services, cluster.worker)
    assert "apid" in services

    refused = cluster.ctl("reboot", "-n", cluster.both, config=reader)
    assert refused.returncode == 1
    assert b"PERMISSION_DENIED" in refused.stderr and b"os:reader" in refused.stderr

    again = cluster.ctl("config", "new", str(reader), "--roles", "os:reader")
    assert again.returncode == 1 and b"--force" in again.stderr
    unknown = cluster.ctl("config", "new", str(cluster.root / "x"), "--roles", "os:root")
    assert unknown.returncode == 1 and b"os:reader" in unknown.stderr  # lists the choices


# -- machine config on running nodes --------------------------------------------------

SYSCTL_PATCH = """\
apiVersion: basalt.dev/v1alpha1
kind: SysctlConfig
sysctls:
  net.ipv4.ip_forward: "1"
"""


def _sysctls(documents: list[dict[str, Any]]) -> dict[str, str]:
    found = [d for d in documents if d.get("kind") == "SysctlConfig"]
    return found[0]["sysctls"] if found else {}


def _dns_domain(documents: list[dict[str, Any]]) -> str:
    (cluster_config,) = [d for d in documents if d.get("kind") == "ClusterConfig"]
    domain: str = cluster_config["network"]["dnsDomain"]
    return domain


def test_patch_machineconfig_dry_run_then_no_reboot(cluster: Cluster) -> None:
    patch = cluster.root / "sysctl.yaml"
    patch.write_text(SYSCTL_PATCH)
    before = cluster.configs()

    dry = cluster.ok(
        "patch", "machineconfig", "--patch", f"@{patch}", "--dry-run", "-n", cluster.both
    )
    for node in (cluster.cp, cluster.worker):
        assert f"{node}: mode no-reboot: dry run, nothing changed" in dry
    assert dry.count("--- a/SysctlConfig\n+++ b/SysctlConfig\n") == 2
    assert "+  net.ipv4.ip_forward: '1'" in dry
    assert cluster.configs() == before

    applied = cluster.ok(
        "patch", "machineconfig", "--patch", f"@{patch}", "--mode", "no-reboot", "-n", cluster.both
    )
    for node in (cluster.cp, cluster.worker):
        assert f"{node}: mode no-reboot: applied live: SysctlConfig" in applied
    after = cluster.configs()
    for node in (cluster.cp, cluster.worker):
        assert _sysctls(after[node])["net.ipv4.ip_forward"] == "1"
        # each node kept its own config: the worker's stays a worker's
        machine = next(d for d in after[node] if d["kind"] == "MachineConfig")
        assert machine["type"] == ("controlplane" if node == cluster.cp else "worker")


def test_patch_needing_reboot_is_refused_in_no_reboot_mode(cluster: Cluster) -> None:
    before = cluster.configs()
    change = (
        "{apiVersion: basalt.dev/v1alpha1, kind: ClusterConfig, network: {dnsDomain: cluster.test}}"
    )
    result = cluster.ctl(
        "patch", "machineconfig", "-p", change, "--mode", "no-reboot", "-n", cluster.both
    )
    assert result.returncode == 1
    err = result.stderr.decode()
    for node in (cluster.cp, cluster.worker):
        assert f"{node}: FAILED_PRECONDITION" in err
    assert err.count("need a reboot: ClusterConfig.network.dnsDomain") == 2
    after = cluster.configs()
    assert after == before and _dns_domain(after[cluster.worker]) == "cluster.local"

    invalid = cluster.ctl(
        "patch", "machineconfig", "-p", change.replace("cluster.test", "'bad domain!'")
    )
    assert invalid.returncode == 1
    assert b"ClusterConfig.network.dnsDomain" in invalid.stderr
    assert b"<inline patch 1>:1" in invalid.stderr  # points at the patch that caused it


EDITOR_SCRIPT = """\
import os, sys, yaml
path = sys.argv[-1]
key, value = os.environ["EDIT_KEY"], os.environ["EDIT_VALUE"]
documents = [d for d in yaml.safe_load_all(open(path)) if d]
if key.startswith("sysctl:") and not any(d["kind"] == "SysctlConfig" for d in documents):
    documents.append({"apiVersion": "basalt.dev/v1alpha1", "kind": "SysctlConfig", "sysctls": {}})
for document in documents:
    if document["kind"] == "SysctlConfig" and key.startswith("sysctl:"):
        document["sysctls"][key[len("sysctl:"):]] = value
    if document["kind"] == "ClusterConfig" and key == "dnsDomain":
        document["network"]["dnsDomain"] = value
open(path, "w").write(yaml.safe_dump_all(documents))
"""


def test_edit_machineconfig(cluster: Cluster) -> None:
    edits = cluster.root / "edits"
    edits.mkdir(exist_ok=True)
    script = cluster.root / "editor.py"
    script.write_text(EDITOR_SCRIPT)
    editor = {
        "TMPDIR": str(edits),
        "VISUAL": "",  # it would win over EDITOR
        "EDITOR": shlex.join([sys.executable, str(script)]),
    }
    before = cluster.configs()

    unchanged = cluster.ctl(
        "edit", "machineconfig", "-n", cluster.both, env={**editor, "EDITOR": "true"}
    )
    assert unchanged.returncode == 0
    assert unchanged.stderr.decode().count("no changes; nothing applied") == 2
    assert cluster.configs() == before and not list(edits.iterdir())

    swappiness = {**editor, "EDIT_KEY": "sysctl:vm.swappiness", "EDIT_VALUE": "10"}
    changed = cluster.ok(
        "edit", "machineconfig", "--mode", "no-reboot", "-n", cluster.both, env=swappiness
    )
    assert changed.count("mode no-reboot: applied live: SysctlConfig") == 2
    after = cluster.configs()
    for node in (cluster.cp, cluster.worker):
        assert _sysctls(after[node])["vm.swappiness"] == "10"
    assert not list(edits.iterdir())  # applied edits leave no files behind

    bad = {**editor, "EDIT_KEY": "dnsDomain", "EDIT_VALUE": "bad domain!"}
    refused = cluster.ctl("edit", "machineconfig", "-n", cluster.worker, env=bad)
    assert refused.returncode == 1
    err = refused.stderr.decode()
    assert f"{cluster.worker}: INVALID_ARGUMENT" in err
    assert "ClusterConfig.network.dnsDomain" in err
    (kept,) = edits.iterdir()
    assert f"your edits are kept in {kept}" in err and "bad domain!" in kept.read_text()
    assert cluster.configs() == after
