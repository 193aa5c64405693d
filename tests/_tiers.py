"""The two tiers of the suite. `make test` runs every test not marked ``heavy``; `.ci/run`
runs the heavy ones too (`make test-heavy`). A test case is heavy when a cheaper case of
the same test already covers its kind in `make test`: the same check on a larger model
(benchmarks/bench_real_models.py measures every corpus model too), or a second failure
path of a whole federated simulation."""

from __future__ import annotations

from collections.abc import Iterable

import pytest


def tiered(values: Iterable[str], heavy: set[str]) -> list[object]:
    """``values`` as parameters, those in ``heavy`` marked heavy."""
    values = list(values)
    unknown = heavy - set(values)
    assert not unknown, f"heavy names no parameter: {sorted(unknown)}"
    return [pytest.param(v, marks=pytest.mark.heavy) if v in heavy else v for v in values]
