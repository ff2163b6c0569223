"""``FleetConfig``: the Basalt Fleet this machine enrols with and links to."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, Field

from ._base import Document, register, secret
from ._types import invalid


def _fleet_url(value: str) -> str:
    from ..errors import BasaltError
    from ..fleetlink.url import parse_fleet_url

    try:
        parse_fleet_url(value, "url")
    except BasaltError as exc:
        raise invalid(str(exc).removeprefix("url: "), exc.hint) from None
    return value


FleetURLText = Annotated[str, AfterValidator(_fleet_url)]


@register
class FleetConfig(Document):
    """The fleet this machine links to (an outbound gRPC stream; the fleet manages the
    machine through it). The kernel argument ``basalt.fleet=`` does the same before a
    machine has any config, and wins over this document."""

    kind: Literal["FleetConfig"] = Field(description="`FleetConfig`.")
    url: FleetURLText = Field(
        description="`https://HOST:PORT/?token=JOIN-TOKEN&ca=sha256:FINGERPRINT`, as "
        "`basaltctl fleet token create` prints it. The join token is used once, at "
        "enrolment.",
        json_schema_extra=secret(),
    )
