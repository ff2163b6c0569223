"""Version contracts: parsing, ordering, and which ones this tool accepts."""

from __future__ import annotations

import pytest

from basalt.machinery.config import CURRENT_CONTRACT, Contract, resolve_contract
from basalt.machinery.config.contract import CONTRACTS, check_contract
from basalt.machinery.errors import ContractError


@pytest.mark.parametrize(
    ("text", "expected"),
    [("0.1", Contract(0, 1)), ("v0.1", Contract(0, 1)), (" 1.12 ", Contract(1, 12))],
)
def test_parse(text: str, expected: Contract) -> None:
    assert Contract.parse(text) == expected


@pytest.mark.parametrize("text", ["", "1", "1.2.3", "a.b", "v", "1.x", "-1.0", "0.1 beta"])
def test_malformed_contract(text: str) -> None:
    with pytest.raises(ContractError) as caught:
        Contract.parse(text)
    assert str(caught.value) == f"version contract {text!r} is not of the form X.Y"
    assert caught.value.hint == f"e.g. --version-contract {CURRENT_CONTRACT}"


def test_ordering_and_str() -> None:
    assert Contract(0, 9) < Contract(0, 10) < Contract(1, 0)
    assert str(Contract(1, 10)) == "1.10"


def test_resolve_without_a_contract_warns() -> None:
    resolved = resolve_contract(None)
    assert resolved.contract == CURRENT_CONTRACT
    assert resolved.defaults == CONTRACTS[CURRENT_CONTRACT]
    assert resolved.warning is not None
    assert f"--version-contract {CURRENT_CONTRACT}" in resolved.warning


def test_resolve_a_pinned_contract() -> None:
    resolved = resolve_contract(str(CURRENT_CONTRACT))
    assert (resolved.contract, resolved.warning) == (CURRENT_CONTRACT, None)


def test_contract_newer_than_the_tool_is_refused() -> None:
    newer = Contract(CURRENT_CONTRACT.major, CURRENT_CONTRACT.minor + 1)
    with pytest.raises(ContractError) as caught:
        resolve_contract(str(newer))
    assert str(caught.value) == (
        f"version contract {newer} is newer than this basaltctl (contract {CURRENT_CONTRACT})"
    )
    assert caught.value.hint is not None and "upgrade basaltctl" in caught.value.hint


def test_unknown_older_contract_is_refused_with_the_known_ones() -> None:
    with pytest.raises(ContractError) as caught:
        check_contract(Contract(0, 0))
    assert str(caught.value) == "version contract 0.0 is not supported by this basaltctl"
    assert caught.value.hint == "supported contracts: " + ", ".join(
        str(c) for c in sorted(CONTRACTS)
    )


def test_malformed_contract_refused_by_resolve() -> None:
    with pytest.raises(ContractError, match=r"not of the form X\.Y"):
        resolve_contract("latest")


def test_every_known_contract_is_at_most_current() -> None:
    assert CURRENT_CONTRACT in CONTRACTS
    assert all(contract <= CURRENT_CONTRACT for contract in CONTRACTS)
