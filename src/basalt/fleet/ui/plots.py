"""Small SVG plots drawn on the server: no chart library, no script, readable in both
themes (they draw with ``currentColor`` and the page's CSS classes)."""

from __future__ import annotations

import datetime as dt
import html
from collections.abc import Sequence

from markupsafe import Markup


def sparkline(values: Sequence[float], top: float | None = None, width: int = 240,
              height: int = 40) -> Markup:  # fmt: skip
    """A line of ``values`` (oldest first) scaled to ``top`` (else their maximum)."""
    if len(values) < 2:
        return Markup('<span class="muted">not enough samples yet</span>')
    highest = top or max(values) or 1.0
    step = width / (len(values) - 1)
    points = " ".join(
        f"{i * step:.1f},{height - 2 - (min(v, highest) / highest) * (height - 4):.1f}"
        for i, v in enumerate(values)
    )
    return Markup(
        f'<svg class="spark" viewBox="0 0 {width} {height}" preserveAspectRatio="none" '
        f'role="img" aria-label="last value {values[-1]:.1f} of {highest:.1f}">'
        f'<polyline fill="none" stroke="currentColor" stroke-width="1.5" '
        f'vector-effect="non-scaling-stroke" points="{points}"/>'
        "</svg>"
    )


def outcome_bars(rows: Sequence[tuple[str, int, int, int]], width: int = 480) -> Markup:
    """Per release: machines good, fell back, rolled back (stacked horizontal bars)."""
    if not rows:
        return Markup('<p class="muted">no rollouts yet</p>')
    bar, gap, label = 18, 8, 90
    most = max(sum(r[1:]) for r in rows) or 1
    height = len(rows) * (bar + gap)
    parts = [
        f'<svg class="bars" viewBox="0 0 {width} {height}" width="100%" role="img" '
        'aria-label="machines per release: good, fell back, rolled back">'
    ]
    for index, (version, good, fell, rolled) in enumerate(rows):
        y = index * (bar + gap)
        parts.append(f'<text x="0" y="{y + bar - 5}" class="axis">{html.escape(version)}</text>')
        x = float(label)
        for count, css, what in ((good, "good", "good"), (fell, "bad", "fell back"),
                                 (rolled, "warn", "rolled back")):  # fmt: skip
            if not count:
                continue
            length = (width - label - 40) * count / most
            parts.append(
                f'<rect x="{x:.1f}" y="{y}" width="{length:.1f}" height="{bar}" class="{css}">'
                f"<title>{count} {what}</title></rect>"
            )
            x += length
        parts.append(
            f'<text x="{x + 4:.1f}" y="{y + bar - 5}" class="axis">{good}/{fell}/{rolled}</text>'
        )
    parts.append("</svg>")
    return Markup("".join(parts))


def progress_over_time(
    started: Sequence[dt.datetime], healthy: Sequence[dt.datetime], total: int,
    width: int = 480, height: int = 120,
) -> Markup:  # fmt: skip
    """Machines started and machines healthy over the rollout's time (step lines)."""
    times = sorted([*started, *healthy])
    if not times or total <= 0:
        return Markup('<p class="muted">no machine has started yet</p>')
    begin, end = times[0], max(times[-1], dt.datetime.now(dt.UTC))
    span = max((end - begin).total_seconds(), 1.0)

    def line(stamps: Sequence[dt.datetime], css: str) -> str:
        points = [f"0,{height}"]
        count = 0
        for stamp in sorted(stamps):
            x = (stamp - begin).total_seconds() / span * width
            points.append(f"{x:.1f},{height - count / total * height:.1f}")
            count += 1
            points.append(f"{x:.1f},{height - count / total * height:.1f}")
        points.append(f"{width},{height - count / total * height:.1f}")
        return f'<polyline class="{css}" fill="none" stroke-width="2" points="{" ".join(points)}"/>'

    minutes = span / 60
    return Markup(
        f'<svg class="progress" viewBox="0 -4 {width} {height + 20}" width="100%" role="img" '
        f'aria-label="{len(healthy)} of {total} machines healthy">'
        f'<line x1="0" y1="{height}" x2="{width}" y2="{height}" class="grid"/>'
        f'<line x1="0" y1="0" x2="{width}" y2="0" class="grid"/>'
        + line(started, "started")
        + line(healthy, "healthy")
        + f'<text x="0" y="{height + 14}" class="axis">0</text>'
        f'<text x="{width}" y="{height + 14}" class="axis" text-anchor="end">'
        f"{minutes:.1f} min</text></svg>"
    )
