"""``UpdateConfig``: where this node takes its upgrades from, and when it may.

The node's updater (:mod:`basalt.machined.updater`) reads release channels from a TUF
repository (``basaltctl release``), trusting only the root pinned here, and, in ``auto``
mode, upgrades itself inside its maintenance windows while holding a reboot slot of a
FleetLock server.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, Field, model_validator

from ..durations import parse_duration
from ._base import Document, Model, register, replace_on_merge, secret
from ._types import invalid


def _http_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise invalid(
            f"{value!r} is not an http(s) URL with a host",
            "e.g. https://releases.example.com/basalt/",
        )
    try:
        _ = parts.port
    except ValueError:
        raise invalid(f"{value!r} has an invalid port", "ports are 1-65535") from None
    if parts.username or parts.password or parts.query or parts.fragment:
        raise invalid(
            f"{urlsplit(value)._replace(netloc=parts.hostname).geturl()!r}: no credentials, "
            "query or fragment in this URL",
            "give a coordinator's token in rebootCoordinator.token",
        )
    return value


def _duration(value: str) -> str:
    if parse_duration(value) is None:
        raise invalid(f"{value!r} is not a duration", "e.g. 90s, 30m, 4h or 1h30m")
    return value


def _tuf_root(value: str) -> str:
    try:
        document = json.loads(value)
        kind = document["signed"]["_type"]
        signatures = document["signatures"]
    except (ValueError, KeyError, TypeError):
        raise invalid(
            "not a TUF root metadata document (JSON with signed._type and signatures)",
            "paste the repository's metadata/1.root.json (basaltctl release init wrote it)",
        ) from None
    if kind != "root" or not signatures:
        raise invalid(f"a TUF {kind!r} document with {len(signatures)} signature(s), not a root")
    return value


def _cron(value: str) -> str:
    from ..errors import BasaltError
    from ..windows import parse_cron

    try:
        parse_cron(value)
    except BasaltError as exc:
        raise invalid(str(exc), exc.hint) from None
    return value


def _timezone(value: str) -> str:
    from ..errors import BasaltError
    from ..windows import zone

    try:
        zone(value)
    except BasaltError as exc:
        raise invalid(str(exc), exc.hint) from None
    return value


HttpURL = Annotated[str, AfterValidator(_http_url)]
DurationText = Annotated[str, AfterValidator(_duration)]
TUFRoot = Annotated[str, AfterValidator(_tuf_root)]
CronText = Annotated[str, AfterValidator(_cron)]
TimeZoneName = Annotated[str, AfterValidator(_timezone)]


class MaintenanceWindow(Model):
    """When automatic upgrades may start: each time ``cron`` matches, for ``duration``."""

    cron: CronText = Field(
        description="When the window opens: minute hour day-of-month month day-of-week, "
        "e.g. `0 2 * * sat`."
    )
    duration: DurationText = Field(description="How long it stays open, e.g. `4h`.")
    timezone: TimeZoneName = Field(
        "UTC", description="The IANA time zone `cron` is read in, e.g. `Europe/Berlin`."
    )

    @model_validator(mode="after")
    def _length(self) -> MaintenanceWindow:
        seconds = parse_duration(self.duration) or 0
        if not 60 <= seconds <= 7 * 86400:
            raise invalid(f"duration {self.duration}: between 1m and 7d")
        return self

    def seconds(self) -> dt.timedelta:
        return dt.timedelta(seconds=parse_duration(self.duration) or 0)


class RebootCoordinator(Model):
    """A FleetLock server (Basalt Fleet, or any other) that hands out reboot slots."""

    url: HttpURL = Field(description="The server's base URL; `/v1/pre-reboot` is under it.")
    group: str = Field(
        "default",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$",
        description="The reboot group to take a slot of (a fleet puts control planes in "
        "their cluster's group whatever this says).",
    )
    token: str = Field(
        "",
        description="Sent as `Authorization: Bearer`; a fleet wants a token with the role "
        "`fleet:reboot`.",
        json_schema_extra=secret(),
    )
    ca: str = Field(
        "",
        description="PEM CA certificate(s) the server's certificate must chain to "
        "(`https` URLs; empty: the system's CA store).",
    )


@register
class UpdateConfig(Document):
    """Automatic updates from a release channel (a TUF repository)."""

    kind: Literal["UpdateConfig"] = Field(description="`UpdateConfig`.")
    repository: HttpURL = Field(
        description="The release repository's base URL (it holds `metadata/` and `targets/`)."
    )
    root: TUFRoot = Field(
        description="The repository's TUF root metadata (JSON) this node trusts; later "
        "roots are only accepted when this one (and each next) signed them."
    )
    channel: str = Field(
        "stable",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9-]{0,62}$",
        description="The channel to follow (`alpha`, `beta`, `stable`, or another of the "
        "repository's).",
    )
    version: str = Field(
        "",
        description="Pin a version: go to it (through the upgrade path) and stay; empty: "
        "follow the channel.",
    )
    mode: Literal["manual", "notify", "auto"] = Field(
        "notify",
        description="`manual`: check only when asked; `notify`: check on the interval and "
        "report; `auto`: also upgrade, inside a window, holding a reboot slot.",
    )
    interval: DurationText = Field("1h", description="How often to check (plus up to 10% jitter).")
    windows: list[MaintenanceWindow] = Field(
        default_factory=list,
        description="When `auto` may start an upgrade; none: any time.",
        json_schema_extra=replace_on_merge(),
    )
    reboot_coordinator: RebootCoordinator | None = Field(
        None,
        description="Take a reboot slot here before upgrading and give it back once the "
        "new version passed its health gates; none: no coordination.",
    )

    @model_validator(mode="after")
    def _interval(self) -> UpdateConfig:
        if (parse_duration(self.interval) or 0) < 1:
            raise invalid(f"interval {self.interval}: at least 1s")
        return self

    def interval_seconds(self) -> float:
        return parse_duration(self.interval) or 3600.0
