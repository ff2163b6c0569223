"""The node: the state every part of machined shares, and its lifecycle entry points.

A :class:`Node` is plain state. It builds none of the parts above it: the composition
root (:mod:`basalt.machined.assemble`) creates the upgrader, the servers, the etcd
manager and the controllers, and sets the narrow interfaces (:mod:`.ports`) that the
sequences and the API reach them through.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import basalt
from basalt.machinery.resources import MachineConfigSpec, MachineStatusSpec, UnmetCondition
from basalt.machinery.resources.specs import Stage

from .events import EventBus
from .platform import Platform, PowerAction
from .ports import EtcdMember, Updates, Upgrades, Wiring
from .runtime import ControllerEngine, ResourceStore, Sequencer
from .services import LogBuffer, Supervisor
from .storage.state import ConfigStore

if TYPE_CHECKING:
    # Imported where used: a first boot opens its maintenance API before it needs
    # config models (pydantic) or identities, and under TCG each import costs seconds.
    from basalt.machinery.api import trust_pb2
    from basalt.machinery.config import ConfigBundle, MachineConfig

    from .identity import NodeIdentity
    from .services import ServiceStatus

log = logging.getLogger(__name__)


@dataclass
class Tuning:
    """Timings that tests shorten; defaults are for real nodes."""

    #: Lifetime of the node's certificates (machined --cert-validity).
    cert_validity: dt.timedelta = dt.timedelta(hours=24)
    announce_interval: float = 10.0
    member_ttl: float = 60.0
    #: How long a slot on trial has to pass its health gates before it counts as failed.
    boot_assessment_timeout: float = 120.0
    #: Time sync: the servers' UDP port, and the poll interval bounds once in sync.
    ntp_port: int = 123
    time_poll_min: float = 64.0
    time_poll_max: float = 1024.0
    #: Upgrades of a node whose kubelet runs: how long cordon + drain may take before the
    #: upgrade is refused, the first wait after a disruption budget refused an eviction
    #: (it doubles), and how often evicted pods are looked for while they terminate.
    drain_timeout: float = 300.0
    drain_backoff: float = 1.0
    drain_poll: float = 1.0
    #: After the upgrade (or a refusal): attempts to uncordon, and the first wait between
    #: them (it doubles, up to a minute): about ten minutes in all.
    uncordon_attempts: int = 12
    uncordon_backoff: float = 5.0
    #: One request to the Kubernetes API server.
    kube_request_timeout: float = 10.0
    #: Seconds between two samples of the node's CPU and memory use (SystemStats/history,
    #: machined --stats-interval).
    stats_interval: float = 30.0
    #: ``basalt.fleet=`` as machined's --fleet gives it (container mode; metal reads the
    #: kernel argument).
    fleet_url: str = ""


@dataclass
class TrialState:
    """A config under ``--mode try``: running, not committed, reverted at ``deadline``."""

    previous: ConfigBundle
    deadline: float
    task: asyncio.Task[None] | None = None


@dataclass(eq=False)
class Node:
    platform: Platform
    tuning: Tuning = field(default_factory=Tuning)
    #: Set by the composition root (:func:`basalt.machined.assemble.build_node`).
    #: A/B slots, upgrades, rollbacks and the boot assessment.
    upgrader: Upgrades = field(init=False)
    #: What the boot sequence asks of the composition root (servers, services).
    wiring: Wiring = field(init=False)

    def __post_init__(self) -> None:
        self.paths = self.platform.paths
        self.address = self.platform.address
        self.events = EventBus()
        self.store = ResourceStore()
        self.agent_log = LogBuffer(max_lines=5000)
        self.supervisor = Supervisor(self.events, on_change=self._service_changed)
        self.configs = ConfigStore(self.paths.state)
        self.config: ConfigBundle | None = None
        self.identity: NodeIdentity | None = None
        self.stage: Stage = "booting"
        self.sequencer: Sequencer[Node] = Sequencer(self, self._sequence_event)
        self.engine: ControllerEngine | None = None
        #: The updater, once the composition root made it (None: never on this node).
        self.updates: Updates | None = None
        self.trial: TrialState | None = None
        self.config_arrived = asyncio.Event()
        #: Cleared while the boot's maintenance API may still be opening: the network
        #: controller then holds back its slow pyroute2 import (DHCP itself starts).
        self.api_first = asyncio.Event()
        self.api_first.set()
        self.exit_code: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.started = time.time()
        #: The cluster's members as the control planes list them (node id -> member).
        self.members: dict[str, trust_pb2.Member] = {}
        #: On control planes: the member registry the trust service keeps.
        self.trust_members: dict[str, trust_pb2.Member] = {}
        #: On control planes: etcd's lifecycle (set when services are registered).
        self.etcd: EtcdMember | None = None
        self._background: set[asyncio.Task[None]] = set()

    # -- identity and config -------------------------------------------------------------
    @property
    def maintenance(self) -> bool:
        return self.config is None

    @property
    def machine(self) -> MachineConfig | None:
        if self.config is None:
            return None
        from basalt.machinery.config import MachineConfig

        return self.config.first(MachineConfig)

    @property
    def is_controlplane(self) -> bool:
        machine = self.machine
        return machine is not None and machine.type == "controlplane"

    @property
    def hostname(self) -> str:
        if self.config is not None:
            from basalt.machinery.config.network import HostnameConfig

            hostname = self.config.first(HostnameConfig)
            if hostname is not None and hostname.hostname:
                return hostname.hostname
        return self.platform.hostname

    @property
    def version(self) -> str:
        return basalt.__version__

    def load_text(self, text: str, source: str) -> ConfigBundle:
        from basalt.machinery.config import load_bundle

        return load_bundle(text, source)

    def use_config(self, bundle: ConfigBundle, *, staged: ConfigBundle | None = None) -> None:
        """Make ``bundle`` the running config and publish it as a resource."""
        self.config = bundle
        self.store.put(
            "MachineConfigs", "v1alpha1", MachineConfigSpec(yaml=bundle.to_yaml()), owner="config"
        )
        if staged is not None:
            self.store.put(
                "MachineConfigs",
                "staged",
                MachineConfigSpec(yaml=staged.to_yaml(), staged=True),
                owner="config",
            )
        else:
            self.store.delete("MachineConfigs", "staged", owner="config")
        if self.engine is not None:
            for controller in self.engine.controllers:
                self.engine.kick(controller.name)

    # -- status ------------------------------------------------------------------------------
    def set_stage(self, stage: Stage) -> None:
        if stage != self.stage:
            self.stage = stage
            self.events.publish("machine", f"stage {stage}", actor="machined", stage=stage)
        self.refresh_status()

    def unmet_conditions(self) -> list[UnmetCondition]:
        unmet = []
        if self.stage != "running":
            unmet.append(UnmetCondition(name="stage", reason=f"node is {self.stage}"))
        for status in self.supervisor.statuses():
            if status.state == "skipped" or self.supervisor.is_ready(status.id):
                continue
            if status.state != "running":
                reason = status.message or str(status.state)
            else:
                reason = f"{status.health}: {status.health_message or 'not checked yet'}"
            unmet.append(UnmetCondition(name=f"service {status.id}", reason=reason))
        return unmet

    def refresh_status(self) -> None:
        unmet = self.unmet_conditions()
        self.store.put(
            "MachineStatuses",
            "machine",
            MachineStatusSpec(stage=self.stage, ready=not unmet, unmet_conditions=unmet),
            owner="machined",
        )

    def _service_changed(self, status: ServiceStatus) -> None:
        from basalt.machinery.resources import ServiceStatusSpec

        self.store.put(
            "Services",
            status.id,
            ServiceStatusSpec(
                state=str(status.state),
                healthy=status.health == "healthy",
                health=status.health,
                message=status.message,
                restarts=status.restarts,
            ),
            owner="supervisor",
        )
        self.refresh_status()

    def _sequence_event(self, sequence: str, phase: str, message: str) -> None:
        fields = {"sequence": sequence}
        if phase:
            fields["phase"] = phase
        text = f"{sequence}: {phase + ': ' if phase else ''}{message}"
        self.events.publish("sequence", text, actor="sequencer", **fields)
        log.info("%s", text)

    def background(self, coro: Coroutine[object, object, None], *, name: str) -> asyncio.Task[None]:
        """Run ``coro`` for the node's lifetime; it is cancelled when the node stops."""
        task = asyncio.create_task(coro, name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def stop_background(self) -> None:
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)

    # -- the end -----------------------------------------------------------------------------
    def finish(self, action: PowerAction) -> None:
        """End the process so the launcher reboots or stops the node."""
        if not self.exit_code.done():
            self.exit_code.set_result(self.platform.exit_code(action))
