"""etcd data dirs: what counts as a member's data."""

from __future__ import annotations

from pathlib import Path


def test_etcd_data_without_a_wal_is_discarded_not_started_as_a_cluster(tmp_path: Path) -> None:
    """A join whose etcd exited before it had the cluster leaves member/snap and no WAL;
    restarting etcd on that would found a one-member cluster (a split brain)."""
    from basalt.machined.etcd.manager import discard_incomplete, has_wal

    data = tmp_path / "etcd"
    (data / "member" / "snap").mkdir(parents=True)
    assert not has_wal(data)
    assert discard_incomplete(data) and not data.exists()
    assert not discard_incomplete(data)  # nothing there: nothing to do
    (data / "member" / "wal").mkdir(parents=True)
    (data / "member" / "wal" / "0000000000000000-0000000000000000.wal").write_bytes(b"x")
    assert has_wal(data) and not discard_incomplete(data) and data.exists()
