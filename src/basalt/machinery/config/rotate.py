"""Rotating the OS API CA without locking anyone out: the phases, where each node is in
them, and the config each step gives a node.

Three steps take a cluster from its old CA to a new one (``basaltctl rotate-ca``):

``trust``
    every node accepts the new CA for client and peer certificates too
    (``MachineConfig.acceptedCAs`` gets it);
``issue``
    every node's ``ca`` becomes the new CA (control planes get its key) and the old one
    moves to ``acceptedCAs``: nodes issue their certificates again from the new CA,
    clients with old certificates still get in; the client config gets a new one;
``drop``
    the old CA leaves ``acceptedCAs``: only certificates of the new CA get in.

A node's place is read from its own config (:func:`node_phase`), never remembered, so
a rotation interrupted anywhere is finished by running the same steps again: a step
changes only the nodes that have not reached it. This module is pure: no I/O.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum, StrEnum
from typing import TYPE_CHECKING, Any

from ..errors import BasaltError
from ..pki import CertificateAndKey

if TYPE_CHECKING:
    from .bundle import ConfigBundle


class RotationError(BasaltError):
    """The cluster is not in a state a rotation can go on from (nothing was changed)."""


class NodePhase(IntEnum):
    """Where one node is, from the old CA (``OLD``) to the new one (``DONE``)."""

    OLD = 0  #: ca = old; the new CA is not accepted
    TRUSTING = 1  #: ca = old; the new CA is accepted
    ISSUED = 2  #: ca = new; the old CA is still accepted
    DONE = 3  #: ca = new; the old CA is no longer accepted

    @property
    def label(self) -> str:
        return self.name.lower()


class Step(StrEnum):
    TRUST = "trust"
    ISSUE = "issue"
    DROP = "drop"

    @property
    def reaches(self) -> NodePhase:
        """The phase every node is in once this step is done."""
        return {Step.TRUST: NodePhase.TRUSTING, Step.ISSUE: NodePhase.ISSUED}.get(
            self, NodePhase.DONE
        )

    @property
    def summary(self) -> str:
        return {
            Step.TRUST: "every node accepts the new CA besides the old one",
            Step.ISSUE: "every node switches to the new CA and issues its certificates "
            "again (control planes first); the client config gets a certificate of the "
            "new CA; the old CA stays accepted",
            Step.DROP: "every node stops accepting the old CA; so does the client config",
        }[self]


STEPS: tuple[Step, ...] = (Step.TRUST, Step.ISSUE, Step.DROP)


def same_pem(a: str, b: str) -> bool:
    return a.strip() == b.strip()


def _pem(text: str) -> str:
    return text.strip() + "\n"


def node_phase(ca: str, accepted: Sequence[str], old: str, new: str) -> NodePhase | None:
    """The node's phase from its config's ``ca.crt`` and ``acceptedCAs``; None when its
    CA is neither ``old`` nor ``new`` (a node of another rotation, or of another cluster)."""
    accepts_new = any(same_pem(new, a) for a in accepted)
    accepts_old = any(same_pem(old, a) for a in accepted)
    if same_pem(ca, old):
        return NodePhase.TRUSTING if accepts_new else NodePhase.OLD
    if same_pem(ca, new):
        return NodePhase.ISSUED if accepts_old else NodePhase.DONE
    return None


def steps_left(phases: Mapping[str, NodePhase]) -> list[Step]:
    """The steps still to run: from the step the least advanced node needs."""
    lowest = min(phases.values(), default=NodePhase.DONE)
    return [s for s in STEPS if s.reaches > lowest]


def nodes_for(step: Step, phases: Mapping[str, NodePhase], types: Mapping[str, str]) -> list[str]:
    """The nodes ``step`` changes, in order: control planes before workers (a worker
    asks a control plane for its certificate, which must sign with the new CA by then)."""
    todo = [n for n, p in phases.items() if p < step.reaches]
    return sorted(todo, key=lambda n: (types.get(n) != "controlplane", n))


def machine_config_for(raw: Mapping[str, Any], step: Step, state: RotationState) -> dict[str, Any]:
    """The MachineConfig document (as data) after ``step``, from the node's current one.

    Other entries of ``acceptedCAs`` stay; only control planes get the new CA's key; the
    new CA cross-signed by the old one (``crossSignedCA``) is served from the issue step
    until the drop step, when the state has it.
    """
    old_crt, new_crt, new_key = state.old_crt, state.new_crt, state.new_key
    document: dict[str, Any] = json.loads(json.dumps(raw))  # a deep copy of plain data
    accepted = [a for a in document.get("acceptedCAs", []) if not same_pem(a, new_crt)]
    accepted = [a for a in accepted if not same_pem(a, old_crt)]
    if step is Step.TRUST:
        accepted.append(_pem(new_crt))
    elif step is Step.ISSUE:
        ca: dict[str, str] = {"crt": _pem(new_crt)}
        if document.get("type") == "controlplane":
            ca["key"] = _pem(new_key)
        document["ca"] = ca
        accepted.append(_pem(old_crt))
        if state.cross_crt:
            document["crossSignedCA"] = _pem(state.cross_crt)
    elif step is Step.DROP:
        document.pop("crossSignedCA", None)
    if accepted:
        document["acceptedCAs"] = accepted
    else:
        document.pop("acceptedCAs", None)
    return document


def _issued_at(pem: str) -> Any:
    from ..pki import load_certificate

    return load_certificate(pem).not_valid_before_utc


def infer_rotation(
    nodes: Mapping[str, tuple[str, Sequence[str]]], secrets_crt: str
) -> tuple[str, str] | None:
    """Without a state file: ``(old, new)`` of the rotation the nodes are in, or None when
    they are in none (every node runs with the secrets bundle's CA and accepts no other).

    ``nodes``: each node's ``ca.crt`` and ``acceptedCAs``. The secrets bundle holds the new
    CA from the issue step on, so it must be the newer of exactly two CAs in use; else
    (a rotation stopped at its trust step, whose new key only the state file had; or CAs
    of something else) :class:`RotationError`.
    """
    in_use = {c.strip(): c for ca, accepted in nodes.values() for c in (ca, *accepted)}
    if set(in_use) == {secrets_crt.strip()}:
        return None
    if secrets_crt.strip() not in in_use:
        raise RotationError(
            "the secrets bundle does not match the cluster: its OS CA is none of the CAs "
            "the nodes use or accept",
            hint="pass this cluster's secrets bundle with --secrets",
        )
    others = [c for key, c in in_use.items() if key != secrets_crt.strip()]
    newer = all(_issued_at(secrets_crt) > _issued_at(c) for c in others)
    if len(others) != 1 or not newer:
        raise RotationError(
            "the nodes accept another OS CA besides the secrets bundle's: a rotation stopped "
            "before its issue step (or another CA was added by hand), and without its state "
            "file the new CA's key is unknown",
            hint="restore rotate-ca.state.json (or pass it with --state); to abandon that "
            "rotation, remove the extra acceptedCAs entry on every node with 'basaltctl "
            "patch machineconfig', then run rotate-ca again",
        )
    return others[0], secrets_crt


@dataclass(frozen=True)
class RotationState:
    """What a rotation must not forget between runs: the old CA certificate and the new
    CA (with its key). Kept beside the secrets bundle, readable by its owner only."""

    old_crt: str
    new_crt: str
    new_key: str
    step: str = ""  #: the last step finished (informative; nodes' configs decide)
    #: The new CA signed by the old one (nodes serve it until the drop step); "" if unknown.
    cross_crt: str = ""

    def to_json(self) -> str:
        data = {
            "version": 1,
            "oldCA": self.old_crt,
            "newCA": {"crt": self.new_crt, "key": self.new_key},
            "crossSignedCA": self.cross_crt,
            "step": self.step,
        }
        return json.dumps(data, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str) -> RotationState:
        try:
            data = json.loads(text)
            state = cls(
                str(data["oldCA"]),
                str(data["newCA"]["crt"]),
                str(data["newCA"]["key"]),
                str(data.get("step", "")),
                str(data.get("crossSignedCA", "")),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise RotationError(
                f"{source}: not a rotate-ca state file ({type(exc).__name__}: {exc})",
                hint="restore it from a backup; without it an unfinished rotation cannot "
                "be finished, because the new CA's key is only there",
            ) from None
        return state

    def with_step(self, step: Step) -> RotationState:
        return dataclasses.replace(self, step=step.value)


def cross_sign(new_crt: str, old: CertificateAndKey) -> str:
    """``new_crt`` (a CA) signed by the ``old`` CA: same subject, key and constraints, the
    old CA as issuer, valid while both are. A client that trusts only the old CA verifies
    a certificate of the new one through it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    from ..pki import load_certificate, load_private_key

    assert old.key is not None
    new, issuer = load_certificate(new_crt), load_certificate(old.crt)
    builder = (
        x509.CertificateBuilder()
        .subject_name(new.subject)
        .issuer_name(issuer.subject)
        .public_key(new.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(new.not_valid_before_utc)
        .not_valid_after(min(new.not_valid_after_utc, issuer.not_valid_after_utc))
    )
    for extension in new.extensions:
        builder = builder.add_extension(extension.value, extension.critical)
    cert = builder.sign(load_private_key(old.key), hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def new_rotation(old_crt: str, old_key: str | None) -> RotationState:
    """A rotation from ``old_crt`` to a CA generated now; cross-signed when the old key
    is at hand (clients that trust only the old CA verify nodes through it)."""
    import datetime as dt

    from ..pki import generate_ca

    # A subject of its own: TLS stacks pick an issuer by name, and one name for both
    # CAs of a trust bundle would fail every certificate of the other one.
    pair = generate_ca(f"basalt-os-{dt.datetime.now(dt.UTC):%Y%m%d%H%M%S}")
    assert pair.key is not None
    cross = cross_sign(pair.crt, CertificateAndKey(old_crt, old_key)) if old_key else ""
    return RotationState(old_crt, pair.crt, pair.key, cross_crt=cross)


def next_config(bundle: ConfigBundle, step: Step, state: RotationState, source: str) -> str:
    """The node's whole config (YAML) after ``step``, validated."""
    from .bundle import bundle_from_raw

    documents = [
        machine_config_for(d, step, state) if d.get("kind") == "MachineConfig" else d
        for d in bundle.to_raw()
    ]
    return bundle_from_raw(documents, source).to_yaml()


def fingerprint(pem: str) -> str:
    """A short name for a certificate: ``sha256:`` and 16 hex digits of its DER form."""
    import hashlib

    from cryptography.hazmat.primitives import serialization

    from ..pki import load_certificate

    der = load_certificate(pem).public_bytes(serialization.Encoding.DER)
    return "sha256:" + hashlib.sha256(der).hexdigest()[:16]
