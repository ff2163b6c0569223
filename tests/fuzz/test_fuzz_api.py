"""Fuzz target: decoding every API request message, as the dispatcher does.

For every method the node serves (MachineService, ResourceService): random bytes and
mutations of a valid request either decode or are refused as a bad argument (too large
for the method, or not decodable); nothing else is raised. The dispatcher decodes each
message only after the role check (machined.api.dispatch.decoder).
"""

from __future__ import annotations

from typing import Any

import grpc
from hypothesis import given
from hypothesis import strategies as st

from basalt.machined.api.dispatch import (
    Dispatcher,
    RequestTooLargeError,
    decoder,
    request_limit,
)
from basalt.machined.api.errors import InvalidRequestError
from basalt.machinery.api import machine_pb2_grpc, resource_pb2_grpc
from tests.fuzz.conftest import fuzz


def _methods() -> dict[str, grpc.RpcMethodHandler]:
    dispatcher = Dispatcher(maintenance=False)
    dispatcher.register(
        machine_pb2_grpc.add_MachineServiceServicer_to_server,
        machine_pb2_grpc.MachineServiceServicer(),
    )
    dispatcher.register(
        resource_pb2_grpc.add_ResourceServiceServicer_to_server,
        resource_pb2_grpc.ResourceServiceServicer(),
    )
    return dict(dispatcher._handlers)


METHODS = _methods()
NAMES = sorted(METHODS)


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, bytes]:
    method = draw(st.sampled_from(NAMES))
    data = draw(
        st.one_of(
            st.binary(max_size=256),
            # protobuf-shaped: tag bytes, varints and length-delimited runs
            st.lists(
                st.one_of(
                    st.integers(0, 255).map(lambda b: bytes([b])),
                    st.binary(min_size=1, max_size=8),
                ),
                max_size=40,
            ).map(b"".join),
            # just over the method's limit
            st.just(b"\x0a" + b"\xff" * (request_limit(method) + 1)),
        )
    )
    return method, data


@fuzz
@given(requests())
def test_fuzz_api_request_decoding(case: tuple[str, bytes]) -> None:
    method, data = case
    handler = METHODS[method]
    decode = decoder(method, handler.request_deserializer)
    try:
        decoded: Any = decode(data)
    except (InvalidRequestError, RequestTooLargeError) as exc:
        assert exc.render()  # a refusal says why
        return
    assert len(data) <= request_limit(method)
    assert decoded is not None
    assert decoded.SerializeToString() is not None
