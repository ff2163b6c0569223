"""The image factory without the imager: ranges and entity tags (pure, from a table and
hypothesis), schematic errors by field, the queue (one build however many ask), serving
(ranges, 304, 416, Server-Timing), secrets kept out of listings, tokens, extensions.

Builds here are :class:`FakeBuild`: it writes an image's files as the real build does
(a work directory installed by one rename, ``artefacts.json`` last) and can be held
at a gate or made to fail. tests/integration/test_factory.py builds real images.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import given
from hypothesis import strategies as st

import basalt
from basalt.factory.app import make_app
from basalt.factory.builds import BuildKey, BuildQueue, BuildStatus, Progress
from basalt.factory.core import Factory, FactoryOptions
from basalt.factory.ranges import (
    ByteRange,
    Unsatisfiable,
    etag,
    none_match,
    parse_range,
    range_applies,
)
from basalt.factory.redact import redact_arg
from basalt.factory.runner import observe
from basalt.factory.store import ARTEFACTS, ARTEFACTS_FILE, ArtefactFile, Store
from basalt.machinery.errors import BasaltError
from basalt.machinery.images import key_id, load_signing_key
from basalt.machinery.schematic import parse_schematic

VERSION = basalt.__version__
QEMU = "customization:\n  systemExtensions:\n    officialExtensions: [qemu-guest-agent]\n"
TOKEN = "bfj_0123abcd.s3cr3t-join-token-value"
FLEET_ARG = f"basalt.fleet=https://fleet.example:8443/?token={TOKEN}&ca=sha256:{'ab' * 32}"
SECRET = f"customization:\n  extraKernelArgs: ['{FLEET_ARG}', console=ttyS1]\n"

# -- ranges and entity tags ---------------------------------------------------------------------

RANGES: list[tuple[str | None, int, ByteRange | type[Unsatisfiable] | None]] = [
    # header, file size, answer: a range, None (the whole file) or 416
    (None, 100, None),
    ("bytes=0-9", 100, ByteRange(0, 9)),
    ("bytes=90-", 100, ByteRange(90, 99)),
    ("bytes=-10", 100, ByteRange(90, 99)),
    ("bytes=-1000", 100, ByteRange(0, 99)),  # a suffix longer than the file: all of it
    ("bytes=50-1000", 100, ByteRange(50, 99)),  # the end is clipped
    ("BYTES = 5 - 6", 100, ByteRange(5, 6)),
    ("bytes=99-99", 100, ByteRange(99, 99)),
    ("bytes=100-", 100, Unsatisfiable),
    ("bytes=100-200", 100, Unsatisfiable),
    ("bytes=-0", 100, Unsatisfiable),
    ("bytes=0-", 0, Unsatisfiable),
    ("bytes=-5", 0, Unsatisfiable),
    ("bytes=9-5", 100, None),  # invalid: ignored
    ("bytes=0-1,5-6", 100, None),  # several ranges: the whole file
    ("items=0-5", 100, None),
    ("bytes=", 100, None),
    ("bytes=-", 100, None),
    ("bytes=a-b", 100, None),
    ("0-5", 100, None),
]


@pytest.mark.parametrize(("header", "size", "answer"), RANGES)
def test_range_header_table(header: str | None, size: int, answer: Any) -> None:
    if answer is Unsatisfiable:
        with pytest.raises(Unsatisfiable) as refused:
            parse_range(header, size)
        assert refused.value.content_range == f"bytes */{size}"
    else:
        assert parse_range(header, size) == answer


@given(
    size=st.integers(0, 10_000),
    first=st.integers(0, 20_000) | st.none(),
    last=st.integers(0, 20_000) | st.none(),
)
def test_a_served_range_is_always_inside_the_file(
    size: int, first: int | None, last: int | None
) -> None:
    header = f"bytes={'' if first is None else first}-{'' if last is None else last}"
    try:
        served = parse_range(header, size)
    except Unsatisfiable:
        assert size == 0 or (first is not None and first >= size) or (first is None and last == 0)
        return
    if served is not None:
        assert 0 <= served.first <= served.last < size
        assert served.length == served.last - served.first + 1
        assert served.content_range(size) == f"bytes {served.first}-{served.last}/{size}"


def test_entity_tags_are_the_sha256_and_if_none_match_compares_weakly() -> None:
    tag = etag("ab" * 32)
    assert tag == f'"{"ab" * 32}"'
    assert none_match(tag, tag)
    assert none_match(f'"other", W/{tag}', tag)
    assert none_match("*", tag)
    assert not none_match('"other"', tag)
    assert not none_match(None, tag)
    assert range_applies(None, tag) and range_applies(tag, tag)
    assert not range_applies(f"W/{tag}", tag)  # If-Range compares strongly
    assert not range_applies("Wed, 21 Oct 2015 07:28:00 GMT", tag)


def test_the_join_token_of_a_fleet_argument_is_redacted() -> None:
    shown = redact_arg(FLEET_ARG)
    assert TOKEN not in shown and "token=***" in shown and "fleet.example:8443" in shown
    assert redact_arg("basalt.fleet=garbage-with-secret") == "basalt.fleet=***"
    assert redact_arg("console=ttyS1") == "console=ttyS1"


# -- a factory with fake builds -----------------------------------------------------------------


def _content(name: str, schematic_id: str) -> bytes:
    seed = hashlib.sha256(f"{name}/{schematic_id}".encode()).digest()
    return seed * (3000 if name.startswith("disk") else 40)


class FakeBuild:
    """Writes an image as the real build does; held at ``gate``; fails with ``fail``."""

    def __init__(self, state: Path, signing_key_id: str | None = None) -> None:
        self.store = Store(state)
        self.signing_key_id = signing_key_id
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Event()
        self.fail: str | None = None
        self.calls: list[BuildKey] = []

    def __call__(self, key: BuildKey, progress: Progress) -> list[dict[str, Any]]:
        self.calls.append(key)
        progress.total, progress.done, progress.stage = 3, 1, "rootfs"
        self.started.set()
        assert self.gate.wait(10), "the test never opened the gate"
        if self.fail:
            raise BasaltError(self.fail, hint="fix the lock")
        image = self.store.work_dir(key.schematic, key.version) / "image"
        image.mkdir(parents=True)
        described = {}
        for name in ARTEFACTS:
            if name == "bundle.tar" and self.signing_key_id is None:
                continue
            data = _content(name, key.schematic)
            (image / name).write_bytes(data)
            described[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        bundle = {"keyId": self.signing_key_id} if self.signing_key_id else None
        (image / "image.json").write_text(json.dumps({"bundle": bundle}))
        (image / ARTEFACTS_FILE).write_text(json.dumps(described))
        self.store.install(key.schematic, key.version, image)
        progress.done, progress.stage = 3, None
        return [{"stage": "rootfs", "result": "built", "seconds": 0.0}]


@pytest.fixture
def signing_key(tmp_path: Path, keypair: tuple[str, str]) -> Path:
    path = tmp_path / "release.key"
    path.write_text(keypair[0])
    return path


def _factory(tmp_path: Path, signing_key: Path | None = None) -> tuple[Factory, FakeBuild]:
    state = tmp_path / "state"
    kid = key_id(load_signing_key(signing_key.read_bytes())) if signing_key else None
    fake = FakeBuild(state, kid)
    options = FactoryOptions(state=state, lock=tmp_path / "image.lock", signing_key=signing_key)
    return Factory(options, build=fake), fake


@dataclass
class Made:
    factory: Factory
    fake: FakeBuild
    client: TestClient


@pytest.fixture
def made(tmp_path: Path, signing_key: Path) -> Iterator[Made]:
    factory, fake = _factory(tmp_path, signing_key)
    with TestClient(make_app(factory)) as client:
        yield Made(factory, fake, client)
    factory.close()


def _wait_built(client: Any, schematic_id: str, prefix: str = "") -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        status: dict[str, Any] = client.get(f"{prefix}/builds/{schematic_id}/{VERSION}").json()
        if status["state"] in ("done", "failed"):
            return status
        time.sleep(0.02)
    raise AssertionError(f"the build of {schematic_id} did not end: {status}")


def test_posting_a_schematic_answers_its_id_once_stored_and_again_the_same(
    made: Made,
) -> None:
    factory = made.factory
    client = made.client
    first = client.post("/schematics", content=QEMU)
    assert first.status_code == 201, first.text
    schematic_id = first.json()["id"]
    assert schematic_id == parse_schematic(QEMU).id
    assert first.json()["created"] is True
    assert first.json()["artefacts"]["vmlinuz"] == f"/image/{schematic_id}/{VERSION}/vmlinuz"
    # Layout, comments and order do not change the id: the same schematic, 200.
    again = client.post(
        "/schematics",
        content="# the same\ncustomization: {systemExtensions: {officialExtensions: "
        "[qemu-guest-agent]}, extraKernelArgs: []}\n",
    )
    assert again.status_code == 200 and again.json()["id"] == schematic_id
    assert again.json()["created"] is False
    assert [p.name for p in factory.store.schematics.iterdir()] == [f"{schematic_id}.yaml"]
    listed = client.get("/schematics").json()
    assert [s["id"] for s in listed] == [schematic_id]
    assert listed[0]["extensions"] == ["qemu-guest-agent"]


def test_a_schematic_that_does_not_validate_gets_every_problem_by_field_and_nothing_is_stored(
    made: Made,
) -> None:
    factory = made.factory
    client = made.client
    bad = (
        "customization:\n"
        "  extraKernelArgs: ['two words', basalt.slot=b]\n"
        "  systemExtensions:\n"
        "    officialExtensions: [nope]\n"
        "  colour: blue\n"
    )
    answer = client.post("/schematics", content=bad)
    assert answer.status_code == 422, answer.text
    body = answer.json()
    assert "4 errors" in body["detail"]
    problems = {p["path"]: p for p in body["problems"]}
    assert set(problems) == {
        "customization.extraKernelArgs[0]",
        "customization.extraKernelArgs[1]",
        "customization.systemExtensions.officialExtensions[0]",
        "customization.colour",
    }
    assert problems["customization.extraKernelArgs[0]"]["line"] == 2
    assert problems["customization.colour"]["line"] == 5
    assert (
        "qemu-guest-agent"
        in problems["customization.systemExtensions.officialExtensions[0]"]["hint"]
    )
    syntax = client.post("/schematics", content="customization: [unclosed\n")
    assert syntax.status_code == 422
    assert syntax.json()["problems"][0]["line"] is not None
    binary = client.post("/schematics", content=b"\xff\xfe")
    assert binary.status_code == 422 and "UTF-8" in binary.json()["detail"]
    too_big = client.post("/schematics", content="#" * 70_000)
    assert too_big.status_code == 400 and "larger than" in too_big.json()["detail"]
    assert list(factory.store.schematics.iterdir()) == []
    assert client.get("/schematics").json() == []


def test_unknown_schematic_version_and_name_are_404_naming_them(
    made: Made,
) -> None:
    fake = made.fake
    client = made.client
    schematic_id = client.post("/schematics", content=QEMU).json()["id"]
    unknown = "0" * 64
    answer = client.get(f"/image/{unknown}/{VERSION}/vmlinuz")
    assert answer.status_code == 404 and unknown in answer.json()["detail"]
    assert "POST" in answer.json()["hint"]
    answer = client.get(f"/image/{schematic_id}/9.9.9/vmlinuz")
    assert answer.status_code == 404
    assert "'9.9.9'" in answer.json()["detail"] and VERSION in answer.json()["detail"]
    answer = client.get(f"/image/{schematic_id}/{VERSION}/root.sqfs")
    assert answer.status_code == 404 and "disk.raw.zst" in answer.json()["hint"]
    assert client.get(f"/builds/../{VERSION}").status_code == 404
    assert fake.calls == []


def test_bundle_tar_without_a_signing_key_is_refused_naming_the_key(tmp_path: Path) -> None:
    factory, fake = _factory(tmp_path)
    with TestClient(make_app(factory)) as client:
        schematic_id = client.post("/schematics", content=QEMU).json()["id"]
        answer = client.get(f"/image/{schematic_id}/{VERSION}/bundle.tar")
        assert answer.status_code == 409
        assert "no signing key" in answer.json()["detail"]
        assert "--signing-key" in answer.json()["hint"]
        assert fake.calls == []
        assert "bundle.tar" not in client.post("/schematics", content=QEMU).json()["artefacts"]
    factory.close()


def test_two_requests_at_once_build_the_image_once_and_progress_is_visible(
    made: Made,
) -> None:
    fake = made.fake
    client = made.client
    schematic_id = client.post("/schematics", content=QEMU).json()["id"]
    fake.gate.clear()
    barrier = threading.Barrier(2)
    answers: list[Any] = []

    def fetch(name: str) -> None:
        barrier.wait()
        answers.append(client.get(f"/image/{schematic_id}/{VERSION}/{name}"))

    threads = [threading.Thread(target=fetch, args=(n,)) for n in ("vmlinuz", "disk.qcow2")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [a.status_code for a in answers] == [202, 202]
    for answer in answers:
        assert answer.headers["retry-after"] == "2"
        assert answer.headers["location"] == f"/builds/{schematic_id}/{VERSION}"
        assert answer.json()["state"] in ("queued", "building")
    assert fake.started.wait(5)
    building = client.get(f"/builds/{schematic_id}/{VERSION}").json()
    assert building["state"] == "building"
    assert (building["stage"], building["stagesDone"], building["stagesTotal"]) == ("rootfs", 1, 3)
    assert building["builds"] == 1
    # While it builds, another image waits its turn, with its place in the queue.
    other = client.post("/schematics", content="customization: {extraKernelArgs: [quiet]}").json()
    queued = client.get(f"/image/{other['id']}/{VERSION}/vmlinuz")
    assert queued.status_code == 202 and queued.json()["position"] == 1
    fake.gate.set()
    done = _wait_built(client, schematic_id)
    assert done["state"] == "done" and done["builds"] == 1
    assert done["stages"] == [{"stage": "rootfs", "result": "built", "seconds": 0.0}]
    served = client.get(f"/image/{schematic_id}/{VERSION}/vmlinuz")
    assert served.status_code == 200
    assert served.content == _content("vmlinuz", schematic_id)
    _wait_built(client, other["id"])
    assert fake.calls == [BuildKey(schematic_id, VERSION), BuildKey(other["id"], VERSION)]
    # Asking again, and starting a build of a built image, build nothing.
    assert client.post(f"/builds/{schematic_id}/{VERSION}").status_code == 200
    assert len(fake.calls) == 2
    index = client.get("/")
    assert index.status_code == 200 and schematic_id in index.text
    assert f"/image/{schematic_id}/{VERSION}/disk.raw.zst" in index.text


def test_an_artefact_is_served_with_its_sha256_ranges_and_revalidation(
    made: Made,
) -> None:
    client = made.client
    schematic_id = client.post("/schematics", content=QEMU).json()["id"]
    url = f"/image/{schematic_id}/{VERSION}/disk.raw.zst"
    assert client.get(url).status_code == 202
    _wait_built(client, schematic_id)
    data = _content("disk.raw.zst", schematic_id)
    digest = hashlib.sha256(data).hexdigest()
    whole = client.get(url)
    assert whole.status_code == 200 and whole.content == data
    assert whole.headers["etag"] == f'"{digest}"'
    assert whole.headers["x-content-sha256"] == digest
    assert whole.headers["accept-ranges"] == "bytes"
    assert whole.headers["content-length"] == str(len(data))
    assert whole.headers["content-type"] == "application/zstd"
    server_ms = float(whole.headers["server-timing"].partition("dur=")[2])
    assert server_ms < 50, f"a cached artefact took {server_ms} ms of server time"
    part = client.get(url, headers={"Range": "bytes=1000-1999"})
    assert part.status_code == 206 and part.content == data[1000:2000]
    assert part.headers["content-range"] == f"bytes 1000-1999/{len(data)}"
    tail = client.get(url, headers={"Range": "bytes=-10"})
    assert tail.status_code == 206 and tail.content == data[-10:]
    beyond = client.get(url, headers={"Range": f"bytes={len(data)}-"})
    assert beyond.status_code == 416
    assert beyond.headers["content-range"] == f"bytes */{len(data)}"
    same = client.get(url, headers={"If-None-Match": whole.headers["etag"]})
    assert same.status_code == 304 and same.content == b""
    stale = client.get(url, headers={"If-Range": '"other"', "Range": "bytes=0-9"})
    assert stale.status_code == 200 and stale.content == data
    # Larger than one read: streamed in chunks, whole.
    big = client.get(f"/image/{schematic_id}/{VERSION}/disk.qcow2")
    assert big.content == _content("disk.qcow2", schematic_id)
    assert len(big.content) > 64 * 1024


def test_a_failed_build_says_why_until_it_is_started_again(
    made: Made,
) -> None:
    fake = made.fake
    client = made.client
    schematic_id = client.post("/schematics", content=QEMU).json()["id"]
    fake.fail = "apt-get: the mirror is gone"
    assert client.get(f"/image/{schematic_id}/{VERSION}/initrd.img").status_code == 202
    failed = _wait_built(client, schematic_id)
    assert failed["state"] == "failed" and "the mirror is gone" in failed["error"]
    again = client.get(f"/image/{schematic_id}/{VERSION}/initrd.img")
    assert again.status_code == 409 and "the mirror is gone" in again.json()["detail"]
    assert f"POST /builds/{schematic_id}/{VERSION}" in again.json()["hint"]
    assert len(fake.calls) == 1  # a failed build does not restart on every poll
    fake.fail = None
    assert client.post(f"/builds/{schematic_id}/{VERSION}").status_code == 202
    done = _wait_built(client, schematic_id)
    assert done["state"] == "done" and done["builds"] == 2 and done["error"] is None
    assert client.get(f"/image/{schematic_id}/{VERSION}/initrd.img").status_code == 200


def test_a_secret_schematic_shows_no_token_and_its_file_is_private(
    made: Made,
) -> None:
    factory = made.factory
    client = made.client
    posted = client.post("/schematics", content=SECRET)
    assert posted.status_code == 201
    schematic_id = posted.json()["id"]
    for text in (
        client.get("/").text,
        client.get("/schematics").text,
        client.get(f"/schematics/{schematic_id}").text,
    ):
        assert TOKEN not in text
        assert "token=***" in text
    listed = client.get(f"/schematics/{schematic_id}").json()
    assert listed["secret"] is True
    assert listed["extraKernelArgs"][1] == "console=ttyS1"
    stored = factory.store.schematic_file(schematic_id)
    assert stored.stat().st_mode & 0o777 == 0o600
    assert TOKEN in stored.read_text()  # the image needs it: kept, privately


def test_a_token_guards_changes_and_secret_images_but_not_reads(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    factory, _fake = _factory(tmp_path)
    with TestClient(make_app(factory, token="s3cret")) as client:
        refused = client.post("/schematics", content=QEMU)
        assert refused.status_code == 401 and "token" in refused.json()["detail"]
        assert refused.headers["www-authenticate"] == "Bearer"
        wrong = client.post("/schematics", content=QEMU, headers={"Authorization": "Bearer no"})
        assert wrong.status_code == 401
        auth = {"Authorization": "Bearer s3cret"}
        plain = client.post("/schematics", content=QEMU, headers=auth).json()["id"]
        secret = client.post("/schematics", content=SECRET, headers=auth).json()["id"]
        assert client.get("/").status_code == 200
        assert client.get(f"/image/{plain}/{VERSION}/vmlinuz").status_code == 202
        assert client.get(f"/image/{secret}/{VERSION}/vmlinuz").status_code == 401
        assert client.get(f"/image/{secret}/{VERSION}/vmlinuz", headers=auth).status_code == 202
        assert client.post(f"/builds/{plain}/{VERSION}").status_code == 401
    factory.close()
    assert TOKEN not in caplog.text


def test_custom_extensions_are_verified_kept_by_sha256_and_listed(
    tmp_path: Path, keypair: tuple[str, str]
) -> None:
    from basalt.imager.custom import sign_squashfs
    from basalt.machinery.images import generate_signing_key
    from basalt.machinery.schematic import ExtensionManifest

    public = tmp_path / "ext.pub"
    public.write_text(keypair[1])
    state = tmp_path / "state"
    options = FactoryOptions(state=state, lock=tmp_path / "image.lock", extension_keys=(public,))
    factory = Factory(options, build=FakeBuild(state))
    squashfs = tmp_path / "hello.squashfs"
    squashfs.write_bytes(b"hsqs" + bytes(5000))
    signed = tmp_path / "hello.sqfs"
    info = sign_squashfs(
        squashfs, signed, load_signing_key(keypair[0]), ExtensionManifest("hello", "1.0")
    )
    stranger = tmp_path / "stranger.sqfs"
    sign_squashfs(
        squashfs,
        stranger,
        load_signing_key(generate_signing_key()[0]),
        ExtensionManifest("hello", "1.0"),
    )
    with TestClient(make_app(factory)) as client:
        added = client.post("/extensions", content=signed.read_bytes())
        assert added.status_code == 201, added.text
        assert (
            added.json()["sha256"] == info.sha256 == hashlib.sha256(signed.read_bytes()).hexdigest()
        )
        assert client.post("/extensions", content=signed.read_bytes()).status_code == 200
        refused = client.post("/extensions", content=stranger.read_bytes())
        assert refused.status_code == 400 and "not trusted" in refused.json()["detail"]
        assert str(factory.store.extensions) not in refused.json()["detail"]
        unsigned = client.post("/extensions", content=squashfs.read_bytes())
        assert unsigned.status_code == 400 and "signed" in unsigned.json()["detail"]
        assert [e["name"] for e in client.get("/extensions").json()] == ["hello"]
        assert "hello" in client.get("/").text
        schematic = (
            "customization:\n  systemExtensions:\n    customExtensions:\n"
            f"      - {{sha256: {info.sha256}, path: ./on/my/laptop.sqfs}}\n"
        )
        posted = client.post("/schematics", content=schematic)
        assert posted.status_code == 201
        # The factory keeps the reference by sha256 only: its registry has the file.
        stored = factory.store.schematic_file(posted.json()["id"]).read_text()
        assert "laptop" not in stored and info.sha256 in stored
        # An extension the registry lacks is a field error at once, not a failed build.
        unknown = schematic.replace(info.sha256, "c" * 64)
        missing = client.post("/schematics", content=unknown)
        assert missing.status_code == 422, missing.text
        (problem,) = missing.json()["problems"]
        assert problem["path"] == "customization.systemExtensions.customExtensions"
        assert "c" * 64 in problem["message"] and "POST /extensions" in problem["hint"]
        assert len(client.get("/schematics").json()) == 1
    leftovers = [p.name for p in factory.store.extensions.iterdir()]
    assert sorted(leftovers) == sorted([f"{info.sha256}.sqfs", f"{info.sha256}.json"])
    factory.close()


def test_without_trusted_keys_no_extension_is_taken(tmp_path: Path) -> None:
    factory, _fake = _factory(tmp_path)
    with TestClient(make_app(factory)) as client:
        refused = client.post("/extensions", content=b"anything")
        assert refused.status_code == 400
        assert "--extension-key" in refused.json()["hint"]
    assert list(factory.store.extensions.iterdir()) == []
    factory.close()


def test_a_restarted_factory_serves_what_it_built_and_rebuilds_for_a_new_signing_key(
    tmp_path: Path, signing_key: Path, keypair: tuple[str, str]
) -> None:
    factory, fake = _factory(tmp_path, signing_key)
    schematic, _ = factory.add_schematic(QEMU)
    assert factory.builds.request(BuildKey(schematic.id, VERSION)).state == "queued"
    deadline = time.monotonic() + 10
    while not factory.is_built(BuildKey(schematic.id, VERSION)):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    factory.close()
    again, fake_again = _factory(tmp_path, signing_key)
    found = again.artefact(schematic.id, VERSION, "bundle.tar")
    assert isinstance(found, ArtefactFile) and found.path.read_bytes()
    assert fake_again.calls == []
    again.close()
    from basalt.machinery.images import generate_signing_key

    other_key = tmp_path / "other.key"
    other_key.write_text(generate_signing_key()[0])
    rekeyed, _ = _factory(tmp_path, other_key)
    queued = rekeyed.artefact(schematic.id, VERSION, "vmlinuz")
    assert isinstance(queued, BuildStatus) and queued.state == "queued"
    rekeyed.close()
    assert len(fake.calls) == 1


def test_observe_reads_progress_from_the_stage_cache(tmp_path: Path) -> None:
    plan = [["fetch-debs", "fetch-debs-1"], ["rootfs", "rootfs-2"], ["disk", "disk-3"]]
    (tmp_path / "fetch-debs-1").mkdir()
    (tmp_path / "fetch-debs-1" / ".complete").write_text("x")
    (tmp_path / "rootfs-2.tmp-123").mkdir()
    progress = Progress()
    observe(plan, tmp_path, progress)
    assert (progress.stage, progress.done, progress.total) == ("rootfs", 1, 3)
    for name in ("rootfs-2", "disk-3"):
        (tmp_path / name).mkdir()
        (tmp_path / name / ".complete").write_text("x")
    observe(plan, tmp_path, progress)
    assert (progress.stage, progress.done, progress.total) == (None, 3, 3)


def test_closing_cancels_the_build_under_way_and_the_queue(tmp_path: Path) -> None:
    calls: list[BuildKey] = []

    def slow(key: BuildKey, progress: Progress) -> list[dict[str, Any]]:
        from basalt.factory.builds import BuildCancelled

        calls.append(key)
        if progress.cancel.wait(10):
            raise BuildCancelled("stopped")
        return []

    queue = BuildQueue(slow, lambda key: False)
    first, second = BuildKey("a" * 64, VERSION), BuildKey("b" * 64, VERSION)
    queue.request(first)
    queue.request(second)
    deadline = time.monotonic() + 5
    while queue.status(first).state != "building":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert queue.status(second).position == 1
    queue.close()
    assert queue.status(first).state == "failed" and "shut down" in str(queue.status(first).error)
    assert queue.status(second).state == "failed"
    assert calls == [first]


# -- the factory in the fleet -------------------------------------------------------------------


@dataclass
class FleetMade:
    fleet: Any
    fake: FakeBuild
    api: TestClient
    admin: dict[str, str]

    def user(self, role: str) -> dict[str, str]:
        made = self.api.post(
            "/v1/users", json={"name": role.replace(":", "-"), "role": role}, headers=self.admin
        )
        assert made.status_code == 201, made.text
        return {"Authorization": f"Bearer {made.json()['token']}"}


@pytest.fixture
def in_fleet(tmp_path: Path) -> Iterator[FleetMade]:
    from basalt.fleet.core import Fleet, FleetOptions
    from basalt.fleet.rest import make_app as fleet_app

    fleet = Fleet(FleetOptions(data_dir=tmp_path / "fleet", port=18443))
    fleet.factory.close()
    state = tmp_path / "fleet" / "factory"
    fake = FakeBuild(state)
    fleet.factory = Factory(FactoryOptions(state=state, lock=tmp_path / "image.lock"), build=fake)
    admin = {"Authorization": f"Bearer {fleet.admin_token_path.read_text().strip()}"}
    yield FleetMade(fleet, fake, TestClient(fleet_app(fleet), base_url="https://testserver"), admin)
    fleet.close()


def test_the_fleet_serves_the_factory_to_readers_and_takes_schematics_from_operators(
    in_fleet: FleetMade,
) -> None:
    api = in_fleet.api
    reader, operator = in_fleet.user("fleet:reader"), in_fleet.user("fleet:operator")
    assert api.get("/factory/").status_code == 401
    assert api.get("/factory/", headers=reader).status_code == 200
    refused = api.post("/factory/schematics", content=QEMU, headers=reader)
    assert refused.status_code == 403 and "fleet:operator" in refused.json()["detail"]
    posted = api.post("/factory/schematics", content=QEMU, headers=operator)
    assert posted.status_code == 201
    schematic_id = posted.json()["id"]
    assert posted.json()["build"] == f"/factory/builds/{schematic_id}/{VERSION}"
    url = posted.json()["artefacts"]["vmlinuz"]
    assert url == f"/factory/image/{schematic_id}/{VERSION}/vmlinuz"
    assert api.get(url, headers=reader).status_code == 202
    assert _wait_built(Authorized(api, reader), schematic_id, "/factory")["state"] == "done"
    served = api.get(url, headers=reader)
    assert served.status_code == 200 and served.content == _content("vmlinuz", schematic_id)
    assert api.post(f"/factory/builds/{schematic_id}/{VERSION}", headers=reader).status_code == 403
    actions = [e["action"] for e in api.get("/v1/audit", headers=in_fleet.admin).json()]
    assert "factory.schematic.create" in actions


class Authorized:
    """A TestClient's GETs with one user's token (what _wait_built needs)."""

    def __init__(self, api: TestClient, headers: dict[str, str]) -> None:
        self.api, self.headers = api, headers

    def get(self, url: str) -> Any:
        return self.api.get(url, headers=self.headers)


def test_a_join_tokens_installation_image_carries_its_url_and_shows_it_nowhere(
    in_fleet: FleetMade,
) -> None:
    api, fleet = in_fleet.api, in_fleet.fleet
    reader, operator = in_fleet.user("fleet:reader"), in_fleet.user("fleet:operator")
    made = api.post("/v1/join-tokens", json={"uses": 3}, headers=operator).json()
    token, token_id = made["token"], made["id"]
    refused = api.post(
        f"/v1/join-tokens/{token_id}/image", json={"token": "bfj_wrong"}, headers=operator
    )
    assert refused.status_code == 403 and token_id in refused.json()["detail"]
    assert (
        api.post("/v1/join-tokens/nope/image", json={"token": token}, headers=operator).status_code
        == 404
    )
    assert (
        api.post(
            f"/v1/join-tokens/{token_id}/image", json={"token": token}, headers=reader
        ).status_code
        == 403
    )
    bad = api.post(
        f"/v1/join-tokens/{token_id}/image",
        json={"token": token, "customization": "customization: {colour: 1}"},
        headers=operator,
    )
    assert bad.status_code == 422 and bad.json()["problems"][0]["path"] == "customization.colour"
    own = api.post(
        f"/v1/join-tokens/{token_id}/image",
        json={
            "token": token,
            "customization": "customization: {extraKernelArgs: ['basalt.fleet=https://x/']}",
        },
        headers=operator,
    )
    assert own.status_code == 400 and "basalt.fleet" in own.json()["detail"]
    answer = api.post(
        f"/v1/join-tokens/{token_id}/image",
        json={"token": token, "customization": QEMU},
        headers=operator,
    )
    assert answer.status_code == 202, answer.text
    image = answer.json()
    schematic_id = image["schematic"]
    stored = fleet.factory.schematic(schematic_id)
    assert stored.extra_kernel_args == (f"basalt.fleet={made['url']}",)
    assert stored.extensions == ("qemu-guest-agent",)
    assert image["artefacts"]["disk.raw.zst"] == (
        f"/factory/image/{schematic_id}/{VERSION}/disk.raw.zst"
    )
    # The build started with the request; a reader sees the schematic, never the token,
    # and may not fetch its image; an operator may.
    _wait_built(Authorized(api, operator), schematic_id, "/factory")
    for path in (
        "/factory/",
        "/factory/schematics",
        f"/factory/schematics/{schematic_id}",
        "/v1/audit",
        "/v1/join-tokens",
    ):
        text = api.get(path, headers=in_fleet.admin).text
        assert token not in text and token.split(".")[1] not in text, path
    assert "token=***" in api.get("/factory/schematics", headers=reader).text
    disk = image["artefacts"]["disk.qcow2"]
    denied = api.get(disk, headers=reader)
    assert denied.status_code == 403 and "join token" in denied.json()["detail"]
    assert api.get(disk, headers=operator).status_code == 200
    audit = api.get("/v1/audit", headers=in_fleet.admin).json()
    entry = next(e for e in audit if e["action"] == "join-token.image")
    assert entry["target"] == token_id and entry["detail"]["schematic"] == schematic_id


def test_the_join_token_page_offers_the_image_where_the_token_is_shown_once(
    in_fleet: FleetMade,
) -> None:
    import re

    api, fleet = in_fleet.api, in_fleet.fleet
    answer = api.post(
        "/ui/login",
        data={"token": fleet.admin_token_path.read_text().strip()},
        follow_redirects=False,
    )
    assert answer.status_code == 303
    page = api.get("/ui/join-tokens")
    csrf = re.search(r'X-CSRF-Token": "([^"]+)"', page.text)
    assert csrf is not None
    headers = {"X-CSRF-Token": csrf[1], "HX-Request": "true"}
    shown = api.post(
        "/ui/join-tokens", data={"ttl": "1h", "uses": "2", "labels": ""}, headers=headers
    )
    assert shown.status_code == 201
    token_id = re.search(r'hx-post="/ui/join-tokens/([0-9a-f]+)/image"', shown.text)
    token = re.search(r'name="token" value="([^"]+)"', shown.text)
    assert token_id is not None and token is not None
    without_csrf = api.post(f"/ui/join-tokens/{token_id[1]}/image", data={"token": token[1]})
    assert without_csrf.status_code == 403
    in_fleet.fake.gate.clear()
    building = api.post(
        f"/ui/join-tokens/{token_id[1]}/image",
        data={"token": token[1], "extensions": "qemu-guest-agent"},
        headers=headers,
    )
    assert building.status_code == 202, building.text
    polled = re.search(r'hx-get="/ui/join-tokens/image/([0-9a-f]{64})"', building.text)
    assert polled is not None and 'hx-trigger="every 2s"' in building.text
    assert token[1] not in building.text
    in_fleet.fake.gate.set()
    deadline = time.monotonic() + 10
    while "hx-trigger" in (part := api.get(f"/ui/join-tokens/image/{polled[1]}")).text:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert "Built." in part.text
    link = re.search(r'href="(/ui/factory/image/[0-9a-f]{64}/[^/]+/disk\.raw\.zst)"', part.text)
    assert link is not None
    download = api.get(link[1])
    assert download.status_code == 200
    assert download.content == _content("disk.raw.zst", polled[1])
    index = api.get("/ui/factory/")
    assert index.status_code == 200 and polled[1] in index.text and token[1] not in index.text
    assert fleet.factory.schematic(polled[1]).extensions == ("qemu-guest-agent",)
