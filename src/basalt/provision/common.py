"""What every provisioner shares: node plans, the maintenance-API bring-up, process checks.

A provisioner starts machines (processes, VMs) and records them; from then on a cluster
comes up the same way whatever the machines are: each node answers in maintenance mode,
gets its config through the insecure maintenance API (as on real hardware), boots with
it, joins the member list, and the first control plane bootstraps etcd.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import signal
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from basalt.machinery.api import common_pb2, machine_pb2, resource_pb2
from basalt.machinery.client.client import Client
from basalt.machinery.client.config import ClientConfig, Context, parse_client_config
from basalt.machinery.errors import BasaltError
from basalt.machinery.fileio import write_atomic

from .state import ClusterRecord, NodeRecord

if TYPE_CHECKING:
    from basalt.machinery.config import GeneratedConfigs
    from basalt.machinery.config.secrets import SecretsBundle

DEFAULT_BASE = "127.0.0.11"
#: ``progress(node name, stage)``: what a caller shows while a cluster comes up.
Progress = Callable[[str, str], None]
#: Returns why waiting is pointless (a machine died), or None to keep waiting.
GiveUp = Callable[[], str | None]


class ProvisionError(BasaltError):
    """A cluster could not be created or destroyed; says which node and why."""


# -- plans -------------------------------------------------------------------------------------


def plan_nodes(
    name: str, controlplanes: int, workers: int, base_address: str, state_dir: Path, *, what: str
) -> list[NodeRecord]:
    """Names, types, host-side loopback addresses and node directories, in boot order."""
    if controlplanes < 1:
        raise ProvisionError("a cluster needs at least one control plane", hint="--controlplanes 1")
    if workers < 0:
        raise ProvisionError("--workers cannot be negative")
    try:
        base = ipaddress.IPv4Address(base_address)
    except ValueError:
        raise ProvisionError(f"{base_address!r} is not an IPv4 address") from None
    total = controlplanes + workers
    try:
        last = base + (total - 1)
    except ipaddress.AddressValueError:
        last = None
    if not base.is_loopback or last is None or not last.is_loopback:
        raise ProvisionError(
            f"node addresses from {base} for {total} nodes must stay inside 127.0.0.0/8",
            hint=f"the {what} provisioner uses loopback addresses only",
        )
    nodes = []
    for index in range(total):
        kind = "controlplane" if index < controlplanes else "worker"
        number = index + 1 if kind == "controlplane" else index - controlplanes + 1
        node_name = f"{name}-{kind}-{number}"
        nodes.append(NodeRecord(node_name, kind, str(base + index), str(state_dir / node_name)))
    return nodes


def port_free(address: str, port: int) -> bool:
    """True when nothing listens on ``address:port`` (TCP) right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((address, port))
        except OSError:
            return False
    return True


def check_ports_free(nodes: list[NodeRecord], ports: tuple[int, ...], *, hint: str) -> None:
    for node in nodes:
        for port in ports:
            if not port_free(node.address, port):
                raise ProvisionError(
                    f"{node.address}:{port} is in use (another cluster, or another program)",
                    hint=hint,
                )


# -- processes ---------------------------------------------------------------------------------


def cmdline(pid: int) -> list[bytes]:
    """``/proc/PID/cmdline`` split into arguments; empty when the process is gone."""
    if pid <= 0:
        return []
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return raw.rstrip(b"\0").split(b"\0") if raw else []


def alive(pid: int) -> bool:
    """True while ``pid`` runs; reaps it when it is our own exited child (a zombie)."""
    if pid <= 0:
        return False
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass  # not our child: the creating basaltctl has exited
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


async def terminate_then_wait(pids: Sequence[int], timeout: float) -> None:
    """SIGTERM each of ``pids`` (a graceful stop), then wait up to ``timeout`` seconds for
    all of them to end; the caller SIGKILLs those it still owns afterwards."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(pid) for pid in pids):
        await asyncio.sleep(0.1)


def processes_naming(marker: bytes) -> list[int]:
    """Processes (other than this one) whose command line contains ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            text = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if marker in text:
            found.append(int(entry.name))
    return found


# -- the API -----------------------------------------------------------------------------------


async def wait_for(
    what: str, check: Callable[[], object], timeout: float, give_up: GiveUp | None = None
) -> None:
    """Poll ``check`` (sync or async) until it is true; ``give_up`` ends the wait early."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if give_up is not None and (reason := give_up()):
            raise ProvisionError(f"stopped waiting for {what}: {reason}")
        try:
            result = check()
            if asyncio.iscoroutine(result):
                result = await result
            if result:
                return
        except Exception as exc:  # not up yet
            last = exc
        await asyncio.sleep(0.2)
    raise ProvisionError(
        f"timed out after {timeout:.0f}s waiting for {what}" + (f": {last}" if last else "")
    )


async def maintenance_up(address: str) -> bool:
    client = await Client.connect(address, insecure=True)
    try:
        answer = await client.machine.Version(common_pb2.Empty(), timeout=3)
        return bool(answer.messages) and answer.messages[0].mode == "maintenance"
    finally:
        await client.close()


async def apply_config(address: str, config: str) -> None:
    """The first config, through the insecure maintenance API."""
    import grpc

    client = await Client.connect(address, insecure=True)
    try:
        await client.machine.ApplyConfiguration(
            machine_pb2.ApplyConfigurationRequest(data=config.encode()), timeout=30
        )
    except grpc.aio.AioRpcError as exc:
        raise ProvisionError(
            f"{address} did not take its config: {exc.code().name}: {exc.details()}"
        ) from None
    finally:
        await client.close()


async def machine_status(context: Context, address: str) -> dict[str, object]:
    """The node's MachineStatus spec, over mTLS."""
    client = await Client.connect(address, ca=context.ca, crt=context.crt, key=context.key)
    try:
        answer = await client.resources.Get(
            resource_pb2.ResourceGetRequest(type="MachineStatuses", id="machine"), timeout=3
        )
        spec: dict[str, object] = json.loads(answer.messages[0].resource.spec_json)
        return spec
    finally:
        await client.close()


async def node_ready(context: Context, address: str) -> bool:
    """True when the node answers over mTLS and reports itself ready."""
    return bool((await machine_status(context, address)).get("ready"))


async def node_running(context: Context, address: str) -> bool:
    """True when the node booted with its config (it may still wait for etcd)."""
    return (await machine_status(context, address)).get("stage") == "running"


async def bootstrap(context: Context, address: str) -> None:
    client = await Client.connect(address, ca=context.ca, crt=context.crt, key=context.key)
    try:
        await client.machine.Bootstrap(machine_pb2.BootstrapRequest(), timeout=30)
    finally:
        await client.close()


async def members_known(context: Context, endpoint: str, names: set[str]) -> bool:
    """True when the endpoint's member list has every node in ``names``."""
    client = await Client.connect(endpoint, ca=context.ca, crt=context.crt, key=context.key)
    try:
        found = {
            item.resource.metadata.id
            async for item in client.resources.List(
                resource_pb2.ResourceListRequest(type="Members"), timeout=3
            )
        }
        return names <= found
    finally:
        await client.close()


@dataclass(frozen=True)
class BringUp:
    """How long each step of a bring-up may take, and whether to bootstrap etcd."""

    maintenance_timeout: float = 30.0
    ready_timeout: float = 120.0
    members_timeout: float = 30.0
    bootstrap: bool = True


async def bring_up(
    nodes: list[NodeRecord],
    configs: Mapping[str, str],
    context: Context,
    progress: Progress,
    steps: BringUp,
    give_up: GiveUp | None = None,
) -> None:
    """Maintenance mode -> config applied -> running (the first node: -> bootstrap) ->
    members -> ready.

    ``configs`` maps node names to their config text; every address is the one this host
    reaches the node's API on.
    """
    for node in nodes:
        await wait_for(
            f"{node.name} maintenance API",
            lambda n=node: maintenance_up(n.address),  # type: ignore[misc]
            steps.maintenance_timeout,
            give_up,
        )
        progress(node.name, "maintenance")
    await asyncio.gather(*(apply_config(n.address, configs[n.name]) for n in nodes))
    for node in nodes:
        progress(node.name, "booting")

    async def wait(node: NodeRecord, check: Callable[..., object], stage: str) -> None:
        await wait_for(
            f"{node.name} to be {stage}",
            lambda: check(context, node.address),
            steps.ready_timeout,
            give_up,
        )
        progress(node.name, stage)

    async def first_then_bootstrap() -> None:
        # etcd starts on the first control plane as soon as it runs: the others join it
        # one at a time while they come up, and the clock etcd keeps before taking the
        # next member (see machined.etcd.pacing) starts with the first joiner.
        await wait(nodes[0], node_running, "running")
        if steps.bootstrap:
            await bootstrap(context, nodes[0].address)
            progress(nodes[0].name, "etcd bootstrapped")

    await asyncio.gather(
        first_then_bootstrap(), *(wait(n, node_running, "running") for n in nodes[1:])
    )
    names = {n.name for n in nodes}
    await wait_for(
        "every node in the member list",
        lambda: members_known(context, nodes[0].address, names),
        steps.members_timeout,
        give_up,
    )
    if steps.bootstrap:
        await asyncio.gather(*(wait(n, node_ready, "ready") for n in nodes))


# -- client config -----------------------------------------------------------------------------


def generated_client(secrets: object, nodes: list[NodeRecord]) -> Context:
    """An admin client context signed by the cluster's OS CA, pointed at the first node."""
    from basalt.machinery.client.config import issue_client_context
    from basalt.machinery.pki import CertificateAndKey

    os_ca = secrets.certs.os  # type: ignore[attr-defined]
    return issue_client_context(
        CertificateAndKey(os_ca.crt, os_ca.key), endpoints=[nodes[0].address]
    )


def client_context(
    name: str, state_dir: Path, nodes: list[NodeRecord], context: Context
) -> Context:
    """Write the cluster's own basaltconfig next to its state and return the context."""
    config = ClientConfig(context=name, contexts={name: context})
    write_atomic(state_dir / "basaltconfig", config.to_yaml(), mode=0o600)
    return context


def load_context(record: ClusterRecord) -> ClientConfig:
    path = Path(record.state_dir) / "basaltconfig"
    return parse_client_config(path.read_text(), str(path))


def failure_hint(state_dir: Path) -> str:
    return (
        f"node console logs are in {state_dir}/<node>/console.log; "
        f"clean up with 'basaltctl cluster destroy --state-dir {state_dir}'"
    )


@contextlib.asynccontextmanager
async def stopped_on_failure(
    stop: Callable[[], Awaitable[object]], state_dir: Path
) -> AsyncIterator[None]:
    """A cluster's bring-up: when it fails, ``stop`` what was started but keep the state
    (the console logs say what went wrong), and say where they are in the error's hint."""
    try:
        yield
    except BaseException as exc:
        await stop()
        if isinstance(exc, BasaltError):
            exc.hint = failure_hint(state_dir)
        raise


def write_cluster_inputs(
    state_dir: Path, secrets: SecretsBundle, generated: GeneratedConfigs
) -> dict[str, str]:
    """Keep the cluster's secrets and machine configs with its state; returns the configs."""
    state_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(state_dir / "secrets.yaml", secrets.to_yaml(), mode=0o600)
    configs = {
        "controlplane": generated.controlplane.to_yaml(),
        "worker": generated.worker.to_yaml(),
    }
    for kind, text in configs.items():
        write_atomic(state_dir / f"{kind}.yaml", text, mode=0o600)
    return configs
