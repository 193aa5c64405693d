"""Power loss: the update subprocess is SIGKILLed at every named install point and at
random delays; the device always starts and serves the old or the new verified model."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from bench_bundle import POINTS, full_duration, prepare, trial


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    s = prepare(tmp_path_factory.mktemp("powerloss"), megabytes=2)
    yield s
    s.close()


@pytest.mark.parametrize("point", POINTS)
def test_kill_at_each_install_point(setup, point: str) -> None:
    killed, where, version = trial(setup, point=point)
    assert killed and where != "finished before the kill"
    assert version == ("1.1.0" if point == "committed" else "1.0.0")


def test_kill_at_random_delays(setup) -> None:
    total = full_duration(setup)
    rng = random.Random(1)
    seen = {trial(setup, delay=rng.uniform(0, total), recover=False) for _ in range(10)}
    assert {v for _, _, v in seen} <= {"1.0.0", "1.1.0"}
    assert any(k for k, _, _ in seen)
