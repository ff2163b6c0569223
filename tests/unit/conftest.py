"""Fixtures for the unit tests; the objects come from :mod:`tests.fakes.inputs`."""

from __future__ import annotations

import pytest

from basalt.machinery.config.secrets import SecretsBundle
from basalt.machinery.images import VerificationKey, generate_signing_key, verification_key
from tests.fakes import inputs


@pytest.fixture(scope="session")
def secrets() -> SecretsBundle:
    return inputs.session_secrets()


@pytest.fixture(scope="session")
def other_secrets() -> SecretsBundle:
    return inputs.other_secrets()


@pytest.fixture
def cp_yaml() -> str:
    return inputs.controlplane_yaml()


@pytest.fixture
def worker_yaml() -> str:
    return inputs.worker_yaml()


@pytest.fixture(scope="session")
def keypair() -> tuple[str, str]:
    """An image signing key pair (private PEM, public PEM)."""
    return generate_signing_key()


@pytest.fixture(scope="session")
def trusted(keypair: tuple[str, str]) -> list[VerificationKey]:
    """The node side of ``keypair``: its public key, trusted as "release"."""
    return [verification_key(keypair[1], "release")]
