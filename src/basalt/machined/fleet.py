"""The node's link to Basalt Fleet: enrol with ``basalt.fleet=`` and keep the stream up.

Started by the boot sequence right after the committed config is read, so a machine
in maintenance mode enrols and is manageable before it has any config. The fleet is
named by machined's ``--fleet`` (container mode), the kernel argument ``basalt.fleet=``
(metal), or a ``FleetConfig`` document of the running config, in that order. The link
only dials out; what the fleet sends through it reaches the node's API port as TLS
bytes and is authenticated there like any other client.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from basalt.machinery.api import API_PORT

if TYPE_CHECKING:
    from basalt.machinery.api import fleet_pb2
    from basalt.machinery.fleetlink.agent import FleetAgent

    from .node import Node

log = logging.getLogger(__name__)

KERNEL_ARG = "basalt.fleet"


def fleet_url_text(node: Node) -> tuple[str, str]:
    """(the URL, where it came from), ('', '') when this machine has no fleet."""
    if node.tuning.fleet_url:
        return node.tuning.fleet_url, "machined --fleet"
    value = node.platform.kernel_arg(KERNEL_ARG)
    if value:
        return value, f"kernel argument {KERNEL_ARG}="
    if node.config is not None:
        from basalt.machinery.config import FleetConfig

        document = node.config.first(FleetConfig)
        if document is not None and document.url:
            return document.url, "FleetConfig.url"
    return "", ""


def inventory(node: Node, schematic: str = "") -> fleet_pb2.Inventory:
    """What the fleet is told about this machine (sent at link-up and when it changes).
    Cheap reads of /proc and /sys only: the agent looks every two seconds."""
    import psutil

    from basalt.machinery.api import fleet_pb2

    platform = node.platform
    links: list[fleet_pb2.Link] = []
    if platform.mode.manages_network:
        for name, addresses in sorted(psutil.net_if_addrs().items()):
            if name == "lo":
                continue
            mac = next((a.address for a in addresses if a.family == psutil.AF_LINK), "")
            ips = [a.address for a in addresses if a.family in (2, 10)]
            links.append(fleet_pb2.Link(name=name, mac=mac, addresses=ips))
    else:
        links.append(fleet_pb2.Link(name="node", addresses=[node.address]))
    disks = _disks(node) if platform.mode.requires_install else []
    cluster = ""
    if node.config is not None:
        from basalt.machinery.config import ClusterConfig

        document = node.config.first(ClusterConfig)
        cluster = document.name if document is not None else ""
    return fleet_pb2.Inventory(
        hostname=node.hostname,
        arch=platform.arch,
        cpus=os.cpu_count() or 0,
        memory=psutil.virtual_memory().total,
        disks=disks,
        links=links,
        api_address=_api_host(node),
        api_port=API_PORT,
        version=node.version,
        schematic=schematic,
        stage=node.stage,
        configured=node.config is not None,
        cluster=cluster,
    )


def _disks(node: Node) -> list[fleet_pb2.Disk]:
    from basalt.machinery.api import fleet_pb2

    found = []
    block = node.platform.system_root / "sys" / "block"
    try:
        entries = sorted(block.iterdir())
    except OSError:
        return []
    for entry in entries:
        if entry.name.startswith(("loop", "ram", "zram", "dm-")):
            continue
        try:
            sectors = int((entry / "size").read_text())
        except (OSError, ValueError):
            continue
        try:
            model = (entry / "device" / "model").read_text().strip()
        except OSError:
            model = ""
        found.append(fleet_pb2.Disk(name=entry.name, size=sectors * 512, model=model))
    return found


def _api_host(node: Node) -> str:
    return node.address if node.platform.address_known else "127.0.0.1"


def start(node: Node) -> FleetAgent | None:
    """Start the link in the background when this machine has a fleet; a fleet URL that
    does not parse is reported (event, one log line) and the boot goes on without it."""
    text, source = fleet_url_text(node)
    if not text:
        return None
    from basalt.machinery.errors import BasaltError
    from basalt.machinery.fleetlink.agent import FleetAgent
    from basalt.machinery.fleetlink.url import parse_fleet_url

    try:
        url = parse_fleet_url(text, source)
    except BasaltError as exc:
        node.events.publish("fleet", f"not linking to a fleet: {exc}", actor="fleet")
        log.error("not linking to a fleet: %s", exc.one_line())
        return None
    schematic = ""
    if node.platform.extensions or node.platform.mode.requires_install:
        from .extensions import schematic_record

        # The image's schematic does not change while it runs: read once.
        schematic = str(schematic_record(node.platform.system_root).get("id", ""))
    agent = FleetAgent(
        url=url,
        directory=node.platform.fleet_dir,
        machine_uuid=node.platform.machine_uuid(),
        inventory=lambda: inventory(node, schematic),
        api_host=_api_host(node),
        api_port=API_PORT,
        hostname=node.hostname,
    )
    node.events.publish("fleet", f"linking to the fleet at {url.base}", actor="fleet")
    log.info("linking to the fleet at %s as machine %s", url.base, agent.machine_uuid)
    node.background(agent.run(), name="fleet-link")
    return agent
