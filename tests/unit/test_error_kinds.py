"""Every refusal's gRPC code comes from its class's kind (``BasaltError.kind``): the
table below is the mapping the API has always made, pinned class by class."""

from __future__ import annotations

import grpc
import pytest

from basalt.machined.api.dispatch import RequestTooLargeError
from basalt.machined.api.errors import status_for
from basalt.machined.api.meta import NoDisksError, NoMetaError
from basalt.machined.api.pcap import CaptureLimitError
from basalt.machined.apply import InvalidApplyError, RebootRequiredError
from basalt.machined.boot.meta import MetaError, MetaFullError, MetaKeyError
from basalt.machined.etcd.manager import AlreadyBootstrappedError, EtcdStateError, QuorumError
from basalt.machined.fetch import BundleFetchError, BundleURLError
from basalt.machined.kubernetes.drain import DrainError
from basalt.machined.runtime.sequencer import SequenceConflictError
from basalt.machined.services.supervisor import UnknownServiceError
from basalt.machined.storage.wipe import DiskInUseError, UnknownDiskError, WipeError
from basalt.machined.upgrade import BundleUploadError, DowngradeRefusedError, UpgradeRefusedError
from basalt.machinery.boot.slots import SlotWriteError
from basalt.machinery.bpf import FilterError
from basalt.machinery.config.identity import IdentityChangeError
from basalt.machinery.errors import (
    AccessDeniedError,
    AlreadyExistsError,
    BasaltError,
    ClientConfigError,
    ConfigSyntaxError,
    ContractError,
    ErrorKind,
    InvalidRequestError,
    NotFoundError,
    OutputExistsError,
    PatchError,
    SecretsError,
    UnavailableError,
)
from basalt.machinery.images.errors import ImageSignatureError, ImageVerificationError
from basalt.machinery.resources.definitions import UnknownResourceTypeError

Code = grpc.StatusCode
EXPECTED: dict[type[BasaltError], grpc.StatusCode] = {
    ConfigSyntaxError: Code.INVALID_ARGUMENT,
    PatchError: Code.INVALID_ARGUMENT,
    ContractError: Code.INVALID_ARGUMENT,
    SecretsError: Code.INVALID_ARGUMENT,
    InvalidRequestError: Code.INVALID_ARGUMENT,
    InvalidApplyError: Code.INVALID_ARGUMENT,
    RequestTooLargeError: Code.RESOURCE_EXHAUSTED,
    SequenceConflictError: Code.FAILED_PRECONDITION,
    RebootRequiredError: Code.FAILED_PRECONDITION,
    IdentityChangeError: Code.FAILED_PRECONDITION,
    QuorumError: Code.FAILED_PRECONDITION,
    EtcdStateError: Code.FAILED_PRECONDITION,
    AlreadyBootstrappedError: Code.ALREADY_EXISTS,
    UnknownServiceError: Code.NOT_FOUND,
    UnknownResourceTypeError: Code.NOT_FOUND,
    NotFoundError: Code.NOT_FOUND,
    AccessDeniedError: Code.PERMISSION_DENIED,
    UnavailableError: Code.UNAVAILABLE,
    OutputExistsError: Code.ALREADY_EXISTS,
    AlreadyExistsError: Code.ALREADY_EXISTS,
    ImageVerificationError: Code.INVALID_ARGUMENT,
    ImageSignatureError: Code.INVALID_ARGUMENT,
    BundleUploadError: Code.INVALID_ARGUMENT,
    UpgradeRefusedError: Code.FAILED_PRECONDITION,
    DowngradeRefusedError: Code.FAILED_PRECONDITION,
    DrainError: Code.FAILED_PRECONDITION,
    SlotWriteError: Code.ABORTED,
    BundleURLError: Code.INVALID_ARGUMENT,
    BundleFetchError: Code.UNAVAILABLE,
    ClientConfigError: Code.FAILED_PRECONDITION,
    # The operator's toolbox.
    CaptureLimitError: Code.RESOURCE_EXHAUSTED,
    FilterError: Code.INVALID_ARGUMENT,
    MetaError: Code.FAILED_PRECONDITION,
    MetaFullError: Code.RESOURCE_EXHAUSTED,
    MetaKeyError: Code.INVALID_ARGUMENT,
    NoMetaError: Code.FAILED_PRECONDITION,
    NoDisksError: Code.FAILED_PRECONDITION,
    DiskInUseError: Code.FAILED_PRECONDITION,
    UnknownDiskError: Code.NOT_FOUND,
    WipeError: Code.FAILED_PRECONDITION,
    BasaltError: Code.FAILED_PRECONDITION,
}


@pytest.mark.parametrize("cls", EXPECTED, ids=lambda cls: cls.__name__)
def test_each_error_class_has_its_code(cls: type[BasaltError]) -> None:
    error = cls.__new__(cls)  # the code depends on the class alone, not on its arguments
    assert status_for(error) == EXPECTED[cls]


def test_every_kind_has_a_code() -> None:
    for kind in ErrorKind:
        error = BasaltError("x")
        error.kind = kind  # type: ignore[misc]
        assert isinstance(status_for(error), grpc.StatusCode)


def test_an_error_that_is_not_basalts_is_a_state_problem() -> None:
    assert status_for(RuntimeError("boom")) == Code.FAILED_PRECONDITION
