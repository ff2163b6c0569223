"""Whole-config checks that no single field can make: cross-document and mode rules.

Each rule is a small function that yields Problems; :data:`RULES` lists them all, so
``validate`` reports every error at once.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Callable, Iterator
from enum import StrEnum

from ..errors import ConfigValidationError, ContractError, Problem
from ._base import Document
from .bundle import ConfigBundle
from .cluster import ClusterConfig
from .contract import Contract, check_contract
from .machine import CertificateAndKey, MachineConfig
from .network import TimeSyncConfig


class Mode(StrEnum):
    """Where the config will run: a real machine, or a process on a host."""

    METAL = "metal"
    CONTAINER = "container"

    @property
    def requires_install(self) -> bool:
        return self is Mode.METAL


Rule = Callable[[ConfigBundle, Mode | None], Iterator[Problem]]
EXPIRY_WARNING = dt.timedelta(days=30)


def required_documents(bundle: ConfigBundle, mode: Mode | None) -> Iterator[Problem]:
    for kind in (MachineConfig, ClusterConfig):
        if bundle.first(kind) is None:
            yield bundle.problem(
                kind.kind_name(),
                (),
                "document is missing",
                "a machine config needs one MachineConfig and one ClusterConfig; "
                "generate it with 'basaltctl gen config'",
            )


def _ca_slots(
    bundle: ConfigBundle,
) -> Iterator[tuple[Document, tuple[str, ...], CertificateAndKey | None]]:
    machine, cluster = bundle.first(MachineConfig), bundle.first(ClusterConfig)
    if machine is not None:
        yield machine, ("ca",), machine.ca
    if cluster is not None:
        yield cluster, ("etcd", "ca"), cluster.etcd.ca
        yield cluster, ("kubernetes", "ca"), cluster.kubernetes.ca
        yield cluster, ("kubernetes", "aggregatorCA"), cluster.kubernetes.aggregator_ca


def secrets_by_role(bundle: ConfigBundle, mode: Mode | None) -> Iterator[Problem]:
    """Control planes hold every CA key; workers hold none."""
    machine, cluster = bundle.first(MachineConfig), bundle.first(ClusterConfig)
    if machine is None or cluster is None:
        return
    controlplane = machine.type == "controlplane"
    for document, loc, pair in _ca_slots(bundle):
        if controlplane and (pair is None or pair.key is None):
            yield bundle.problem(
                document,
                (*loc, "key"),
                "control planes need this CA's private key",
                "regenerate the config with 'basaltctl gen config --with-secrets'",
            )
        if not controlplane and pair is not None and pair.key is not None:
            yield bundle.problem(
                document,
                (*loc, "key"),
                "workers must not hold CA private keys",
                "remove the key; generate worker configs with 'basaltctl gen config'",
            )
    k8s = cluster.kubernetes
    for loc, value in (
        (("kubernetes", "serviceAccountKey"), k8s.service_account_key),
        (("kubernetes", "secretboxEncryptionSecret"), k8s.secretbox_encryption_secret),
    ):
        if controlplane and value is None:
            yield bundle.problem(
                cluster,
                loc,
                "control planes need this secret",
                "regenerate the config with 'basaltctl gen config --with-secrets'",
            )
        if not controlplane and value is not None:
            yield bundle.problem(
                cluster,
                loc,
                "workers must not hold this secret",
                "remove it; generate worker configs with 'basaltctl gen config'",
            )


def ca_certificates(bundle: ConfigBundle, mode: Mode | None) -> Iterator[Problem]:
    """CA slots hold CA certificates that are valid now and not about to expire."""
    from cryptography import x509

    from ..pki import load_certificate

    now = dt.datetime.now(dt.UTC)
    for document, loc, pair in _ca_slots(bundle):
        if pair is None:
            continue
        cert = load_certificate(pair.crt)
        try:
            is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            is_ca = False
        where = (*loc, "crt")
        if not is_ca:
            yield bundle.problem(
                document,
                where,
                "is not a CA certificate",
                "use the CA certificate from the secrets bundle",
            )
        if cert.not_valid_after_utc <= now:
            yield bundle.problem(
                document,
                where,
                f"expired on {cert.not_valid_after_utc:%Y-%m-%d}",
                "rotate this CA: generate new secrets and roll them out",
            )
        elif cert.not_valid_after_utc - now < EXPIRY_WARNING:
            yield bundle.problem(
                document,
                where,
                f"expires on {cert.not_valid_after_utc:%Y-%m-%d}",
                "plan a CA rotation",
                severity="warning",
            )
        if cert.not_valid_before_utc > now:
            yield bundle.problem(
                document,
                where,
                f"is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M}",
                "check the clock of the machine that generated it",
            )


def accepted_cas(bundle: ConfigBundle, mode: Mode | None) -> Iterator[Problem]:
    """``acceptedCAs``: warnings for repeats, the OS CA itself, and expired entries (a
    rotation never finished; none keeps a node from its config). ``crossSignedCA``: the
    OS CA's own subject and key, or it would be served in a chain that cannot verify."""
    from ..pki import load_certificate

    machine = bundle.first(MachineConfig)
    if machine is None:
        return
    now = dt.datetime.now(dt.UTC)
    seen: set[str] = set()
    for index, pem in enumerate(machine.accepted_cas):
        where = ("acceptedCAs", index)
        if pem.strip() == machine.ca.crt.strip():
            yield bundle.problem(
                machine, where, "is the OS CA itself (ca.crt)", "remove it", severity="warning"
            )
        elif pem.strip() in seen:
            yield bundle.problem(
                machine, where, "is listed twice", "remove the repeat", severity="warning"
            )
        seen.add(pem.strip())
        expires = load_certificate(pem).not_valid_after_utc
        if expires <= now:
            yield bundle.problem(
                machine,
                where,
                f"expired on {expires:%Y-%m-%d}; it accepts nobody",
                "remove it, or finish the rotation with 'basaltctl rotate-ca'",
                severity="warning",
            )
    cross = machine.cross_signed_ca
    if cross is not None:
        ca, crossed = load_certificate(machine.ca.crt), load_certificate(cross)
        if crossed.subject != ca.subject or crossed.public_key() != ca.public_key():
            yield bundle.problem(
                machine,
                ("crossSignedCA",),
                "is not ca.crt signed by another CA (its subject or key differs)",
                "remove it; 'basaltctl rotate-ca' sets it while it rotates the OS CA",
            )


def install_for_mode(bundle: ConfigBundle, mode: Mode | None) -> Iterator[Problem]:
    machine = bundle.first(MachineConfig)
    if machine is None or mode is None:
        return
    if mode.requires_install and machine.install.disk is None:
        yield bundle.problem(
            machine,
            ("install", "disk"),
            "required on metal",
            "set it with 'gen config --install-disk /dev/vda' or a patch on install.disk",
        )
    if not mode.requires_install and machine.install.disk is not None:
        yield bundle.problem(
            machine,
            ("install", "disk"),
            "is ignored in container mode (nothing is installed)",
            severity="warning",
        )


def subnets(bundle: ConfigBundle, mode: Mode | None) -> Iterator[Problem]:
    """Pod and service subnets may not overlap each other or themselves."""
    cluster = bundle.first(ClusterConfig)
    if cluster is None:
        return
    listed = [("podSubnets", i, s) for i, s in enumerate(cluster.network.pod_subnets)]
    listed += [("serviceSubnets", i, s) for i, s in enumerate(cluster.network.service_subnets)]
    networks = [(f, i, ipaddress.ip_network(s)) for f, i, s in listed]
    for n, (field_a, index_a, net_a) in enumerate(networks):
        for field_b, index_b, net_b in networks[n + 1 :]:
            if net_a.version == net_b.version and net_a.overlaps(net_b):
                yield bundle.problem(
                    cluster,
                    ("network", field_b, index_b),
                    f"{net_b} overlaps network.{field_a}[{index_a}] ({net_a})",
                    "pod and service subnets must be disjoint",
                )


def version_contract(bundle: ConfigBundle, mode: Mode | None) -> Iterator[Problem]:
    machine = bundle.first(MachineConfig)
    if machine is None:
        return
    try:
        check_contract(Contract.parse(machine.version_contract))
    except ContractError as exc:
        yield bundle.problem(machine, ("versionContract",), exc.message, exc.hint)


def time_sync(bundle: ConfigBundle, mode: Mode | None) -> Iterator[Problem]:
    config = bundle.first(TimeSyncConfig)
    if config is not None and config.enabled and not config.servers:
        yield bundle.problem(
            config,
            ("servers",),
            "time sync is enabled but has no servers",
            "list at least one NTP server, or set enabled: false",
        )


RULES: tuple[Rule, ...] = (
    required_documents,
    secrets_by_role,
    ca_certificates,
    accepted_cas,
    install_for_mode,
    subnets,
    version_contract,
    time_sync,
)


def validate_bundle(
    bundle: ConfigBundle, mode: Mode | None = None, *, complete: bool = True
) -> list[Problem]:
    """Every problem the rules find, errors and warnings, in rule order.

    ``complete=False`` checks a partial config (a file of extra documents) without
    demanding the MachineConfig and ClusterConfig that a whole machine config has.
    """
    rules = RULES if complete else tuple(r for r in RULES if r is not required_documents)
    return [problem for rule in rules for problem in rule(bundle, mode)]


def check_bundle(
    bundle: ConfigBundle, mode: Mode | None = None, *, complete: bool = True
) -> list[Problem]:
    """Raise :class:`ConfigValidationError` on any error; return the warnings otherwise."""
    problems = validate_bundle(bundle, mode, complete=complete)
    ConfigValidationError.raise_if_errors(problems, source=bundle.source)
    return problems
