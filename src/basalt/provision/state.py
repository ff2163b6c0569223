"""What a provisioner remembers about a cluster it created (``cluster.json``)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from basalt.machinery.errors import BasaltError
from basalt.machinery.fileio import write_atomic

STATE_FILE = "cluster.json"


class ClusterStateError(BasaltError):
    """A cluster's state directory is missing or unreadable."""


@dataclass
class NodeRecord:
    name: str
    type: str
    #: Where this host reaches the node's API (a loopback address).
    address: str
    node_dir: str
    #: The node's "machine": its launcher (``process``) or its QEMU (``qemu``).
    launcher_pid: int = 0
    #: The node's own address when it differs from ``address`` (a VM behind NAT).
    guest_address: str = ""


@dataclass
class ClusterRecord:
    name: str
    provisioner: str
    state_dir: str
    endpoint: str
    nodes: list[NodeRecord] = field(default_factory=list)
    #: Provisioner-specific facts worth showing (qemu: accelerator, image, memory ...).
    options: dict[str, object] = field(default_factory=dict)

    def save(self) -> None:
        path = Path(self.state_dir) / STATE_FILE
        write_atomic(path, json.dumps(asdict(self), indent=2) + "\n", mode=0o600)

    @classmethod
    def load(cls, state_dir: Path) -> ClusterRecord:
        path = state_dir / STATE_FILE
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ClusterStateError(
                f"no cluster at {state_dir} ({STATE_FILE} is missing)",
                hint="list what exists under ~/.basalt/clusters, or pass --state-dir",
            ) from None
        except (OSError, ValueError) as exc:
            raise ClusterStateError(f"{path} cannot be read: {exc}") from None
        nodes = [NodeRecord(**n) for n in data.pop("nodes", [])]
        return cls(nodes=nodes, **data)


def default_clusters_dir() -> Path:
    return Path(os.environ.get("BASALT_CLUSTERS_DIR", Path.home() / ".basalt" / "clusters"))
