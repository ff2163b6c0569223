"""The downgrade check on a metal node's slots (on files, as in test_metal_slots): a bundle
older than the running version is refused unless the admin allows it; nothing is written.
Container nodes: tests/integration/test_upgrade.py."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

import pytest

from basalt.machined import upgrade
from tests.fakes.bundles import metal_bundle
from tests.unit.test_metal_slots import _machine


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _upgrader(tmp_path: Path) -> upgrade.Upgrader:
    node = SimpleNamespace(
        platform=SimpleNamespace(mode=SimpleNamespace(in_container=False)),
        paths=SimpleNamespace(root=tmp_path),
    )
    upgrader = upgrade.Upgrader(node)  # type: ignore[arg-type]
    upgrader.slots = _machine(tmp_path / "disk")  # booted: slot a, 0.1.0
    return upgrader


def test_an_older_bundle_is_refused_on_metal_and_nothing_changes(
    tmp_path: Path, keypair: tuple[str, str]
) -> None:
    (tmp_path / "disk").mkdir()
    upgrader = _upgrader(tmp_path)
    old = metal_bundle(tmp_path, keypair, "0.0.1", b"root-0.0.1")
    before = _snapshot(tmp_path / "disk")
    with pytest.raises(upgrade.DowngradeRefusedError) as refused:
        asyncio.run(upgrader.check_version(old, allow_downgrade=False))
    assert isinstance(refused.value, upgrade.UpgradeRefusedError)  # FailedPrecondition
    assert "bundle 0.0.1 is older than the running version 0.1.0" in refused.value.message
    assert "--allow-downgrade" in (refused.value.hint or "")
    assert _snapshot(tmp_path / "disk") == before
    note = asyncio.run(upgrader.check_version(old, allow_downgrade=True))
    assert note == "downgrading from 0.1.0 to 0.0.1 (allowed by --allow-downgrade)"


@pytest.mark.parametrize("version", ["0.1.0", "0.2.0", "0.10.0"])
def test_the_same_or_a_newer_version_is_not_a_downgrade(
    tmp_path: Path, keypair: tuple[str, str], version: str
) -> None:
    (tmp_path / "disk").mkdir()
    upgrader = _upgrader(tmp_path)
    bundle = metal_bundle(tmp_path, keypair, version, b"root")
    assert asyncio.run(upgrader.check_version(bundle, allow_downgrade=False)) is None
