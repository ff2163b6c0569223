"""Discovery's keys, sealing and proofs (basalt.machinery.discovery.crypto)."""

from __future__ import annotations

import base64
import hashlib

import pytest

from basalt.machinery.discovery import Affiliate, ClusterKeys, DiscoveryDataError
from basalt.machinery.discovery.client import parse_target
from basalt.machinery.discovery.crypto import (
    EMPTY_DIGEST,
    NonceCache,
    Proof,
    ProofRefused,
    check_affiliate_id,
    update_digest,
    verify_proof,
    wire_id_of,
)
from basalt.machinery.discovery.errors import (
    DiscoveryLimitError,
    DiscoveryRequestError,
    DiscoveryTargetError,
)

CLUSTER_ID = bytes(range(32))
SECRET = bytes(range(32, 64))
NOW = 1_700_000_000


@pytest.fixture(scope="module")
def keys() -> ClusterKeys:
    return ClusterKeys.from_secret(CLUSTER_ID, SECRET)


def test_derivation_is_stable(keys: ClusterKeys) -> None:
    again = ClusterKeys.from_config(
        base64.b64encode(CLUSTER_ID).decode(), base64.b64encode(SECRET).decode()
    )
    assert again.wire_id == keys.wire_id
    assert again.public_key == keys.public_key
    assert keys.wire_id == wire_id_of(keys.public_key)
    # Pinned: a change to the derivation would split every running cluster's view.
    assert keys.wire_id == "238d6bf90b967d4743f6382de9c1805eed8bd310c75fd0b0447ca70d709f70a8"


def test_wire_id_reveals_neither_id_nor_secret(keys: ClusterKeys) -> None:
    assert keys.wire_id != CLUSTER_ID.hex()
    assert keys.wire_id != hashlib.sha256(CLUSTER_ID).hexdigest()
    assert CLUSTER_ID.hex() not in repr(keys) and SECRET.hex() not in repr(keys)
    assert "public_key" not in repr(keys)


def test_another_secret_gives_other_keys(keys: ClusterKeys) -> None:
    other = ClusterKeys.from_secret(CLUSTER_ID, bytes(32))
    assert other.wire_id != keys.wire_id
    sealed = keys.seal_data("a", b"hello")
    with pytest.raises(DiscoveryDataError):
        other.open_data("a", sealed)
    with pytest.raises(DiscoveryDataError):
        other.open_endpoint(keys.seal_endpoint("10.0.0.1"))


def test_bad_base64_is_a_clear_error() -> None:
    with pytest.raises(DiscoveryDataError, match="base64"):
        ClusterKeys.from_config("not base64!", "x")


def test_data_round_trip_and_fresh_nonce(keys: ClusterKeys) -> None:
    one, two = keys.seal_data("node-1", b"payload"), keys.seal_data("node-1", b"payload")
    assert one != two
    assert keys.open_data("node-1", one) == b"payload" == keys.open_data("node-1", two)


@pytest.mark.parametrize("where", [0, 1, 13, -1])
def test_gcm_tamper_refused(keys: ClusterKeys, where: int) -> None:
    sealed = bytearray(keys.seal_data("node-1", b"payload"))
    sealed[where] ^= 0x01
    with pytest.raises(DiscoveryDataError, match="node-1"):
        keys.open_data("node-1", bytes(sealed))


def test_data_bound_to_affiliate(keys: ClusterKeys) -> None:
    sealed = keys.seal_data("node-1", b"payload")
    with pytest.raises(DiscoveryDataError, match="another affiliate"):
        keys.open_data("node-2", sealed)
    with pytest.raises(DiscoveryDataError, match="too short"):
        keys.open_data("node-1", b"\x01abc")


def test_siv_deterministic_and_tamper_refused(keys: ClusterKeys) -> None:
    a = keys.seal_endpoint("10.0.0.1")
    assert a == keys.seal_endpoint("10.0.0.1")
    assert a != keys.seal_endpoint("10.0.0.2")
    assert keys.open_endpoint(a) == "10.0.0.1"
    bad = bytearray(a)
    bad[-1] ^= 0x80
    with pytest.raises(DiscoveryDataError, match="endpoint"):
        keys.open_endpoint(bytes(bad))


def test_affiliate_json_round_trip(keys: ClusterKeys) -> None:
    affiliate = Affiliate(
        node_id="n1",
        hostname="cp-1",
        machine_type="controlplane",
        addresses=("10.0.0.1", "fd00::1"),
        version="0.1.0",
        etcd_peer_url="https://10.0.0.1:2380",
    )
    raw = keys.open_data("a", keys.seal_data("a", affiliate.to_json()))
    assert Affiliate.from_json(raw) == affiliate
    newer = Affiliate.from_json(b'{"node_id":"n","future":1}')
    assert newer.extra == {"future": 1}
    assert b'"future":1' in newer.to_json()
    with pytest.raises(DiscoveryDataError, match="addresses"):
        Affiliate.from_json(b'{"addresses":"10.0.0.1"}')


# -- proofs -----------------------------------------------------------------------------------


def _verify(proof: Proof, keys: ClusterKeys, **over: object) -> None:
    args: dict[str, object] = {
        "method": "List",
        "cluster_id": keys.wire_id,
        "affiliate_id": "",
        "digest": EMPTY_DIGEST,
        "now": NOW,
    }
    args.update(over)
    verify_proof(proof, **args)  # type: ignore[arg-type]


def test_proof_verifies(keys: ClusterKeys) -> None:
    _verify(keys.proof("List", now=NOW), keys)
    digest = update_digest(b"data", [b"e1"], 60)
    proof = keys.proof("AffiliateUpdate", "node-1", digest, now=NOW)
    _verify(proof, keys, method="AffiliateUpdate", affiliate_id="node-1", digest=digest)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"method": "Watch"}, "signature"),
        ({"affiliate_id": "node-2"}, "signature"),
        ({"digest": update_digest(b"other", [], 60)}, "signature"),
        ({"now": NOW + 301}, "stale"),
        ({"now": NOW - 301}, "stale"),
        ({"cluster_id": "0" * 64}, "key"),
    ],
)
def test_proof_refused(keys: ClusterKeys, change: dict[str, object], reason: str) -> None:
    with pytest.raises(ProofRefused) as caught:
        _verify(keys.proof("List", now=NOW), keys, **change)
    assert caught.value.reason == reason


def test_proof_with_wrong_key_refused(keys: ClusterKeys) -> None:
    stranger = ClusterKeys.from_secret(CLUSTER_ID, bytes(32))
    # The stranger's own key does not match the cluster's wire id ...
    with pytest.raises(ProofRefused) as caught:
        _verify(stranger.proof("List", now=NOW), keys)
    assert caught.value.reason == "key"
    # ... and presenting the cluster's public key with the stranger's signature fails.
    forged = stranger.proof("List", now=NOW)
    forged = Proof(keys.public_key, forged.timestamp, forged.nonce, forged.signature)
    with pytest.raises(ProofRefused) as caught:
        _verify(forged, keys)
    assert caught.value.reason == "signature"


def test_malformed_proof_refused(keys: ClusterKeys) -> None:
    proof = keys.proof("List", now=NOW)
    with pytest.raises(ProofRefused) as caught:
        _verify(Proof(proof.public_key, proof.timestamp, b"short", proof.signature), keys)
    assert caught.value.reason == "malformed"


def test_replayed_nonce_refused(keys: ClusterKeys) -> None:
    cache = NonceCache(capacity=3)
    proof = keys.proof("List", now=NOW)
    cache.check(keys.wire_id, proof, NOW)
    with pytest.raises(ProofRefused) as caught:
        cache.check(keys.wire_id, proof, NOW + 10)
    assert caught.value.reason == "replay"
    # Another cluster's use of the same nonce is its own business.
    cache.check("f" * 64, proof, NOW)
    cache.check(keys.wire_id, keys.proof("List", now=NOW), NOW)
    assert len(cache) == 3
    with pytest.raises(DiscoveryLimitError, match="replay cache is full"):
        cache.check(keys.wire_id, keys.proof("List", now=NOW), NOW)
    # Once the window has passed, nonces are forgotten (the timestamp check refuses them).
    cache.check(keys.wire_id, keys.proof("List", now=NOW + 400), NOW + 400)
    assert len(cache) == 1


def test_affiliate_id_limits() -> None:
    check_affiliate_id("x" * 64)
    for bad in ("", "x" * 65, "a\nb"):
        with pytest.raises(DiscoveryRequestError):
            check_affiliate_id(bad)


def test_targets() -> None:
    assert str(parse_target("grpc://127.0.0.1:3000")) == "grpc://127.0.0.1:3000"
    target = parse_target("grpcs://[fd00::1]:443/")
    assert target.tls and target.host == "fd00::1" and target.address == "[fd00::1]:443"
    for bad in ("https://x:1", "grpc://x", "grpc://x:0", "grpc://x:99999", "grpc://a b:1"):
        with pytest.raises(DiscoveryTargetError):
            parse_target(bad)
