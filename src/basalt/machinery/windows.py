"""Maintenance windows: when a node may start an automatic upgrade.

A window is a cron expression (five fields: minute hour day-of-month month day-of-week;
``*``, ``a``, ``a-b``, ``*/n``, ``a-b/n``, lists with ``,``, names ``mon``..``sun`` and
``jan``..``dec``; day 0 and 7 are Sunday; when both day fields are restricted either one
matches, as in cron) giving when a window opens, a duration, and the time zone the
expression is read in. A window is open at instant T when some minute in
``(T - duration, T]`` matches the expression in local wall time.

DST-safe by construction: instants are walked in UTC minute by minute and each is turned
into local time, so a local time skipped by a spring-forward never matches (a window at
02:30 on that night does not open) and a repeated autumn hour may keep a window open
longer, never shorter. Pure: the clock is passed in.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

from .errors import BasaltError, ErrorKind

_NAMES = {
    3: {m: i for i, m in enumerate(
        ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"),
        start=1)},
    4: {d: i for i, d in enumerate(("sun", "mon", "tue", "wed", "thu", "fri", "sat"))},
}  # fmt: skip
_FIELDS = (("minute", 0, 59), ("hour", 0, 23), ("day of month", 1, 31), ("month", 1, 12),
           ("day of week", 0, 7))  # fmt: skip
#: How far ahead :func:`next_open` looks: a year covers every expression that ever matches.
_HORIZON = dt.timedelta(days=366)


class WindowError(BasaltError):
    kind = ErrorKind.INVALID_ARGUMENT


@dataclass(frozen=True)
class Cron:
    text: str
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday
    day_restricted: bool
    weekday_restricted: bool

    def matches(self, local: dt.datetime) -> bool:
        if (
            local.minute not in self.minutes
            or local.hour not in self.hours
            or local.month not in self.months
        ):
            return False
        day = local.day in self.days
        weekday = (local.isoweekday() % 7) in self.weekdays
        if self.day_restricted and self.weekday_restricted:
            return day or weekday
        return day and weekday


def _value(text: str, index: int) -> int:
    names = _NAMES.get(index, {})
    if text.lower() in names:
        return names[text.lower()]
    if not text.isdigit():
        raise ValueError(f"{text!r} is not a number" + (" or a name" if names else ""))
    return int(text)


def _field(text: str, index: int) -> tuple[frozenset[int], bool]:
    name, low, high = _FIELDS[index]
    values: set[int] = set()
    for part in text.split(","):
        base, _, step_text = part.partition("/")
        try:
            step = int(step_text) if step_text else 1
            if step < 1:
                raise ValueError("a step must be at least 1")
            if base == "*":
                first, last = low, high
            elif "-" in base:
                a, b = base.split("-", 1)
                first, last = _value(a, index), _value(b, index)
            else:
                first = _value(base, index)
                last = high if step_text else first
        except ValueError as exc:
            raise WindowError(f"{name} field {text!r}: {exc}") from None
        if not (low <= first <= high and low <= last <= high) or first > last:
            raise WindowError(f"{name} field {text!r}: values must be {low} to {high}, low-high")
        values.update(range(first, last + 1, step))
    if index == 4 and 7 in values:
        values = (values - {7}) | {0}
    return frozenset(values), text != "*"


@lru_cache(maxsize=64)
def parse_cron(text: str) -> Cron:
    fields = text.split()
    if len(fields) != 5:
        raise WindowError(
            f"cron expression {text!r} has {len(fields)} fields, not 5",
            hint="minute hour day-of-month month day-of-week, e.g. '0 2 * * sat'",
        )
    parsed = [_field(f, i) for i, f in enumerate(fields)]
    return Cron(
        text,
        parsed[0][0],
        parsed[1][0],
        parsed[2][0],
        parsed[3][0],
        parsed[4][0],
        day_restricted=parsed[2][1],
        weekday_restricted=parsed[4][1],
    )


def zone(name: str) -> dt.tzinfo:
    import zoneinfo

    if name in ("", "UTC"):
        return dt.UTC
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise WindowError(
            f"time zone {name!r} is not known here",
            hint="an IANA name such as Europe/Berlin or America/New_York, or UTC",
        ) from None


@dataclass(frozen=True)
class Window:
    cron: str
    duration: dt.timedelta
    timezone: str = "UTC"

    def check(self) -> None:
        parse_cron(self.cron)
        zone(self.timezone)
        if not dt.timedelta(minutes=1) <= self.duration <= dt.timedelta(days=7):
            raise WindowError(f"window duration {self.duration}: between 1 minute and 7 days")

    def _minutes(self, start: dt.datetime, count: int, step: int) -> Iterable[dt.datetime]:
        minute = start.astimezone(dt.UTC).replace(second=0, microsecond=0)
        for i in range(count):
            yield minute + dt.timedelta(minutes=i * step)

    def opened_at(self, now: dt.datetime) -> dt.datetime | None:
        """When the window holding ``now`` opened; None when no window holds it."""
        cron, tz = parse_cron(self.cron), zone(self.timezone)
        count = int(self.duration.total_seconds() // 60)
        for minute in self._minutes(now, count, -1):
            if cron.matches(minute.astimezone(tz)):
                return minute
        return None

    def is_open(self, now: dt.datetime) -> bool:
        return self.opened_at(now) is not None

    def next_open(self, now: dt.datetime) -> dt.datetime | None:
        """The next instant after ``now`` at which this window opens (None: never)."""
        cron, tz = parse_cron(self.cron), zone(self.timezone)
        start = now.astimezone(dt.UTC).replace(second=0, microsecond=0) + dt.timedelta(minutes=1)
        # Walk hours first and only look at minutes in hours that can match: fast for a year.
        hour = start.replace(minute=0)
        while hour - start < _HORIZON:
            first, last = hour.astimezone(tz), (hour + dt.timedelta(minutes=59)).astimezone(tz)
            # Both ends: zones with half-hour offsets span two local hours per UTC hour.
            if {first.hour, last.hour} & cron.hours and {first.month, last.month} & cron.months:
                for minute in self._minutes(hour, 60, 1):
                    if minute >= start and cron.matches(minute.astimezone(tz)):
                        return minute
            hour += dt.timedelta(hours=1)
        return None


def open_now(windows: Sequence[Window], now: dt.datetime) -> bool:
    """No windows: always open. Otherwise open when any window holds ``now``."""
    return not windows or any(w.is_open(now) for w in windows)


def next_opening(windows: Sequence[Window], now: dt.datetime) -> dt.datetime | None:
    found = [t for w in windows if (t := w.next_open(now)) is not None]
    return min(found, default=None)
