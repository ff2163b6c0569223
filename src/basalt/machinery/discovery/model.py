"""What a node publishes about itself: the ``Affiliate`` record, in clear.

A record travels as JSON (sorted keys, no spaces), sealed with the cluster's data key;
its addresses also travel one by one as endpoints, sealed deterministically, so the
service can de-duplicate them. Unknown JSON keys are ignored (a newer node may add some).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import DiscoveryDataError

_STRINGS = ("node_id", "hostname", "machine_type", "version", "etcd_peer_url")


@dataclass(frozen=True)
class Affiliate:
    """One node as its cluster's other nodes see it through discovery."""

    node_id: str
    hostname: str
    machine_type: str  # controlplane | worker
    addresses: tuple[str, ...] = ()
    version: str = ""
    #: The node's etcd peer URL (control planes), '' otherwise.
    etcd_peer_url: str = ""
    #: Extra keys a newer node sent; kept so that nothing is lost on a round trip.
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def to_json(self) -> bytes:
        body = asdict(self)
        extra = body.pop("extra")
        body["addresses"] = list(self.addresses)
        return json.dumps({**extra, **body}, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes, where: str = "affiliate") -> Affiliate:
        """Parse a decrypted record; DiscoveryDataError names the field that is wrong."""
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DiscoveryDataError(f"{where}: the record is not JSON ({exc})") from None
        if not isinstance(body, dict):
            raise DiscoveryDataError(f"{where}: the record is not a JSON object")
        for name in _STRINGS:
            if not isinstance(body.get(name, ""), str):
                raise DiscoveryDataError(f"{where}: {name} is not a string")
        addresses = body.get("addresses", [])
        if not isinstance(addresses, list) or not all(isinstance(a, str) for a in addresses):
            raise DiscoveryDataError(f"{where}: addresses is not a list of strings")
        known = {*_STRINGS, "addresses"}
        return cls(
            node_id=body.get("node_id", ""),
            hostname=body.get("hostname", ""),
            machine_type=body.get("machine_type", ""),
            addresses=tuple(addresses),
            version=body.get("version", ""),
            etcd_peer_url=body.get("etcd_peer_url", ""),
            extra={k: v for k, v in body.items() if k not in known},
        )
