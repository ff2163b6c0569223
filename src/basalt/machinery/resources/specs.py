"""The specs of Basalt's resources (camelCase JSON on the wire; see :mod:`.record`)."""

from __future__ import annotations

from dataclasses import field
from typing import Literal

from .record import Spec

Stage = Literal[
    "maintenance",
    "booting",
    "running",
    "rebooting",
    "shuttingDown",
    "resetting",
    "upgrading",
    "applying",
]


class UnmetCondition(Spec):
    name: str
    reason: str


class MachineStatusSpec(Spec):
    """The node's lifecycle stage and whether it is ready."""

    stage: Stage
    ready: bool
    unmet_conditions: list[UnmetCondition] = field(default_factory=list)


class ServiceStatusSpec(Spec):
    """One supervised service."""

    state: str
    healthy: bool
    health: str
    message: str = ""
    restarts: int = 0


class HostnameSpec(Spec):
    hostname: str
    domainname: str = ""


class NodeAddressesSpec(Spec):
    addresses: list[str]


class MemberSpec(Spec):
    """A node of the cluster, as the trust service's member list reports it; with
    discovery, also an affiliate that list lacks (``last_seen``: when its record last
    changed)."""

    hostname: str
    machine_type: str
    addresses: list[str]
    version: str
    last_seen: float


class AffiliateSpec(Spec):
    """A node of the cluster as the discovery service relays it (decrypted by this node
    with the cluster's key; the id is the affiliate id the node chose)."""

    node_id: str
    hostname: str
    machine_type: str
    addresses: list[str]
    version: str
    #: The node's etcd peer URL (control planes), '' otherwise.
    etcd_peer_url: str = ""


class DiscoveryStatusSpec(Spec):
    """This node's link to the discovery service (``DiscoveryConfig``).

    ``state``: ``disabled`` (no DiscoveryConfig, or ``enabled: false``), ``connecting``,
    ``connected`` (the last publish and the last watch succeeded), ``failing`` (one of them
    failed: ``last_error`` says why, unreachable or refused; the node retries with backoff).
    """

    state: str
    url: str = ""
    affiliate_id: str = ""
    affiliates: int = 0
    last_published: float = 0.0
    last_error: str = ""


class IssuedCertificateSpec(Spec):
    """A node certificate this control plane's trust service signed: for which names,
    asked from where."""

    names: list[str]
    serial: str
    sha256: str
    requested_from: str
    issued: float


class VersionSpec(Spec):
    tag: str
    python: str
    platform: str
    arch: str
    #: The id of the schematic the image was built from ('' when it records none).
    schematic: str = ""
    #: The system extensions the node uses, as ``name version``.
    extensions: list[str] = field(default_factory=list)
    #: The image's extensions the node refused at boot (a changed file, a broken
    #: manifest, a fixed path another extension or the root has), as ``name: reason``.
    extensions_skipped: list[str] = field(default_factory=list)


class BootStatusSpec(Spec):
    """Which A/B slot the node runs, the one it would roll back to, and whether it fell back.

    ``on_trial``: the running slot has not passed its health gates yet. ``fell_back_from``
    names the slot whose upgrade failed (its boot tries ran out) and ``reason`` why.
    """

    slot: str
    version: str
    on_trial: bool
    tries_left: int | None = None
    previous_slot: str = ""
    previous_version: str = ""
    fell_back_from: str = ""
    reason: str = ""
    summary: str = ""


class UpdateStatusSpec(Spec):
    """What the node's updater (UpdateConfig) sees and does.

    ``state``: ``disabled`` (no UpdateConfig), ``checking``, ``up-to-date``,
    ``available`` (notify/manual: a newer release waits for an admin), ``waiting-window``,
    ``waiting-slot`` (the reboot coordinator said not now), ``downloading``,
    ``upgrading``, ``on-trial`` (the new slot runs its health gates, the slot still held),
    ``error``. ``refused``: releases that fell back on this node, never taken again by it.
    """

    mode: str = ""
    channel: str = ""
    current: str = ""
    available: str = ""
    next_hop: str = ""
    path: list[str] = field(default_factory=list)
    state: str = "disabled"
    last_check: str = ""
    next_check: str = ""
    next_window: str = ""
    last_error: str = ""
    slot_held: str = ""
    refused: list[str] = field(default_factory=list)


class TimeStatusSpec(Spec):
    """The clock, as SNTP sees it: synchronised or not, against which server, how far off.

    ``offset`` is the last correction measured (seconds; positive: the clock was behind);
    ``adjustment`` says what was done about it: ``step``, ``slew``, or ``none`` when this
    agent does not own the clock (not PID 1) and only observes.
    """

    synced: bool
    servers: list[str]
    server: str = ""
    stratum: int = 0
    offset: float = 0.0
    delay: float = 0.0
    adjustment: str = ""
    last_sync: float = 0.0
    error: str = ""


class SystemStatsSpec(Spec):
    """The node's CPU and memory use over the last hour, one sample every ``interval``
    seconds, oldest first; the lists are aligned (sample i is ``times[i]``).

    ``cpu``: percent of all CPUs busy since the sample before (100 = every CPU busy);
    ``memory``: bytes in use (total minus available) at that time; ``times``: Unix
    seconds; ``network_rx`` / ``network_tx``: bytes per second received and sent by every
    interface but loopback since the sample before (0 when ``/proc/net/dev`` could not
    be read). A sample the node could not read is left out, not zero.
    """

    interval: float
    cpu: list[float] = field(default_factory=list)
    memory: list[int] = field(default_factory=list)
    memory_total: int = 0
    times: list[float] = field(default_factory=list)
    network_rx: list[float] = field(default_factory=list)
    network_tx: list[float] = field(default_factory=list)


class MachineConfigSpec(Spec):
    """The machine config the node runs (sensitive: admin only)."""

    yaml: str
    staged: bool = False


class KubernetesAssetFile(Spec):
    """One rendered file: its path in the node view, its mode, and (unless secret) its digest."""

    path: str
    mode: str
    secret: bool
    sha256: str = ""


class KubernetesAssetsSpec(Spec):
    """The Kubernetes files the node rendered from its config (digests of secrets withheld)."""

    kubernetes_version: str
    machine_type: str
    files: list[KubernetesAssetFile]


class EtcdMemberSpec(Spec):
    """One etcd member (id is the member id in hex)."""

    name: str
    peer_urls: list[str]
    client_urls: list[str]
    is_learner: bool


class EtcdStatusSpec(Spec):
    """The local etcd member's view (ids in hex)."""

    member_id: str
    leader: str
    raft_index: int
    raft_term: int
    db_size: int
    version: str
    is_learner: bool
    errors: list[str] = field(default_factory=list)


class ResourceDefinitionSpec(Spec):
    type: str
    namespace: str
    aliases: list[str]
    sensitive: bool
    description: str


class DiskPartition(Spec):
    """One partition of a disk: its device, GPT name, where it starts and how big it is
    (bytes), and its GPT type (``efi``, ``linux-data`` or the type GUID; '' when the
    partition table could not be read)."""

    name: str
    label: str = ""
    start: int = 0
    size: int = 0
    type: str = ""


class DiskSpec(Spec):
    """A block device (``/sys/block``; loop, ram and zram devices left out); the id is its
    kernel name. ``transport``: ``nvme``, ``virtio``, ``sata``, ``usb``, ``scsi``,
    ``mmc``, ``xen`` or '' when unknown."""

    device: str
    size: int
    model: str = ""
    serial: str = ""
    rotational: bool = False
    readonly: bool = False
    transport: str = ""
    #: True for the disk the node booted from (the one holding its A/B slots).
    system_disk: bool = False
    partitions: list[DiskPartition] = field(default_factory=list)


class VolumeSpec(Spec):
    """One of Basalt's volumes; the id is its role (``EFI``, ``BASALT-A``, ``BASALT-B``,
    ``META``, ``STATE``, ``EPHEMERAL``).

    On metal a volume is a partition found by its GPT name; in container mode it is the
    node's state or ephemeral directory on the host's filesystem. ``size``, ``used`` and
    ``free`` are the filesystem's (statvfs; 0 when not mounted); ``contents`` is the bytes
    of the files under ``path`` in container mode, where the filesystem is shared with the
    host (-1 on metal, where ``used`` says it).
    """

    device: str = ""
    path: str = ""
    filesystem: str = ""
    mounted: bool = False
    size: int = 0
    used: int = 0
    free: int = 0
    contents: int = -1


class LinkSpec(Spec):
    """A network link (the id is its name). ``type``: the hardware type (``ether``,
    ``loopback``, ``none``, or the ARPHRD number); ``kind``: the virtual link's driver
    (``bridge``, ``veth``, ``vlan``...), '' for a physical one."""

    index: int
    type: str
    mtu: int
    mac: str = ""
    operstate: str = ""
    flags: list[str] = field(default_factory=list)
    kind: str = ""


class AddressSpec(Spec):
    """An address on a link; the id is ``link/address/prefix``."""

    link: str
    address: str
    family: str
    scope: str
    flags: list[str] = field(default_factory=list)


class RouteSpec(Spec):
    """A route of any table; ``destination`` is a network (``0.0.0.0/0`` for a default
    route), ``gateway`` and ``source`` '' when there is none."""

    family: str
    destination: str
    gateway: str = ""
    link: str = ""
    source: str = ""
    table: str = ""
    metric: int = 0
    protocol: str = ""
    scope: str = ""
    type: str = ""


class KernelParamSpec(Spec):
    """A kernel parameter Basalt's config (or its defaults) sets; the id is the key.

    ``value``: what the kernel reports now ('' when unreadable, ``error`` says why);
    ``wanted``: what Basalt sets; ``applied``: whether this node sets it (metal), or only
    shows it (container mode: the host's kernel is not the node's)."""

    value: str
    wanted: str
    source: str
    applied: bool
    error: str = ""
