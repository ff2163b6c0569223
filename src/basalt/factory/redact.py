"""Kernel arguments that carry a secret, and how they are shown.

``basalt.fleet=https://HOST:PORT/?token=...&ca=...`` holds a join token: an image made
for "add machines" carries it, so that a machine booted from the image enrols by itself.
Such a schematic is *secret*: its arguments appear redacted on the index page, in JSON
listings and in logs (``token=***``), its YAML is stored readable by the factory only,
and where the factory has roles or a token, its artefacts need the stronger one.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from basalt.machinery.fleetlink.url import FleetURLError, parse_fleet_url
from basalt.machinery.schematic import Schematic

#: Kernel arguments whose value is a secret.
SECRET_KERNEL_ARGS = ("basalt.fleet",)


def _key(arg: str) -> str:
    return arg.partition("=")[0]


def is_secret(schematic: Schematic) -> bool:
    """Whether any of the schematic's kernel arguments carries a secret."""
    return any(_key(arg) in SECRET_KERNEL_ARGS for arg in schematic.extra_kernel_args)


def redact_arg(arg: str) -> str:
    """``arg`` as it may be shown: a fleet URL with ``token=***``, else the whole value."""
    key, sep, value = arg.partition("=")
    if key not in SECRET_KERNEL_ARGS or not sep:
        return arg
    try:
        return f"{key}={parse_fleet_url(value, key).redacted()}"
    except FleetURLError:
        return f"{key}=***"


def redact_args(args: Iterable[str]) -> list[str]:
    return [redact_arg(arg) for arg in args]


def shown_record(schematic: Schematic) -> dict[str, Any]:
    """The schematic's record (id, extensions, kernel args, custom extensions) with its
    secrets redacted, and whether it had any: what listings and the index page show."""
    record = schematic.record()
    record["extraKernelArgs"] = redact_args(schematic.extra_kernel_args)
    record["secret"] = is_secret(schematic)
    return record


__all__ = ["SECRET_KERNEL_ARGS", "is_secret", "redact_arg", "redact_args", "shown_record"]
