"""The operator's META keys: stored beside Basalt's boot fields in the same two-copy
record, each writer changing only its own part, under one lock; reserved names, bad
names and sizes refused before anything is written."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest

from basalt.machined.boot.meta import (
    MAX_KEY_LENGTH,
    MAX_PAYLOAD,
    MAX_VALUE_BYTES,
    OFFSETS,
    SECOND_COPY,
    Meta,
    MetaFullError,
    MetaKeyError,
    MetaRecord,
    PendingUpgrade,
    check_key,
    decode_copy,
    reserved,
)
from basalt.machinery.boot.assessment import SlotName
from basalt.machinery.errors import ErrorKind

MIB = 1 << 20
B = SlotName.B


@pytest.fixture
def meta(tmp_path: Path) -> Meta:
    device = tmp_path / "meta"
    device.write_bytes(bytes(MIB))
    return Meta(device)


def test_keys_live_beside_the_boot_fields_and_each_writer_keeps_the_other_part(
    meta: Meta,
) -> None:
    meta.write(MetaRecord({B: "health gates failed"}, PendingUpgrade(B, "0.2.0", 2)))
    meta.set_key("site.rack", "r12")
    record = meta.read()
    assert record.keys == {"site.rack": "r12"}
    assert record.reasons == {B: "health gates failed"}
    assert record.pending == PendingUpgrade(B, "0.2.0", 2)
    # A boot writer (MetalSlots.save) writes a record without keys: they stay.
    meta.write(MetaRecord({B: "rolled back"}))
    record = meta.read()
    assert (record.reasons, record.pending, record.keys) == (
        {B: "rolled back"},
        None,
        {"site.rack": "r12"},
    )
    assert meta.delete_key("site.rack") is True
    assert meta.read().keys == {}
    assert meta.read().reasons == {B: "rolled back"}


def test_a_record_without_keys_has_the_bytes_it_always_had() -> None:
    record = MetaRecord({B: "x"})
    assert b"keys" not in record.payload()
    assert b'"keys":{"a":"1"}' in MetaRecord(keys={"a": "1"}).payload()


def test_deleting_a_missing_key_writes_nothing(meta: Meta) -> None:
    before = meta.device.read_bytes()
    assert meta.delete_key("absent") is False
    assert meta.device.read_bytes() == before


def test_key_writes_alternate_copies_and_survive_a_torn_one(meta: Meta) -> None:
    meta.set_key("a", "1")
    meta.set_key("b", "2")
    raw = meta.device.read_bytes()
    copies = [decode_copy(raw[o : o + SECOND_COPY]) for o in OFFSETS]
    assert sorted(c.sequence for c in copies if c) == [1, 2]
    newest = next(o for o, c in zip(OFFSETS, copies, strict=True) if c and c.sequence == 2)
    with open(meta.device, "r+b") as handle:  # a power cut in the middle of the 2nd write
        handle.seek(newest + 70)
        handle.write(b"\xff" * 8)
    assert meta.read().keys == {"a": "1"}


@pytest.mark.parametrize(
    "key",
    [
        "reasons",
        "Pending",
        "keys",
        "sequence",
        "basalt.slot",
        "basalt-upgrade",
        "BASALT_anything",
        "Basalt.entry",
    ],
)
def test_names_basalt_owns_are_refused(meta: Meta, key: str) -> None:
    assert reserved(key)
    before = meta.device.read_bytes()
    with pytest.raises(MetaKeyError, match="reserved by Basalt") as caught:
        meta.set_key(key, "x")
    assert caught.value.kind is ErrorKind.INVALID_ARGUMENT
    assert caught.value.hint and "basalt." in caught.value.hint
    with pytest.raises(MetaKeyError):
        meta.delete_key(key)
    assert meta.device.read_bytes() == before


@pytest.mark.parametrize(
    ("key", "match"),
    [
        ("", "empty"),
        ("has space", "characters outside"),
        ("-leading", "characters outside"),
        ("slash/key", "characters outside"),
        ("é", "characters outside"),
        ("k" * (MAX_KEY_LENGTH + 1), f"at most {MAX_KEY_LENGTH}"),
    ],
)
def test_malformed_keys_are_refused(key: str, match: str) -> None:
    with pytest.raises(MetaKeyError, match=match):
        check_key(key)


def test_allowed_names() -> None:
    for key in ("site.rack", "owner-team", "a", "0x0a", "k" * MAX_KEY_LENGTH, "basaltic"):
        check_key(key)


def test_a_value_too_large_is_refused_with_its_size(meta: Meta) -> None:
    with pytest.raises(MetaKeyError, match=rf"is {MAX_VALUE_BYTES + 1} bytes; at most"):
        meta.set_key("big", "v" * (MAX_VALUE_BYTES + 1))
    meta.set_key("big", "v" * MAX_VALUE_BYTES)  # the limit itself is fine
    assert len(meta.read().keys["big"]) == MAX_VALUE_BYTES


def test_a_record_that_would_not_fit_is_refused_and_changes_nothing(meta: Meta) -> None:
    value = "v" * MAX_VALUE_BYTES
    stored = 0
    with pytest.raises(MetaFullError, match=r"would be \d+ bytes; a copy holds at most") as full:
        for n in range(MAX_PAYLOAD // MAX_VALUE_BYTES + 2):
            meta.set_key(f"k{n}", value)
            stored += 1
    assert str(MAX_PAYLOAD) in str(full.value)
    assert full.value.kind is ErrorKind.RESOURCE_EXHAUSTED
    assert len(meta.read().keys) == stored  # the refused key is not there


def test_writers_in_threads_never_lose_each_others_changes(meta: Meta) -> None:
    errors: list[BaseException] = []

    def keys(prefix: str) -> None:
        try:
            other = Meta(meta.device)  # another instance: the lock is the device's
            for n in range(25):
                other.set_key(f"{prefix}{n}", str(n))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def boot() -> None:
        try:
            for n in range(25):
                meta.write(MetaRecord({B: f"reason {n}"}))
        except BaseException as exc:  # pragma: no cover
            errors.append(exc)

    threads = [threading.Thread(target=keys, args=(p,)) for p in "xyz"]
    threads.append(threading.Thread(target=boot))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    record = meta.read()
    assert len(record.keys) == 75
    assert record.reasons == {B: "reason 24"}
    assert record.sequence == 100


def test_writers_in_two_processes_are_serialised_by_flock(meta: Meta) -> None:
    script = (
        "import sys; from pathlib import Path; from basalt.machined.boot.meta import Meta\n"
        "m = Meta(Path(sys.argv[1]))\n"
        "for n in range(30): m.set_key(f'{sys.argv[2]}{n}', 'v')\n"
    )
    children = [
        subprocess.Popen([sys.executable, "-c", script, str(meta.device), prefix])
        for prefix in ("p", "q")
    ]
    for n in range(30):
        meta.set_key(f"r{n}", "v")
    assert [child.wait(timeout=60) for child in children] == [0, 0]
    assert len(meta.read().keys) == 90
