"""A/B upgrades of container-mode nodes, end to end, on a 3-control-plane + 1-worker cluster.

Bundles are built from this source tree (bundle_from_tree) with other version strings,
signed by a key the cluster trusts (ImageVerificationConfig, added with a config patch).
The tests run in order on one cluster: refusals change nothing; v1 -> v2 comes back on
slot b, healthy; rollback; a deliberately broken build falls back by itself; a control
plane upgrade is refused while etcd quorum is at risk, unless forced.
"""

from __future__ import annotations

import functools
import http.server
import os
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

import basalt
from basalt.machinery.api import common_pb2, machine_pb2
from basalt.machinery.client.client import upload
from basalt.machinery.images import create_bundle, generate_signing_key, load_signing_key
from basalt.provision.bundle_from_tree import bundle_from_tree
from tests.fakes.cluster import LiveCluster, run, stop_cluster, upgradable_cluster
from tests.fakes.etcd_writer import EtcdWriter
from tests.fakes.releases import broken_tree

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SRC = Path(basalt.__file__).resolve().parent
V1 = basalt.__version__
GATES_TIMEOUT = 15
_SCRIPT = Path(sys.executable).with_name("basaltctl")
BASALTCTL = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "basalt.cli.main"]


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("keys")
    private, public = generate_signing_key()
    (directory / "release.key").write_text(private)
    (directory / "release.pub").write_text(public)
    return directory


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, keys: Path) -> Any:
    live = upgradable_cluster(
        tmp_path_factory.mktemp("upgrade"),
        "upg",
        "127.0.0.81",
        trusted_key=(keys / "release.pub").read_text(),
        key_name="test-release",
        gates_timeout=GATES_TIMEOUT,
        controlplanes=3,
    )
    yield live
    stop_cluster(live)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory, keys: Path) -> Path:
    out = tmp_path_factory.mktemp("bundles")
    key = load_signing_key((keys / "release.key").read_text())
    bundle_from_tree(SRC, out / "v2.tar", "0.2.0", key)
    bundle_from_tree(broken_tree(SRC, out), out / "v3-broken.tar", "0.3.0-broken", key)
    other_private, _ = generate_signing_key()
    bundle_from_tree(SRC, out / "unknown-key.tar", "0.2.0", load_signing_key(other_private))
    bundle_from_tree(SRC, out / "aarch64.tar", "0.2.0", key, arch="aarch64")
    bundle_from_tree(SRC, out / "old.tar", "0.0.1", key)
    _unsigned(out / "v2.tar", out / "unsigned.tar")
    _tampered(out / "v2.tar", out / "tampered.tar")
    _sparse(out / "v2.tar", out / "sparse.tar")
    for name in ("kernel", "initramfs", "rootfs.squashfs"):
        (out / name).write_bytes(name.encode() * 100)
    metal = {n: out / n for n in ("kernel", "initramfs", "rootfs.squashfs")}
    create_bundle(out / "metal.tar", metal, "0.2.0", "default", "x86_64", key)
    (out / "not-a-tar.tar").write_bytes(b"this is not a tar file\n" * 100)
    return out


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def bundle_server(bundles: Path) -> Iterator[str]:
    """The bundles over HTTP on a loopback address of their own: ``http://HOST:PORT``."""
    handler = functools.partial(_QuietHandler, directory=str(bundles))
    server = http.server.ThreadingHTTPServer(("127.0.0.89", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.89:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _unsigned(source: Path, target: Path) -> None:
    with tarfile.open(source) as tar, tarfile.open(target, "w") as out:
        for member in tar.getmembers():
            if member.name != "manifest.sig":
                out.addfile(member, tar.extractfile(member))


def _sparse(source: Path, target: Path) -> None:
    """v2.tar re-encoded with a GNU sparse header over basalt.tar (one data region, all of
    it: tarfile reads the same bytes) and code after the archive's end: the shape of the
    signature bypass through sparse members."""
    with tarfile.open(source) as tar, target.open("wb") as out:
        for member in tar.getmembers():
            data = tar.extractfile(member).read()  # type: ignore[union-attr]
            if member.name == "basalt.tar":
                member.pax_headers = {
                    "GNU.sparse.map": f"0,{len(data)}",
                    "GNU.sparse.size": str(len(data)),
                }
            out.write(member.tobuf(format=tarfile.PAX_FORMAT))
            out.write(data + bytes(-len(data) % tarfile.BLOCKSIZE))
        out.write(b"import os  # not signed\n" * 64)


def _tampered(source: Path, target: Path) -> None:
    data = bytearray(source.read_bytes())
    with tarfile.open(source) as tar:
        payload = tar.getmember("basalt.tar")
    data[payload.offset_data + 4096] ^= 0x01
    target.write_bytes(bytes(data))


# -- helpers -------------------------------------------------------------------------------------


async def _upload(
    cluster: LiveCluster, node: str, bundle: Path | None, **options: Any
) -> machine_pb2.Upgrade:
    """Upload ``bundle``; None: send the options only (with ``url=``, the node fetches)."""
    client = await cluster.client(node)
    data = bundle.read_bytes() if bundle is not None else b""

    async def requests() -> AsyncIterator[machine_pb2.UpgradeRequest]:
        yield machine_pb2.UpgradeRequest(options=machine_pb2.UpgradeOptions(**options))
        for start in range(0, len(data), 256 * 1024):
            yield machine_pb2.UpgradeRequest(data=data[start : start + 256 * 1024])

    try:
        answer = await upload(client.machine.Upgrade, requests(), timeout=60)
        return answer.messages[0]
    finally:
        await client.close()


def upload_refused(cluster: LiveCluster, node: str, bundle: Path | None, **options: Any) -> Any:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        run(_upload(cluster, node, bundle, **options))
    return raised.value


def boot_status(cluster: LiveCluster, node: str) -> dict[str, Any]:
    return run(cluster.resource(node, "BootStatuses", "boot"))


def wait_boot_status(
    cluster: LiveCluster, node: str, ok: Callable[[dict[str, Any]], bool], timeout: float
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    last: dict[str, Any] = {}
    while time.monotonic() < deadline:
        try:
            last = boot_status(cluster, node)
            if ok(last):
                return last
        except Exception:
            pass  # rebooting
        time.sleep(0.5)
    raise AssertionError(f"{node}: boot status not reached in {timeout}s; last: {last}")


def basaltctl(cluster: LiveCluster, *args: str, timeout: float = 180) -> tuple[int, str, str]:
    env = {**os.environ, "BASALTCONFIG": str(Path(cluster.record.state_dir) / "basaltconfig")}
    done = subprocess.run(
        [*BASALTCTL, *args], check=False, capture_output=True, text=True, env=env, timeout=timeout
    )
    return done.returncode, done.stdout, done.stderr


async def _call(cluster: LiveCluster, node: str, rpc: str, request: Any) -> Any:
    client = await cluster.client(node)
    try:
        return (await getattr(client.machine, rpc)(request, timeout=30)).messages[0]
    finally:
        await client.close()


def slots(cluster: LiveCluster, node: str) -> Path:
    return cluster.node_dir(node) / "slots"


def snapshot(cluster: LiveCluster, node: str) -> dict[str, bytes]:
    """Every file under the node's slots directory: what a refusal must leave alone."""
    root = slots(cluster, node)
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


def events(cluster: LiveCluster, node: str) -> list[str]:
    async def go() -> list[str]:
        client = await cluster.client(node)
        try:
            return [
                e.message
                async for e in client.machine.Events(machine_pb2.EventsRequest(), timeout=10)
            ]
        finally:
            await client.close()

    return run(go())


# -- tests ---------------------------------------------------------------------------------------


def test_first_boot_runs_the_installed_basalt_as_slot_a(cluster: LiveCluster) -> None:
    worker = cluster.workers[0]
    status = boot_status(cluster, worker)
    assert (status["slot"], status["version"], status["onTrial"]) == ("a", V1, False)
    assert status["fellBackFrom"] == "" and status["previousSlot"] == ""
    assert (slots(cluster, worker) / "boot.json").is_file()
    assert not (slots(cluster, worker) / "a").exists()  # slot a: the installed package


REFUSALS = [
    ("unsigned.tar", "signature present check failed: there is no manifest.sig"),
    ("unknown-key.tar", "signing key trusted check failed: signed by key"),
    ("tampered.tar", "payload check failed: basalt.tar: tampered"),
    ("aarch64.tar", "architecture check failed: built for aarch64, expected x86_64"),
    ("metal.tar", "payload check failed: basalt.tar: is required here"),
    ("not-a-tar.tar", "format check failed"),
    ("sparse.tar", "format check failed: refused tar header: a sparse member"),
]


@pytest.mark.parametrize(("bundle", "expected"), REFUSALS, ids=[r[0] for r in REFUSALS])
def test_bad_bundles_are_refused_before_anything_is_written(
    cluster: LiveCluster, bundles: Path, bundle: str, expected: str
) -> None:
    worker = cluster.workers[0]
    before = snapshot(cluster, worker)
    error = upload_refused(cluster, worker, bundles / bundle)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert f"uploaded bundle: {expected}" in (error.details() or "")
    assert snapshot(cluster, worker) == before  # no slot written, boot state unchanged
    assert not (slots(cluster, worker) / "b").exists()
    assert not list((cluster.node_dir(worker) / "var" / "upgrade").glob("*"))  # upload gone
    assert boot_status(cluster, worker)["slot"] == "a"


@pytest.mark.parametrize("how", ["upload", "url", "stage"])
def test_an_older_bundle_is_refused_unless_the_admin_allows_it(
    cluster: LiveCluster, bundles: Path, bundle_server: str, how: str
) -> None:
    worker = cluster.workers[0]  # runs V1 (0.1.0) in slot a
    before = snapshot(cluster, worker)
    if how == "url":
        error = upload_refused(cluster, worker, None, url=bundle_server + "/old.tar")
    else:
        error = upload_refused(cluster, worker, bundles / "old.tar", stage=how == "stage")
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error.details()
    details = error.details() or ""
    assert f"bundle 0.0.1 is older than the running version {V1}: downgrade refused" in details
    assert "--allow-downgrade" in details
    assert snapshot(cluster, worker) == before
    assert not list((cluster.node_dir(worker) / "var" / "upgrade").glob("*"))
    assert boot_status(cluster, worker)["version"] == V1


URL_REFUSALS = [
    ("/missing.tar", grpc.StatusCode.UNAVAILABLE, "HTTP 404 File not found"),
    ("/tampered.tar", grpc.StatusCode.INVALID_ARGUMENT, "payload check failed: basalt.tar"),
    ("/unsigned.tar", grpc.StatusCode.INVALID_ARGUMENT, "signature present check failed"),
    ("/sparse.tar", grpc.StatusCode.INVALID_ARGUMENT, "refused tar header: a sparse member"),
]


@pytest.mark.parametrize(
    ("path", "code", "expected"), URL_REFUSALS, ids=["404", "tamp", "unsig", "sparse"]
)
def test_bundles_the_node_fetches_are_checked_like_uploads(
    cluster: LiveCluster, bundle_server: str, path: str, code: grpc.StatusCode, expected: str
) -> None:
    worker = cluster.workers[0]
    before = snapshot(cluster, worker)
    error = upload_refused(cluster, worker, None, url=bundle_server + path)
    assert error.code() == code, error.details()
    assert expected in (error.details() or "")
    assert snapshot(cluster, worker) == before
    assert not list((cluster.node_dir(worker) / "var" / "upgrade").glob("*"))


@pytest.mark.parametrize(
    "url", ["file:///etc/passwd", "ftp://127.0.0.89/v2.tar", "http:///v2.tar", "v2.tar"]
)
def test_only_http_urls_with_a_host_are_fetched(cluster: LiveCluster, url: str) -> None:
    error = upload_refused(cluster, cluster.workers[0], None, url=url)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "is not an http:// or https:// URL with a host" in (error.details() or "")


def test_a_url_upgrade_carries_no_data(
    cluster: LiveCluster, bundles: Path, bundle_server: str
) -> None:
    error = upload_refused(
        cluster, cluster.workers[0], bundles / "v2.tar", url=bundle_server + "/v2.tar"
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "an Upgrade with a URL carries no bundle data" in (error.details() or "")


@pytest.mark.parametrize(
    ("delta_index", "code", "expected"),
    [
        ("0" * 64, grpc.StatusCode.FAILED_PRECONDITION, "keeps no chunk index of its slots"),
        ("not-a-hash", grpc.StatusCode.INVALID_ARGUMENT, "is not the sha256"),
    ],
    ids=["no-index", "malformed"],
)
def test_a_delta_upload_to_a_node_without_an_index_is_refused(
    cluster: LiveCluster, bundles: Path, delta_index: str, code: grpc.StatusCode, expected: str
) -> None:
    """Container slots keep no chunk index: UpgradeIndex answers none (clients upload
    whole), and an Upgrade that says it is a delta is refused before anything is read."""
    worker = cluster.workers[0]

    async def index() -> Any:
        client = await cluster.client(endpoint=worker)
        try:
            return await client.machine.UpgradeIndex(common_pb2.Empty(), timeout=10)
        finally:
            await client.close()

    answer = run(index()).messages[0]
    assert (answer.index, answer.sha256) == (b"", "")
    before = snapshot(cluster, worker)
    error = upload_refused(cluster, worker, bundles / "v2.tar", delta_index=delta_index)
    assert error.code() == code, error.details()
    assert expected in (error.details() or "")
    assert snapshot(cluster, worker) == before
    assert not list((cluster.node_dir(worker) / "var" / "upgrade").glob("*"))


def test_upgrade_v1_to_v2_comes_back_on_slot_b_healthy(cluster: LiveCluster, bundles: Path) -> None:
    worker = cluster.workers[0]
    code, out, err = basaltctl(
        cluster, "upgrade", "-n", worker, "--image", str(bundles / "v2.tar"), "--wait",
        "--timeout", "90",
    )  # fmt: skip
    assert code == 0, err
    assert "Kubernetes not running on this node; skipping cordon/drain" in err
    assert "verified bundle 0.2.0 (x86_64), signed by test-release" in err
    assert f"{worker}: running slot b (0.2.0); health gates passed" in out
    status = boot_status(cluster, worker)
    assert (status["slot"], status["version"], status["onTrial"]) == ("b", "0.2.0", False)
    assert (status["previousSlot"], status["previousVersion"]) == ("a", V1)
    version = run(_call(cluster, worker, "Version", common_pb2.Empty()))
    assert version.tag == "0.2.0"
    health = run(_call(cluster, worker, "Health", common_pb2.Empty()))
    assert health.healthy, [(c.name, c.message) for c in health.checks if not c.ok]
    assert (slots(cluster, worker) / "b" / "python" / "basalt" / "__init__.py").is_file()
    assert any(
        "slot b (0.2.0) passed its health gates: marked good" in m for m in events(cluster, worker)
    )


def test_rollback_boots_the_previous_slot_and_is_refused_without_one(
    cluster: LiveCluster,
) -> None:
    worker = cluster.workers[0]
    code, out, err = basaltctl(cluster, "rollback", "-n", worker)
    assert code == 0, err
    assert "rolling back from slot b (0.2.0) to slot a" in out
    status = wait_boot_status(cluster, worker, lambda s: s["slot"] == "a", 30)
    assert status["version"] == V1 and not status["onTrial"]
    assert "rolled back from slot b (0.2.0)" in status["reason"]
    run(cluster.wait_ready(worker))

    cp = cluster.controlplanes[0]  # never upgraded: its slot b is empty
    code, _, err = basaltctl(cluster, "rollback", "-n", cp)
    assert code == 1
    assert "FAILED_PRECONDITION" in err and "rollback refused: slot b holds no image" in err
    assert boot_status(cluster, cp)["slot"] == "a"


def test_broken_upgrade_falls_back_to_the_good_slot_by_itself(
    cluster: LiveCluster, bundles: Path
) -> None:
    worker = cluster.workers[0]
    answer = run(_upload(cluster, worker, bundles / "v3-broken.tar"))
    assert (answer.slot, answer.version) == ("b", "0.3.0-broken")
    status = wait_boot_status(
        cluster, worker, lambda s: s["fellBackFrom"] == "b", 3 * (GATES_TIMEOUT + 15)
    )
    assert (status["slot"], status["version"], status["onTrial"]) == ("a", V1, False)
    assert "waiting for broken: deliberately broken build" in status["reason"]
    assert "its 3 boot tries ran out" in status["reason"]
    console = (cluster.node_dir(worker) / "console.log").read_text()
    assert console.count("booting slot b (0.3.0-broken) on trial: try") == 3
    run(cluster.wait_ready(worker))
    assert any(
        m.startswith("fell back from slot b (0.3.0-broken) because health gates did not pass")
        for m in events(cluster, worker)
    )
    version = run(_call(cluster, worker, "Version", common_pb2.Empty()))
    assert version.tag == V1


def test_staged_upgrade_installs_early_in_the_next_boot(
    cluster: LiveCluster, bundles: Path
) -> None:
    worker = cluster.workers[0]  # runs slot a (v1); slot b holds the failed build
    answer = run(_upload(cluster, worker, bundles / "v2.tar", stage=True))
    assert answer.slot == "" and answer.version == "0.2.0"
    assert "staged 0.2.0: it is installed early in the next boot" in answer.message
    status = wait_boot_status(
        cluster, worker, lambda s: s["slot"] == "b" and not s["onTrial"], GATES_TIMEOUT + 60
    )
    assert status["version"] == "0.2.0" and status["fellBackFrom"] == ""
    assert not (slots(cluster, worker) / "staged").exists()
    run(cluster.wait_ready(worker))


def test_controlplane_upgrade_refused_while_quorum_is_at_risk_unless_forced(
    cluster: LiveCluster, bundles: Path
) -> None:
    _, cp2, cp3 = cluster.controlplanes
    stop = machine_pb2.ServiceActionRequest(id="etcd", action=machine_pb2.STOP)
    run(_call(cluster, cp2, "ServiceAction", stop))
    try:
        time.sleep(1.0)
        before = snapshot(cluster, cp3)
        error = upload_refused(cluster, cp3, bundles / "v2.tar")
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error.details()
        details = error.details() or ""
        assert "would cost etcd quorum" in details
        assert "unhealthy: upg-controlplane-2: unreachable" in details
        assert snapshot(cluster, cp3) == before
        assert not (slots(cluster, cp3) / "b").exists()

        answer = run(_upload(cluster, cp3, bundles / "v2.tar", force=True))
        assert answer.slot == "b"
        assert "etcd quorum pre-check skipped (--force)" in answer.steps
    finally:
        start = machine_pb2.ServiceActionRequest(id="etcd", action=machine_pb2.START)
        run(_call(cluster, cp2, "ServiceAction", start))
    status = wait_boot_status(
        cluster, cp3, lambda s: s["slot"] == "b" and not s["onTrial"], GATES_TIMEOUT + 60
    )
    assert status["version"] == "0.2.0"
    run(cluster.wait_ready(cp3, timeout=60))


def test_rolling_upgrade_of_the_control_planes_keeps_etcd_writable(
    cluster: LiveCluster, bundle_server: str
) -> None:
    """``--rolling`` over three control planes, the bundle fetched by each node, while a
    client writes to etcd all along: one node at a time, each good before the next."""
    cps = cluster.controlplanes
    for cp in cps:
        run(cluster.wait_ready(cp, timeout=90))
    etcd_ca = cluster.secrets["certs"]["etcd"]
    writer = EtcdWriter(etcd_ca["crt"], etcd_ca["key"], cluster.controlplanes)
    writer.start()
    try:
        code, out, err = basaltctl(
            cluster, "upgrade", "-n", ",".join(cps), "--rolling",
            "--image", bundle_server + "/v2.tar", "--timeout", "120",
            timeout=900,
        )  # fmt: skip
    finally:
        writer.stopping.set()
        writer.join(timeout=30)
    print(
        f"rolling upgrade of {len(cps)} control planes: {len(writer.succeeded)} writes, "
        f"{writer.failed} failed, longest gap {writer.longest_gap():.2f} s"
    )
    assert code == 0, err
    for cp in cps:
        assert f"{cp}: running slot" in out and "(0.2.0); health gates passed" in out
        assert f"{cp}: fetching {bundle_server}/v2.tar" in err
    assert "rolling upgrade: 3/3 nodes done" in err
    assert err.index(f"{cps[0]}: fetching") < err.index(f"{cps[1]}: fetching")
    assert writer.failed == 0, f"{writer.failed} writes found no etcd member"
    assert writer.longest_gap() < 10.0
    for cp in cps:
        assert boot_status(cluster, cp)["version"] == "0.2.0"


def test_rolling_upgrade_stops_at_the_first_failure(
    cluster: LiveCluster, bundle_server: str
) -> None:
    worker, cp = cluster.workers[0], cluster.controlplanes[0]
    before = boot_status(cluster, cp)
    code, _, err = basaltctl(
        cluster, "upgrade", "-n", f"{worker},{cp}", "--rolling",
        "--image", bundle_server + "/unsigned.tar",
    )  # fmt: skip
    assert code == 1
    assert "signature present check failed" in err
    assert f"rolling upgrade stopped at {worker}; not upgraded: {cp}" in err
    assert boot_status(cluster, cp) == before


def test_an_admin_may_downgrade_explicitly(cluster: LiveCluster, bundles: Path) -> None:
    worker = cluster.workers[0]
    running = boot_status(cluster, worker)["version"]
    assert running != "0.0.1"
    code, out, err = basaltctl(
        cluster, "upgrade", "-n", worker, "--image", str(bundles / "old.tar"),
        "--allow-downgrade", "--wait", "--timeout", "90",
    )  # fmt: skip
    assert code == 0, err
    assert f"downgrading from {running} to 0.0.1 (allowed by --allow-downgrade)" in err
    assert f"{worker}: running slot" in out and "(0.0.1); health gates passed" in out
    assert boot_status(cluster, worker)["version"] == "0.0.1"
