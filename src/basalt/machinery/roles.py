"""API roles and the table that gives every RPC its roles.

A client's roles travel in its certificate's Organization field. An RPC missing from
:data:`RPC_ROLES` is admin-only, so a new RPC is closed until someone opens it here.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum


class Role(StrEnum):
    """What a client may do."""

    #: Everything, including secrets (machine config, keys) and minting client configs.
    ADMIN = "os:admin"
    #: Day-2 operations (reboot, service restart, etcd maintenance) and every read
    #: that is not sensitive.
    OPERATOR = "os:operator"
    #: Read-only access to everything that is not sensitive.
    READER = "os:reader"
    #: Read etcd members and status, and take etcd snapshots.
    ETCD_BACKUP = "os:etcd:backup"
    #: Held only by control-plane nodes forwarding a request for a client; the target
    #: then takes the client's roles from request metadata. Never minted for clients.
    IMPERSONATOR = "os:impersonator"


#: Roles a client certificate may carry (what ``config new --roles`` accepts).
CLIENT_ROLES = (Role.ADMIN, Role.OPERATOR, Role.READER, Role.ETCD_BACKUP)

_SERVICE = "/basalt.api.v1alpha1.MachineService/"
_RESOURCES = "/basalt.api.v1alpha1.ResourceService/"

_READ = frozenset({Role.ADMIN, Role.OPERATOR, Role.READER})
_OPERATE = frozenset({Role.ADMIN, Role.OPERATOR})
_ADMIN = frozenset({Role.ADMIN})

RPC_ROLES: dict[str, frozenset[Role]] = {
    _SERVICE + "Version": _READ | {Role.ETCD_BACKUP},
    _SERVICE + "ApplyConfiguration": _ADMIN,
    _SERVICE + "Reboot": _OPERATE,
    _SERVICE + "Shutdown": _OPERATE,
    _SERVICE + "Reset": _ADMIN,
    _SERVICE + "ServiceList": _READ,
    _SERVICE + "ServiceAction": _OPERATE,
    _SERVICE + "Logs": _READ,
    _SERVICE + "Dmesg": _READ,
    _SERVICE + "Events": _READ,
    _SERVICE + "List": _READ,
    _SERVICE + "Read": _ADMIN,
    _SERVICE + "Copy": _ADMIN,
    _SERVICE + "Processes": _READ,
    _SERVICE + "Memory": _READ,
    _SERVICE + "Mounts": _READ,
    _SERVICE + "Netstat": _READ,
    _SERVICE + "Health": _READ,
    _SERVICE + "Disks": _READ,
    _SERVICE + "GenerateClientConfiguration": _ADMIN,
    _SERVICE + "Bootstrap": _ADMIN,
    _SERVICE + "EtcdRecover": _ADMIN,
    _SERVICE + "EtcdMemberList": _READ | {Role.ETCD_BACKUP},
    _SERVICE + "EtcdStatus": _READ | {Role.ETCD_BACKUP},
    # Membership changes can end the etcd cluster or cost its quorum: admin only.
    _SERVICE + "EtcdLeaveCluster": _ADMIN,
    _SERVICE + "EtcdRemoveMember": _ADMIN,
    _SERVICE + "EtcdForfeitLeadership": _OPERATE,
    # A snapshot holds every Kubernetes Secret: the backup role and admins only (audited).
    _SERVICE + "EtcdSnapshot": _ADMIN | {Role.ETCD_BACKUP},
    _SERVICE + "EtcdDefragment": _OPERATE,
    _SERVICE + "EtcdAlarmList": _READ | {Role.ETCD_BACKUP},
    _SERVICE + "EtcdAlarmDisarm": _OPERATE,
    _SERVICE + "Kubeconfig": _ADMIN,
    # Installing software and choosing which slot boots: admin only.
    _SERVICE + "Upgrade": _ADMIN,
    _SERVICE + "UpgradeIndex": _ADMIN,
    _SERVICE + "Rollback": _ADMIN,
    _SERVICE + "UpdateCheck": _ADMIN,
    # Containers: importing images is an operation; running one runs arbitrary code.
    _SERVICE + "ImageImport": _OPERATE,
    _SERVICE + "ImageList": _READ,
    _SERVICE + "ContainerRun": _ADMIN,
    # The operator's toolbox (docs/toolbox.md).
    _SERVICE + "Containers": _READ,
    _SERVICE + "Stats": _READ,
    _SERVICE + "Cgroups": _READ,
    # Packets may carry what no log shows (plaintext protocols): operators and admins.
    _SERVICE + "PacketCapture": _OPERATE,
    _SERVICE + "TimeCheck": _READ,
    _SERVICE + "DiskUsage": _READ,
    # META holds boot state; its user keys are admin business, reads included.
    _SERVICE + "MetaRead": _ADMIN,
    _SERVICE + "MetaWrite": _ADMIN,
    _SERVICE + "MetaDelete": _ADMIN,
    _SERVICE + "WipeDisk": _ADMIN,
    _SERVICE + "ControllerGraph": _READ,
    _SERVICE + "ClusterHealth": _READ,
    # Resource reads; sensitive types are further limited to admin by the servicer.
    _RESOURCES + "Get": _READ,
    _RESOURCES + "List": _READ,
    _RESOURCES + "Watch": _READ,
}

#: What maintenance mode (no config yet, no client certificates) serves.
MAINTENANCE_RPCS = frozenset(
    {
        _SERVICE + "Version",
        _SERVICE + "ApplyConfiguration",
        _SERVICE + "Disks",
    }
)


def allowed_roles(method: str) -> frozenset[Role]:
    """The roles that may call ``method`` (a full gRPC method name)."""
    return RPC_ROLES.get(method, _ADMIN)


def is_allowed(method: str, roles: Iterable[Role]) -> bool:
    return not allowed_roles(method).isdisjoint(roles)


def parse_roles(values: Iterable[str]) -> set[Role]:
    """Known roles among ``values``; unknown organizations carry no rights."""
    known = {r.value: r for r in Role}
    return {known[v] for v in values if v in known}
