"""The error classes: paths, rendering, and the one-base-class contract."""

from __future__ import annotations

import pytest

from basalt.machinery import errors
from basalt.machinery.errors import (
    BasaltError,
    ConfigError,
    ConfigSyntaxError,
    ConfigValidationError,
    Problem,
    format_path,
)


@pytest.mark.parametrize(
    ("loc", "expected"),
    [
        ((), ""),
        (("network", "podSubnets", 1), "network.podSubnets[1]"),
        (("routes", 0, "gateway"), "routes[0].gateway"),
        (("sysctls", "net.ipv4.ip_forward"), 'sysctls["net.ipv4.ip_forward"]'),
        (("name",), "name"),
        ((0,), "[0]"),
        (("files", "a b"), 'files["a b"]'),
    ],
)
def test_format_path(loc: tuple[str | int, ...], expected: str) -> None:
    assert format_path(loc) == expected


def test_problem_where_joins_document_and_path() -> None:
    assert Problem("ClusterConfig", "network.podSubnets[1]", "x").where == (
        "ClusterConfig.network.podSubnets[1]"
    )
    assert Problem("LinkConfig(eth0)", "", "x").where == "LinkConfig(eth0)"
    assert Problem("document 2", "[0]", "x").where == "document 2[0]"


def test_problem_render_has_source_line_severity_and_hint() -> None:
    problem = Problem(
        "MachineConfig", "install.disk", "required on metal", "set it", source="cp.yaml", line=26
    )
    assert problem.render() == (
        "cp.yaml:26: error: MachineConfig.install.disk: required on metal\n    hint: set it"
    )
    assert Problem("A", "b", "m", line=3).render() == "line 3: error: A.b: m"
    assert Problem("A", "b", "m", severity="warning").render() == "warning: A.b: m"


def test_validation_error_counts_errors_not_warnings() -> None:
    problems = [
        Problem("A", "x", "bad"),
        Problem("A", "y", "worse"),
        Problem("A", "z", "meh", severity="warning"),
    ]
    error = ConfigValidationError(problems, source="cp.yaml")
    assert error.message == "cp.yaml: 2 errors found"
    assert len(error.errors) == 2
    rendered = str(error)
    assert rendered.startswith("cp.yaml: 2 errors found\n")
    for needle in ("A.x: bad", "A.y: worse", "warning: A.z: meh", "hint: fix every"):
        assert needle in rendered
    assert ConfigValidationError([Problem("A", "", "m")]).message == "config: 1 error found"


def test_raise_if_errors_ignores_warnings() -> None:
    ConfigValidationError.raise_if_errors([Problem("A", "", "w", severity="warning")], source=None)
    with pytest.raises(ConfigValidationError):
        ConfigValidationError.raise_if_errors([Problem("A", "", "e")], source=None)


def test_syntax_error_names_source_line_and_column() -> None:
    error = ConfigSyntaxError("bad", source="a.yaml", line=3, column=7, hint="fix")
    assert str(error) == "a.yaml:3:7: bad"
    assert error.render() == "a.yaml:3:7: bad\n  hint: fix"
    assert str(ConfigSyntaxError("bad", source=None)) == "<input>: bad"


def test_every_library_error_is_a_basalt_error() -> None:
    for name in dir(errors):
        value = getattr(errors, name)
        if isinstance(value, type) and issubclass(value, Exception):
            assert issubclass(value, BasaltError), name
    for cls in (
        errors.PatchError,
        errors.ContractError,
        errors.SecretsError,
        ConfigSyntaxError,
        ConfigValidationError,
    ):
        assert issubclass(cls, ConfigError)


def test_output_exists_error_says_what_to_do() -> None:
    error = errors.OutputExistsError("out/cp.yaml")
    assert "out/cp.yaml already exists" in error.render()
    assert "--force" in error.render()
