"""Prometheus metrics of one fleet process (``GET /metrics``), in a registry of its own."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.machines = Gauge("basalt_fleet_machines", "Machines by state", ["state"], registry=r)
        self.connections = Gauge(
            "basalt_fleet_links", "Machine links held by this replica", registry=r
        )
        self.link_messages = Counter(
            "basalt_fleet_link_messages", "Messages received from machines", ["kind"], registry=r
        )
        self.link_refusals = Counter(
            "basalt_fleet_link_refusals",
            "Links refused (removed machine, old certificate)",
            registry=r,
        )
        self.calls = Counter(
            "basalt_fleet_calls",
            "Calls to node APIs through links",
            ["method", "result"],
            registry=r,
        )
        self.requests = Histogram(
            "basalt_fleet_http_request_seconds", "REST request latency", ["route"], registry=r
        )
        self.drifted = Gauge(
            "basalt_fleet_drifted_nodes",
            "Nodes whose running config differs from the fleet's intent",
            registry=r,
        )
        self.controller_loop = Histogram(
            "basalt_fleet_controller_seconds",
            "Duration of one controller pass",
            ["controller"],
            registry=r,
        )
        self.leader = Gauge(
            "basalt_fleet_leader", "1 when this replica runs the controllers", registry=r
        )

    def machine_counts(self, counts: Callable[[], dict[str, int]]) -> None:
        for state, number in counts().items():
            self.machines.labels(state).set(number)
