"""The upgrade graph: next hops, via releases, yanked and refused releases."""

from __future__ import annotations

import pytest

from basalt.machinery.releases.graph import UpgradePathError, next_hop, path
from basalt.machinery.releases.repository import Release


def r(version: str, via: str = "", yanked: bool = False, arch: str = "x86_64") -> Release:
    return Release("stable", f"stable/basalt-{version}-{arch}.tar", version, arch, 1, "h",
                   yanked, via)  # fmt: skip


def test_the_newest_release_is_next_when_no_hop_is_required() -> None:
    releases = [r("0.1.0"), r("0.1.3"), r("0.2.1"), r("0.10.0")]
    assert next_hop("0.1.0", releases).version == "0.10.0"  # type: ignore[union-attr]
    assert next_hop("0.10.0", releases) is None
    assert next_hop("0.9.0", [r("1.0.0-rc.1"), r("0.9.1")]).version == "1.0.0-rc.1"  # type: ignore[union-attr]


def test_a_multi_hop_path_is_stepped_one_hop_at_a_time() -> None:
    releases = [r("0.1.3"), r("0.2.1", via="0.1.3"), r("0.3.0", via="0.2.1")]
    assert path("0.1.0", releases) == ["0.1.3", "0.2.1", "0.3.0"]
    assert path("0.1.3", releases) == ["0.2.1", "0.3.0"]
    assert path("0.2.5", releases) == ["0.3.0"]


def test_yanked_refused_and_other_architectures_are_skipped() -> None:
    releases = [r("0.2.0"), r("0.3.0", yanked=True), r("0.4.0", arch="aarch64")]
    assert path("0.1.0", releases) == ["0.2.0"]
    assert path("0.1.0", [r("0.2.0"), r("0.2.1")], refused={"0.2.1"}) == ["0.2.0"]


def test_a_required_hop_that_is_missing_is_named() -> None:
    with pytest.raises(UpgradePathError, match=r"through 0\.1\.3, which this channel does not"):
        next_hop("0.1.0", [r("0.2.1", via="0.1.3")])
    with pytest.raises(UpgradePathError, match="does not offer"):
        next_hop("0.1.0", [r("0.1.3", yanked=True), r("0.2.1", via="0.1.3")])
