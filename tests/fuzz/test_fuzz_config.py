"""Fuzz targets: the config loader and validator, and both patch kinds.

The strategies and oracles are the property tests' (tests/unit/test_properties.py: only
ConfigErrors, and whatever is accepted validates and loads again to the same config);
here they run at the fuzz budget.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from tests.fuzz.conftest import fuzz
from tests.unit import test_properties as properties


def _inner(test: Any) -> Any:
    return test.hypothesis.inner_test


@fuzz
@given(properties.yaml_text)
def test_fuzz_config_text(text: str) -> None:
    _inner(properties.test_fuzzed_yaml_text_raises_only_config_errors)(text)


@fuzz
@given(properties.mutated_config_text())
def test_fuzz_mutated_configs(text: str) -> None:
    _inner(properties.test_mutated_real_configs_raise_only_config_errors)(text)


@fuzz
@given(
    st.lists(properties.merge_patches(), min_size=1, max_size=3),
    st.sampled_from(properties.MODES),
    st.booleans(),
)
def test_fuzz_merge_patches(patches: Any, mode: Any, worker: bool) -> None:
    _inner(properties.test_fuzzed_merge_patches_raise_only_config_errors)(patches, mode, worker)


@fuzz
@given(properties.json_cases(), st.sampled_from(properties.MODES))
def test_fuzz_json_patches(case: Any, mode: Any) -> None:
    _inner(properties.test_fuzzed_json_patches_raise_only_config_errors)(case, mode)
