"""`edgeloop targets` and the profiles it lists (their int8 layouts are checked in
test_saturation.py)."""

from __future__ import annotations

import json

import pytest

from edgeloop.cli import main
from edgeloop.errors import UsageError
from edgeloop.targets import SAFE_WEIGHT, TARGETS, detect, get_target, this_machine


def test_targets_lists_every_profile_and_marks_the_detected_one(
        capsys: pytest.CaptureFixture[str]) -> None:
    main(["targets"])
    out = capsys.readouterr().out
    for name in TARGETS:
        assert name[:8] in out
    assert f"auto-detected on this machine: {detect().name}" in out
    assert sum(1 for line in out.splitlines() if line.startswith("│ * │")) == 1


def test_get_target_auto_and_unknown() -> None:
    assert get_target("auto") == detect()
    with pytest.raises(UsageError, match="`target` must be one of auto, "):
        get_target("riscv")


def test_targets_json_names_this_machines_kind_and_layout(
        capsys: pytest.CaptureFixture[str]) -> None:
    main(["targets", "--json"])
    doc = json.loads(capsys.readouterr().out)
    here = this_machine()
    assert doc["machine"]["kind"] == here.target.kind
    assert doc["machine"]["target"]["name"] == detect().name
    assert [p["name"] for p in doc["profiles"]] == list(TARGETS)
    assert {p["name"]: p["layout"] for p in doc["profiles"]}["x86-avx2"] == \
        "U8S8, 7-bit weights, QDQ"


def test_weight_grid_of_each_profile() -> None:
    assert TARGETS["x86-avx2"].weight_max(8) == SAFE_WEIGHT == 64
    assert TARGETS["x86-avx512-vnni"].weight_max(8) == 127
    assert TARGETS["arm64-dotprod"].weight_max(8) == 127
    assert TARGETS["x86-avx2"].weight_max(4) == 7
