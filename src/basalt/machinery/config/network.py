"""Host name, links, resolvers and time sync."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from ._base import Document, Model, register, replace_on_merge
from ._types import Hostname, HostOrIP, InterfaceAddress, IPAddress, Subnet, invalid


@register
class HostnameConfig(Document):
    """The node's host name: given, or derived from the machine id."""

    kind: Literal["HostnameConfig"] = Field(description="`HostnameConfig`.")
    hostname: Hostname | None = Field(default=None, description="The host name to use.")
    auto: Literal["stable"] | None = Field(
        default=None,
        description="`stable`: derive a host name from the machine id (leave unset with hostname).",
    )

    @model_validator(mode="after")
    def _one_source(self) -> HostnameConfig:
        if self.hostname is None and self.auto is None:
            raise invalid("set either hostname or auto: stable", "e.g. hostname: cp-1")
        if self.hostname is not None and self.auto is not None:
            raise invalid("hostname and auto: stable exclude each other", "keep one of them")
        return self


class Route(Model):
    """A static route."""

    network: Subnet = Field(
        default="0.0.0.0/0",
        description="Destination CIDR; the default is the IPv4 default route (`::/0` for IPv6).",
    )
    gateway: IPAddress = Field(description="Next hop.")
    metric: int = Field(default=1024, ge=0, le=2**32 - 1, description="Route metric.")


@register
class LinkConfig(Document):
    """One network link, matched by its kernel name."""

    named: ClassVar[bool] = True
    kind: Literal["LinkConfig"] = Field(description="`LinkConfig`.")
    name: str = Field(
        min_length=1,
        max_length=15,
        pattern=r"^[A-Za-z0-9_.:-]+$",
        description="Link name, e.g. `eth0`.",
    )
    up: bool = Field(default=True, description="Bring the link up.")
    addresses: list[InterfaceAddress] = Field(
        default_factory=list,
        description="Static addresses with prefix length, e.g. `192.0.2.10/24`.",
        json_schema_extra=replace_on_merge(),
    )
    routes: list[Route] = Field(default_factory=list, description="Static routes.")
    dhcp: bool = Field(default=False, description="Run a DHCPv4 client on this link.")
    mtu: int | None = Field(default=None, ge=68, le=65535, description="MTU in bytes.")


@register
class ResolverConfig(Document):
    """DNS resolvers for the host (not for pods)."""

    kind: Literal["ResolverConfig"] = Field(description="`ResolverConfig`.")
    nameservers: list[IPAddress] = Field(
        default_factory=list,
        max_length=3,
        description="Name server addresses.",
        json_schema_extra=replace_on_merge(),
    )
    search_domains: list[Hostname] = Field(default_factory=list, description="DNS search domains.")


@register
class TimeSyncConfig(Document):
    """SNTP time synchronisation."""

    kind: Literal["TimeSyncConfig"] = Field(description="`TimeSyncConfig`.")
    enabled: bool = Field(default=True, description="Synchronise the clock.")
    servers: list[HostOrIP] = Field(
        default_factory=list,
        description="NTP servers.",
        json_schema_extra=replace_on_merge(),
    )
    boot_timeout_seconds: int = Field(
        default=120, ge=0, le=3600, description="How long boot waits for a first sync."
    )
