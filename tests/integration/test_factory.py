"""The image factory for real: ``basalt-factory serve`` builds an image with the imager
and serves it; the same schematic built by ``basaltctl image build`` gives the same bytes.

One real build is shared by the module's tests (a module-scoped fixture). To keep it to
a couple of minutes on 2 cores, the two builds share the expensive stages that do not
depend on the schematic; exactly this is shared:

* the CLI build uses the repository's ``_out/cache`` (as ``make image`` and the VM tests
  do): every stage there is reused, and the CLI builds what the current sources and the
  schematic need (everything on a fresh checkout, which the VM tests then reuse;
  ``sources``, ``rootfs`` and ``squashfs`` when the sources changed since the last
  build; ``extension``, ``custom-extension``, ``boot``, ``disk``);
* the factory's cache gets, hard-linked from the CLI build's cache, only the
  schematic-independent stages of the image: ``fetch-debs``, ``fetch-wheels``,
  ``unpack``, ``sources``, ``rootfs``, ``squashfs``. The factory builds the
  schematic's own stages itself: the ``extension`` (qemu-guest-agent), the
  ``custom-extension`` (the test extension, built from source by ``basaltctl extension
  build``, uploaded to the factory's registry, pinned in the schematic by sha256),
  ``boot`` (the initramfs carries the schematic) and ``disk`` (its boot entry carries the
  extra kernel argument), and signs ``bundle.tar`` with the same key.

Every artefact (vmlinuz, initrd.img, disk.raw.zst, disk.qcow2, bundle.tar) is then
compared by sha256. Talks only to 127.0.0.119.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import basalt
from tests.fixtures.extensions import build_standin, hello_source

pytestmark = [pytest.mark.integration, pytest.mark.slow]

HOST = "127.0.0.119"
VERSION = basalt.__version__
TOOLS = ("mksquashfs", "unsquashfs", "apt-get", "dpkg-deb", "zstd", "qemu-img", "mkfs.fat", "gcc")
#: With an official extension and a custom one (built here from the test extension's
#: source, tests/fixtures/extensions), pinned by its sha256.
SCHEMATIC = """\
customization:
  extraKernelArgs: [console=ttyS1, basalt.test=factory]
  systemExtensions:
    officialExtensions: [qemu-guest-agent]
    customExtensions:
      - path: hello.sqfs
        sha256: {sha256}
"""
ARTEFACTS = ("vmlinuz", "initrd.img", "disk.raw.zst", "disk.qcow2", "bundle.tar")
#: Stages that do not depend on the schematic: the factory's cache starts with them.
SHARED = ("fetch-debs", "fetch-wheels", "unpack", "sources", "rootfs", "squashfs")
REPO = Path(__file__).resolve().parents[2]
_BIN = Path(sys.executable).parent


def _command(script: str, module: str) -> list[str]:
    path = _BIN / script
    return [str(path)] if path.exists() else [sys.executable, "-m", module]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        port: int = probe.getsockname()[1]
        return port


def _request(
    url: str, method: str = "GET", body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, data=body, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, {k.lower(): v for k, v in answer.headers.items()}, answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


@dataclass
class Built:
    base: str
    schematic_id: str
    cli_image: Path
    state: Path
    concurrent: list[int]
    status: dict[str, Any]
    tmp: Path
    environment: dict[str, str]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Built]:
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed: run 'make image-deps' as root")
    from basalt.machinery.images import generate_signing_key

    tmp = tmp_path_factory.mktemp("factory")
    key = tmp / "release.key"
    key.write_text(generate_signing_key()[0])
    environment = {**os.environ, "PYTHONUNBUFFERED": "1"}

    # The CLI path, with the repository's stage cache (what `make image` and the VM tests
    # use: on a fresh checkout this build fills it for them).
    cli_cache = REPO / "_out" / "cache"
    cli_cache.mkdir(parents=True, exist_ok=True)
    # The custom extension: built from source and signed with its own key.
    ext_private, ext_public = generate_signing_key()
    (tmp / "ext.key").write_text(ext_private)
    (tmp / "ext.pub").write_text(ext_public)
    source = hello_source(tmp / "hello-source", build_standin(tmp / "standin"))
    made = subprocess.run(
        [
            *_command("basaltctl", "basalt.cli.main"),
            *("extension", "build", str(source), "-o", str(tmp / "hello.sqfs")),
            *("--signing-key", str(tmp / "ext.key"), "--cache", str(cli_cache)),
        ],
        capture_output=True,
        text=True,
        env=environment,
        timeout=1800,
        check=False,
    )
    assert made.returncode == 0, made.stderr[-4000:]
    schematic = tmp / "schematic.yaml"
    schematic.write_text(SCHEMATIC.format(sha256=made.stdout.split()[-1]))
    cli_image = tmp / "cli-image"
    started = time.monotonic()
    done = subprocess.run(
        [
            *_command("basaltctl", "basalt.cli.main"),
            "image",
            "build",
            "--schematic",
            str(schematic),
            "--signing-key",
            str(key),
            "--extension-key",
            str(tmp / "ext.pub"),
            "--cache",
            str(cli_cache),
            "--out",
            str(cli_image),
        ],
        capture_output=True,
        text=True,
        env=environment,
        timeout=1800,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    print(f"CLI build: {time.monotonic() - started:.1f} s")

    # The factory, with only the schematic-independent stages of that cache.
    state = tmp / "state"
    (state / "cache").mkdir(parents=True)
    stages = json.loads((cli_image / "image.json").read_text())["stages"]
    for directory in cli_cache.iterdir():
        name = directory.name.rsplit("-", 1)[0]
        if name in SHARED and directory.is_dir() and (directory / ".complete").exists():
            subprocess.run(["cp", "-al", str(directory), str(state / "cache")], check=True)
    assert not any(
        p.name.startswith(("boot-", "disk-", "extension-", "custom-extension-"))
        for p in (state / "cache").iterdir()
    )
    port = _free_port()
    log = (tmp / "factory.log").open("wb")
    server = subprocess.Popen(
        [
            *_command("basalt-factory", "basalt.factory"),
            "serve",
            "--listen",
            f"{HOST}:{port}",
            "--state",
            str(state),
            "--signing-key",
            str(key),
            "--extension-key",
            str(tmp / "ext.pub"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=environment,
    )
    base = f"http://{HOST}:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                _request(f"{base}/schematics")
                break
            except OSError:
                assert server.poll() is None, (tmp / "factory.log").read_text()
                assert time.monotonic() < deadline, "the factory did not start"
                time.sleep(0.1)
        status, _, body = _request(f"{base}/extensions", "POST", (tmp / "hello.sqfs").read_bytes())
        assert status == 201, body
        status, _, body = _request(f"{base}/schematics", "POST", schematic.read_bytes())
        assert status == 201, body
        schematic_id = json.loads(body)["id"]
        # Two clients ask for the image at once: one build.
        codes: list[int] = []
        barrier = threading.Barrier(2)

        def fetch(name: str) -> None:
            barrier.wait()
            codes.append(_request(f"{base}/image/{schematic_id}/{VERSION}/{name}")[0])

        threads = [threading.Thread(target=fetch, args=(n,)) for n in ("vmlinuz", "disk.qcow2")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        started = time.monotonic()
        while True:
            report = json.loads(_request(f"{base}/builds/{schematic_id}/{VERSION}")[2])
            if report["state"] in ("done", "failed"):
                break
            assert time.monotonic() - started < 1200, report
            time.sleep(1)
        print(f"factory build: {time.monotonic() - started:.1f} s ({stages['disk'][:16]})")
        yield Built(base, schematic_id, cli_image, state, codes, report, tmp, environment)
    finally:
        server.terminate()
        server.wait(30)
        log.close()


def test_two_requests_at_once_build_once_and_only_the_schematics_own_stages(
    built: Built,
) -> None:
    assert built.concurrent == [202, 202]
    status = built.status
    assert status["state"] == "done", status["error"]
    assert status["builds"] == 1
    assert (status["stagesDone"], status["stagesTotal"]) == (10, 10)
    results = {step["stage"]: step["result"] for step in status["stages"]}
    assert {s: r for s, r in results.items() if r == "built"} == {
        "extension": "built",
        "custom-extension": "built",
        "boot": "built",
        "disk": "built",
    }
    assert all(results[s] == "cached" for s in ("rootfs", "squashfs", "unpack"))


def test_the_factory_and_the_cli_build_the_same_bytes(built: Built) -> None:
    cli = json.loads((built.cli_image / "image.json").read_text())
    factory_dir = built.state / "images" / built.schematic_id / VERSION
    made = json.loads((factory_dir / "image.json").read_text())
    assert made["stages"]["rootfs"] == cli["stages"]["rootfs"], (
        "the sources changed between the two builds (an edit meanwhile?): run again"
    )
    assert made["schematic"]["id"] == cli["schematic"]["id"] == built.schematic_id
    for name in ARTEFACTS:
        status, headers, body = _request(
            f"{built.base}/image/{built.schematic_id}/{VERSION}/{name}"
        )
        assert status == 200, (name, body[:300])
        digest = hashlib.sha256(body).hexdigest()
        assert headers["etag"] == f'"{digest}"' and headers["x-content-sha256"] == digest
        assert digest == _sha256(built.cli_image / name), f"{name} differs from the CLI's"


def test_a_cached_artefact_is_served_fast_with_ranges_and_revalidation(built: Built) -> None:
    url = f"{built.base}/image/{built.schematic_id}/{VERSION}/disk.qcow2"
    size = (built.cli_image / "disk.qcow2").stat().st_size
    figures = []
    for _ in range(5):
        started = time.perf_counter()
        status, headers, body = _request(url, headers={"Range": "bytes=0-65535"})
        figures.append((time.perf_counter() - started) * 1000)
        assert status == 206 and len(body) == 65536
        assert headers["content-range"] == f"bytes 0-65535/{size}"
        server_ms = float(headers["server-timing"].partition("dur=")[2])
        assert server_ms < 50
    assert min(figures) < 50, f"a cached artefact's first 64 KiB took {figures} ms"
    with (built.cli_image / "disk.qcow2").open("rb") as stream:
        stream.seek(size - 100)
        assert _request(url, headers={"Range": "bytes=-100"})[2] == stream.read()
    assert _request(url, headers={"Range": f"bytes={size}-"})[0] == 416
    tag = f'"{_sha256(built.cli_image / "disk.qcow2")}"'
    assert _request(url, headers={"If-None-Match": tag})[0] == 304
    index = _request(f"{built.base}/")[2].decode()
    assert built.schematic_id in index and "built" in index


def test_basaltctl_downloads_the_image_and_checks_every_file(built: Built) -> None:
    schematic = built.tmp / "schematic.yaml"
    out = built.tmp / "downloaded"
    done = subprocess.run(
        [
            *_command("basaltctl", "basalt.cli.main"),
            "image",
            "build",
            "--factory",
            built.base,
            "--schematic",
            str(schematic),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=built.environment,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    for name in ARTEFACTS:
        assert _sha256(out / name) == _sha256(built.cli_image / name), name
        assert str(out / name) in done.stdout
    assert built.schematic_id in done.stderr
    assert "extension hello 1.0.0: on the factory" in done.stderr  # uploaded (it had it)
    # Nothing was built again for it.
    assert (
        json.loads(_request(f"{built.base}/builds/{built.schematic_id}/{VERSION}")[2])["builds"]
        == 1
    )
