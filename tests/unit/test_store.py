"""The resource store (versions, owners, watches) and the controller engine."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Coroutine
from typing import Any, ClassVar, TypeVar

import pytest

from basalt.machined.runtime import Controller, ControllerEngine, ResourceStore, WatchEvent
from basalt.machined.runtime import store as store_module
from basalt.machined.runtime.store import OwnershipError
from basalt.machinery.errors import BasaltError
from basalt.machinery.resources import HostnameSpec, NodeAddressesSpec

T = TypeVar("T")
HOSTNAMES = "Hostnames"
ADDRESSES = "NodeAddresses"


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 5))


def host(name: str, domain: str = "") -> HostnameSpec:
    return HostnameSpec(hostname=name, domainname=domain)


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


# -- versions and ownership ----------------------------------------------------------------


def test_put_creates_version_one_with_metadata() -> None:
    store = ResourceStore()
    resource = store.put(HOSTNAMES, "hostname", host("cp-1"), owner="hostname")
    assert resource.meta.version == 1
    assert resource.meta.namespace == "network"
    assert (resource.meta.type, resource.meta.id, resource.meta.owner) == (
        HOSTNAMES,
        "hostname",
        "hostname",
    )
    assert resource.meta.created == resource.meta.updated
    assert store.get(HOSTNAMES, "hostname") is resource
    assert resource.spec_json() == '{"hostname":"cp-1","domainname":""}'


@pytest.mark.parametrize(
    ("second", "version", "notified"),
    [
        (host("cp-1"), 1, False),
        (host("cp-1", ""), 1, False),
        (host("cp-2"), 2, True),
        (host("cp-1", "example.org"), 2, True),
    ],
)
def test_put_bumps_version_only_on_a_real_change(
    second: HostnameSpec, version: int, notified: bool
) -> None:
    store = ResourceStore()
    calls: list[str] = []
    store.on_change(HOSTNAMES, lambda: calls.append("change"))
    first = store.put(HOSTNAMES, "hostname", host("cp-1"), owner="hostname")
    again = store.put(HOSTNAMES, "hostname", second, owner="hostname")
    assert again.meta.version == version
    assert calls == ["change", "change"] if notified else ["change"]
    assert (again is first) == (not notified)
    if notified:
        assert again.meta.created == first.meta.created
        assert again.meta.updated >= first.meta.updated


def test_versions_keep_counting() -> None:
    store = ResourceStore()
    for i in range(5):
        store.put(HOSTNAMES, "hostname", host(f"n{i}"), owner="hostname")
    resource = store.get(HOSTNAMES, "hostname")
    assert resource is not None
    assert resource.meta.version == 5
    assert resource.spec == host("n4")


def test_on_change_is_per_type() -> None:
    store = ResourceStore()
    calls: list[str] = []
    store.on_change(ADDRESSES, lambda: calls.append("addresses"))
    store.put(HOSTNAMES, "hostname", host("cp-1"), owner="hostname")
    assert calls == []
    store.put(ADDRESSES, "node", NodeAddressesSpec(addresses=["192.0.2.1"]), owner="addr")
    assert calls == ["addresses"]


@pytest.mark.parametrize("action", ["put", "delete"])
def test_only_the_owner_writes(action: str) -> None:
    store = ResourceStore()
    store.put(HOSTNAMES, "hostname", host("cp-1"), owner="hostname")
    with pytest.raises(OwnershipError, match="owned by hostname, not intruder") as caught:
        if action == "put":
            store.put(HOSTNAMES, "hostname", host("evil"), owner="intruder")
        else:
            store.delete(HOSTNAMES, "hostname", owner="intruder")
    assert isinstance(caught.value, BasaltError)
    resource = store.get(HOSTNAMES, "hostname")
    assert resource is not None
    assert resource.spec == host("cp-1")
    assert resource.meta.version == 1


def test_delete_removes_and_notifies() -> None:
    store = ResourceStore()
    calls: list[str] = []
    store.put(HOSTNAMES, "hostname", host("cp-1"), owner="hostname")
    store.on_change(HOSTNAMES, lambda: calls.append("change"))
    store.delete(HOSTNAMES, "hostname", owner="hostname")
    assert store.get(HOSTNAMES, "hostname") is None
    assert calls == ["change"]
    store.delete(HOSTNAMES, "hostname", owner="hostname")  # absent: nothing happens
    assert calls == ["change"]


def test_a_deleted_resource_starts_again_at_version_one() -> None:
    store = ResourceStore()
    store.put(HOSTNAMES, "hostname", host("a"), owner="hostname")
    store.put(HOSTNAMES, "hostname", host("b"), owner="hostname")
    store.delete(HOSTNAMES, "hostname", owner="hostname")
    assert store.put(HOSTNAMES, "hostname", host("c"), owner="other").meta.version == 1


def test_retain_deletes_only_the_owners_unlisted_resources() -> None:
    store = ResourceStore()
    for id_ in ("a", "b", "c"):
        store.put(HOSTNAMES, id_, host(id_), owner="mine")
    store.put(HOSTNAMES, "z", host("z"), owner="theirs")
    store.retain(HOSTNAMES, {"b"}, owner="mine")
    assert [r.meta.id for r in store.list(HOSTNAMES)] == ["b", "z"]


def test_list_is_sorted_by_id() -> None:
    store = ResourceStore()
    for id_ in ("m", "a", "z"):
        store.put(HOSTNAMES, id_, host(id_), owner="o")
    assert [r.meta.id for r in store.list(HOSTNAMES)] == ["a", "m", "z"]
    assert store.list(ADDRESSES) == []


# -- watches -------------------------------------------------------------------------------


def brief(event: WatchEvent) -> tuple[str, str | None, int | None]:
    if event.resource is None:
        return event.kind, None, None
    return event.kind, event.resource.meta.id, event.resource.meta.version


async def take(events: AsyncIterator[WatchEvent], count: int) -> list[tuple[Any, ...]]:
    return [brief(await anext(events)) for _ in range(count)]


def test_watch_with_tail_bootstraps_then_follows() -> None:
    async def scenario() -> list[tuple[Any, ...]]:
        store = ResourceStore()
        store.put(HOSTNAMES, "b", host("b"), owner="o")
        store.put(HOSTNAMES, "a", host("a"), owner="o")
        watch = store.watch(HOSTNAMES, tail=True)
        seen = await take(watch, 3)
        store.put(HOSTNAMES, "a", host("a2"), owner="o")
        store.put(HOSTNAMES, "c", host("c"), owner="o")
        store.delete(HOSTNAMES, "b", owner="o")
        seen += await take(watch, 3)
        await watch.aclose()
        return seen

    assert run(scenario()) == [
        ("created", "a", 1),
        ("created", "b", 1),
        ("bootstrapped", None, None),
        ("updated", "a", 2),
        ("created", "c", 1),
        ("destroyed", "b", 1),
    ]


def test_watch_without_tail_sees_only_later_changes() -> None:
    async def scenario() -> list[tuple[Any, ...]]:
        store = ResourceStore()
        store.put(HOSTNAMES, "old", host("old"), owner="o")
        watch = store.watch(HOSTNAMES)
        pending = asyncio.ensure_future(anext(watch))
        await settle()
        store.put(HOSTNAMES, "new", host("new"), owner="o")
        first = brief(await pending)
        await watch.aclose()
        return [first]

    assert run(scenario()) == [("created", "new", 1)]


def test_watch_by_id_filters_tail_and_live_events() -> None:
    async def scenario() -> list[tuple[Any, ...]]:
        store = ResourceStore()
        store.put(HOSTNAMES, "a", host("a"), owner="o")
        store.put(HOSTNAMES, "b", host("b"), owner="o")
        watch = store.watch(HOSTNAMES, "b", tail=True)
        seen = await take(watch, 2)
        store.put(HOSTNAMES, "a", host("a2"), owner="o")
        store.put(HOSTNAMES, "b", host("b2"), owner="o")
        store.delete(HOSTNAMES, "a", owner="o")
        store.delete(HOSTNAMES, "b", owner="o")
        seen += await take(watch, 2)
        await watch.aclose()
        return seen

    assert run(scenario()) == [
        ("created", "b", 1),
        ("bootstrapped", None, None),
        ("updated", "b", 2),
        ("destroyed", "b", 2),
    ]


def test_an_unchanged_put_reaches_no_watcher() -> None:
    async def scenario() -> list[tuple[Any, ...]]:
        store = ResourceStore()
        store.put(HOSTNAMES, "a", host("a"), owner="o")
        watch = store.watch(HOSTNAMES, tail=True)
        seen = await take(watch, 2)
        store.put(HOSTNAMES, "a", host("a"), owner="o")
        store.put(HOSTNAMES, "a", host("a3"), owner="o")
        seen += await take(watch, 1)
        await watch.aclose()
        return seen

    assert run(scenario())[-1] == ("updated", "a", 2)


def test_closing_a_watch_detaches_it() -> None:
    async def scenario() -> int:
        store = ResourceStore()
        watch = store.watch(HOSTNAMES, tail=True)
        await anext(watch)
        await watch.aclose()
        return len(store._watchers[HOSTNAMES])

    assert run(scenario()) == 0


def test_a_slow_watcher_is_ended_without_blocking_writers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(store_module, "WATCH_QUEUE", 4)

    async def scenario() -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]], int]:
        store = ResourceStore()
        slow = store.watch(HOSTNAMES, tail=True)
        fast = store.watch(HOSTNAMES, tail=True)
        await anext(slow)  # bootstrapped: registered
        await anext(fast)
        fast_seen: list[tuple[Any, ...]] = []
        for i in range(10):  # never awaits: a writer is never held up by a watcher
            store.put(HOSTNAMES, "a", host(f"v{i}"), owner="o")
            if i % 2:
                fast_seen += await take(fast, 2)
        slow_seen = [brief(event) async for event in slow]
        await fast.aclose()
        return slow_seen, fast_seen, len(store._watchers[HOSTNAMES])

    slow_seen, fast_seen, watchers = run(scenario())
    every = [("created", "a", 1)] + [("updated", "a", v) for v in range(2, 11)]
    # The slow watcher saw a gap-free prefix of the changes, then its watch ended.
    assert slow_seen == every[: len(slow_seen)]
    assert 0 < len(slow_seen) < 10
    # The watcher that kept up saw every change.
    assert fast_seen == every
    assert watchers == 0


def test_an_ended_watcher_can_watch_again_with_tail(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_module, "WATCH_QUEUE", 2)

    async def scenario() -> list[tuple[Any, ...]]:
        store = ResourceStore()
        slow = store.watch(HOSTNAMES)
        pending = asyncio.ensure_future(anext(slow))
        await settle()
        for i in range(6):
            store.put(HOSTNAMES, "a", host(f"v{i}"), owner="o")
        await pending
        _ = [event async for event in slow]
        again = store.watch(HOSTNAMES, tail=True)
        seen = await take(again, 2)
        await again.aclose()
        return seen

    assert run(scenario()) == [("created", "a", 6), ("bootstrapped", None, None)]


# -- the controller engine -----------------------------------------------------------------


class Mirror(Controller):
    """Copies every host name into NodeAddresses (a stand-in for a real domain)."""

    name = "mirror"
    inputs: ClassVar[tuple[str, ...]] = (HOSTNAMES,)
    outputs: ClassVar[tuple[str, ...]] = (ADDRESSES,)

    def __init__(self) -> None:
        self.runs = 0
        self.ran = asyncio.Event()
        self.gate: asyncio.Event | None = None

    async def reconcile(self, store: ResourceStore) -> None:
        self.runs += 1
        if self.gate is not None:
            await self.gate.wait()
        names = [r.spec.hostname for r in store.list(HOSTNAMES)]  # type: ignore[attr-defined]
        store.put(ADDRESSES, "mirror", NodeAddressesSpec(addresses=names), owner=self.name)
        self.ran.set()


async def wait_for(predicate: Any, timeout: float = 2.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


def mirrored(store: ResourceStore) -> list[str] | None:
    resource = store.get(ADDRESSES, "mirror")
    return None if resource is None else list(resource.spec.addresses)  # type: ignore[attr-defined]


def test_engine_runs_every_controller_at_start() -> None:
    async def scenario() -> tuple[int, list[str] | None]:
        store = ResourceStore()
        mirror = Mirror()
        engine = ControllerEngine(store, [mirror])
        engine.start()
        await asyncio.wait_for(mirror.ran.wait(), 1)
        await settle()
        await engine.stop()
        return mirror.runs, mirrored(store)

    assert run(scenario()) == (1, [])


def test_engine_reruns_on_input_changes_only() -> None:
    async def scenario() -> tuple[list[str] | None, int, int]:
        store = ResourceStore()
        mirror = Mirror()
        engine = ControllerEngine(store, [mirror])
        engine.start()
        await wait_for(lambda: mirror.runs == 1)
        store.put(HOSTNAMES, "a", host("cp-1"), owner="test")
        await wait_for(lambda: mirrored(store) == ["cp-1"])
        runs_after_input = mirror.runs
        store.put(HOSTNAMES, "a", host("cp-1"), owner="test")  # no change: no run
        store.put("Versions", "v", _version(), owner="test")  # not an input: no run
        await settle()
        await engine.stop()
        return mirrored(store), runs_after_input, mirror.runs

    result, runs_after_input, runs = run(scenario())
    assert result == ["cp-1"]
    assert runs_after_input == 2
    assert runs == 2


def _version() -> Any:
    from basalt.machinery.resources import VersionSpec

    return VersionSpec(tag="v0", python="3.11", platform="container", arch="amd64")


def test_changes_during_a_run_coalesce_into_one_more_run() -> None:
    async def scenario() -> tuple[int, list[str] | None]:
        store = ResourceStore()
        mirror = Mirror()
        mirror.gate = asyncio.Event()
        engine = ControllerEngine(store, [mirror])
        engine.start()
        await wait_for(lambda: mirror.runs == 1)
        for i in range(5):  # the first run is still waiting at the gate
            store.put(HOSTNAMES, f"n{i}", host(f"n{i}"), owner="test")
        mirror.gate.set()
        await wait_for(lambda: mirrored(store) == [f"n{i}" for i in range(5)])
        await asyncio.sleep(0.02)
        await engine.stop()
        return mirror.runs, mirrored(store)

    runs, result = run(scenario())
    assert runs == 2
    assert result == ["n0", "n1", "n2", "n3", "n4"]


class Flaky(Controller):
    """Fails ``failures`` times, then succeeds; records when each attempt happened."""

    name = "flaky"
    inputs: ClassVar[tuple[str, ...]] = ()

    def __init__(self, failures: int, engine_errors: list[dict[str, str]]) -> None:
        self.failures = failures
        self.attempts: list[float] = []
        self.errors_seen = engine_errors
        self.engine: ControllerEngine | None = None

    async def reconcile(self, store: ResourceStore) -> None:
        self.attempts.append(asyncio.get_running_loop().time())
        assert self.engine is not None
        self.errors_seen.append(dict(self.engine.errors))
        if len(self.attempts) <= self.failures:
            raise RuntimeError(f"attempt {len(self.attempts)} failed")


def test_a_failing_controller_is_retried_with_backoff_and_its_error_recorded() -> None:
    async def scenario() -> tuple[Flaky, dict[str, str], list[dict[str, str]], Any]:
        store = ResourceStore()
        seen: list[dict[str, str]] = []
        flaky = Flaky(2, seen)
        healthy = Mirror()
        engine = ControllerEngine(store, [flaky, healthy])
        flaky.engine = engine
        engine.start()
        await wait_for(lambda: len(flaky.attempts) == 3)
        await settle()
        errors_after = dict(engine.errors)
        await engine.stop()
        return flaky, errors_after, seen, mirrored(store)

    flaky, errors_after, seen, healthy_output = run(scenario())
    assert healthy_output == []  # the other controller ran regardless
    gaps = [b - a for a, b in itertools.pairwise(flaky.attempts)]
    assert gaps[0] >= 0.09  # first backoff 0.1 s
    assert gaps[1] >= 0.19  # then doubled
    assert seen == [
        {},
        {"flaky": "RuntimeError: attempt 1 failed"},
        {"flaky": "RuntimeError: attempt 2 failed"},
    ]
    assert errors_after == {}  # cleared by the success


def test_backoff_is_capped() -> None:
    async def scenario() -> list[float]:
        store = ResourceStore()
        flaky = Flaky(4, [])
        engine = ControllerEngine(store, [flaky], backoff_max=0.1)
        flaky.engine = engine
        engine.start()
        await wait_for(lambda: len(flaky.attempts) == 5)
        await engine.stop()
        return flaky.attempts

    attempts = run(scenario())
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    assert all(gap >= 0.09 for gap in gaps), gaps
    assert gaps[-1] < 0.35, gaps  # doubling without the cap would wait 0.8 s here


def test_kick_runs_a_controller_again() -> None:
    async def scenario() -> int:
        store = ResourceStore()
        mirror = Mirror()
        engine = ControllerEngine(store, [mirror])
        engine.start()
        await wait_for(lambda: mirror.runs == 1)
        engine.kick("mirror")
        await wait_for(lambda: mirror.runs == 2)
        await settle()
        await engine.stop()
        return mirror.runs

    assert run(scenario()) == 2


def test_stop_cancels_the_controllers() -> None:
    async def scenario() -> tuple[int, int]:
        store = ResourceStore()
        mirror = Mirror()
        engine = ControllerEngine(store, [mirror])
        engine.start()
        await wait_for(lambda: mirror.runs == 1)
        await engine.stop()
        store.put(HOSTNAMES, "late", host("late"), owner="test")
        await settle()
        return mirror.runs, len(engine._tasks)

    assert run(scenario()) == (1, 0)
