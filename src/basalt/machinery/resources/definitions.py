"""The table of resource types: namespace, aliases, sensitivity and table columns."""

from __future__ import annotations

import builtins
from dataclasses import dataclass

from ..errors import BasaltError, ErrorKind
from . import specs
from .record import Spec


class UnknownResourceTypeError(BasaltError):
    """A resource type or alias that no definition has."""

    kind = ErrorKind.NOT_FOUND


@dataclass(frozen=True)
class ResourceDefinition:
    """How one resource type is named, guarded and printed."""

    type: str
    namespace: str
    spec: builtins.type[Spec]
    aliases: tuple[str, ...]
    description: str
    #: (column header, spec key) for table output, after NODE, ID and VERSION. A key may
    #: go into nested fields with dots (``partitions.label``: that field of each item).
    columns: tuple[tuple[str, str], ...] = ()
    #: Sensitive resources (keys, configs) are readable by os:admin only.
    sensitive: bool = False
    #: More columns for ``-o wide``, after ``columns``.
    wide_columns: tuple[tuple[str, str], ...] = ()

    def matches(self, name: str) -> bool:
        wanted = name.lower()
        return wanted == self.type.lower() or wanted in self.aliases


DEFINITIONS: tuple[ResourceDefinition, ...] = (
    ResourceDefinition(
        "ResourceDefinitions",
        "meta",
        specs.ResourceDefinitionSpec,
        ("rd", "rds"),
        "The resource types this node knows.",
        (("NAMESPACE", "namespace"), ("ALIASES", "aliases"), ("SENSITIVE", "sensitive")),
    ),
    ResourceDefinition(
        "MachineConfigs",
        "config",
        specs.MachineConfigSpec,
        ("machineconfig", "machineconfigs", "mc"),
        "The machine config the node runs (id v1alpha1), and a staged one (id staged).",
        (("STAGED", "staged"),),
        sensitive=True,
    ),
    ResourceDefinition(
        "MachineStatuses",
        "runtime",
        specs.MachineStatusSpec,
        ("machinestatus", "machinestatuses", "ms"),
        "Lifecycle stage and readiness.",
        (("STAGE", "stage"), ("READY", "ready"), ("UNMET", "unmetConditions")),
    ),
    ResourceDefinition(
        "Services",
        "runtime",
        specs.ServiceStatusSpec,
        ("service", "services", "svc"),
        "Supervised services.",
        (
            ("STATE", "state"),
            ("HEALTH", "health"),
            ("RESTARTS", "restarts"),
            ("MESSAGE", "message"),
        ),
    ),
    ResourceDefinition(
        "Hostnames",
        "network",
        specs.HostnameSpec,
        ("hostname", "hostnames"),
        "The node's host name.",
        (("HOSTNAME", "hostname"), ("DOMAINNAME", "domainname")),
    ),
    ResourceDefinition(
        "NodeAddresses",
        "network",
        specs.NodeAddressesSpec,
        ("nodeaddress", "nodeaddresses"),
        "The addresses the node serves on (all addresses of every link: 'get addresses').",
        (("ADDRESSES", "addresses"),),
    ),
    ResourceDefinition(
        "Members",
        "cluster",
        specs.MemberSpec,
        ("member", "members"),
        "Nodes of the cluster: the control planes' member list, plus the discovery "
        "service's affiliates it lacks (DiscoveryConfig).",
        (
            ("HOSTNAME", "hostname"),
            ("MACHINE TYPE", "machineType"),
            ("ADDRESSES", "addresses"),
            ("BASALT", "version"),
        ),
    ),
    ResourceDefinition(
        "Affiliates",
        "cluster",
        specs.AffiliateSpec,
        ("affiliate", "affiliates"),
        "Nodes of the cluster, from the discovery service (DiscoveryConfig).",
        (
            ("HOSTNAME", "hostname"),
            ("MACHINE TYPE", "machineType"),
            ("ADDRESSES", "addresses"),
            ("BASALT", "version"),
        ),
    ),
    ResourceDefinition(
        "DiscoveryStatuses",
        "cluster",
        specs.DiscoveryStatusSpec,
        ("discoverystatus", "discoverystatuses", "discovery"),
        "This node's link to the discovery service: state, affiliates seen, last error.",
        (
            ("STATE", "state"),
            ("URL", "url"),
            ("AFFILIATES", "affiliates"),
            ("LAST ERROR", "lastError"),
        ),
    ),
    ResourceDefinition(
        "KubernetesAssets",
        "k8s",
        specs.KubernetesAssetsSpec,
        ("kubernetesasset", "kubernetesassets", "k8sassets"),
        "Kubernetes files rendered from the config: PKI, static pods, kubeconfigs, kubelet.",
        (("KUBERNETES", "kubernetesVersion"), ("TYPE", "machineType")),
    ),
    ResourceDefinition(
        "IssuedCertificates",
        "cluster",
        specs.IssuedCertificateSpec,
        ("issuedcertificate", "issuedcertificates", "certs"),
        "Node certificates this control plane's trust service signed (by host name).",
        (("NAMES", "names"), ("FROM", "requestedFrom"), ("SERIAL", "serial")),
    ),
    ResourceDefinition(
        "EtcdMembers",
        "etcd",
        specs.EtcdMemberSpec,
        ("etcdmember", "etcdmembers"),
        "etcd cluster members, as this control plane's etcd reports them.",
        (("HOSTNAME", "name"), ("PEER URLS", "peerUrls"), ("LEARNER", "isLearner")),
    ),
    ResourceDefinition(
        "EtcdStatuses",
        "etcd",
        specs.EtcdStatusSpec,
        ("etcdstatus", "etcdstatuses"),
        "This control plane's etcd member: leader, raft index, database size.",
        (
            ("MEMBER", "memberId"),
            ("LEADER", "leader"),
            ("RAFT INDEX", "raftIndex"),
            ("DB SIZE", "dbSize"),
            ("ERRORS", "errors"),
        ),
    ),
    ResourceDefinition(
        "UpdateStatuses",
        "runtime",
        specs.UpdateStatusSpec,
        ("updatestatus", "updatestatuses", "update"),
        "The updater: its channel, the running, newest and next release, what it does now.",
        (
            ("MODE", "mode"),
            ("CHANNEL", "channel"),
            ("CURRENT", "current"),
            ("NEXT HOP", "nextHop"),
            ("STATE", "state"),
            ("LAST ERROR", "lastError"),
        ),
    ),
    ResourceDefinition(
        "BootStatuses",
        "runtime",
        specs.BootStatusSpec,
        ("bootstatus", "bootstatuses", "boot"),
        "The A/B slot the node runs, on trial or good, and the last fallback and why.",
        (
            ("SLOT", "slot"),
            ("BASALT", "version"),
            ("ON TRIAL", "onTrial"),
            ("PREVIOUS", "previousVersion"),
            ("FELL BACK FROM", "fellBackFrom"),
            ("REASON", "reason"),
        ),
    ),
    ResourceDefinition(
        "TimeStatuses",
        "runtime",
        specs.TimeStatusSpec,
        ("timestatus", "timestatuses", "time"),
        "Time synchronisation (SNTP): in sync or not, the server, the last offset.",
        (
            ("SYNCED", "synced"),
            ("SERVER", "server"),
            ("OFFSET", "offset"),
            ("ADJUSTMENT", "adjustment"),
            ("ERROR", "error"),
        ),
    ),
    ResourceDefinition(
        "SystemStats",
        "perf",
        specs.SystemStatsSpec,
        ("systemstat", "systemstats", "stats"),
        "CPU and memory use over the last hour (id history), sampled by the node itself.",
        (("INTERVAL", "interval"), ("MEMORY TOTAL", "memoryTotal")),
    ),
    ResourceDefinition(
        "Versions",
        "runtime",
        specs.VersionSpec,
        ("version", "versions"),
        "The running Basalt version, and the image's schematic id and system extensions.",
        (
            ("TAG", "tag"),
            ("PLATFORM", "platform"),
            ("ARCH", "arch"),
            ("SCHEMATIC", "schematic"),
            ("EXTENSIONS", "extensions"),
            ("SKIPPED", "extensionsSkipped"),
        ),
    ),
    ResourceDefinition(
        "Disks",
        "hardware",
        specs.DiskSpec,
        ("disk", "disks", "blockdevice", "blockdevices"),
        "Block devices: model, size, serial, transport and partitions (the host's in "
        "container mode).",
        (
            ("SIZE", "size"),
            ("MODEL", "model"),
            ("TRANSPORT", "transport"),
            ("ROTATIONAL", "rotational"),
            ("SYSTEM", "systemDisk"),
        ),
        wide_columns=(
            ("SERIAL", "serial"),
            ("READONLY", "readonly"),
            ("PARTITIONS", "partitions.label"),
        ),
    ),
    ResourceDefinition(
        "Volumes",
        "hardware",
        specs.VolumeSpec,
        ("volume", "volumes"),
        "Basalt's partitions and mounts with their usage (container mode: the node's state "
        "and ephemeral directories).",
        (
            ("DEVICE", "device"),
            ("PATH", "path"),
            ("FS", "filesystem"),
            ("SIZE", "size"),
            ("USED", "used"),
            ("FREE", "free"),
        ),
        wide_columns=(("MOUNTED", "mounted"), ("CONTENTS", "contents")),
    ),
    ResourceDefinition(
        "Links",
        "network",
        specs.LinkSpec,
        ("link", "links"),
        "Network links (the host's for process nodes, which share its network namespace).",
        (("INDEX", "index"), ("TYPE", "type"), ("OPERSTATE", "operstate"), ("MTU", "mtu")),
        wide_columns=(("MAC", "mac"), ("KIND", "kind"), ("FLAGS", "flags")),
    ),
    ResourceDefinition(
        "Addresses",
        "network",
        specs.AddressSpec,
        ("address", "addresses", "addr"),
        "Addresses on every link (the node's own: 'get nodeaddresses').",
        (("LINK", "link"), ("ADDRESS", "address"), ("FAMILY", "family")),
        wide_columns=(("SCOPE", "scope"), ("FLAGS", "flags")),
    ),
    ResourceDefinition(
        "Routes",
        "network",
        specs.RouteSpec,
        ("route", "routes"),
        "Routes of every table.",
        (
            ("DESTINATION", "destination"),
            ("GATEWAY", "gateway"),
            ("LINK", "link"),
            ("TABLE", "table"),
            ("METRIC", "metric"),
        ),
        wide_columns=(
            ("FAMILY", "family"),
            ("SOURCE", "source"),
            ("PROTOCOL", "protocol"),
            ("SCOPE", "scope"),
            ("TYPE", "type"),
        ),
    ),
    ResourceDefinition(
        "KernelParams",
        "runtime",
        specs.KernelParamSpec,
        ("kernelparam", "kernelparams", "sysctls"),
        "Kernel parameters the config sets (SysctlConfig and Basalt's defaults): the value "
        "now and the one wanted.",
        (("VALUE", "value"), ("WANTED", "wanted"), ("APPLIED", "applied")),
        wide_columns=(("SOURCE", "source"), ("ERROR", "error")),
    ),
)


def resolve_type(name: str) -> ResourceDefinition:
    """The definition for a type name or alias (case-insensitive)."""
    for definition in DEFINITIONS:
        if definition.matches(name):
            return definition
    known = ", ".join(sorted(d.aliases[0] for d in DEFINITIONS))
    raise UnknownResourceTypeError(
        f"unknown resource type {name!r}",
        hint=f"known types: {known} (or run 'basaltctl get rd')",
    )
