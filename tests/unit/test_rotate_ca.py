"""rotate-ca's pure parts: each node's phase from its config, the steps left, the config
each step gives a node; the ``acceptedCAs`` field; the identity check letting a rotation
step through and nothing else; the state file."""

from __future__ import annotations

import functools
import time
from typing import Any

import pytest

from basalt.machinery.config import bundle_from_raw, check_bundle
from basalt.machinery.config.diff import config_changes
from basalt.machinery.config.identity import IdentityChangeError, check_identity
from basalt.machinery.config.rotate import (
    NodePhase,
    RotationError,
    RotationState,
    Step,
    cross_sign,
    infer_rotation,
    machine_config_for,
    node_phase,
    nodes_for,
    steps_left,
)
from basalt.machinery.errors import ConfigValidationError
from basalt.machinery.pki import CertificateAndKey, generate_ca, issue_certificate
from tests.fakes import inputs

OLD, NEW, OTHER = "OLD-PEM", "NEW-PEM", "OTHER-PEM"


@pytest.mark.parametrize(
    ("ca", "accepted", "phase"),
    [
        (OLD, [], NodePhase.OLD),
        (OLD, [OTHER], NodePhase.OLD),
        (OLD, [NEW], NodePhase.TRUSTING),
        (OLD + "\n", [" " + NEW], NodePhase.TRUSTING),  # whitespace does not count
        (NEW, [OLD], NodePhase.ISSUED),
        (NEW, [OTHER, OLD], NodePhase.ISSUED),
        (NEW, [], NodePhase.DONE),
        (NEW, [OTHER], NodePhase.DONE),
        (OTHER, [OLD, NEW], None),  # neither: another rotation or another cluster
    ],
)
def test_node_phase(ca: str, accepted: list[str], phase: NodePhase | None) -> None:
    assert node_phase(ca, accepted, OLD, NEW) == phase


@pytest.mark.parametrize(
    ("phases", "left"),
    [
        ([NodePhase.OLD] * 4, [Step.TRUST, Step.ISSUE, Step.DROP]),
        ([NodePhase.OLD, NodePhase.TRUSTING], [Step.TRUST, Step.ISSUE, Step.DROP]),
        ([NodePhase.TRUSTING] * 2, [Step.ISSUE, Step.DROP]),
        ([NodePhase.TRUSTING, NodePhase.ISSUED], [Step.ISSUE, Step.DROP]),
        ([NodePhase.ISSUED, NodePhase.DONE], [Step.DROP]),
        ([NodePhase.DONE] * 3, []),
        ([], []),
    ],
)
def test_steps_left_start_from_the_least_advanced_node(
    phases: list[NodePhase], left: list[Step]
) -> None:
    assert steps_left({str(i): p for i, p in enumerate(phases)}) == left


def test_nodes_for_a_step_are_the_ones_behind_it_control_planes_first() -> None:
    phases = {
        "w1": NodePhase.TRUSTING,
        "cp2": NodePhase.TRUSTING,
        "cp1": NodePhase.ISSUED,  # done with this step already: left alone
        "cp3": NodePhase.TRUSTING,
    }
    types = {"w1": "worker", "cp1": "controlplane", "cp2": "controlplane", "cp3": "controlplane"}
    assert nodes_for(Step.ISSUE, phases, types) == ["cp2", "cp3", "w1"]
    assert nodes_for(Step.TRUST, phases, types) == []
    assert nodes_for(Step.DROP, phases, types) == ["cp1", "cp2", "cp3", "w1"]


@functools.cache
def cas() -> tuple[CertificateAndKey, CertificateAndKey]:
    """An old CA and a new one, valid from a later second (certificates count seconds)."""
    old = generate_ca("basalt-os-old")
    time.sleep(1.05)
    return old, generate_ca("basalt-os-new")


def _machine(documents: list[dict[str, Any]]) -> dict[str, Any]:
    return inputs.find(documents, "MachineConfig")


def _node_configs() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A control plane's and a worker's documents, running with the old CA."""
    old, _ = cas()
    cp, worker = inputs.controlplane_raw(), inputs.worker_raw()
    _machine(cp)["ca"] = {"crt": old.crt, "key": old.key}
    _machine(worker)["ca"] = {"crt": old.crt}
    return cp, worker


@functools.cache
def state() -> RotationState:
    old, new = cas()
    assert new.key is not None
    return RotationState(old.crt, new.crt, new.key, cross_crt=cross_sign(new.crt, old))


def _step(documents: list[dict[str, Any]], step: Step) -> list[dict[str, Any]]:
    return [
        machine_config_for(d, step, state()) if d["kind"] == "MachineConfig" else d
        for d in documents
    ]


def test_each_step_gives_the_config_of_its_phase_and_is_idempotent() -> None:
    old, new = cas()
    for start in _node_configs():
        is_cp = _machine(start)["type"] == "controlplane"
        documents = start
        for step in (Step.TRUST, Step.ISSUE, Step.DROP):
            before = documents
            documents = _step(documents, step)
            assert _step(documents, step) == documents  # again: the same config
            machine = _machine(documents)
            assert (
                node_phase(machine["ca"]["crt"], machine.get("acceptedCAs", []), old.crt, new.crt)
                == step.reaches
            )
            current = bundle_from_raw(before)
            nxt = bundle_from_raw(documents)
            check_bundle(nxt)  # a valid config: keys only where they belong
            # Every step applies live, and none is refused as an identity change.
            assert not [c for c in config_changes(current, nxt) if c.needs_reboot]
            assert check_identity(current, nxt, allow=False) is None
            assert ("crossSignedCA" in machine) is (step is Step.ISSUE)
        machine = _machine(documents)
        assert machine["ca"]["crt"].strip() == new.crt.strip()
        assert "acceptedCAs" not in machine
        assert ("key" in machine["ca"]) is is_cp
        if is_cp:
            assert machine["ca"]["key"].strip() == (new.key or "").strip()


def test_other_accepted_cas_stay() -> None:
    third = generate_ca("someone-else")
    cp, _ = _node_configs()
    _machine(cp)["acceptedCAs"] = [third.crt]
    for step in (Step.TRUST, Step.ISSUE, Step.DROP):
        cp = _step(cp, step)
        assert third.crt in _machine(cp)["acceptedCAs"]


def test_a_ca_change_without_the_rotation_steps_is_still_an_identity_change() -> None:
    cp, _ = _node_configs()
    current = bundle_from_raw(cp)
    # Straight to the new CA, never accepted before: refused, as before rotate-ca existed.
    switched = _step(cp, Step.ISSUE)
    with pytest.raises(IdentityChangeError, match="the OS API CA"):
        check_identity(current, bundle_from_raw(switched), allow=False)
    # Accepted first, but the old CA not kept accepted: refused too (old clients locked out).
    trusting = _step(cp, Step.TRUST)
    abrupt = [dict(d) for d in _step(trusting, Step.ISSUE)]
    _machine(abrupt).pop("acceptedCAs")
    with pytest.raises(IdentityChangeError):
        check_identity(bundle_from_raw(trusting), bundle_from_raw(abrupt), allow=False)


def _load(documents: list[dict[str, Any]]) -> str:
    with pytest.raises(ConfigValidationError) as caught:
        bundle_from_raw(documents, source="cp.yaml")
    return caught.value.render()


def test_accepted_cas_must_be_ca_certificates_only() -> None:
    old, _ = cas()
    leaf = issue_certificate(old, "a-leaf", client=True)
    cp, _ = _node_configs()
    cases = {
        "not a CA certificate": leaf.crt,
        "more than one PEM block": old.crt + (old.key or ""),
    }
    for message, value in cases.items():
        _machine(cp)["acceptedCAs"] = [value]
        rendered = _load(cp)
        assert "acceptedCAs" in rendered and message in rendered, rendered
        assert "PRIVATE KEY" not in rendered  # the key is never echoed
    _machine(cp)["acceptedCAs"] = ["not a certificate"]
    assert "acceptedCAs" in _load(cp)


def test_accepted_cas_warnings() -> None:
    old, _ = cas()
    cp, _ = _node_configs()
    _machine(cp)["acceptedCAs"] = [old.crt]
    warnings = check_bundle(bundle_from_raw(cp))
    assert any("is the OS CA itself" in w.render() for w in warnings)


def test_state_round_trip_and_a_bad_file() -> None:
    state = RotationState("old", "new", "key", "trust")
    assert RotationState.from_json(state.to_json(), "s.json") == state
    assert state.with_step(Step.ISSUE).step == "issue"
    with pytest.raises(RotationError, match=r"s\.json: not a rotate-ca state file"):
        RotationState.from_json('{"oldCA": 1}', "s.json")


def test_infer_rotation_without_a_state_file() -> None:
    old, new = cas()  # new was generated after old: the newer one
    third = generate_ca("someone-else")
    nothing: list[str] = []
    # Not rotating: every node on the secrets bundle's CA, accepting nothing else.
    assert infer_rotation({"a": (old.crt, nothing), "b": (old.crt, nothing)}, old.crt) is None
    # The secrets bundle has the new CA (issue step begun): old and new recovered, from
    # any mix of the phases that can follow.
    for views in (
        {"a": (old.crt, [new.crt]), "b": (old.crt, [new.crt])},  # issue not yet applied
        {"a": (new.crt, [old.crt]), "b": (old.crt, [new.crt])},
        {"a": (new.crt, [old.crt]), "b": (new.crt, [old.crt])},
        {"a": (new.crt, nothing), "b": (new.crt, [old.crt])},
    ):
        assert infer_rotation(views, new.crt) == (old.crt, new.crt), views
    # Stopped at trust: the secrets bundle still has the old CA, the new key is lost.
    with pytest.raises(RotationError, match="state file"):
        infer_rotation({"a": (old.crt, [new.crt])}, old.crt)
    # Another cluster's secrets, or three CAs at once.
    with pytest.raises(RotationError, match="does not match"):
        infer_rotation({"a": (old.crt, nothing)}, third.crt)
    with pytest.raises(RotationError):
        infer_rotation({"a": (new.crt, [old.crt, third.crt])}, new.crt)


def _verify_server(leaf: str, roots: list[str], intermediates: list[str]) -> None:
    from cryptography import x509
    from cryptography.x509.verification import PolicyBuilder, Store

    from basalt.machinery.pki import load_certificate

    store = Store([load_certificate(r) for r in roots])
    verifier = PolicyBuilder().store(store).build_server_verifier(x509.DNSName("node-1"))
    verifier.verify(load_certificate(leaf), [load_certificate(i) for i in intermediates])


def test_the_cross_signed_ca_lets_old_clients_verify_new_certificates() -> None:
    from cryptography.x509.verification import VerificationError

    old, new = cas()
    leaf = issue_certificate(new, "node-1", server=True, sans=["node-1"]).crt
    cross = state().cross_crt
    _verify_server(leaf, [old.crt], [cross])  # an untouched old client config
    _verify_server(leaf, [new.crt], [cross])  # a rotated one
    with pytest.raises(VerificationError):
        _verify_server(leaf, [old.crt], [])  # what a node without crossSignedCA serves


def test_cross_signed_ca_must_be_the_os_ca_itself() -> None:
    cp, _ = _node_configs()  # ca: the old CA
    _machine(cp)["crossSignedCA"] = state().cross_crt  # the new CA's subject and key
    assert "is not ca.crt signed by another CA" in _load_checked(cp)


def _load_checked(documents: list[dict[str, Any]]) -> str:
    with pytest.raises(ConfigValidationError) as caught:
        check_bundle(bundle_from_raw(documents, source="cp.yaml"))
    return caught.value.render()


# -- the node's TLS server through a rotation (real TLS on loopback) -------------------------

ADDRESS = "127.0.9.40"


def test_the_api_server_follows_the_trust_bundle_and_serves_the_cross_signed_chain() -> None:
    """machined's server credentials, as each rotation step leaves them: which client
    certificates get in and which clients verify the server, from the next connection on."""
    import asyncio

    import grpc
    import grpc.aio

    from basalt.machined.api.tls import mtls_credentials

    old, new = cas()
    serving: dict[str, Any] = {
        "cas": old.crt,
        "server": issue_certificate(old, "node-1", server=True, sans=[ADDRESS]),
    }
    old_client = issue_certificate(old, "admin", organizations=["os:admin"], client=True)
    new_client = issue_certificate(new, "admin", organizations=["os:admin"], client=True)

    def echo(request: bytes, context: Any) -> bytes:
        return request

    handler = grpc.method_handlers_generic_handler(
        "t.T", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}
    )

    async def scenario() -> list[bool]:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((handler,))
        credentials = mtls_credentials(lambda: (serving["cas"], serving["server"]))
        port = server.add_secure_port(f"{ADDRESS}:0", credentials)
        await server.start()

        async def gets_in(client: CertificateAndKey, root: str) -> bool:
            assert client.key is not None
            channel_credentials = grpc.ssl_channel_credentials(
                root.encode(), client.key.encode(), client.crt.encode()
            )
            async with grpc.aio.secure_channel(f"{ADDRESS}:{port}", channel_credentials) as ch:
                try:
                    await ch.unary_unary("/t.T/Echo", None, None)(b"hi", timeout=5)
                except grpc.aio.AioRpcError:
                    return False
                return True

        seen = []
        try:
            seen += [await gets_in(old_client, old.crt), await gets_in(new_client, old.crt)]
            serving["cas"] = old.crt + new.crt  # trust: the new CA is accepted too
            seen += [await gets_in(new_client, old.crt)]
            issued = issue_certificate(new, "node-1", server=True, sans=[ADDRESS])
            assert issued.key is not None
            chain = issued.crt + state().cross_crt  # issue: served with the cross-signed CA
            serving["server"] = CertificateAndKey(chain, issued.key)
            seen += [await gets_in(old_client, old.crt), await gets_in(new_client, new.crt)]
            serving["cas"] = new.crt  # drop
            seen += [await gets_in(old_client, old.crt), await gets_in(new_client, new.crt)]
        finally:
            await server.stop(None)
        return seen

    assert asyncio.run(asyncio.wait_for(scenario(), 30)) == [
        True,  # old client, old CA
        False,  # a new CA's client before the trust step
        True,  # ... and after it
        True,  # an untouched old client config verifies a new certificate (cross-signed)
        True,  # a rotated client trusting the new CA only
        False,  # the old client certificate after the drop step
        True,
    ]
