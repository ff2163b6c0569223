"""Release channels as a TUF repository: what ``basaltctl release`` writes, checked with
python-tuf's own client over HTTP on loopback, as a node's updater will read it."""

from __future__ import annotations

import functools
import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from basalt.machinery.releases.repository import ReleaseError, Repository
from tests.fakes.bundles import metal_bundle
from tests.fakes.releases import expire_timestamp


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Repository, str]]:
    repo = Repository.init(tmp_path / "repo")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(repo.directory))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield repo, f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def updater(repo: Repository, url: str, work: Path) -> object:
    """python-tuf's client, trusting the repository's first root (as a node pins it)."""
    from tuf.ngclient import Updater

    work.mkdir(exist_ok=True)
    (work / "targets").mkdir(exist_ok=True)
    root = (repo.metadata / "1.root.json").read_bytes()
    return Updater(
        str(work),
        f"{url}/metadata/",
        str(work / "targets"),
        f"{url}/targets/",
        bootstrap=root,
    )


def test_publish_promote_yank_as_a_client_sees_them(
    served: tuple[Repository, str], tmp_path: Path, keypair: tuple[str, str]
) -> None:
    repo, url = served
    bundle = metal_bundle(tmp_path, keypair, "0.2.0", b"root-0.2.0")
    published = repo.publish(bundle.source, "0.2.0", "x86_64", "beta")
    assert published.path == "beta/basalt-0.2.0-x86_64.tar"
    client = updater(repo, url, tmp_path / "client")
    client.refresh()  # type: ignore[attr-defined]
    info = client.get_targetinfo("beta/basalt-0.2.0-x86_64.tar")  # type: ignore[attr-defined]
    assert info is not None and info.custom == {"version": "0.2.0", "arch": "x86_64"}
    path = client.download_target(info)  # type: ignore[attr-defined]
    assert Path(path).read_bytes() == bundle.source.read_bytes()
    assert client.get_targetinfo("stable/basalt-0.2.0-x86_64.tar") is None  # type: ignore[attr-defined]

    repo.promote("0.2.0", "beta", "stable")
    repo.yank("0.2.0", ["beta"])
    fresh = updater(repo, url, tmp_path / "client2")
    fresh.refresh()  # type: ignore[attr-defined]
    stable = fresh.get_targetinfo("stable/basalt-0.2.0-x86_64.tar")  # type: ignore[attr-defined]
    beta = fresh.get_targetinfo("beta/basalt-0.2.0-x86_64.tar")  # type: ignore[attr-defined]
    assert stable.custom.get("yanked") is None and beta.custom["yanked"] is True
    assert [(r.channel, r.yanked) for r in repo.releases()] == [
        ("beta", True),
        ("stable", False),
    ]


def test_refusals_name_what_is_wrong(served: tuple[Repository, str], tmp_path: Path,
                                     keypair: tuple[str, str]) -> None:  # fmt: skip
    repo, _ = served
    bundle = metal_bundle(tmp_path, keypair, "0.3.0", b"root")
    repo.publish(bundle.source, "0.3.0", "x86_64", "alpha")
    with pytest.raises(ReleaseError, match="in alpha already"):
        repo.publish(bundle.source, "0.3.0", "x86_64", "alpha")
    with pytest.raises(ReleaseError, match="channel 'nightly' is not in"):
        repo.publish(bundle.source, "0.3.0", "x86_64", "nightly")
    with pytest.raises(ReleaseError, match=r"0\.9\.9 is not in channel alpha \(there: 0\.3\.0\)"):
        repo.promote("0.9.9", "alpha", "beta")
    repo.yank("0.3.0")
    with pytest.raises(ReleaseError, match="yanked"):
        repo.promote("0.3.0", "alpha", "beta")
    with pytest.raises(ReleaseError, match="holds a release repository already"):
        Repository.init(repo.directory)
    (repo.keys / "root.pem").rename(tmp_path / "offline-root.pem")
    repo.timestamp()  # daily work needs no root key


def test_a_client_refuses_expired_replayed_and_tampered_metadata(
    served: tuple[Repository, str], tmp_path: Path, keypair: tuple[str, str]
) -> None:
    from tuf.api.exceptions import ExpiredMetadataError, LengthOrHashMismatchError, RepositoryError

    repo, url = served
    bundle = metal_bundle(tmp_path, keypair, "0.4.0", b"root")
    repo.publish(bundle.source, "0.4.0", "x86_64", "stable")
    client = updater(repo, url, tmp_path / "seen")
    client.refresh()  # type: ignore[attr-defined]

    # Replay: an older snapshot and timestamp served after the client saw newer ones.
    old_snapshot = (repo.metadata / "snapshot.json").read_bytes()
    old_timestamp = (repo.metadata / "timestamp.json").read_bytes()
    repo.yank("0.4.0")
    updater(repo, url, tmp_path / "seen").refresh()  # type: ignore[attr-defined]
    new_snapshot = (repo.metadata / "snapshot.json").read_bytes()
    (repo.metadata / "snapshot.json").write_bytes(old_snapshot)
    (repo.metadata / "timestamp.json").write_bytes(old_timestamp)
    with pytest.raises(RepositoryError):
        updater(repo, url, tmp_path / "seen").refresh()  # type: ignore[attr-defined]
    (repo.metadata / "snapshot.json").write_bytes(new_snapshot)
    repo.timestamp()

    # Expired: a timestamp signed to expire in the past.
    expire_timestamp(repo)
    with pytest.raises(ExpiredMetadataError):
        updater(repo, url, tmp_path / "fresh").refresh()  # type: ignore[attr-defined]
    repo.timestamp()

    # Tampered: the bundle on the server is not the one the metadata lists.
    target = repo.targets / "stable" / "basalt-0.4.0-x86_64.tar"
    data = target.read_bytes()
    target.write_bytes(bytes([data[0] ^ 0xFF]) + data[1:])
    fresh = updater(repo, url, tmp_path / "fresh2")
    fresh.refresh()  # type: ignore[attr-defined]
    info = fresh.get_targetinfo("stable/basalt-0.4.0-x86_64.tar")  # type: ignore[attr-defined]
    with pytest.raises(LengthOrHashMismatchError):
        fresh.download_target(info)  # type: ignore[attr-defined]


def test_the_cli_verifies_the_bundle_signature_before_publishing(
    tmp_path: Path, keypair: tuple[str, str]
) -> None:
    from basalt.cli.main import build_app
    from basalt.machinery.images import generate_signing_key

    app = build_app("release")
    runner = CliRunner()
    repo_dir = tmp_path / "repo"
    assert runner.invoke(app, ["release", "init", str(repo_dir)]).exit_code == 0
    bundle = metal_bundle(tmp_path, keypair, "0.5.0", b"root")
    good = tmp_path / "good.pub"
    good.write_text(keypair[1])
    other = tmp_path / "other.pub"
    other.write_text(generate_signing_key()[1])
    refused = runner.invoke(
        app, ["release", "publish", str(repo_dir), str(bundle.source), "--channel", "beta",
              "--key", str(other)],
    )  # fmt: skip
    assert refused.exit_code != 0
    assert Repository(repo_dir).releases() == []
    done = runner.invoke(
        app, ["release", "publish", str(repo_dir), str(bundle.source), "--channel", "beta",
              "--key", str(good)],
    )  # fmt: skip
    assert done.exit_code == 0, done.output
    listing = runner.invoke(app, ["release", "list", str(repo_dir)])
    assert "0.5.0" in listing.output and "beta" in listing.output
    meta = json.loads((repo_dir / "metadata" / "beta.json").read_text())
    assert meta["signed"]["targets"]["beta/basalt-0.5.0-x86_64.tar"]["custom"]["version"] == "0.5.0"

    # Promotion: without a fleet to vouch for the release, only by force, and logged.
    env = {"BASALTCONFIG": str(tmp_path / "no-such-config")}
    promote = ["release", "promote", str(repo_dir), "0.5.0", "--from", "beta", "--to", "stable"]
    refused = runner.invoke(app, promote, env=env)
    assert refused.exit_code != 0 and "no fleet vouches for it" in str(refused.exception)
    assert [r.channel for r in Repository(repo_dir).releases()] == ["beta"]
    forced = runner.invoke(app, [*promote, "--force"], env=env)
    assert forced.exit_code == 0, forced.output
    assert [r.channel for r in Repository(repo_dir).releases()] == ["beta", "stable"]
    [logged] = [json.loads(line) for line in (repo_dir / "promotions.log").read_text().splitlines()]
    assert (logged["version"], logged["to"], logged["forced"]) == ("0.5.0", "stable", True)


def test_the_node_reader_lists_downloads_and_refuses_with_a_reason(
    served: tuple[Repository, str], tmp_path: Path, keypair: tuple[str, str]
) -> None:
    """What a node's updater reads (ChannelReader): releases with their graph fields; an
    expired timestamp, a replayed snapshot, a tampered bundle and a root the node does not
    pin are each refused with a reason that says so, and nothing is left behind."""
    from basalt.machinery.releases.client import (
        ChannelReader,
        ReleaseFetchError,
        ReleaseRefusedError,
    )

    repo, url = served
    pinned = (repo.metadata / "1.root.json").read_bytes()
    bundle = metal_bundle(tmp_path, keypair, "0.5.0", b"root")
    repo.publish(bundle.source, "0.5.0", "x86_64", "stable", via="0.4.9")
    reader = ChannelReader(url, pinned, tmp_path / "node", "stable")
    [release] = reader.releases()
    assert (release.version, release.via, release.yanked) == ("0.5.0", "0.4.9", False)
    got = reader.download(release, tmp_path / "in" / "b.tar")
    assert got.read_bytes() == bundle.source.read_bytes()
    got.write_bytes(b"X" + got.read_bytes()[1:])  # a kept download that changed: fetched again
    assert reader.download(release, got).read_bytes() == bundle.source.read_bytes()

    with pytest.raises(ReleaseFetchError, match="has no channel 'nightly'") as missing:
        ChannelReader(url, pinned, tmp_path / "node", "nightly").releases()
    assert "basaltctl release list" in (missing.value.hint or "")

    old = {r: (repo.metadata / f"{r}.json").read_bytes() for r in ("snapshot", "timestamp")}
    repo.yank("0.5.0")
    assert reader.releases()[0].yanked
    new = {r: (repo.metadata / f"{r}.json").read_bytes() for r in old}
    for role, data in old.items():
        (repo.metadata / f"{role}.json").write_bytes(data)
    with pytest.raises(ReleaseRefusedError, match="replayed"):
        ChannelReader(url, pinned, tmp_path / "node", "stable").releases()
    for role, data in new.items():
        (repo.metadata / f"{role}.json").write_bytes(data)

    expire_timestamp(repo)
    with pytest.raises(ReleaseRefusedError, match="expired") as stale:
        ChannelReader(url, pinned, tmp_path / "node2", "stable").releases()
    assert "release timestamp" in (stale.value.hint or "")
    repo.timestamp()

    other = Repository.init(tmp_path / "other")
    with pytest.raises(ReleaseRefusedError, match="not signed by the keys this node trusts"):
        ChannelReader(url, (other.metadata / "1.root.json").read_bytes(), tmp_path / "n3",
                      "stable").releases()  # fmt: skip

    target = repo.targets / "stable" / "basalt-0.5.0-x86_64.tar"
    target.write_bytes(b"X" + target.read_bytes()[1:])
    fresh = ChannelReader(url, pinned, tmp_path / "node4", "stable")
    with pytest.raises(ReleaseRefusedError, match="does not match what TUF signed"):
        fresh.download(fresh.releases()[0], tmp_path / "in" / "c.tar")
    assert not (tmp_path / "in" / "c.tar").exists()
