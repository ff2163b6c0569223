"""Just enough protobuf wire format to merge and tag answers without knowing their type.

Every unary response has ``repeated X messages = 1`` and every X and streamed message
has ``Metadata metadata = 1``, so concatenating serialized responses merges them, and
a length-delimited field 1 holding a Metadata makes a valid per-node error answer.
"""

from __future__ import annotations

from basalt.machinery.api import common_pb2


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def length_delimited(field_number: int, payload: bytes) -> bytes:
    return _varint((field_number << 3) | 2) + _varint(len(payload)) + payload


def metadata(node: str, error: str = "", code: int = 0) -> bytes:
    return common_pb2.Metadata(node=node, error=error, code=code).SerializeToString()


def unary_error(node: str, error: str, code: int) -> bytes:
    """A whole unary response holding one message that carries only an error for ``node``."""
    return length_delimited(1, length_delimited(1, metadata(node, error, code)))


def stream_error(node: str, error: str, code: int) -> bytes:
    """One streamed message that carries only an error for ``node``."""
    return length_delimited(1, metadata(node, error, code))
