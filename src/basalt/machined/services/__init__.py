"""Supervised services: dependencies, conditions, health checks, restart policy, logs.

Register a :class:`ServiceSpec` with a :class:`Supervisor`, then start it; the
supervisor publishes every state change on the node's event bus.
"""

from basalt.machined.services.logs import LineSplitter, LogBuffer
from basalt.machined.services.runners import (
    ExitStatus,
    ProcessRunner,
    Runner,
    Running,
    TaskRunner,
)
from basalt.machined.services.service import (
    Condition,
    FlagCondition,
    HealthCheck,
    RestartPolicy,
    ServiceSpec,
    ServiceState,
)
from basalt.machined.services.supervisor import (
    Health,
    ServiceEvent,
    ServiceStatus,
    Supervisor,
    UnknownServiceError,
)

__all__ = [
    "Condition",
    "ExitStatus",
    "FlagCondition",
    "Health",
    "HealthCheck",
    "LineSplitter",
    "LogBuffer",
    "ProcessRunner",
    "RestartPolicy",
    "Runner",
    "Running",
    "ServiceEvent",
    "ServiceSpec",
    "ServiceState",
    "ServiceStatus",
    "Supervisor",
    "TaskRunner",
    "UnknownServiceError",
]
