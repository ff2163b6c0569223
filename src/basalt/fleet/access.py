"""Who may see what: a user's cluster scope, and which machines have a link now (here or
through another live replica). Shared by the REST API and the web UI."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .auth import Caller
from .core import Fleet
from .service import Refused


def linked_anywhere(fleet: Fleet) -> Callable[[Any], bool]:
    """Whether a machine has a link to this replica or to another one that is alive."""
    from sqlalchemy import select

    from .db import Replica, aware, utcnow
    from .replicas import PRESENCE_TTL

    with fleet.database.session() as session:
        now = utcnow()
        alive = {
            r.name
            for r in session.execute(select(Replica)).scalars()
            if (seen := aware(r.seen)) is not None and (now - seen).total_seconds() < PRESENCE_TTL
        }
    local = fleet.links.links
    return lambda m: m.uuid in local or (bool(m.replica) and m.replica in alive)


def cluster_labels(fleet: Fleet, cluster: str) -> dict[str, str]:
    from .db import Cluster
    from .template import parse_template

    with fleet.database.session() as session:
        row = session.get(Cluster, cluster)
        if row is None:
            return {}
        return dict(parse_template(row.template, cluster).spec.labels)


def in_scope(
    caller: Caller, cluster: str, fleet: Fleet, labels: dict[str, str] | None = None
) -> None:
    """Refuse a user limited to other clusters (by name, or by the template's labels)."""
    if caller.scope.unlimited or cluster in caller.scope.clusters:
        return
    if labels is None:
        labels = cluster_labels(fleet, cluster)
    if not caller.scope.covers(cluster, labels):
        raise Refused(f"{caller.name} may not act on cluster {cluster}")
