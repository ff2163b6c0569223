"""Version contracts: the defaults a config was generated with, pinned by ``X.Y``.

A contract fixes every default that ``gen config`` bakes into a config. Regenerating
with the same contract gives the same config even after basaltctl is upgraded; moving
to a newer contract is a deliberate change the user makes in Git.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import ContractError

_CONTRACT = re.compile(r"^(\d+)\.(\d+)$")


@dataclass(frozen=True, order=True)
class Contract:
    """A version contract ``major.minor``."""

    major: int
    minor: int

    @classmethod
    def parse(cls, text: str) -> Contract:
        match = _CONTRACT.match(text.strip().removeprefix("v"))
        if not match:
            raise ContractError(
                f"version contract {text!r} is not of the form X.Y",
                hint=f"e.g. --version-contract {CURRENT}",
            )
        return cls(int(match[1]), int(match[2]))

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}"


@dataclass(frozen=True)
class ContractDefaults:
    """Every default that ``gen config`` takes from the contract."""

    kubernetes_version: str
    install_image: str
    kubelet_image: str
    pod_subnets: tuple[str, ...]
    service_subnets: tuple[str, ...]
    dns_domain: str
    rbac: bool
    stable_hostname: bool


#: The contract this basaltctl speaks natively.
CURRENT = Contract(0, 1)

#: One row per contract this basaltctl can still generate for. Never change a row once
#: released: add a new contract instead.
CONTRACTS: dict[Contract, ContractDefaults] = {
    Contract(0, 1): ContractDefaults(
        kubernetes_version="v1.34.1",
        install_image="basalt/installer:v0.1.0",
        kubelet_image="basalt/kubelet:v1.34.1",
        pod_subnets=("10.244.0.0/16",),
        service_subnets=("10.96.0.0/12",),
        dns_domain="cluster.local",
        rbac=True,
        stable_hostname=True,
    ),
}


@dataclass(frozen=True)
class ResolvedContract:
    contract: Contract
    defaults: ContractDefaults
    warning: str | None


def resolve_contract(requested: str | None) -> ResolvedContract:
    """The contract to generate with, and a warning when the user did not pin one.

    Raises :class:`ContractError` for a malformed, unknown or too-new contract.
    """
    if requested is None:
        return ResolvedContract(
            CURRENT,
            CONTRACTS[CURRENT],
            f"no --version-contract given; using this tool's contract {CURRENT}. Pin it "
            f"(--version-contract {CURRENT}) so that a newer basaltctl regenerates the same config",
        )
    contract = Contract.parse(requested)
    check_contract(contract)
    return ResolvedContract(contract, CONTRACTS[contract], None)


def check_contract(contract: Contract) -> None:
    """Refuse contracts newer than this tool, and ones it no longer knows."""
    if contract > CURRENT:
        raise ContractError(
            f"version contract {contract} is newer than this basaltctl (contract {CURRENT})",
            hint="upgrade basaltctl, or generate with an older contract",
        )
    if contract not in CONTRACTS:
        known = ", ".join(str(c) for c in sorted(CONTRACTS))
        raise ContractError(
            f"version contract {contract} is not supported by this basaltctl",
            hint=f"supported contracts: {known}",
        )
