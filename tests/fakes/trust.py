"""A stand-in for the node the trust service reads: the parts ``TrustServicer`` touches.

Everything in it is real (a generated MachineConfig, the real Tuning and EventBus);
it only leaves out the rest of ``Node`` (platform, paths, supervisor, sequencer). Give
it an ``engine`` to act as a running control plane that publishes Members resources.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from basalt.machined.events import EventBus
from basalt.machined.node import Tuning
from basalt.machined.runtime import ControllerEngine, ResourceStore
from basalt.machinery.config import ConfigBundle, MachineConfig
from basalt.machinery.pki import CertificateAndKey
from tests.fakes import inputs


@dataclass
class TrustNode:
    """What a control plane's trust service needs: its config, timings, events, members."""

    machine: MachineConfig | None
    tuning: Tuning = field(
        default_factory=lambda: Tuning(cert_validity=dt.timedelta(hours=2), member_ttl=60.0)
    )
    events: EventBus = field(default_factory=EventBus)
    trust_members: dict[str, Any] = field(default_factory=dict)
    #: With an engine (a running control plane), Announce also publishes Members resources.
    engine: ControllerEngine | None = None
    store: ResourceStore = field(default_factory=ResourceStore)
    members: dict[str, Any] = field(default_factory=dict)
    #: The control plane's own address and host name (names nobody else may get).
    address: str = "127.0.0.229"
    hostname: str = "cp-1"
    #: Its own certificates (their names are its own too), when a test gives them.
    identity: Any = None
    #: The whole config (for the cluster endpoint), when a test gives it.
    config: ConfigBundle | None = None

    @property
    def os_ca(self) -> CertificateAndKey:
        assert self.machine is not None
        return CertificateAndKey(self.machine.ca.crt, self.machine.ca.key)


def controlplane_node() -> TrustNode:
    """A trust node holding the session's generated control plane MachineConfig."""
    config = inputs.generate().controlplane
    machine = config.first(MachineConfig)
    assert machine is not None
    return TrustNode(machine, config=config)
