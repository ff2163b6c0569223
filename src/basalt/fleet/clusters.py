"""Clusters from templates: plan, render configs, and what the database keeps.

``plan`` compares a template with what the fleet has: which machines to allocate (free,
linked, in maintenance mode, matching the set's selector) or release, and each node's
config change. ``commit`` stores the plan (the template, secrets generated once and
sealed, every node's intended config, sealed); ``operations.Reconciler`` then makes the
nodes match. Everything a node runs is what ``basaltctl gen config`` makes from the
exported secrets, patches and contract: ``export_files`` writes those, and the script
that regenerates each node's config.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from basalt.machinery.config import ConfigBundle, GenerateOptions, generate_configs, load_bundle
from basalt.machinery.config.diff import config_changes
from basalt.machinery.config.secrets import SecretsBundle, generate_secrets, load_secrets
from basalt.machinery.roles import Role

from . import audit
from .auth import Caller
from .db import Cluster, Machine, utcnow
from .secretbox import SecretBox
from .service import FleetError, NotFound
from .template import Template, parse_template, patch_text

CONTROLPLANE = "controlplane"
WORKER = "worker"


@dataclass
class NodePlan:
    uuid: str
    hostname: str
    role: str
    machine_set: str
    #: allocate (a free machine joins) | keep | release (leaves, back to maintenance)
    action: str
    #: Changed fields of its config (``Document.path``); values are never shown.
    changes: list[str] = field(default_factory=list)
    #: How the change is applied: maintenance | no-reboot | reboot | none | reset
    mode: str = "none"

    def to_json(self) -> dict[str, Any]:
        return {
            "uuid": self.uuid,
            "hostname": self.hostname,
            "role": self.role,
            "set": self.machine_set,
            "action": self.action,
            "changes": self.changes,
            "mode": self.mode,
        }


@dataclass
class Plan:
    cluster: str
    create: bool
    endpoint: str
    nodes: list[NodePlan]
    #: uuid -> the config each allocated or kept node is to run (not for display).
    configs: dict[str, str] = field(default_factory=dict)
    secrets: SecretsBundle | None = None

    @property
    def changes(self) -> bool:
        return self.create or any(n.action != "keep" or n.changes for n in self.nodes)

    def to_json(self) -> dict[str, Any]:
        return {
            "cluster": self.cluster,
            "create": self.create,
            "endpoint": self.endpoint,
            "nodes": [n.to_json() for n in self.nodes],
            "changes": self.changes,
        }


def render(
    template: Template,
    secrets: SecretsBundle,
    endpoint: str,
    role: str,
    machine_set: str,
    uuid: str,
) -> str:
    """The config one node runs: ``gen config`` with the cluster's patches, then its
    set's, then its own."""
    own = template.machine_patches(uuid)
    spec = template.spec
    generated = generate_configs(
        secrets,
        GenerateOptions(
            cluster_name=spec.name, endpoint=endpoint, version_contract=spec.version_contract
        ),
        patches=template.cluster_patches(),
        controlplane_patches=[
            *template.set_patches(CONTROLPLANE, ""),
            *(own if role == CONTROLPLANE else []),
        ],
        worker_patches=[
            *template.set_patches(WORKER, machine_set),
            *(own if role == WORKER else []),
        ],
    )
    bundle = generated.controlplane if role == CONTROLPLANE else generated.worker
    return bundle.to_yaml()


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _selector_ok(machine: Machine, selector: dict[str, str]) -> bool:
    return all(machine.labels.get(k) == v for k, v in selector.items())


def _available(machine: Machine, linked: Iterable[str]) -> bool:
    inventory = machine.inventory or {}
    return (
        machine.state == "free"
        and machine.uuid in linked
        and not inventory.get("configured", False)
        and inventory.get("stage", "") == "maintenance"
    )


def cluster_secrets(cluster: Cluster, box: SecretBox) -> SecretsBundle:
    text = box.open(cluster.secrets, f"cluster {cluster.name} secrets").decode()
    return load_secrets(text, f"cluster {cluster.name} secrets")


def intended_config(machine: Machine, box: SecretBox) -> str:
    if machine.intended is None:
        raise FleetError(f"machine {machine.uuid} has no intended config")
    return box.open(machine.intended, f"machine {machine.uuid} config").decode()


def plan(session: Session, template: Template, box: SecretBox, linked: Iterable[str]) -> Plan:
    """What applying ``template`` would do; refuses (changing nothing) when it cannot."""
    spec = template.spec
    linked = set(linked)
    existing = session.get(Cluster, spec.name)
    if existing is not None and existing.status == "deleting":
        raise FleetError(f"cluster {spec.name} is being deleted; apply it again afterwards")
    members = list(
        session.execute(
            select(Machine).where(Machine.cluster == spec.name).order_by(Machine.allocated)
        ).scalars()
    )
    free = [
        m
        for m in session.execute(
            select(Machine).where(Machine.state == "free").order_by(Machine.enrolled, Machine.uuid)
        ).scalars()
        if _available(m, linked)
    ]
    sets: list[tuple[str, str, int, dict[str, str], str]] = [
        (
            CONTROLPLANE,
            "",
            spec.control_plane.count,
            spec.control_plane.machine_selector,
            "controlPlane.machineSelector",
        )
    ]
    sets += [
        (WORKER, w.name, w.count, w.machine_selector, f"workers[{i}].machineSelector")
        for i, w in enumerate(spec.workers)
    ]
    nodes: list[NodePlan] = []
    taken: set[str] = set()
    wanted_sets = {(role, name) for role, name, *_ in sets}
    for member in members:
        if member.state == "releasing" or (member.role, member.machine_set) not in wanted_sets:
            nodes.append(_node(member, "release", "reset"))
    for role, name, count, selector, where in sets:
        current = [
            m for m in members if (m.role, m.machine_set) == (role, name) and m.state == "allocated"
        ]
        for member in current[count:][::-1]:
            nodes.append(_node(member, "release", "reset"))
        nodes.extend(_node(member, "keep") for member in current[:count])
        missing = count - len(current)
        if missing <= 0:
            continue
        candidates = [m for m in free if m.uuid not in taken and _selector_ok(m, selector)]
        if len(candidates) < missing:
            raise _too_few(template.source, where, selector, len(candidates), missing)
        for machine in candidates[:missing]:
            taken.add(machine.uuid)
            nodes.append(
                NodePlan(
                    machine.uuid,
                    machine.hostname,
                    role,
                    name,
                    "allocate",
                    mode="maintenance",
                )
            )
    if existing is not None:
        secrets = cluster_secrets(existing, box)
        endpoint = spec.endpoint or existing.endpoint
    else:
        secrets = generate_secrets()
        first = next((n for n in nodes if n.role == CONTROLPLANE), None)
        address = ""
        if first is not None:
            chosen = session.get(Machine, first.uuid)
            address = str((chosen.inventory or {}).get("api_address", "")) if chosen else ""
        endpoint = spec.endpoint or f"https://{address or '127.0.0.1'}:6443"
    result = Plan(spec.name, existing is None, endpoint, nodes, secrets=secrets)
    by_uuid = {m.uuid: m for m in members}
    for node in nodes:
        if node.action == "release":
            continue
        config = render(template, secrets, endpoint, node.role, node.machine_set, node.uuid)
        result.configs[node.uuid] = config
        kept = by_uuid.get(node.uuid)
        if node.action == "keep" and kept is not None and kept.intended is not None:
            before = intended_config(kept, box)
            if digest(before) != digest(config):
                changes = config_changes(
                    load_bundle(before, "intended"), load_bundle(config, "new")
                )
                node.changes = [c.document + ("." + c.path if c.path else "") for c in changes]
                node.mode = "reboot" if any(c.needs_reboot for c in changes) else "no-reboot"
    return result


def _too_few(
    source: str, where: str, selector: dict[str, str], found: int, missing: int
) -> FleetError:
    labels = ",".join(f"{k}={v}" for k, v in selector.items()) or "(any labels)"
    return FleetError(
        f"{source}: Cluster.{where}: {labels} matches {found} free machine(s) in "
        f"maintenance mode with a link; {missing} are needed",
        hint="enrol more machines, label free ones with 'basaltctl fleet label', "
        "or lower the count; nothing was changed",
    )


def _node(machine: Machine, action: str, mode: str = "none") -> NodePlan:
    return NodePlan(
        machine.uuid, machine.hostname, machine.role, machine.machine_set, action, mode=mode
    )


def commit(
    session: Session, caller: Caller, template: Template, result: Plan, box: SecretBox
) -> Cluster:
    """Store the plan: the cluster row, allocations, intended configs, releases."""
    assert result.secrets is not None
    name = template.spec.name
    cluster = session.get(Cluster, name)
    now = utcnow()
    if cluster is None:
        cluster = Cluster(
            name=name,
            template=template.text,
            secrets=box.seal(result.secrets.to_yaml().encode(), f"cluster {name} secrets"),
            endpoint=result.endpoint,
            status="applying",
            message="",
            bootstrapped=False,
            generation=1,
            drifted=0,
            created=now,
            updated=now,
        )
        session.add(cluster)
    else:
        cluster.template = template.text
        cluster.endpoint = result.endpoint
        cluster.status = "applying"
        cluster.message = ""
        cluster.generation += 1
        cluster.updated = now
    for node in result.nodes:
        machine = session.get(Machine, node.uuid)
        assert machine is not None
        if node.action == "release":
            machine.state = "releasing"
            continue
        if node.action == "allocate":
            machine.state = "allocated"
            machine.cluster = name
            machine.role = node.role
            machine.machine_set = node.machine_set
            machine.allocated = now
        config = result.configs[node.uuid]
        machine.intended = box.seal(config.encode(), f"machine {node.uuid} config")
        machine.intended_digest = digest(config)
    audit.record(
        session,
        caller.name,
        "cluster.apply",
        name,
        {
            "generation": cluster.generation,
            "allocate": [n.uuid for n in result.nodes if n.action == "allocate"],
            "release": [n.uuid for n in result.nodes if n.action == "release"],
            "changed": [n.uuid for n in result.nodes if n.changes],
        },
    )
    return cluster


def apply(
    session: Session,
    caller: Caller,
    template: Template,
    box: SecretBox,
    linked: Iterable[str],
    dry_run: bool = False,
) -> dict[str, Any]:
    """Plan ``template`` and, unless ``dry_run``, commit it; the plan as JSON. The
    caller's controller then carries the cluster to it."""
    plan_ = plan(session, template, box, list(linked))
    result = {**plan_.to_json(), "dry_run": dry_run}
    if dry_run:
        return result
    if plan_.changes:
        commit(session, caller, template, plan_, box)
    else:
        # The template is unchanged: the nodes are still brought back to it (drift),
        # and a cluster that failed half-way is carried on.
        row = get_cluster(session, template.spec.name)
        row.status, row.message = "applying", "checking nodes"
        audit.record(session, caller.name, "cluster.reconcile", row.name)
    return result


def get_cluster(session: Session, name: str) -> Cluster:
    cluster = session.get(Cluster, name)
    if cluster is None:
        raise NotFound(f"cluster {name} does not exist in this fleet")
    return cluster


def members(session: Session, name: str) -> list[Machine]:
    return list(
        session.execute(
            select(Machine).where(Machine.cluster == name).order_by(Machine.allocated)
        ).scalars()
    )


def cluster_info(
    cluster: Cluster, machines: Sequence[Machine], linked: Iterable[str]
) -> dict[str, Any]:
    linked = set(linked)
    template = parse_template(cluster.template, f"cluster {cluster.name}").spec
    return {
        "name": cluster.name,
        "endpoint": cluster.endpoint,
        "status": cluster.status,
        "message": cluster.message,
        "generation": cluster.generation,
        "bootstrapped": cluster.bootstrapped,
        "drifted": cluster.drifted,
        "controlplanes": template.control_plane.count,
        "workers": sum(w.count for w in template.workers),
        "nodes": [
            {
                "uuid": m.uuid,
                "hostname": m.hostname,
                "role": m.role,
                "set": m.machine_set,
                "state": m.state,
                "address": (m.inventory or {}).get("api_address", ""),
                "stage": (m.inventory or {}).get("stage", ""),
                "linked": m.uuid in linked,
            }
            for m in machines
        ],
    }


def client_config_yaml(
    cluster: Cluster, box: SecretBox, roles: Sequence[Role], endpoints: Sequence[str]
) -> str:
    """A basaltconfig for the cluster (a new client certificate with ``roles``)."""
    from basalt.machinery.client.config import ClientConfig, issue_client_context
    from basalt.machinery.pki import CertificateAndKey

    secrets = cluster_secrets(cluster, box)
    os_ca = CertificateAndKey(secrets.certs.os.crt, secrets.certs.os.key)
    context = issue_client_context(
        os_ca, endpoints=list(endpoints), roles=list(roles), common_name="basalt-fleet-export"
    )
    return ClientConfig(context=cluster.name, contexts={cluster.name: context}).to_yaml()


def node_roles(values: Sequence[str], where: str = "roles") -> list[Role]:
    """Node API roles by name; the first unknown one is named with its place."""
    roles = []
    for index, value in enumerate(values):
        try:
            roles.append(Role(value))
        except ValueError:
            known = ", ".join(r.value for r in Role)
            raise FleetError(
                f"{where}[{index}]: {value!r} is not a node API role ({known})"
            ) from None
    return roles


def basaltconfig(session: Session, name: str, box: SecretBox, roles: Sequence[Role]) -> str:
    """A client config for cluster ``name`` with a certificate of ``roles``, pointing
    at its control planes' API addresses."""
    row = get_cluster(session, name)
    endpoints = [
        str((m.inventory or {}).get("api_address", ""))
        for m in members(session, name)
        if m.role == CONTROLPLANE
    ]
    return client_config_yaml(row, box, roles, [e for e in endpoints if e])


def export_files(session: Session, cluster: Cluster, box: SecretBox) -> dict[str, str]:
    """Everything needed to manage the cluster without the fleet, by file name."""
    import shlex

    template = parse_template(cluster.template, f"cluster {cluster.name}")
    spec = template.spec
    secrets = cluster_secrets(cluster, box)
    files: dict[str, str] = {
        "cluster.yaml": cluster.template,
        "secrets.yaml": secrets.to_yaml(),
        "contract": spec.version_contract + "\n",
    }

    def write_patches(raw: list[Any], stem: str) -> list[str]:
        names = []
        for index, patch in enumerate(raw, 1):
            name = f"patches/{stem}-{index}.yaml"
            files[name] = patch_text(patch)
            names.append(name)
        return names

    cluster_patches = write_patches(spec.patches, "cluster")
    cp_patches = write_patches(spec.control_plane.patches, "controlplane")
    worker_patches = {w.name: write_patches(w.patches, f"workers-{w.name}") for w in spec.workers}
    machines = members(session, cluster.name)
    endpoints = [
        str((m.inventory or {}).get("api_address", "")) for m in machines if m.role == CONTROLPLANE
    ]
    files["basaltconfig"] = client_config_yaml(
        cluster, box, [Role.ADMIN], [e for e in endpoints if e]
    )
    lines = [
        "#!/bin/sh",
        "# Regenerates every node's config from these files with basaltctl gen config;",
        "# each result is byte for byte what the node runs (nodes.txt has their sha256).",
        "set -eu",
        'cd "$(dirname "$0")"',
        "mkdir -p configs",
    ]
    summary = []
    for machine in machines:
        if machine.state != "allocated":
            continue
        own = write_patches(
            spec.machines[machine.uuid].patches if machine.uuid in spec.machines else [],
            f"machine-{machine.uuid}",
        )
        role = machine.role
        args = [
            "basaltctl", "gen", "config", spec.name, cluster.endpoint,
            "--with-secrets", "secrets.yaml", "--version-contract", spec.version_contract,
        ]  # fmt: skip
        for name in cluster_patches:
            args += ["--config-patch", f"@{name}"]
        for name in cp_patches + (own if role == CONTROLPLANE else []):
            args += ["--config-patch-control-plane", f"@{name}"]
        for name in worker_patches.get(machine.machine_set, []) + (own if role == WORKER else []):
            args += ["--config-patch-worker", f"@{name}"]
        args += ["-t", role, "-o", f"configs/{machine.uuid}", "--force"]
        lines.append(" ".join(shlex.quote(a) for a in args))
        lines.append(
            f"mv configs/{machine.uuid}/{role}.yaml configs/{machine.hostname or machine.uuid}.yaml"
        )
        lines.append(f"rmdir configs/{machine.uuid}")
        summary.append(
            f"{machine.hostname or machine.uuid}\t{machine.uuid}\t{role}\t"
            f"{(machine.inventory or {}).get('api_address', '')}\t{machine.intended_digest}"
        )
    files["regenerate.sh"] = "\n".join(lines) + "\n"
    files["nodes.txt"] = "\n".join(summary) + "\n"
    return files


def running_bundle(text: str, where: str) -> ConfigBundle:
    return load_bundle(text, where)
