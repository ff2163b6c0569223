"""Schematics: strict parsing with positions, and an id that only the content decides."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from basalt.machinery.errors import BasaltError, ConfigSyntaxError
from basalt.machinery.schematic import (
    EMPTY,
    OFFICIAL_EXTENSIONS,
    Schematic,
    SchematicError,
    parse_schematic,
    read_schematic,
)

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "schematic-qemu.yaml"

BLOCK = """\
customization:
  extraKernelArgs:
    - console=ttyS1
    - quiet
  systemExtensions:
    officialExtensions:
      - qemu-guest-agent
"""

#: The same schematic: other key order, flow style, comments, extra whitespace.
REORDERED = """\
# a comment
customization:
    systemExtensions: {officialExtensions: ["qemu-guest-agent"]}   # trailing

    extraKernelArgs: [console=ttyS1,    quiet]
"""


def test_empty_text_is_the_empty_schematic_and_its_id_is_of_the_canonical_json() -> None:
    assert parse_schematic("") == EMPTY
    assert parse_schematic("customization: {}\n") == EMPTY
    canonical = (
        '{"customization":{"extraKernelArgs":[],"systemExtensions":{"officialExtensions":[]}}}'
    )
    assert EMPTY.canonical_json() == canonical
    assert EMPTY.id == hashlib.sha256(canonical.encode()).hexdigest()


def test_id_is_stable_under_key_order_whitespace_and_comments() -> None:
    first, second = parse_schematic(BLOCK), parse_schematic(REORDERED)
    assert first == second == Schematic(("console=ttyS1", "quiet"), ("qemu-guest-agent",))
    assert first.id == second.id
    assert first.record() == {
        "id": first.id,
        "extensions": ["qemu-guest-agent"],
        "extraKernelArgs": ["console=ttyS1", "quiet"],
    }


def test_id_changes_with_the_content() -> None:
    ids = {
        parse_schematic(BLOCK).id,
        parse_schematic(BLOCK.replace("- quiet", "- loglevel=7")).id,
        parse_schematic(REORDERED.replace("console=ttyS1,    quiet", "quiet, console=ttyS1")).id,
        EMPTY.id,
    }
    assert len(ids) == 4  # kernel argument order matters; so does every value


def test_every_problem_is_listed_with_file_line_field_and_hint() -> None:
    text = """\
customization:
  extraKernelArgs: [console=ttyS1, "two words", basalt.root=/dev/sda]
  systemExtension:
    officialExtensions: [qemu-guest-agent]
"""
    with pytest.raises(SchematicError) as caught:
        parse_schematic(text, "s.yaml")
    rendered = caught.value.render()
    problems = {p.path: p for p in caught.value.problems}
    assert set(problems) == {
        "customization.systemExtension",
        "customization.extraKernelArgs[1]",
        "customization.extraKernelArgs[2]",
    }
    unknown = problems["customization.systemExtension"]
    assert (unknown.source, unknown.line) == ("s.yaml", 3)
    assert "extraKernelArgs, systemExtensions" in (unknown.hint or "")
    assert problems["customization.extraKernelArgs[2]"].line == 2
    assert "s.yaml:3: error: schematic.customization.systemExtension: unknown field" in rendered
    assert "3 errors" in rendered and "nothing was built" in rendered


def test_unknown_and_duplicate_extensions_are_errors_naming_the_official_ones() -> None:
    text = """\
customization:
  systemExtensions:
    officialExtensions:
      - qemu-guest-agent
      - nvidia-drivers
      - qemu-guest-agent
"""
    with pytest.raises(SchematicError) as caught:
        parse_schematic(text, "ext.yaml")
    by_path = {p.path: p for p in caught.value.problems}
    wrong = by_path["customization.systemExtensions.officialExtensions[1]"]
    assert wrong.line == 5 and "unknown extension 'nvidia-drivers'" in wrong.message
    assert ", ".join(OFFICIAL_EXTENSIONS) in (wrong.hint or "")
    twice = by_path["customization.systemExtensions.officialExtensions[2]"]
    assert twice.line == 6 and "twice" in twice.message


@pytest.mark.parametrize(
    ("text", "path", "words"),
    [
        ("- a list\n", "", "must be a mapping"),
        ("customization: [1]\n", "customization", "must be a mapping"),
        ("customization: {extraKernelArgs: quiet}\n", "customization.extraKernelArgs", "list"),
        ("customization: {extraKernelArgs: [3]}\n", "customization.extraKernelArgs[0]", "string"),
        ("kernelArgs: []\n", "kernelArgs", "unknown field"),
    ],
)
def test_wrong_shapes_are_errors(text: str, path: str, words: str) -> None:
    with pytest.raises(SchematicError) as caught:
        parse_schematic(text, "x.yaml")
    (problem,) = caught.value.problems
    assert problem.path == path and words in problem.message


def test_yaml_errors_and_several_documents_name_the_line() -> None:
    with pytest.raises(ConfigSyntaxError) as caught:
        parse_schematic("customization:\n  extraKernelArgs: [a\n", "bad.yaml")
    assert caught.value.source == "bad.yaml" and caught.value.line is not None
    with pytest.raises(ConfigSyntaxError) as caught:
        parse_schematic("customization: {}\n---\ncustomization: {}\n", "two.yaml")
    assert caught.value.line == 3


def test_read_schematic_of_a_missing_file_says_what_to_pass(tmp_path: Path) -> None:
    with pytest.raises(BasaltError) as caught:
        read_schematic(tmp_path / "nope.yaml")
    assert "nope.yaml" in str(caught.value) and caught.value.hint


def test_image_build_refuses_a_bad_schematic_before_building(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from basalt.cli.main import main

    bad = tmp_path / "s.yaml"
    bad.write_text("customization:\n  systemExtensions: {officialExtensions: [nvidia]}\n")
    out = tmp_path / "image"
    code = main(["image", "build", "--schematic", str(bad), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 1 and not out.exists()
    assert f"{bad}:2: error: schematic.customization.systemExtensions.officialExtensions[0]" in err
    assert "unknown extension 'nvidia'" in err and "official extensions: qemu-guest-agent" in err


def test_the_example_names_the_guest_agent() -> None:
    assert read_schematic(EXAMPLE).extensions == ("qemu-guest-agent",)
