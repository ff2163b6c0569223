"""``meta`` and ``wipe disk`` against a real process node (container mode), through the
installed basaltctl, real mTLS and the node's API.

A container-mode node keeps its boot state in a file of the launcher's and has no META
partition and no disks of its own: the node says so (FAILED_PRECONDITION) for every
well-formed request, and refuses a malformed one (a key Basalt owns, a bad device name)
as such first. What META and a wipe do on metal is proven in tests/vm/test_wipe.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fakes.cluster import LiveCluster, start_cluster, stop_cluster

pytestmark = pytest.mark.integration

BASE_ADDRESS = "127.0.0.246"
_SCRIPT = Path(sys.executable).with_name("basaltctl")
BASALTCTL = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "basalt.cli.main"]


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveCluster, Path]]:
    from basalt.machinery.client.config import ClientConfig, save_client_config

    root = tmp_path_factory.mktemp("meta")
    cluster = start_cluster(root, "meta", BASE_ADDRESS, workers=0)
    try:
        config = root / "basaltconfig"
        save_client_config(ClientConfig("meta", {"meta": cluster.context}), config)
        yield cluster, config
    finally:
        stop_cluster(cluster)


def _ctl(config: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "BASALTCONFIG": str(config)}
    return subprocess.run(
        [*BASALTCTL, *args],
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _refused(config: Path, *args: str) -> str:
    result = _ctl(config, *args)
    assert result.returncode == 1, (args, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    return result.stderr


def test_meta_on_a_container_node_says_it_has_no_meta(live: tuple[LiveCluster, Path]) -> None:
    cluster, config = live
    node = cluster.controlplanes[0]
    for args in (
        ("meta", "read"),
        ("meta", "read", "site.rack"),
        ("meta", "write", "site.rack", "r12"),
        ("meta", "delete", "site.rack"),
    ):
        err = _refused(config, *args, "-n", node)
        assert "FAILED_PRECONDITION" in err, err
        assert "this node has no META partition (container mode)" in err


def test_keys_basalt_owns_and_malformed_keys_are_refused_first(
    live: tuple[LiveCluster, Path],
) -> None:
    cluster, config = live
    node = cluster.controlplanes[0]
    err = _refused(config, "meta", "write", "basalt.slot", "B", "-n", node)
    assert "INVALID_ARGUMENT" in err and "META key 'basalt.slot' is reserved by Basalt" in err
    err = _refused(config, "meta", "delete", "pending", "-n", node)
    assert "reserved by Basalt" in err
    err = _refused(config, "meta", "write", "has space", "x", "-n", node)
    assert "characters outside" in err
    err = _refused(config, "meta", "write", "big", "v" * 9000, "-n", node)
    assert "is 9000 bytes; at most 8192" in err


def test_wipe_on_a_container_node_is_refused(live: tuple[LiveCluster, Path]) -> None:
    cluster, config = live
    node = cluster.controlplanes[0]
    err = _refused(config, "wipe", "disk", "vdb", "--yes", "-n", node)
    assert "FAILED_PRECONDITION" in err
    assert "this node has no disks of its own (container mode): nothing is wiped" in err
    err = _refused(config, "wipe", "disk", "../etc", "--yes", "-n", node)
    assert "INVALID_ARGUMENT" in err and "is not a block device name" in err
    # The client's own checks: no question can be asked without a terminal; a bad method.
    err = _refused(config, "wipe", "disk", "vdb", "-n", node)
    assert "confirmation needed" in err and "--yes" in err
    err = _refused(config, "wipe", "disk", "vdb", "--method", "slow", "--yes", "-n", node)
    assert "--method 'slow' is not a wipe method" in err


def test_a_reader_may_not_read_meta(live: tuple[LiveCluster, Path], tmp_path: Path) -> None:
    from basalt.machinery.client.config import (
        ClientConfig,
        issue_client_context,
        save_client_config,
    )
    from basalt.machinery.roles import Role

    cluster, _ = live
    reader = issue_client_context(
        cluster.os_ca, endpoints=cluster.context.endpoints, roles=(Role.READER,)
    )
    config = tmp_path / "reader"
    save_client_config(ClientConfig("r", {"r": reader}), config)
    err = _refused(config, "meta", "read", "-n", cluster.controlplanes[0])
    assert "PERMISSION_DENIED" in err
