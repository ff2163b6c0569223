"""Fuzzing the parsers that face the outside (hypothesis at scale).

Every target here is a ``@fuzz``-decorated hypothesis test. A *crash* is an exception
other than the target's documented refusal (a :class:`BasaltError` subclass, or the
library error the target names); an *accepted-invalid input* is an input the parser
takes although the target's oracle says it must be refused. Both fail the test.

Budgets: ``make test`` runs each target for ``FUZZ_SHORT`` inputs; ``make fuzz`` sets
``BASALT_FUZZ_EXAMPLES`` (10,000 by default) and prints hypothesis' statistics.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

from hypothesis import HealthCheck, settings

F = TypeVar("F", bound=Callable[..., object])

#: Inputs per target in ``make test`` (the fast lane keeps its budget).
FUZZ_SHORT = 60


def examples() -> int:
    return int(os.environ.get("BASALT_FUZZ_EXAMPLES", FUZZ_SHORT))


def fuzz(function: F) -> F:
    """Hypothesis settings for a fuzz target: the budget of this run, no deadline."""
    configured = settings(
        max_examples=examples(),
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        database=None if os.environ.get("CI") else settings.default.database,
    )
    return configured(function)  # type: ignore[no-any-return]
