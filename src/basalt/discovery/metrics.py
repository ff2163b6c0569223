"""``/metrics`` in the Prometheus text format, and the tiny HTTP server that serves it.

The counters are plain dictionaries (no client library: the service runs without the
fleet's extras); the gauges are read from the registry when scraped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger("basalt.discovery")

#: Upper bounds (seconds) of the fan-out latency histogram's buckets.
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


@dataclass
class Metrics:
    """What the service counts: requests by method and status code, refusals by limit or
    by why a proof was refused, and how long changes took to reach their watches."""

    requests: Counter[tuple[str, str]] = field(default_factory=Counter)
    refusals: Counter[str] = field(default_factory=Counter)
    fanout: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    fanout_sum: float = 0.0

    def request(self, method: str, code: str) -> None:
        self.requests[(method, code)] += 1

    def refusal(self, reason: str) -> None:
        self.refusals[reason] += 1

    def delivered(self, seconds: float) -> None:
        """One change sent to one watch ``seconds`` after the service accepted it."""
        self.fanout_sum += seconds
        for index, bound in enumerate(LATENCY_BUCKETS):
            if seconds <= bound:
                self.fanout[index] += 1
                return
        self.fanout[-1] += 1

    def render(self, gauges: dict[str, tuple[str, float]]) -> str:
        """The exposition text; ``gauges``: name -> (help, value)."""
        lines: list[str] = []
        for name, (text, value) in sorted(gauges.items()):
            lines += [f"# HELP {name} {text}", f"# TYPE {name} gauge", f"{name} {value:g}"]
        name = "basalt_discovery_requests_total"
        lines += [
            f"# HELP {name} Requests by method and gRPC status code.",
            f"# TYPE {name} counter",
        ]
        for (method, code), count in sorted(self.requests.items()):
            lines.append(f'{name}{{method="{method}",code="{code}"}} {count}')
        name = "basalt_discovery_refusals_total"
        lines += [
            f"# HELP {name} Refused requests by the limit reached or why the proof failed.",
            f"# TYPE {name} counter",
        ]
        for reason, count in sorted(self.refusals.items()):
            lines.append(f'{name}{{reason="{reason}"}} {count}')
        name = "basalt_discovery_fanout_seconds"
        lines += [
            f"# HELP {name} From accepting a change to handing it to a watch's stream.",
            f"# TYPE {name} histogram",
        ]
        total = 0
        for bound, count in zip((*LATENCY_BUCKETS, float("inf")), self.fanout, strict=True):
            total += count
            le = "+Inf" if bound == float("inf") else f"{bound:g}"
            lines.append(f'{name}_bucket{{le="{le}"}} {total}')
        lines += [f"{name}_sum {self.fanout_sum:.6f}", f"{name}_count {total}"]
        return "\n".join(lines) + "\n"


async def serve_metrics(host: str, port: int, render: Callable[[], str]) -> asyncio.Server:
    """Serve ``GET /metrics`` (and ``GET /healthz``) over plain HTTP/1.1."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            parts = head.split(b"\r\n", 1)[0].split()
            target = parts[1].split(b"?")[0] if len(parts) >= 2 else b""
            if len(parts) < 2 or parts[0] not in (b"GET", b"HEAD"):
                status, body, kind = "405 Method Not Allowed", b"GET only\n", "text/plain"
            elif target == b"/metrics":
                status, body = "200 OK", render().encode()
                kind = "text/plain; version=0.0.4; charset=utf-8"
            elif target == b"/healthz":
                status, body, kind = "200 OK", b"ok\n", "text/plain"
            else:
                status, body, kind = "404 Not Found", b"not found: try /metrics\n", "text/plain"
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n".encode()
                + (body if parts[0] != b"HEAD" else b"")
            )
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    return await asyncio.start_server(handle, host, port, limit=16 * 1024)
