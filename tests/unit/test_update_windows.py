"""Maintenance windows (cron in a time zone, DST-safe), pinned upgrade paths, the
UpdateConfig document and the FleetLock client: the updater's pure parts, with an
injected clock."""

from __future__ import annotations

import datetime as dt
import http.server
import json
import threading
from collections.abc import Iterator
from typing import Any, ClassVar

import pytest
from pydantic import ValidationError

from basalt.machinery.config import UpdateConfig
from basalt.machinery.durations import format_duration, parse_duration
from basalt.machinery.releases.fleetlock import (
    Coordinator,
    CoordinatorError,
    SlotRefusedError,
)
from basalt.machinery.releases.graph import UpgradePathError, pinned_hop
from basalt.machinery.releases.repository import Release
from basalt.machinery.windows import Window, WindowError, next_opening, open_now, parse_cron

UTC = dt.UTC


def at(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text).replace(tzinfo=UTC)


def test_cron_fields() -> None:
    cron = parse_cron("*/15 2-4 * * sat,sun")
    assert cron.minutes == {0, 15, 30, 45} and cron.hours == {2, 3, 4}
    assert cron.weekdays == {0, 6}
    assert parse_cron("0 0 * * 7").weekdays == {0}  # 7 is Sunday too
    assert parse_cron("0 0 1 jan-mar *").months == {1, 2, 3}
    # Both day fields restricted: either matches (as cron does).
    either = parse_cron("0 0 13 * fri")
    assert either.matches(dt.datetime(2026, 11, 13))  # a Friday the 13th
    assert either.matches(dt.datetime(2026, 11, 20))  # a Friday
    assert either.matches(dt.datetime(2026, 12, 13))  # a Sunday the 13th
    assert not either.matches(dt.datetime(2026, 12, 14))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0 2 * *", "has 4 fields, not 5"),
        ("0 25 * * *", "hour field '25': values must be 0 to 23"),
        ("x 2 * * *", "minute field 'x': 'x' is not a number"),
        ("0 2 * * funday", "is not a number or a name"),
        ("*/0 * * * *", "a step must be at least 1"),
        ("0 5-2 * * *", "low-high"),
    ],
)
def test_bad_cron_is_named(text: str, message: str) -> None:
    with pytest.raises(WindowError, match=message):
        parse_cron(text)


def test_a_window_is_open_for_its_duration() -> None:
    window = Window("0 2 * * sat", dt.timedelta(hours=4), "UTC")
    assert not window.is_open(at("2026-12-05T01:59:59"))  # a Saturday
    assert window.opened_at(at("2026-12-05T02:00:00")) == at("2026-12-05T02:00")
    assert window.is_open(at("2026-12-05T05:59:59"))
    assert not window.is_open(at("2026-12-05T06:00:00"))
    assert not window.is_open(at("2026-12-06T03:00:00"))  # Sunday
    assert window.next_open(at("2026-12-05T06:00")) == at("2026-12-12T02:00")
    assert open_now([], at("2026-12-05T12:00"))  # no windows: any time
    assert not open_now([window], at("2026-12-05T12:00"))
    other = Window("30 12 * * *", dt.timedelta(minutes=10))
    assert next_opening([window, other], at("2026-12-05T12:00")) == at("2026-12-05T12:30")


def test_windows_in_a_time_zone_across_dst() -> None:
    """Europe/Berlin: 2026-03-29 02:00 local does not exist; 2026-10-25 02:00-03:00 is
    lived twice. A window keeps its local time across the change."""
    berlin = Window("30 2 * * *", dt.timedelta(hours=1), "Europe/Berlin")
    # Winter (UTC+1): 02:30 local is 01:30 UTC; summer (UTC+2): 00:30 UTC.
    assert berlin.next_open(at("2026-03-27T00:00")) == at("2026-03-27T01:30")
    # The night of the spring change has no 02:30: the next window is the night after.
    assert berlin.next_open(at("2026-03-28T02:00")) == at("2026-03-30T00:30")
    assert not berlin.is_open(at("2026-03-29T00:45"))
    assert berlin.is_open(at("2026-03-30T01:29"))
    # The autumn night lives 02:30 twice; the window opens at the first and holds until
    # an hour after the second (never shorter than asked).
    assert berlin.next_open(at("2026-10-24T12:00")) == at("2026-10-25T00:30")
    assert berlin.is_open(at("2026-10-25T01:15"))
    assert berlin.is_open(at("2026-10-25T02:15"))
    assert not berlin.is_open(at("2026-10-25T02:31"))
    # Half-hour offsets (India, UTC+5:30): 02:00 local is 20:30 UTC the day before.
    india = Window("0 2 * * *", dt.timedelta(minutes=30), "Asia/Kolkata")
    assert india.next_open(at("2026-12-05T12:00")) == at("2026-12-05T20:30")
    with pytest.raises(WindowError, match="time zone 'Mars/Olympus' is not known"):
        Window("0 2 * * *", dt.timedelta(hours=1), "Mars/Olympus").check()
    assert Window("0 0 30 2 *", dt.timedelta(hours=1)).next_open(at("2026-01-01")) is None


def test_durations() -> None:
    assert parse_duration("1h30m") == 5400 and parse_duration("90s") == 90
    assert parse_duration("7d") == 7 * 86400 and parse_duration("soon") is None
    assert format_duration(5400) == "1h30m" and format_duration(0.5) == "0.5s"


def _release(version: str, via: str = "", yanked: bool = False) -> Release:
    return Release("stable", f"stable/{version}", version, "x86_64", 1, "", yanked, via)


def test_a_pinned_version_is_reached_through_the_path_and_never_passed() -> None:
    releases = [_release("0.1.3"), _release("0.2.1", via="0.1.3"), _release("0.3.0")]
    assert pinned_hop("0.1.0", releases, "0.2.1").version == "0.1.3"  # type: ignore[union-attr]
    assert pinned_hop("0.1.3", releases, "0.2.1").version == "0.2.1"  # type: ignore[union-attr]
    assert pinned_hop("0.2.1", releases, "0.2.1") is None
    assert pinned_hop("0.3.0", releases, "0.2.1") is None  # never a downgrade by itself
    with pytest.raises(UpgradePathError, match=r"pinned version 0\.2\.5 is not offered"):
        pinned_hop("0.1.0", releases, "0.2.5")
    with pytest.raises(UpgradePathError, match="fell back on this node before"):
        pinned_hop("0.1.0", releases, "0.2.1", refused=["0.2.1"])


def _update(**fields: Any) -> dict[str, Any]:
    root = {"signed": {"_type": "root"}, "signatures": [{"keyid": "k", "sig": "s"}]}
    return {
        "apiVersion": "basalt.dev/v1alpha1",
        "kind": "UpdateConfig",
        "repository": "https://releases.example.com/basalt/",
        "root": json.dumps(root),
        **fields,
    }


@pytest.mark.parametrize(
    ("fields", "where", "message"),
    [
        ({"root": "{}"}, "root", "not a TUF root metadata document"),
        (
            {"root": json.dumps({"signed": {"_type": "timestamp"}, "signatures": [{}]})},
            "root",
            "a TUF 'timestamp' document",
        ),
        ({"repository": "ftp://x/"}, "repository", "is not an http(s) URL"),
        ({"mode": "yolo"}, "mode", "'manual', 'notify' or 'auto'"),
        ({"interval": "soon"}, "interval", "is not a duration"),
        ({"windows": [{"cron": "0 2 * *", "duration": "1h"}]}, "windows.0.cron", "4 fields"),
        ({"windows": [{"cron": "0 2 * * *", "duration": "9d"}]}, "windows.0", "between 1m"),
        (
            {"windows": [{"cron": "0 2 * * *", "duration": "1h", "timezone": "Nowhere/X"}]},
            "windows.0.timezone",
            "not known",
        ),
        (
            {"rebootCoordinator": {"url": "https://u:p@fleet.example.com/"}},
            "rebootCoordinator.url",
            "no credentials",
        ),
    ],
)
def test_update_config_errors_name_the_field(
    fields: dict[str, Any], where: str, message: str
) -> None:
    with pytest.raises(ValidationError) as raised:
        UpdateConfig.model_validate(_update(**fields))
    error = raised.value.errors()[0]
    assert ".".join(str(p) for p in error["loc"]) == where and message in error["msg"]
    assert "u:p" not in str(raised.value) or "credentials" not in where


class _Lock(http.server.BaseHTTPRequestHandler):
    held: ClassVar[dict[str, str]] = {}
    seen: ClassVar[list[dict[str, Any]]] = []

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append(
            {
                "path": self.path,
                "headers": {k.lower(): v for k, v in self.headers.items()},
                "body": body,
            }
        )
        client = body["client_params"]["id"]
        if self.headers.get("Authorization") != "Bearer t0ken":
            code, answer = 403, {"kind": "forbidden", "value": "no token"}
        elif self.path == "/v1/pre-reboot":
            holder = self.held.setdefault(body["client_params"]["group"], client)
            code, answer = (200, {}) if holder == client else (
                409, {"kind": "failed_lock", "value": f"held by {holder}"})  # fmt: skip
        else:
            self.held.pop(body["client_params"]["group"], None)
            code, answer = 200, {}
        data = json.dumps(answer).encode()
        self.send_response(code)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def lock_server() -> Iterator[str]:
    _Lock.held.clear()
    _Lock.seen.clear()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Lock)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_fleetlock_client_speaks_the_protocol(lock_server: str) -> None:
    first = Coordinator(lock_server, "edge", "t0ken")
    first.take("node-a")
    first.take("node-a")  # idempotent
    with pytest.raises(SlotRefusedError, match="409 held by node-a"):
        first.take("node-b")
    first.give_back("node-a")
    first.take("node-b")
    request = _Lock.seen[0]
    assert request["headers"]["fleet-lock-protocol"] == "true"
    assert request["body"] == {"client_params": {"id": "node-a", "group": "edge"}}
    with pytest.raises(CoordinatorError, match="403 no token") as denied:
        Coordinator(lock_server, "edge", "wrong").take("node-c")
    assert "fleet:reboot" in (denied.value.hint or "")
    with pytest.raises(CoordinatorError, match="cannot ask"):
        Coordinator("http://127.0.0.1:9", "edge").take("node-c")
