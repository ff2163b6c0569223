"""Validated scalar types used by the config documents.

Each type checks one kind of value (a CIDR, a URL, a PEM certificate ...) and,
when it is wrong, raises an error that carries a hint the CLI prints.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import AfterValidator
from pydantic_core import PydanticCustomError

_HOST_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_TOKEN = re.compile(r"^[a-z0-9]{6}\.[a-z0-9]{16}$")
_SYSCTL = re.compile(r"^[a-z0-9_]+([./][a-zA-Z0-9_:@-]+)+$")
_MODULE = re.compile(r"^[A-Za-z0-9_-]+$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def invalid(message: str, hint: str | None = None) -> PydanticCustomError:
    """A validation error with a hint that :mod:`.loader` turns into a Problem."""
    return PydanticCustomError("basalt", "{message}", {"message": message, "hint": hint or ""})


def _subnet(value: str) -> str:
    try:
        network = ipaddress.ip_network(value, strict=True)
    except ValueError as exc:
        if "has host bits set" in str(exc):
            fixed = ipaddress.ip_network(value, strict=False)
            raise invalid(f"{value!r} has host bits set", f"did you mean {fixed}?") from None
        raise invalid(
            f"{value!r} is not a CIDR subnet", "write it as ADDRESS/PREFIX, e.g. 10.244.0.0/16"
        ) from None
    return str(network)


def _interface_address(value: str) -> str:
    if "/" not in value:
        raise invalid(
            f"{value!r} has no prefix length",
            "write the address with its prefix, e.g. 192.0.2.10/24",
        )
    try:
        return str(ipaddress.ip_interface(value))
    except ValueError:
        raise invalid(
            f"{value!r} is not an IP address with a prefix length",
            "write it as ADDRESS/PREFIX, e.g. 192.0.2.10/24 or 2001:db8::10/64",
        ) from None


def _ip_address(value: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise invalid(f"{value!r} is not an IP address", "e.g. 192.0.2.1 or 2001:db8::1") from None


def is_hostname(value: str) -> bool:
    """True when ``value`` is a valid RFC 1123 host name (lower case)."""
    if not value or len(value) > 253:
        return False
    return all(_HOST_LABEL.match(label) for label in value.rstrip(".").split("."))


def _hostname(value: str) -> str:
    if not is_hostname(value):
        raise invalid(
            f"{value!r} is not a valid host name",
            "use lower-case letters, digits and '-', labels of 1-63 characters separated by '.'",
        )
    return value


def _host_or_ip(value: str) -> str:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return _hostname(value)
    return value


def _https_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme != "https":
        raise invalid(
            f"{value!r} is not an https URL",
            "the control plane endpoint looks like https://HOST:6443",
        )
    try:
        port = parts.port
    except ValueError:
        raise invalid(f"{value!r} has an invalid port", "ports are 1-65535") from None
    host = parts.hostname or ""
    if not host:
        raise invalid(f"{value!r} has no host", "e.g. https://192.0.2.10:6443")
    _host_or_ip(host)
    if port == 0:
        raise invalid(f"{value!r} has an invalid port", "ports are 1-65535")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise invalid(f"{value!r} must not have a path, query or fragment", "use https://HOST:PORT")
    return value


def _url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("tcp", "udp") or not parts.hostname:
        raise invalid(
            f"{value!r} is not a URL with a scheme and host",
            "e.g. tcp://198.51.100.7:5044 or udp://logs.example.com:514",
        )
    try:
        _ = parts.port
    except ValueError:
        raise invalid(f"{value!r} has an invalid port", "ports are 1-65535") from None
    return value


def _token(value: str) -> str:
    if not _TOKEN.match(value):
        raise invalid(
            "token must look like 6 then 16 lower-case letters or digits, joined by '.'",
            "regenerate with 'basaltctl gen secrets', or write e.g. abcdef.0123456789abcdef",
        )
    return value


def _secret32(value: str) -> str:
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise invalid("not valid base64", "secrets are 32 random bytes, base64-encoded") from None
    if len(raw) != 32:
        raise invalid(
            f"decodes to {len(raw)} bytes, want 32", "secrets are 32 random bytes, base64-encoded"
        )
    return value


def _absolute_path(value: str) -> str:
    if not value.startswith("/") or "\0" in value or "/../" in f"{value}/":
        raise invalid(f"{value!r} is not an absolute path", "e.g. /dev/vda or /etc/example.conf")
    return value


def _disk(value: str) -> str:
    _absolute_path(value)
    if not value.startswith("/dev/"):
        raise invalid(
            f"{value!r} is not a device path", "install disks are block devices, e.g. /dev/vda"
        )
    return value


def _sysctl_key(value: str) -> str:
    if not _SYSCTL.match(value):
        raise invalid(f"{value!r} is not a sysctl name", "e.g. net.ipv4.ip_forward")
    return value


def _module_name(value: str) -> str:
    if not _MODULE.match(value):
        raise invalid(f"{value!r} is not a kernel module name", "e.g. br_netfilter")
    return value


def _env_name(value: str) -> str:
    if not _ENV_NAME.match(value):
        raise invalid(f"{value!r} is not an environment variable name", "e.g. HTTPS_PROXY")
    return value


def _kernel_arg(value: str) -> str:
    from ..schematic import RESERVED_KERNEL_ARGS

    if not value or any(c.isspace() for c in value) or not value.isprintable():
        raise invalid(f"{value!r} is not one kernel argument", "give each argument as its own item")
    if value.partition("=")[0] in RESERVED_KERNEL_ARGS:
        raise invalid(
            f"{value!r} is set by the image's boot path",
            f"remove it: {', '.join(RESERVED_KERNEL_ARGS)} cannot be given here",
        )
    return value


Subnet = Annotated[str, AfterValidator(_subnet)]
InterfaceAddress = Annotated[str, AfterValidator(_interface_address)]
IPAddress = Annotated[str, AfterValidator(_ip_address)]
Hostname = Annotated[str, AfterValidator(_hostname)]
HostOrIP = Annotated[str, AfterValidator(_host_or_ip)]
HttpsURL = Annotated[str, AfterValidator(_https_url)]
URL = Annotated[str, AfterValidator(_url)]
Token = Annotated[str, AfterValidator(_token)]
Secret32 = Annotated[str, AfterValidator(_secret32)]
AbsolutePath = Annotated[str, AfterValidator(_absolute_path)]
DiskPath = Annotated[str, AfterValidator(_disk)]
SysctlKey = Annotated[str, AfterValidator(_sysctl_key)]
ModuleName = Annotated[str, AfterValidator(_module_name)]
EnvName = Annotated[str, AfterValidator(_env_name)]
KernelArg = Annotated[str, AfterValidator(_kernel_arg)]
