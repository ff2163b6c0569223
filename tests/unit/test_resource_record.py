"""Resource specs (basalt.machinery.resources.record): checked when built, copied, camelCase
on the wire, read back from either spelling."""

from __future__ import annotations

import json
from dataclasses import FrozenInstanceError, field

import pytest

from basalt.machinery.resources import DEFINITIONS, Spec, SpecError, record
from basalt.machinery.resources.specs import (
    DiskPartition,
    DiskSpec,
    MachineConfigSpec,
    MachineStatusSpec,
    SystemStatsSpec,
    UnmetCondition,
)


class _Sample(Spec):
    name: str
    count: int = 0
    ratio: float = 0.0
    tags: dict[str, int] = field(default_factory=dict)
    parent: UnmetCondition | None = None


def test_wrong_types_are_refused_naming_the_field() -> None:
    with pytest.raises(SpecError, match=r"MachineStatusSpec\.stage: expected 'maintenance'"):
        MachineStatusSpec(stage="sleeping", ready=True)  # type: ignore[arg-type]
    with pytest.raises(SpecError, match=r"DiskSpec\.size: expected int, got str$"):
        DiskSpec(device="vda", size="3")  # type: ignore[arg-type]
    with pytest.raises(SpecError) as raised:
        MachineConfigSpec(yaml=b"secret: hunter2")  # type: ignore[arg-type]
    assert "hunter2" not in str(raised.value) and str(raised.value).endswith("got bytes")
    with pytest.raises(SpecError, match=r"_Sample\.count: expected int, got bool"):
        _Sample(name="x", count=True)
    with pytest.raises(SpecError, match=r"SystemStatsSpec\.cpu\[1\]: expected float"):
        SystemStatsSpec(interval=1.0, cpu=[1.0, "2"])  # type: ignore[list-item]
    with pytest.raises(SpecError, match=r"_Sample\.tags\['a'\]: expected int"):
        _Sample(name="x", tags={"a": "b"})  # type: ignore[dict-item]
    with pytest.raises(SpecError, match=r"_Sample\.parent: expected UnmetCondition \| NoneType"):
        _Sample(name="x", parent="y")  # type: ignore[arg-type]


def test_ints_become_floats_and_lists_are_copied() -> None:
    cpu = [1, 2.5]
    spec = SystemStatsSpec(interval=30, cpu=cpu)
    assert spec.interval == 30.0 and isinstance(spec.interval, float)
    assert spec.cpu == [1.0, 2.5] and all(isinstance(v, float) for v in spec.cpu)
    cpu.append(3.0)  # the builder's list changes; the stored spec does not
    assert spec.cpu == [1.0, 2.5]
    assert spec == SystemStatsSpec(interval=30.0, cpu=[1.0, 2.5])
    with pytest.raises(FrozenInstanceError):
        spec.interval = 1.0  # type: ignore[misc]


def test_json_keys_are_camel_case_and_read_back() -> None:
    disk = DiskSpec(
        device="vda",
        size=10,
        system_disk=True,
        partitions=[DiskPartition(name="vda1", label="EFI", size=5)],
    )
    wire = json.loads(disk.to_json())
    assert wire["systemDisk"] is True and wire["partitions"][0]["label"] == "EFI"
    assert DiskSpec.from_dict(wire) == disk
    assert DiskSpec.from_dict(disk.to_dict(by_alias=False)) == disk
    assert disk.to_json() == json.dumps(wire, separators=(",", ":"))
    assert _Sample(name="é").to_json().startswith('{"name":"é"')


def test_from_dict_names_unknown_and_missing_fields() -> None:
    with pytest.raises(SpecError, match=r"DiskPartition: no field 'lable'"):
        DiskSpec.from_dict({"device": "vda", "size": 1, "partitions": [{"name": "a", "lable": ""}]})
    with pytest.raises(SpecError, match=r"DiskSpec\(\) is missing required fields: 'size'"):
        DiskSpec.from_dict({"device": "vda"})


def test_every_definition_spec_checks_cleanly() -> None:
    """Each spec's annotations are ones the checks understand (built once per class)."""
    for definition in DEFINITIONS:
        checks = record._build_checks(definition.spec)
        assert set(checks) == set(definition.spec.field_keys())
        assert all("_" not in key for key in definition.spec.field_keys().values())
    with pytest.raises(TypeError, match="resource specs cannot hold"):
        record._check_for(set[str])
