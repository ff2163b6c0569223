"""Discovery on the node: DiscoveryConfig, the discovery controller (publish, refresh,
watch -> Affiliates, removal, errors), Members from affiliates, etcd peers from them.

The service is :mod:`tests.fakes.discovery`: in memory, but with the real cluster keys,
TTLs on its own clock and watches that break when it goes down.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from basalt.machined.assemble import build_node
from basalt.machined.controllers import discovery as controller_module
from basalt.machined.controllers.discovery import (
    BACKOFF_START,
    DiscoveryController,
    affiliate_id_of,
    backoff_cap,
    next_backoff,
    refresh_delay,
)
from basalt.machined.controllers.members import (
    MembersController,
    member_specs,
    publish_members,
)
from basalt.machined.etcd.manager import EtcdManager, discovered_peers
from basalt.machined.node import Node, Tuning
from basalt.machined.platform import UNSPECIFIED_ADDRESS, NodePaths, Platform, PlatformMode
from basalt.machinery.api import trust_pb2
from basalt.machinery.config import ClusterConfig, load_bundle
from basalt.machinery.config.diff import needs_reboot
from basalt.machinery.discovery.crypto import ClusterKeys
from basalt.machinery.discovery.errors import DiscoveryLimitError
from basalt.machinery.discovery.model import Affiliate
from basalt.machinery.errors import ConfigValidationError
from basalt.machinery.resources import AffiliateSpec, NodeAddressesSpec, resolve_type
from tests.fakes import inputs
from tests.fakes.discovery import FakeDiscoveryService

URL = "grpc://127.0.0.250:3000"
ADDRESS = "127.0.0.41"


def discovery_doc(url: str = URL, **fields: Any) -> str:
    lines = ["apiVersion: basalt.dev/v1alpha1", "kind: DiscoveryConfig", f"url: {url}"]
    lines += [f"{key}: {value}" for key, value in fields.items()]
    return "\n".join(lines) + "\n"


def config_text(machine_type: str = "controlplane", *extra: str) -> str:
    base = inputs.controlplane_yaml() if machine_type == "controlplane" else inputs.worker_yaml()
    return base + "".join(f"---\n{text}" for text in extra)


def cluster_keys() -> ClusterKeys:
    cluster = load_bundle(inputs.controlplane_yaml()).first(ClusterConfig)
    assert cluster is not None
    return ClusterKeys.from_config(cluster.id, cluster.secret)


def peer(hostname: str, machine_type: str = "controlplane", address: str = "") -> Affiliate:
    address = address or f"127.0.0.{50 + len(hostname)}"
    return Affiliate(
        node_id=f"uuid-{hostname}",
        hostname=hostname,
        machine_type=machine_type,
        addresses=(address,),
        version="v0.9.0",
        etcd_peer_url=f"https://{address}:2380" if machine_type == "controlplane" else "",
    )


async def until(check: Callable[[], object], timeout: float = 3.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


class Harness:
    """A container node with a config, its discovery controller and a fake service."""

    def __init__(
        self,
        tmp: Path,
        service: FakeDiscoveryService,
        hostname: str = "cp-1",
        address: str = ADDRESS,
    ) -> None:
        platform = Platform(PlatformMode.CONTAINER, NodePaths.under(tmp), address, hostname)
        self.node: Node = build_node(platform, Tuning())
        self.node.paths.create()
        self.service = service
        self.controller = DiscoveryController(self.node, connect=service.connect)

    async def apply(self, text: str) -> None:
        self.node.use_config(load_bundle(text, "node.yaml"))
        await self.controller.reconcile(self.node.store)

    def affiliates(self) -> dict[str, Any]:
        return {r.meta.id: r.spec for r in self.node.store.list("Affiliates")}

    def status(self) -> Any:
        resource = self.node.store.get("DiscoveryStatuses", "discovery")
        assert resource is not None
        return resource.spec

    async def close(self) -> None:
        await self.node.stop_background()


def with_harness(tmp: Path, body: Callable[[Harness], Awaitable[None]]) -> None:
    """Run ``body`` on a fresh harness in its own event loop (a node needs one)."""

    async def go() -> None:
        made = Harness(tmp, FakeDiscoveryService())
        try:
            await body(made)
        finally:
            await made.close()

    asyncio.run(go())


# -- the document -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "where", "message"),
    [
        ({"url": "https://d.example.com:3000"}, "DiscoveryConfig.url", "is not grpc://HOST:PORT"),
        ({"url": "grpcs://d.example.com"}, "DiscoveryConfig.url", "is not grpc://HOST:PORT"),
        ({"url": "grpc://d.example.com:0"}, "DiscoveryConfig.url", "port 0 is out of range"),
        ({"ttl": "soon"}, "DiscoveryConfig.ttl", "is not a duration"),
        ({"ttl": "2s"}, "DiscoveryConfig.ttl", "between 5s and 24h"),
        ({"ttl": "2d"}, "DiscoveryConfig.ttl", "between 5s and 24h"),
        ({"enabled": "perhaps"}, "DiscoveryConfig.enabled", "true or false"),
        ({"urll": URL}, "DiscoveryConfig.urll", ""),
    ],
)
def test_config_errors_name_the_field(fields: dict[str, str], where: str, message: str) -> None:
    text = discovery_doc(**fields)
    with pytest.raises(ConfigValidationError) as raised:
        load_bundle(config_text("controlplane", text), "node.yaml")
    problems = {p.where: p for p in raised.value.errors}
    assert where in problems, problems
    assert message in problems[where].message


def test_a_valid_document_and_its_defaults() -> None:
    bundle = load_bundle(config_text("worker", discovery_doc()), "node.yaml")
    from basalt.machinery.config import DiscoveryConfig

    document = bundle.first(DiscoveryConfig)
    assert document is not None
    assert (document.enabled, document.ttl, document.ttl_seconds(), document.ca) == (
        True,
        "30m",
        1800.0,
        "",
    )
    # A running node takes it (and any change of it) without a reboot.
    assert not needs_reboot("DiscoveryConfig", "")
    assert not needs_reboot("DiscoveryConfig", "url")


def test_get_affiliates_resolves() -> None:
    for name in ("affiliates", "affiliate", "Affiliates"):
        assert resolve_type(name).type == "Affiliates"
    definition = resolve_type("affiliates")
    assert definition.namespace == "cluster" and not definition.sensitive
    assert [header for header, _ in definition.columns] == [
        "HOSTNAME",
        "MACHINE TYPE",
        "ADDRESSES",
        "BASALT",
    ]
    assert resolve_type("discoverystatus").type == "DiscoveryStatuses"


# -- the pure parts ------------------------------------------------------------------------------


def test_affiliate_ids_are_stable_opaque_and_per_cluster() -> None:
    one = affiliate_id_of("cluster-a", "machine-1")
    assert one == affiliate_id_of("cluster-a", "machine-1")
    assert re.fullmatch(r"[0-9a-f]{32}", one)
    assert "machine" not in one
    assert one != affiliate_id_of("cluster-b", "machine-1")
    assert one != affiliate_id_of("cluster-a", "machine-2")


@pytest.mark.parametrize("ttl", [5.0, 30.0, 1800.0])
def test_refresh_is_a_third_of_the_ttl_less_up_to_a_tenth(ttl: float) -> None:
    assert refresh_delay(ttl, lambda: 0.0) == pytest.approx(ttl / 3)
    assert refresh_delay(ttl, lambda: 1.0) == pytest.approx(ttl / 3 * 0.9)


def test_backoff_doubles_up_to_a_third_of_the_ttl_or_30s() -> None:
    waits = [BACKOFF_START]
    for _ in range(12):
        waits.append(next_backoff(waits[-1], 1800.0))
    assert waits[:4] == [0.5, 1.0, 2.0, 4.0] and waits[-1] == 30.0
    assert backoff_cap(6.0) == 2.0
    assert backoff_cap(1.0) == BACKOFF_START


# -- publishing ----------------------------------------------------------------------------------


def test_a_control_plane_publishes_its_affiliate(tmp_path: Path) -> None:
    async def body(harness: Harness) -> None:
        await harness.apply(config_text("controlplane", discovery_doc(ttl="1m")))
        await until(lambda: harness.service.published)
        sent = harness.service.published[0]
        assert sent.ttl == 60.0
        assert sent.affiliate.hostname == "cp-1"
        assert sent.affiliate.machine_type == "controlplane"
        assert sent.affiliate.addresses == (ADDRESS,)
        assert sent.affiliate.version == harness.node.version
        assert sent.affiliate.etcd_peer_url == f"https://{ADDRESS}:2380"
        assert sent.affiliate.node_id == harness.node.platform.machine_uuid()
        assert re.fullmatch(r"[0-9a-f]{32}", sent.affiliate_id)
        # Sealed: the service holds ciphertext, which another cluster's keys do not open.
        (record,) = harness.service.clusters[cluster_keys().wire_id].values()
        assert b"cp-1" not in record.data
        await until(lambda: harness.status().state == "connected")
        assert harness.status().affiliate_id == sent.affiliate_id

    with_harness(tmp_path, body)


def test_a_worker_publishes_no_etcd_peer_url(tmp_path: Path) -> None:
    async def body(harness: Harness) -> None:
        await harness.apply(config_text("worker", discovery_doc()))
        await until(lambda: harness.service.published)
        assert harness.service.published[0].affiliate.machine_type == "worker"
        assert harness.service.published[0].affiliate.etcd_peer_url == ""

    with_harness(tmp_path, body)


def test_the_record_is_refreshed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def body(harness: Harness) -> None:
        monkeypatch.setattr(controller_module, "refresh_delay", lambda ttl: 0.02)
        await harness.apply(config_text("controlplane", discovery_doc()))
        await until(lambda: len(harness.service.published) >= 3)
        ids = {p.affiliate_id for p in harness.service.published}
        assert len(ids) == 1

    with_harness(tmp_path, body)


def test_a_new_host_name_is_published_at_once(tmp_path: Path) -> None:
    async def body(harness: Harness) -> None:
        await harness.apply(config_text("controlplane", discovery_doc()))
        await until(lambda: harness.service.published)
        hostname = "apiVersion: basalt.dev/v1alpha1\nkind: HostnameConfig\nhostname: cp-renamed\n"
        await harness.apply(config_text("controlplane", discovery_doc(), hostname))
        await until(lambda: harness.service.published[-1].affiliate.hostname == "cp-renamed")
        assert len({p.affiliate_id for p in harness.service.published}) == 1

    with_harness(tmp_path, body)


def test_a_node_without_an_address_waits_and_keeps_a_running_session(tmp_path: Path) -> None:
    async def go() -> None:
        made = Harness(tmp_path, FakeDiscoveryService(), address=UNSPECIFIED_ADDRESS)
        try:
            await made.apply(config_text("controlplane", discovery_doc()))
            assert made.status().state == "connecting" and made.controller.session is None
            made.node.store.put(
                "NodeAddresses",
                "current",
                NodeAddressesSpec(addresses=["192.0.2.7"]),
                owner="network",
            )
            await made.controller.reconcile(made.node.store)
            await until(lambda: made.service.published)
            sent = made.service.published[-1].affiliate
            assert sent.addresses == ("192.0.2.7",)
            assert sent.etcd_peer_url == "https://192.0.2.7:2380"
            session = made.controller.session
            made.node.store.put(
                "NodeAddresses", "current", NodeAddressesSpec(addresses=[]), owner="network"
            )
            await made.controller.reconcile(made.node.store)  # a lease lapses for a moment
            assert made.controller.session is session and made.service.deleted == []
        finally:
            await made.close()

    asyncio.run(go())


# -- watching ------------------------------------------------------------------------------------


def test_the_clusters_affiliates_become_resources_and_go_when_removed(tmp_path: Path) -> None:
    async def body(harness: Harness) -> None:
        other = harness.service.connect(URL, cluster_keys())
        await other.update("peer-a", peer("cp-2"), ttl=30)
        await other.update("peer-b", peer("worker-1", "worker"), ttl=300)
        stranger = harness.service.connect(URL, ClusterKeys.from_secret(b"x" * 32, b"y" * 32))
        await stranger.update("peer-z", peer("intruder"), ttl=300)

        await harness.apply(config_text("controlplane", discovery_doc()))
        await until(lambda: {"peer-a", "peer-b"} < set(harness.affiliates()))
        seen = harness.affiliates()
        assert len(seen) == 3  # and itself; never the other cluster's
        assert seen["peer-a"] == AffiliateSpec(
            node_id="uuid-cp-2",
            hostname="cp-2",
            machine_type="controlplane",
            addresses=["127.0.0.54"],
            version="v0.9.0",
            etcd_peer_url="https://127.0.0.54:2380",
        )
        await until(lambda: harness.status().affiliates == 3)

        await other.delete("peer-b")  # a node that left
        await until(lambda: "peer-b" not in harness.affiliates())
        harness.service.advance(31)  # peer-a stopped refreshing: its record ran out
        await until(lambda: "peer-a" not in harness.affiliates())
        assert len(harness.affiliates()) == 1

    with_harness(tmp_path, body)


def test_turning_discovery_off_deletes_the_record_and_the_resources(tmp_path: Path) -> None:
    async def body(harness: Harness) -> None:
        await harness.apply(config_text("controlplane", discovery_doc()))
        await until(harness.affiliates)
        (mine,) = harness.affiliates()
        await harness.apply(config_text("controlplane", discovery_doc(enabled="false")))
        assert harness.affiliates() == {}
        assert harness.service.deleted == [mine]
        assert harness.status().state == "disabled"
        # No DiscoveryConfig at all: the same.
        await harness.apply(config_text("controlplane"))
        assert harness.affiliates() == {} and harness.status().state == "disabled"

    with_harness(tmp_path, body)


def test_a_graceful_shutdown_deletes_the_record_a_reboot_keeps_it(tmp_path: Path) -> None:
    async def go() -> None:
        service = FakeDiscoveryService()
        for stage, kept in (("rebooting", True), ("shuttingDown", False), ("resetting", False)):
            made = Harness(tmp_path / stage, service)
            await made.apply(config_text("controlplane", discovery_doc()))
            await until(lambda made=made: made.status().affiliate_id in made.affiliates())  # type: ignore[misc]
            mine = made.status().affiliate_id
            made.node.set_stage(stage)  # type: ignore[arg-type]
            await made.close()
            assert (mine in service.records(cluster_keys())) is kept, stage

    asyncio.run(go())


# -- errors --------------------------------------------------------------------------------------


def test_an_unreachable_service_is_reported_once_and_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def body(harness: Harness) -> None:
        monkeypatch.setattr(controller_module, "BACKOFF_START", 0.02)
        harness.service.down = True
        await harness.apply(config_text("controlplane", discovery_doc()))
        await until(lambda: harness.status().state == "failing")
        assert "UNAVAILABLE" in harness.status().last_error
        await asyncio.sleep(0.2)  # several retries fail meanwhile
        events = [e for e in harness.node.events.history() if e.type == "discovery"]
        assert len(events) == 1 and "failing" in events[0].message

        harness.service.down = False
        await until(lambda: harness.status().state == "connected")
        await until(harness.affiliates)
        assert harness.status().last_error == ""
        events = [e for e in harness.node.events.history() if e.type == "discovery"]
        assert "works again" in events[-1].message

    with_harness(tmp_path, body)


def test_a_refused_publish_with_a_working_watch_is_failing_without_flapping(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(controller_module, "BACKOFF_START", 0.02)

    async def body(harness: Harness) -> None:
        harness.service.refuse_updates = DiscoveryLimitError(
            "limit affiliates_per_cluster=100 reached: cluster 3f2a… has 100 affiliates"
        )
        other = harness.service.connect(URL, cluster_keys())
        await harness.apply(config_text("controlplane", discovery_doc()))
        await until(lambda: harness.status().state == "failing")
        harness.service.refuse_updates = None
        await other.update("peer-a", peer("cp-2"), ttl=300)
        harness.service.refuse_updates = DiscoveryLimitError("limit reached")
        for _ in range(5):  # watch events arrive and publishes fail, interleaved
            await asyncio.sleep(0.05)
            harness.service.refuse_updates = None
            await other.delete("peer-a")
            await other.update("peer-a", peer("cp-2"), ttl=300)
            harness.service.refuse_updates = DiscoveryLimitError("limit reached")
        await until(lambda: "peer-a" in harness.affiliates())  # the watch still mirrors
        assert harness.status().state == "failing"
        assert "publish:" in harness.status().last_error
        assert "limit" in harness.status().last_error
        events = [e for e in harness.node.events.history() if e.type == "discovery"]
        assert len(events) == 1, [e.message for e in events]

        harness.service.refuse_updates = None
        await until(lambda: harness.status().state == "connected")

    with_harness(tmp_path, body)


def test_a_service_that_lost_its_records_gets_them_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def body(harness: Harness) -> None:
        monkeypatch.setattr(controller_module, "BACKOFF_START", 0.02)
        await harness.apply(config_text("controlplane", discovery_doc()))
        await until(harness.affiliates)
        harness.service.restart(lose_records=True)
        # Long before the refresh (10 min): the watch broke, so the node publishes again.
        await until(lambda: harness.service.records(cluster_keys()))
        await until(lambda: len(harness.affiliates()) == 1)

    with_harness(tmp_path, body)


class Exploding:
    """A client whose every call fails with an error no one planned for."""

    async def update(self, affiliate_id: str, affiliate: Affiliate, ttl: float = 0) -> None:
        raise RuntimeError("boom")

    async def delete(self, affiliate_id: str) -> None:
        raise RuntimeError("boom")

    async def watch(self) -> AsyncIterator[Any]:
        raise RuntimeError("boom")
        yield  # pragma: no cover

    async def close(self) -> None:
        raise RuntimeError("boom")


def test_unexpected_client_errors_never_escape(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(controller_module, "BACKOFF_START", 0.02)

    async def body(harness: Harness) -> None:
        harness.controller.connect = lambda url, keys, ca: Exploding()
        await harness.apply(config_text("controlplane", discovery_doc()))
        await until(lambda: harness.status().state == "failing")
        assert harness.status().last_error in (
            "publish: RuntimeError: boom",
            "watch: RuntimeError: boom",
        )
        await asyncio.sleep(0.1)
        session = harness.controller.session
        assert session is not None and session._task is not None and not session._task.done()
        await harness.apply(config_text("controlplane"))  # stopping it does not raise either
        assert harness.status().state == "disabled"

    with_harness(tmp_path, body)


# -- members and etcd ----------------------------------------------------------------------------


def trust_member(hostname: str, address: str, machine_type: str = "worker") -> trust_pb2.Member:
    return trust_pb2.Member(
        id=hostname,
        hostname=hostname,
        machine_type=machine_type,
        addresses=[address],
        version="v1",
        last_seen=5.0,
    )


def test_members_are_the_trust_list_plus_affiliates_it_lacks(tmp_path: Path) -> None:
    async def body(harness: Harness) -> None:
        other = harness.service.connect(URL, cluster_keys())
        await other.update("peer-a", peer("cp-2", address="127.0.0.52"), ttl=300)
        await other.update("peer-b", peer("worker-1", "worker", address="127.0.0.99"), ttl=300)
        await harness.apply(config_text("controlplane", discovery_doc()))
        await until(lambda: len(harness.affiliates()) == 3)

        publish_members(harness.node, [trust_member("worker-1", "127.0.0.61")])
        members: dict[str, Any] = {r.meta.id: r.spec for r in harness.node.store.list("Members")}
        assert set(members) == {"cp-1", "cp-2", "worker-1"}
        # The trust service's entry wins over the affiliate of the same host name.
        assert members["worker-1"].addresses == ["127.0.0.61"]
        assert members["cp-2"].machine_type == "controlplane"
        # Forwarding still reaches the trust service's members only.
        assert set(harness.node.members) == {"worker-1"}

        # The members controller follows Affiliates (its input) as they change.
        await other.delete("peer-a")
        await until(lambda: "peer-a" not in harness.affiliates())
        assert "Affiliates" in MembersController.inputs
        await MembersController(harness.node).reconcile(harness.node.store)
        assert {r.meta.id for r in harness.node.store.list("Members")} == {"cp-1", "worker-1"}

    with_harness(tmp_path, body)


def test_member_specs_without_discovery_are_the_trust_list() -> None:
    specs = member_specs([trust_member("cp-1", "127.0.0.1", "controlplane")], [])
    assert list(specs) == ["cp-1"] and specs["cp-1"].last_seen == 5.0


def test_a_joining_control_plane_finds_etcd_through_affiliates(tmp_path: Path) -> None:
    async def body(harness: Harness) -> None:
        other = harness.service.connect(URL, cluster_keys())
        await other.update("peer-a", peer("cp-2", address="127.0.0.52"), ttl=300)
        await other.update("peer-b", peer("worker-1", "worker", address="127.0.0.99"), ttl=300)
        await harness.apply(config_text("controlplane", discovery_doc()))
        await until(lambda: len(harness.affiliates()) == 3)
        # No member list (the endpoint is unreachable): after the endpoint's host, asked
        # first, etcd's peers come from discovery, control planes only, never this node.
        assert harness.node.members == {}
        assert EtcdManager(harness.node).peer_addresses() == ["192.0.2.10", "127.0.0.52"]
        # With a member list too: the union.
        publish_members(harness.node, [trust_member("cp-3", "127.0.0.53", "controlplane")])
        assert EtcdManager(harness.node).peer_addresses() == [
            "192.0.2.10",
            "127.0.0.52",
            "127.0.0.53",
        ]

    with_harness(tmp_path, body)


def test_discovered_peers_skip_workers_urlless_and_own() -> None:
    store_node_resources = [
        _resource("a", peer("cp-2", address="127.0.0.52")),
        _resource("b", peer("w", "worker", address="127.0.0.60")),
        _resource("c", Affiliate("u", "cp-x", "controlplane", ("127.0.0.70",))),
        _resource("d", peer("cp-1", address=ADDRESS)),
        _resource("e", replace(peer("cp-6"), etcd_peer_url="https://[fd00::6]:2380")),
    ]
    assert discovered_peers(store_node_resources, ADDRESS) == ["127.0.0.52", "fd00::6"]


def _resource(affiliate_id: str, affiliate: Affiliate) -> Any:
    from basalt.machined.controllers.discovery import affiliate_specs
    from basalt.machined.runtime import ResourceStore

    store = ResourceStore()
    spec = affiliate_specs({affiliate_id: affiliate})[affiliate_id]
    return store.put("Affiliates", affiliate_id, spec, owner="discovery")
