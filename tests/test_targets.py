"""`edgeloop targets` and the profiles it lists."""

from __future__ import annotations

import pytest

from edgeloop.cli import main
from edgeloop.errors import UsageError
from edgeloop.targets import TARGETS, detect, get_target


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
