"""Ordering bundle versions for the downgrade check."""

from __future__ import annotations

import pytest

from basalt.machinery.images.versions import is_downgrade


@pytest.mark.parametrize(
    ("current", "new"),
    [
        ("0.9.1", "0.0.1"),
        ("0.10.0", "0.9.1"),
        ("1.0.0", "1.0.0-rc.2"),
        ("1.0.0-rc.10", "1.0.0-rc.2"),
        ("1.0.0", "1.0"),
        ("0.2.0", "0.1.9~beta"),
    ],
)
def test_older_versions_are_downgrades(current: str, new: str) -> None:
    assert is_downgrade(current, new)
    assert not is_downgrade(new, current)


@pytest.mark.parametrize("version", ["0.1.0", "1.0.0-rc.1", "0.3.0-broken"])
def test_the_same_version_is_not_a_downgrade(version: str) -> None:
    assert not is_downgrade(version, version)
