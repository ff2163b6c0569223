"""The hand-written protobuf wire helpers: merged answers and per-node error answers."""

from __future__ import annotations

from typing import Any

import pytest
from google.protobuf.message import Message

from basalt.machined.api import wire
from basalt.machinery.api import common_pb2, machine_pb2, resource_pb2


def _unary_responses() -> list[type[Message]]:
    found: list[type[Message]] = [common_pb2.ActionResponse, resource_pb2.ResourceGetResponse]
    for name in sorted(machine_pb2.DESCRIPTOR.message_types_by_name):
        if name.endswith("Response"):
            found.append(getattr(machine_pb2, name))
    return found


UNARY_RESPONSES = _unary_responses()
STREAMED = [
    common_pb2.Data,
    machine_pb2.Event,
    machine_pb2.FileInfo,
    resource_pb2.ResourceListResponse,
    resource_pb2.ResourceWatchResponse,
]


def test_every_machine_response_is_covered() -> None:
    names = {cls.DESCRIPTOR.name for cls in UNARY_RESPONSES}
    assert {"VersionResponse", "DisksResponse", "ApplyConfigurationResponse"} <= names
    assert len(names) >= 11


def test_concatenated_responses_parse_as_one_with_every_message() -> None:
    first = machine_pb2.VersionResponse(
        messages=[machine_pb2.VersionInfo(metadata=common_pb2.Metadata(node="a"), tag="v1")]
    )
    second = machine_pb2.VersionResponse(
        messages=[machine_pb2.VersionInfo(metadata=common_pb2.Metadata(node="b"), tag="v2")]
    )
    merged = machine_pb2.VersionResponse.FromString(
        first.SerializeToString() + second.SerializeToString()
    )
    assert [(m.metadata.node, m.tag) for m in merged.messages] == [("a", "v1"), ("b", "v2")]


def test_an_error_answer_merges_with_real_answers() -> None:
    real = machine_pb2.VersionResponse(
        messages=[machine_pb2.VersionInfo(metadata=common_pb2.Metadata(node="a"), tag="v1")]
    ).SerializeToString()
    merged = machine_pb2.VersionResponse.FromString(
        real + wire.unary_error("b", "node unreachable", 14)
    )
    assert [(m.metadata.node, m.metadata.error, m.tag) for m in merged.messages] == [
        ("a", "", "v1"),
        ("b", "node unreachable", ""),
    ]


@pytest.mark.parametrize("response", UNARY_RESPONSES, ids=lambda c: c.DESCRIPTOR.name)
def test_unary_error_parses_as_every_response_type(response: type[Message]) -> None:
    parsed: Any = response.FromString(wire.unary_error("192.0.2.7", "boom", 13))
    assert len(parsed.messages) == 1
    metadata = parsed.messages[0].metadata
    assert (metadata.node, metadata.error, metadata.code) == ("192.0.2.7", "boom", 13)
    assert parsed.SerializeToString() == wire.unary_error("192.0.2.7", "boom", 13)


@pytest.mark.parametrize("message", STREAMED, ids=lambda c: c.DESCRIPTOR.name)
def test_stream_error_parses_as_every_streamed_type(message: type[Message]) -> None:
    parsed: Any = message.FromString(wire.stream_error("cp-1", "gone", 5))
    assert (parsed.metadata.node, parsed.metadata.error, parsed.metadata.code) == (
        "cp-1",
        "gone",
        5,
    )


def test_appending_metadata_to_a_streamed_message_sets_its_node() -> None:
    chunk = common_pb2.Data(bytes=b"log line\n").SerializeToString()
    tagged = common_pb2.Data.FromString(chunk + wire.length_delimited(1, wire.metadata("w-1")))
    assert tagged.bytes == b"log line\n"
    assert tagged.metadata.node == "w-1"
    assert tagged.metadata.error == ""


@pytest.mark.parametrize(
    ("value", "encoded"),
    [
        (0, b"\x00"),
        (1, b"\x01"),
        (127, b"\x7f"),
        (128, b"\x80\x01"),
        (300, b"\xac\x02"),
        (16383, b"\xff\x7f"),
        (16384, b"\x80\x80\x01"),
        (2**32, b"\x80\x80\x80\x80\x10"),
    ],
)
def test_varint(value: int, encoded: bytes) -> None:
    assert wire._varint(value) == encoded


@pytest.mark.parametrize("length", [127, 128, 200, 20_000, 3_000_000])
def test_long_errors_need_multi_byte_lengths(length: int) -> None:
    error = "x" * length
    for data, cls in (
        (wire.unary_error("n", error, 2), machine_pb2.VersionResponse),
        (wire.stream_error("n", error, 2), machine_pb2.Event),
    ):
        parsed: Any = cls.FromString(data)
        metadata = parsed.messages[0].metadata if hasattr(parsed, "messages") else parsed.metadata
        assert metadata.error == error
        assert metadata.code == 2


def test_unicode_errors_are_measured_in_bytes() -> None:
    error = "ноль — δ " * 30  # multi-byte UTF-8, over 127 bytes
    parsed = common_pb2.Data.FromString(wire.stream_error("n", error, 9))
    assert parsed.metadata.error == error


def test_length_delimited_layout() -> None:
    assert wire.length_delimited(1, b"abc") == b"\x0a\x03abc"
    assert wire.length_delimited(2, b"") == b"\x12\x00"
    assert wire.length_delimited(16, b"z") == b"\x82\x01\x01z"
