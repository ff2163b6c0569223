"""``basaltctl release``: release channels as a TUF repository (a plain directory).

    release init DIR [--channel alpha --channel beta --channel stable]
    release publish DIR BUNDLE --channel beta --key image-key.pub [--via VERSION]
    release promote DIR VERSION --from beta --to stable [--force]
    release yank DIR VERSION [--channel C]
    release timestamp DIR
    release list DIR [--channel C]

``publish`` verifies the bundle's own signature first (with ``--key``), so only a
bundle a node would accept enters a channel; the node then checks TUF's hashes and the
bundle signature both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ._api import table
from ._common import info

app = typer.Typer(
    help="Release channels as a TUF repository: init, publish, promote, yank, timestamp.",
    no_args_is_help=True,
)

DirArg = Annotated[Path, typer.Argument(help="The repository directory.")]


@app.command("init")
def init(
    directory: DirArg,
    channel: Annotated[
        list[str] | None,
        typer.Option("--channel", help="A channel (repeat; default alpha, beta, stable)."),
    ] = None,
) -> None:
    """Make a repository: keys for every role and channel, signed metadata."""
    from basalt.machinery.releases.repository import CHANNELS, Repository

    repo = Repository.init(directory, channel or CHANNELS)
    info(f"release repository made in {directory}: channels {', '.join(repo.channels())}")
    info(f"keep {repo.keys / 'root.pem'} offline: it is only needed to change keys or channels")


@app.command("publish")
def publish(
    directory: DirArg,
    bundle: Annotated[Path, typer.Argument(help="An upgrade bundle (basaltctl bundle create).")],
    channel: Annotated[str, typer.Option("--channel", help="The channel to publish to.")],
    key: Annotated[
        list[Path], typer.Option("--key", help="The image public key the bundle is signed with.")
    ],
    arch: Annotated[str, typer.Option("--arch", help="The bundle's architecture.")] = "x86_64",
    via: Annotated[
        str,
        typer.Option("--via", help="Nodes below this version reach this release only through it."),
    ] = "",
) -> None:
    """Verify a bundle's signature and add it to a channel."""
    from basalt.machinery.images import verify_bundle
    from basalt.machinery.releases.repository import Repository

    from .bundle import _keys

    verified = verify_bundle(bundle, _keys(key, None), arch)
    release = Repository(directory).publish(
        bundle, verified.version, verified.architecture, channel, via
    )
    print(f"{release.channel}\t{release.version}\t{release.arch}\t{release.sha256[:16]}")


@app.command("promote")
def promote(
    ctx: typer.Context,
    directory: DirArg,
    version: str,
    source: Annotated[str, typer.Option("--from", help="The channel it is in.")],
    destination: Annotated[str, typer.Option("--to", help="The channel it goes to.")],
    force: Annotated[
        bool,
        typer.Option(help="Promote although the fleet's rule does not hold (audited)."),
    ] = False,
) -> None:
    """Put a release of one channel into another (the same bundle and hashes), once the
    fleet you are logged in to saw it run healthy on enough machines for long enough with
    no fallback (its promotion rule). Every promotion is logged in DIR/promotions.log; a
    forced one in the fleet's audit log too."""
    from basalt.machinery.releases.repository import Repository

    repo = Repository(directory)
    repo.releases(source)  # a missing repository or channel is named before the fleet
    short, fleet = _promotion_shortfalls(ctx, version)
    if short and not force:
        raise _refused(
            f"{version} is not promoted from {source} to {destination}: {'; '.join(short)}",
            hint="roll it out on the source channel first, or --force (fleet:admin, audited)",
        )
    if short and fleet is not None:
        fleet("POST", "/v1/releases/forced-promotions", {
            "version": version, "from": source, "to": destination,
            "repository": str(directory.resolve()), "short": short,
        })  # fmt: skip
    added = repo.promote(version, source, destination)
    _log_promotion(directory, version, source, destination, short)
    for release in added:
        print(f"{release.channel}\t{release.version}\t{release.arch}")
    if short:
        where = "the fleet's audit log" if fleet is not None else f"{directory}/promotions.log"
        info(f"forced past the promotion rule ({'; '.join(short)}); recorded in {where}")


def _refused(message: str, hint: str) -> Exception:
    from basalt.machinery.errors import BasaltError

    return BasaltError(message, hint=hint)  # a state problem: FAILED_PRECONDITION


def _promotion_shortfalls(ctx: typer.Context, version: str) -> tuple[list[str], Any]:
    """What the logged-in fleet says the promotion rule misses, and a way to call it;
    without a fleet login nobody vouches for the release: one shortfall, no fleet."""
    from ._common import options
    from .fleet import request

    config = options(ctx).load_client_config(missing_ok=True)
    login = config.fleet
    if login is None:
        return ["no fleet vouches for it (not logged in: basaltctl fleet login)"], None

    def call(method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        return request(login.url, login.token, login.ca, method, path, body)

    seen = call("GET", f"/v1/releases/{version}/evidence")
    return list(seen["short"]), call


def _log_promotion(directory: Path, version: str, source: str, to: str, short: list[str]) -> None:
    import datetime as dt
    import getpass
    import json
    import socket

    entry = {
        "at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "by": f"{getpass.getuser()}@{socket.gethostname()}",
        "version": version,
        "from": source,
        "to": to,
        "forced": bool(short),
        "short": short,
    }
    with (directory / "promotions.log").open("a") as handle:
        handle.write(json.dumps(entry) + "\n")


@app.command("yank")
def yank(
    directory: DirArg,
    version: str,
    channel: Annotated[
        list[str] | None, typer.Option("--channel", help="Only in this channel.")
    ] = None,
) -> None:
    """Mark a release a dead end: no node takes it."""
    from basalt.machinery.releases.repository import Repository

    for release in Repository(directory).yank(version, channel or []):
        print(f"{release.channel}\t{release.version}\tyanked")


@app.command("timestamp")
def timestamp(directory: DirArg) -> None:
    """Re-sign the timestamp (valid a day): run it from cron where the timestamp key is."""
    from basalt.machinery.releases.repository import Repository

    version = Repository(directory).timestamp()
    info(f"timestamp version {version} signed")


@app.command("list")
def list_releases(
    directory: DirArg,
    channel: Annotated[str | None, typer.Option("--channel", help="Only this channel.")] = None,
) -> None:
    """The releases of every channel."""
    from basalt.machinery.releases.repository import Repository

    table(
        ["CHANNEL", "VERSION", "ARCH", "SIZE", "SHA256", "VIA", "YANKED"],
        (
            [
                r.channel,
                r.version,
                r.arch,
                r.length,
                r.sha256[:16],
                r.via,
                "yes" if r.yanked else "",
            ]
            for r in Repository(directory).releases(channel)
        ),
    )
