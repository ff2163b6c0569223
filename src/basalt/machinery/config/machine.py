"""``MachineConfig``: what this node is and how it is installed."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, Field, model_validator

from ._base import Document, Model, register, replace_on_merge, secret
from ._types import DiskPath, HostOrIP, KernelArg, Subnet, Token, invalid


def _pem_certificate(value: str) -> str:
    from ..pki import PKIError, load_certificate

    try:
        load_certificate(value)
    except PKIError as exc:
        raise invalid(str(exc), "paste the whole PEM block, BEGIN and END lines included") from None
    return value


def _pem_ca_certificate(value: str) -> str:
    """A PEM certificate that is a CA (basic constraints ``ca: true``), and nothing else."""
    from cryptography import x509

    from ..pki import load_certificate

    _pem_certificate(value)
    if value.count("-----BEGIN") != 1:
        raise invalid(
            "holds more than one PEM block",
            "list each CA certificate as its own item; never a private key",
        )
    try:
        constraints = load_certificate(value).extensions.get_extension_for_class(
            x509.BasicConstraints
        )
        is_ca = constraints.value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise invalid(
            "is not a CA certificate (no basic constraints with ca: true)",
            "list CA certificates only, e.g. the OS CA from a secrets bundle",
        )
    return value


#: A PEM CA certificate, alone (no key).
PEMCACertificate = Annotated[str, AfterValidator(_pem_ca_certificate)]


def _pem_private_key(value: str) -> str:
    from ..pki import PKIError, load_private_key

    try:
        load_private_key(value)
    except PKIError as exc:
        raise invalid(str(exc), "paste the whole unencrypted PEM key block") from None
    return value


class CertificateAndKey(Model):
    """A PEM certificate and, on nodes that sign with it, its PEM private key."""

    crt: str = Field(description="PEM-encoded certificate.")
    key: str | None = Field(
        default=None,
        description="PEM-encoded private key. Only control planes hold CA keys.",
        json_schema_extra=secret(),
    )

    @model_validator(mode="after")
    def _check(self) -> CertificateAndKey:
        from ..pki import PKIError, key_matches_certificate

        _pem_certificate(self.crt)
        if self.key is not None:
            _pem_private_key(self.key)
            try:
                matches = key_matches_certificate(self.crt, self.key)
            except PKIError:
                matches = False
            if not matches:
                raise invalid(
                    "the private key does not belong to the certificate",
                    "take crt and key from the same secrets bundle",
                )
        return self


class InstallSpec(Model):
    """Where and how a metal node installs itself on first boot."""

    disk: DiskPath | None = Field(
        default=None, description="Block device to install to, e.g. `/dev/vda`. Required on metal."
    )
    image: str = Field(description="The system image reference to install.")
    wipe: bool = Field(
        default=False,
        description="Install even when `disk` is not blank: another disk's partition table "
        "and first and last MiB are overwritten; on the boot disk, STATE and EPHEMERAL are "
        "formatted again (the stored config and node identity are lost). The rest of the "
        "disk is not zeroed. Without it, such a disk is refused and left unchanged.",
    )
    extra_kernel_args: list[KernelArg] = Field(
        default_factory=list,
        description="Extra kernel command-line arguments, one per item, appended to the "
        "installed boot entry's options after the image's own (the last value wins). Read "
        "at install only; `basalt.root`, `basalt.slot`, `basalt.schematic`, `basalt.entry`, "
        "`init` and `rdinit` belong to the boot path and are refused.",
    )


class NodeIPSpec(Model):
    """How kubelet picks the node IP."""

    valid_subnets: list[Subnet] = Field(
        default_factory=list,
        description="Subnets the node IP must come from; empty means any address.",
        json_schema_extra=replace_on_merge(),
    )


class KubeletSpec(Model):
    """The kubelet that runs on every node."""

    image: str = Field(description="The kubelet image or extension reference.")
    extra_args: dict[str, str] = Field(
        default_factory=dict, description="Extra kubelet flags, without the leading `--`."
    )
    node_ip: NodeIPSpec = Field(
        default_factory=NodeIPSpec, alias="nodeIP", description="Node IP selection."
    )


class Features(Model):
    """Switches for behaviour that changes between version contracts."""

    rbac: bool = Field(default=True, description="Enforce API roles from client certificates.")
    stable_hostname: bool = Field(
        default=True,
        description="Without a HostnameConfig, derive a stable host name from the machine id.",
    )


@register
class MachineConfig(Document):
    """The node's identity: its type, the OS API CA, install and kubelet settings."""

    kind: Literal["MachineConfig"] = Field(description="`MachineConfig`.")
    type: Literal["controlplane", "worker"] = Field(description="`controlplane` or `worker`.")
    version_contract: str = Field(
        description="The version contract the config was generated with (`X.Y`)."
    )
    token: Token = Field(
        description="Join token a worker presents to get its API certificate signed.",
        json_schema_extra=secret(),
    )
    ca: CertificateAndKey = Field(
        description="The OS API CA. Control planes hold its key; workers only the certificate."
    )
    accepted_cas: list[PEMCACertificate] = Field(
        default_factory=list,
        alias="acceptedCAs",
        description="More CA certificates (PEM, certificates only, never keys) whose client "
        "and node certificates the API accepts besides `ca`'s. Used while the OS API CA is "
        "rotated (`basaltctl rotate-ca`): first the new CA is accepted here, then it becomes "
        "`ca` and the old one is listed here until every client has a new certificate. "
        "Changes apply without a reboot.",
        json_schema_extra=replace_on_merge(),
    )
    cross_signed_ca: PEMCACertificate | None = Field(
        default=None,
        alias="crossSignedCA",
        description="`ca`'s certificate signed by the previous OS CA (same subject and key "
        "as `ca.crt`). The node serves it after its own certificate, so that clients that "
        "trust only the previous CA still verify the node while the OS API CA is rotated "
        "(`basaltctl rotate-ca` sets it in its issue step and removes it when the previous "
        "CA is dropped). Changes apply without a reboot.",
    )
    cert_sans: list[HostOrIP] = Field(
        default_factory=list,
        alias="certSANs",
        description="Extra names and addresses for the node's API server certificate.",
    )
    install: InstallSpec = Field(description="Installation on metal.")
    kubelet: KubeletSpec = Field(description="Kubelet settings.")
    features: Features = Field(default_factory=Features, description="Feature switches.")
