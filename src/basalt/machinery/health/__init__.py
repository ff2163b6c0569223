"""Cluster health checks shared by ``basaltctl health`` and the ClusterHealth RPC."""

from .callers import ChannelCaller, ClientCaller, NodeCaller, NodeCallError
from .cluster import (
    CHECKS,
    KubeApi,
    KubeFactory,
    Progress,
    Targets,
    discover,
    run_checks,
)
from .verdicts import MAX_CLOCK_SKEW, Outcome

__all__ = [
    "CHECKS",
    "MAX_CLOCK_SKEW",
    "ChannelCaller",
    "ClientCaller",
    "KubeApi",
    "KubeFactory",
    "NodeCallError",
    "NodeCaller",
    "Outcome",
    "Progress",
    "Targets",
    "discover",
    "run_checks",
]
