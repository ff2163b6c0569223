"""``basaltctl rotate-ca``: rotate the OS API CA of a running cluster, with no loss of access.

The steps and each node's place in them are :mod:`basalt.machinery.config.rotate`'s;
this module does the I/O around them: it reads every node's config through the API
before each step (refusing when a node does not answer), sends each node its next config
(ApplyConfiguration, no reboot), proves the node's new certificate by dialling it with
the new CA alone, and keeps the client config, the secrets bundle and a small state file
(``rotate-ca.state.json`` beside the secrets bundle, mode 0600: it holds the new CA's key
until the secrets bundle does) up to date. Run again after an interruption, it finishes.
"""

from __future__ import annotations

import sys
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ._api import EndpointsOption, split
from ._common import info, options, read_text

if TYPE_CHECKING:
    from basalt.machinery.client.client import Client
    from basalt.machinery.client.config import ClientConfig, Context
    from basalt.machinery.config import ConfigBundle
    from basalt.machinery.config.rotate import NodePhase, RotationState, Step
    from basalt.machinery.config.secrets import SecretsBundle

STATE_NAME = "rotate-ca.state.json"
#: Seconds to wait for a node to serve a certificate of the new CA.
ISSUE_TIMEOUT = 60.0


@dataclass
class NodeView:
    """One node as it reports itself: where to dial it, its type, its config."""

    address: str
    type: str
    bundle: ConfigBundle

    @property
    def ca(self) -> str:
        return self.bundle.machine.ca.crt

    @property
    def accepted(self) -> list[str]:
        return list(self.bundle.machine.accepted_cas)


@dataclass(frozen=True)
class Stop:
    """Where a test interrupts a run: after ``step``, or once ``nodes`` nodes of it changed."""

    step: Step
    nodes: int | None = None


class Stopped(Exception):
    """Raised at the injected stop (``--stop-after``)."""


@dataclass
class Run:
    """Everything one invocation works with."""

    config_path: Path
    client_config: ClientConfig
    context_name: str
    secrets_path: Path
    secrets: SecretsBundle
    state_path: Path
    endpoint: str
    targets: list[str]
    state: RotationState | None = None
    nodes: dict[str, NodeView] = field(default_factory=dict)
    stop: Stop | None = None

    @property
    def context(self) -> Context:
        return self.client_config.contexts[self.context_name]


def rotate_ca(
    ctx: typer.Context,
    secrets: Annotated[
        Path,
        typer.Option(
            "--secrets", help="The cluster's secrets bundle: read, and rewritten with the new CA."
        ),
    ],
    state: Annotated[
        Path | None,
        typer.Option("--state", help=f"State file (default: {STATE_NAME} beside --secrets)."),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the plan; change nothing.")
    ] = False,
    stop_after: Annotated[
        str | None, typer.Option("--stop-after", hidden=True, help="Tests: stop after a step.")
    ] = None,
    nodes: Annotated[
        list[str] | None,
        typer.Option(
            "-n",
            "--nodes",
            help="Nodes the rotation must include besides the members the endpoint lists "
            "(name any that may be down: one that does not answer stops the rotation).",
        ),
    ] = None,
    endpoints: EndpointsOption = None,
) -> None:
    """Rotate the OS API CA: nodes accept old and new, switch to the new one, then drop
    the old one; the client config and the secrets bundle follow. Re-run to resume."""
    import asyncio
    import os

    from basalt.machinery.config.rotate import RotationError, Step

    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    stop = None
    if stop_after is not None:
        name, _, count = stop_after.partition(":")
        if name not in {s.value for s in Step} or not (count or "0").isdigit():
            raise RotationError(
                f"--stop-after {stop_after!r}: expected STEP or STEP:NODES (trust, issue, drop)"
            )
        stop = Stop(Step(name), int(count) if count else None)
    run = _prepare(ctx, secrets, state, split(nodes), split(endpoints))
    if dry_run:
        asyncio.run(_mapped(run, _rotate(run, dry_run, stop)))
        return
    with _only_run(run):
        asyncio.run(_mapped(run, _rotate(run, dry_run, stop)))


async def _mapped(run: Run, work: Coroutine[Any, Any, None]) -> None:
    """``work``, with a failed call (the endpoint down, a refusal) as one clear error."""
    import grpc.aio

    from basalt.machinery.client.client import rpc_error

    try:
        await work
    except grpc.aio.AioRpcError as exc:
        error = rpc_error(exc, run.endpoint)
        error.hint = (error.hint + "; " if error.hint else "") + (
            "nothing more was changed; run rotate-ca again once the endpoint answers: it "
            "goes on from where it stopped"
        )
        raise error from None


@contextmanager
def _only_run(run: Run) -> Iterator[None]:
    """One rotate-ca at a time per secrets bundle: a lock beside the state file (the
    kernel releases it when the process ends, however it ends). The state file is read
    again once the lock is held: a run that just ended may have changed it."""
    import fcntl

    from basalt.machinery.config.rotate import RotationError, RotationState

    lock = run.state_path.with_name(run.state_path.name + ".lock")
    with open(lock, "a", encoding="utf-8") as file:
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RotationError(
                f"another rotate-ca is running with {run.secrets_path} ({lock} is locked)",
                hint="wait for it to finish; a rotation interrupted before is finished by "
                "running rotate-ca again once that one is gone",
            ) from None
        run.state = None
        if run.state_path.exists():
            text = read_text(run.state_path, "state file")
            run.state = RotationState.from_json(text, str(run.state_path))
        yield


def _prepare(
    ctx: typer.Context, secrets: Path, state: Path | None, nodes: list[str], endpoints: list[str]
) -> Run:
    from basalt.machinery.config.rotate import RotationError, RotationState
    from basalt.machinery.config.secrets import load_secrets
    from basalt.machinery.pki import certificate_organizations
    from basalt.machinery.roles import Role

    opts = options(ctx)
    client_config = opts.load_client_config()
    name, context = client_config.current(opts.context)
    roles = certificate_organizations(context.crt)
    if Role.ADMIN.value not in roles:
        raise RotationError(
            f"rotate-ca needs an {Role.ADMIN.value} client certificate; context {name!r} has "
            f"{', '.join(roles) or 'no roles'}",
            hint="run it with an admin's client config (--basaltconfig / --context)",
        )
    if str(secrets) == "-":
        raise RotationError(
            "--secrets - (standard input) cannot be used: rotate-ca writes the new CA back "
            "into the secrets bundle",
            hint="pass the secrets bundle's file",
        )
    bundle = load_secrets(read_text(secrets, "secrets bundle"), str(secrets))
    state_path = state or secrets.with_name(STATE_NAME)
    loaded = None
    if state_path.exists():
        loaded = RotationState.from_json(read_text(state_path, "state file"), str(state_path))
    endpoint = (endpoints or context.endpoints or [""])[0]
    if not endpoint:
        raise RotationError("no endpoint: pass -e/--endpoints or set one in the client config")
    return Run(
        opts.client_config_path,
        client_config,
        name,
        secrets,
        bundle,
        state_path,
        endpoint,
        nodes,
        loaded,
    )


# -- talking to nodes -------------------------------------------------------------------------


async def _connect(run: Run, endpoint: str | None = None, ca: str | None = None) -> Client:
    from basalt.machinery.client.client import Client

    context = run.context
    trusted = ca or _bundle(context.ca, *([run.state.new_crt] if run.state else []))
    return await Client.connect(
        endpoint or run.endpoint, ca=trusted, crt=context.crt, key=context.key
    )


def _bundle(*pems: str) -> str:
    return "".join(dict.fromkeys(p.strip() + "\n" for p in pems if p.strip()))


async def _members(client: Client) -> dict[str, tuple[str, str, str]]:
    """Member name -> (address, hostname, machine type), as the endpoint lists them."""
    import json

    from basalt.machinery.api import resource_pb2

    found: dict[str, tuple[str, str, str]] = {}
    stream = client.resources.List(resource_pb2.ResourceListRequest(type="Members"), timeout=15)
    async for item in stream:
        if item.metadata.error:
            continue
        spec = json.loads(item.resource.spec_json or "{}")
        addresses = spec.get("addresses") or []
        if addresses:
            member = (
                str(addresses[0]),
                str(spec.get("hostname", "")),
                spec.get("machine_type", ""),
            )
            found[item.resource.metadata.id] = member
    return found


async def _read_nodes(run: Run, client: Client, before: str) -> None:
    """Every node's config, or a refusal naming the one that did not answer."""
    import grpc.aio

    from basalt.machinery.config import load_bundle
    from basalt.machinery.config.rotate import RotationError
    from basalt.machinery.errors import BasaltError

    from ._api import NodeFailures
    from .edit import current_config

    members = await _members(client)
    by_name = {n: m for key, m in members.items() for n in (key, m[0], m[1])}
    # Every member, and every node named with -n: a node that has been down for longer
    # than the member list keeps it is no member any more, and naming it makes sure the
    # rotation waits for it instead of leaving it behind on the old CA.
    named = [by_name.get(t, (t, "", ""))[0] for t in run.targets]
    targets = sorted({m[0] for m in members.values()} | set(named))
    run.nodes = {}
    for address in targets:
        failures = NodeFailures()
        try:
            text = await current_config(client, failures, address)
        except grpc.aio.AioRpcError as exc:
            text, failures.count = None, 1
            detail = f"{exc.code().name}: {exc.details()}"
        else:
            detail = "see the error above"
        if text is None:
            raise RotationError(
                f"{address} did not answer ({detail}); nothing was changed" + before,
                hint="bring the node back (or remove it from the cluster), then run "
                "rotate-ca again: it goes on from where it stopped",
            )
        try:
            bundle = load_bundle(text, f"{address} machine config")
        except BasaltError as exc:
            raise RotationError(f"{address}: its config does not load: {exc.render()}") from None
        run.nodes[address] = NodeView(address, bundle.machine.type, bundle)


async def _apply(client: Client, node: NodeView, text: str, step: Step) -> None:
    from basalt.machinery.api import machine_pb2
    from basalt.machinery.config.rotate import RotationError

    request = machine_pb2.ApplyConfigurationRequest(
        data=text.encode(), mode=machine_pb2.ApplyMode.NO_REBOOT
    )
    answer = await client.machine.ApplyConfiguration(
        request, metadata=client.metadata([node.address]), timeout=60
    )
    for item in answer.messages:
        if item.metadata.error:
            raise RotationError(
                f"{node.address} refused the {step.value} step: {item.metadata.error}",
                hint="fix what it names, then run rotate-ca again: it goes on from there",
            )
    info(f"{node.address}: {step.value}: applied without a reboot")


async def _new_certificate_problem(run: Run, node: NodeView, new_crt: str) -> str:
    """Why ``node`` does not answer when dialled directly with the new CA as the only
    root ("" when it does: it serves a certificate of the new CA)."""
    import grpc.aio

    from basalt.machinery.api import common_pb2

    client = await _connect(run, node.address, ca=new_crt)
    try:
        await client.machine.Version(common_pb2.Empty(), timeout=5)
    except grpc.aio.AioRpcError as exc:
        return f"{exc.code().name}: {exc.details()}"
    finally:
        await client.close()
    return ""


async def _wait_issued(run: Run, node: NodeView, new_crt: str) -> None:
    import asyncio
    import time

    from basalt.machinery.config.rotate import RotationError

    deadline = time.monotonic() + ISSUE_TIMEOUT
    while problem := await _new_certificate_problem(run, node, new_crt):
        if time.monotonic() > deadline:
            raise RotationError(
                f"{node.address} does not answer with a certificate of the new CA after "
                f"{ISSUE_TIMEOUT:.0f}s (last: {problem}); the old CA stays accepted "
                "everywhere",
                hint="rotate-ca dials every node directly (port 50000) to check; if this "
                "machine can reach it, look at 'basaltctl events -n NODE' (certificate); "
                "then run rotate-ca again",
            )
        await asyncio.sleep(0.5)


# -- the run ----------------------------------------------------------------------------------


def _phases(run: Run, state: RotationState) -> dict[str, NodePhase]:
    from basalt.machinery.config.rotate import RotationError, fingerprint, node_phase

    phases = {}
    for address, node in run.nodes.items():
        phase = node_phase(node.ca, node.accepted, state.old_crt, state.new_crt)
        if phase is None:
            raise RotationError(
                f"{address} runs with OS CA {fingerprint(node.ca)}, neither this rotation's "
                f"old CA ({fingerprint(state.old_crt)}) nor its new one "
                f"({fingerprint(state.new_crt)}); nothing was changed",
                hint=f"is it another cluster's node? If {run.state_path} is from an older "
                "rotation, move it away",
            )
        phases[address] = phase
    return phases


def _begin(run: Run, dry_run: bool) -> RotationState:
    """The rotation's old and new CA: from the state file, else from the nodes and the
    secrets bundle (a new CA when the cluster is not rotating yet)."""
    from basalt.machinery.config.rotate import (
        RotationError,
        RotationState,
        fingerprint,
        new_rotation,
        same_pem,
    )

    os_ca = run.secrets.certs.os
    state = run.state or _recovered(run)
    if state is None:
        if dry_run:  # no new CA yet: the plan says one is generated
            return RotationState(os_ca.crt, "", "")
        state = new_rotation(os_ca.crt, os_ca.key)
    if not (same_pem(os_ca.crt, state.old_crt) or same_pem(os_ca.crt, state.new_crt)):
        raise RotationError(
            f"the secrets bundle {run.secrets_path} does not match the cluster: its OS CA "
            f"({fingerprint(os_ca.crt)}) is neither the old ({fingerprint(state.old_crt)}) "
            f"nor the new ({fingerprint(state.new_crt)}) CA of this rotation",
            hint="pass this cluster's secrets bundle with --secrets",
        )
    return state


def _recovered(run: Run) -> RotationState | None:
    """Without a state file: the rotation the nodes are in (None: they are in none)."""
    from basalt.machinery.config.rotate import (
        RotationError,
        RotationState,
        fingerprint,
        infer_rotation,
    )

    os_ca = run.secrets.certs.os
    views = {a: (n.ca, n.accepted) for a, n in run.nodes.items()}
    try:
        found = infer_rotation(views, os_ca.crt)
    except RotationError as exc:
        in_use = {fingerprint(n.ca) for n in run.nodes.values()}
        raise RotationError(
            f"{exc.message} (secrets bundle {run.secrets_path}: "
            f"{fingerprint(os_ca.crt)}; the nodes' CA: {', '.join(sorted(in_use))})",
            hint=exc.hint,
        ) from None
    if found is None:
        return None
    if not os_ca.key:
        raise RotationError(
            f"the secrets bundle {run.secrets_path} holds no key for its OS CA",
            hint="pass the full secrets bundle (the one 'gen secrets' wrote)",
        )
    crosses = [n.bundle.machine.cross_signed_ca for n in run.nodes.values()]
    cross = next((c for c in crosses if c), "")
    info(f"no state file: going on with the rotation to {fingerprint(found[1])}")
    return RotationState(found[0], found[1], os_ca.key, cross_crt=cross)


def _save_state(run: Run, state: RotationState) -> None:
    from basalt.machinery.fileio import write_atomic

    write_atomic(run.state_path, state.to_json(), mode=0o600)
    run.state = state


async def _rotate(run: Run, dry_run: bool, stop: Stop | None) -> None:
    from basalt.machinery.config.rotate import NodePhase, Step, fingerprint, steps_left

    client = await _connect(run)
    try:
        await _read_nodes(run, client, "")
    finally:
        await client.close()
    state = _begin(run, dry_run)
    # A dry run on a cluster that is not rotating yet has no new CA to compare with.
    fresh = dict.fromkeys(run.nodes, NodePhase.OLD)
    phases = _phases(run, state) if state.new_crt else fresh
    todo = steps_left(phases)
    if dry_run:
        _print_plan(run, state, phases, todo)
        return
    if run.state is None:
        _save_state(run, state)
        info(f"new OS CA {fingerprint(state.new_crt)}; state kept in {run.state_path}")
    run.stop = stop
    try:
        for step in todo:
            if stop is not None and stop.nodes is None and step.reaches > stop.step.reaches:
                raise Stopped(f"the {stop.step.value} step")
            await _run_step(run, step)
        if stop is not None and stop.nodes is None and stop.step is Step.DROP:
            raise Stopped("the drop step")
    except Stopped as where:
        info(f"stopped after {where} (--stop-after); run again to go on")
        return
    await _finish(run)


async def _run_step(run: Run, step: Step) -> None:
    """One step on every node that has not reached it, after checking every node answers."""
    from basalt.machinery.config.rotate import Step, next_config, nodes_for

    state = run.state
    assert state is not None
    if step is Step.DROP:
        _ensure_client_certificate(run, state)
    client = await _connect(run)
    try:
        await _read_nodes(run, client, f" in the {step.value} step")
        phases = _phases(run, state)
        if step is Step.ISSUE:
            _write_secrets(run, state)
        types = {a: n.type for a, n in run.nodes.items()}
        info(f"step {step.value}: {step.summary}")
        for done, address in enumerate(nodes_for(step, phases, types), start=1):
            node = run.nodes[address]
            source = f"{address} machine config ({step.value})"
            await _apply(client, node, next_config(node.bundle, step, state, source), step)
            if step is Step.ISSUE:
                await _wait_issued(run, node, state.new_crt)
            if run.stop is not None and run.stop.step is step and run.stop.nodes == done:
                raise Stopped(f"{done} node(s) of the {step.value} step")
        if step is Step.DROP:
            for node in run.nodes.values():  # every node proves its new certificate first
                await _wait_issued(run, node, state.new_crt)
    finally:
        await client.close()
    if step is Step.TRUST:
        _update_client(run, ca=_bundle(state.old_crt, state.new_crt))
    elif step is Step.ISSUE:
        _ensure_client_certificate(run, state)
    _save_state(run, state.with_step(step))


async def _finish(run: Run) -> None:
    """The client config trusts the new CA only; the state file goes."""
    from basalt.machinery.config.rotate import fingerprint

    state = run.state
    assert state is not None
    _ensure_client_certificate(run, state)
    _update_client(run, ca=_bundle(state.new_crt))
    run.state_path.unlink(missing_ok=True)
    info(
        f"rotated: every node uses OS CA {fingerprint(state.new_crt)} and accepts no other; "
        f"{run.config_path} (context {run.context_name}) and {run.secrets_path} hold it"
    )


# -- local files ------------------------------------------------------------------------------


def _update_client(run: Run, *, ca: str | None = None, crt: str = "", key: str = "") -> None:
    from basalt.machinery.client.config import save_client_config

    context = run.context
    if ca is not None:
        context.ca = ca
    if crt and key:
        context.crt, context.key = crt, key
    save_client_config(run.client_config, run.config_path)


def _ensure_client_certificate(run: Run, state: RotationState) -> None:
    """The context's client certificate is one of the new CA (same name and roles)."""
    from cryptography.x509.oid import NameOID

    from basalt.machinery.client.config import issue_client_context
    from basalt.machinery.pki import (
        CertificateAndKey,
        certificate_organizations,
        load_certificate,
        verify_issued_by,
    )
    from basalt.machinery.roles import Role

    context = run.context
    if verify_issued_by(context.crt, state.new_crt):
        return
    names = load_certificate(context.crt).subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    known = {r.value: r for r in Role}
    roles = [known[o] for o in certificate_organizations(context.crt) if o in known]
    issued = issue_client_context(
        CertificateAndKey(state.new_crt, state.new_key),
        endpoints=context.endpoints,
        roles=roles,
        common_name=str(names[0].value) if names else "basaltctl",
    )
    _update_client(run, ca=_bundle(state.old_crt, state.new_crt), crt=issued.crt, key=issued.key)
    info(f"{run.config_path}: context {run.context_name} has a client certificate of the new CA")


def _write_secrets(run: Run, state: RotationState) -> None:
    """The secrets bundle's OS CA becomes the new one (before any node uses it)."""
    from basalt.machinery.config.machine import CertificateAndKey
    from basalt.machinery.config.rotate import same_pem
    from basalt.machinery.fileio import write_atomic

    if same_pem(run.secrets.certs.os.crt, state.new_crt):
        return
    run.secrets.certs.os = CertificateAndKey.model_validate(
        {"crt": state.new_crt, "key": state.new_key}
    )
    write_atomic(run.secrets_path, run.secrets.to_yaml(), mode=0o600)
    info(f"{run.secrets_path}: the OS CA is now the new one")


def _print_plan(
    run: Run, state: RotationState, phases: dict[str, NodePhase], todo: list[Step]
) -> None:
    from basalt.machinery.config.rotate import fingerprint, nodes_for

    new = fingerprint(state.new_crt) if state.new_crt else "a new CA, generated when run"
    lines = [
        "rotate-ca plan (dry run, nothing changed)",
        f"  old OS CA: {fingerprint(state.old_crt)}",
        f"  new OS CA: {new}",
        *(f"  {a} ({run.nodes[a].type}): {p.label}" for a, p in sorted(phases.items())),
    ]
    types = {a: n.type for a, n in run.nodes.items()}
    for step in todo:
        lines.append(f"step {step.value}: {step.summary}")
        lines.append(f"  nodes: {', '.join(nodes_for(step, phases, types)) or 'none left'}")
    lines.append(
        f"then: {run.config_path} (context {run.context_name}) trusts only the new CA; "
        f"{run.secrets_path} holds it (written at the issue step)"
    )
    sys.stdout.write("\n".join(lines) + "\n")
