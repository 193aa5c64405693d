"""Alerts and what readers see: the monitor's status files in ``STATE/monitor/``.

The monitor in the serving process writes ``drift.json`` and ``recent.npz`` (the latest
sampled inputs), and the feedback command writes ``evaluations.json`` (all atomically);
the updater, the runtime, ``device personalise --if-flagged``, ``device report`` and
``edgeloop device status`` read them with :func:`monitor_status` or :func:`drift_flag`,
without river and without touching the monitor's detector state.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["Alert", "Flag", "drift_flag", "monitor_status"]

FOLDER = "monitor"
REFERENCE_FILE = "monitor.json"   # the reference sketch, in a bundle's slot
DRIFT_FILE = "drift.json"
EVALUATIONS_FILE = "evaluations.json"
STATE_FILE = "state.pkl"
RECENT_FILE = "recent.npz"


@dataclass(frozen=True)
class Alert:
    """One detector's alarm: which detector on which signal (``detector``, e.g.
    ``"adwin:confidence"``), when it first and last fired (UTC, ISO 8601) and at which
    sample (counted since the model was installed; feedback: 0), how often, and the
    evidence of the last detection in words. ``active`` until ``hold`` samples pass
    without a detection."""

    detector: str
    since: str
    last: str
    first_sample: int
    last_sample: int
    detections: int
    evidence: str
    active: bool = True


@dataclass(frozen=True)
class Flag:
    """What the loop reads: ``drifted`` (an input or output detector is raised),
    ``accuracy_drop`` (the label-free estimate or a feedback evaluation is below the
    golden set's accuracy), and the raised alerts."""

    drifted: bool
    accuracy_drop: bool
    alerts: tuple[Alert, ...]

    @property
    def raised(self) -> bool:
        """Either flag."""
        return self.drifted or self.accuracy_drop


ACCURACY_DETECTORS = ("cbpe:accuracy", "feedback:accuracy")


def _read(path: Path) -> dict[str, object] | None:
    try:
        d = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) else None


def monitor_status(state_dir: str | os.PathLike[str], *,
                   model_sha256: str | None = None) -> dict[str, object]:
    """Everything the monitor last saved for the device at ``state_dir``: the flags, the
    raised alerts, the recent windows (label-free estimate, test p-values), memory per
    detector, and the feedback evaluations (measured accuracy per window). With
    ``model_sha256`` (the active model's), alerts saved for another model are left out:
    an update starts the monitor afresh."""
    folder = Path(state_dir) / FOLDER
    drift = _read(folder / DRIFT_FILE) or {}
    evals = _read(folder / EVALUATIONS_FILE) or {}
    alerts: list[Alert] = []
    for source in (drift, evals):
        if model_sha256 is not None and source.get("model_sha256") != model_sha256:
            continue
        try:
            alerts.extend(a for a in (Alert(**d) for d in source.get("alerts", []))  # type: ignore[union-attr]
                          if a.active)
        except (TypeError, AttributeError):     # a file edited by hand: its alerts ignored
            continue
    flag = Flag(drifted=any(a.detector not in ACCURACY_DETECTORS for a in alerts),
                accuracy_drop=any(a.detector in ACCURACY_DETECTORS for a in alerts),
                alerts=tuple(alerts))
    return {"drifted": flag.drifted, "accuracy_drop": flag.accuracy_drop,
            "alerts": [asdict(a) for a in flag.alerts],
            "model_sha256": drift.get("model_sha256"), "samples": drift.get("samples", 0),
            "saved": drift.get("saved"), "memory_bytes": drift.get("memory_bytes", {}),
            "errors": drift.get("errors", 0), "last_error": drift.get("last_error"),
            "windows": drift.get("windows", []), "evaluations": evals.get("evaluations", [])}


def drift_flag(state_dir: str | os.PathLike[str], *,
               model_sha256: str | None = None) -> Flag:
    """The device's flags as last saved (both False when nothing was saved yet; see
    :func:`monitor_status` for ``model_sha256``)."""
    s = monitor_status(state_dir, model_sha256=model_sha256)
    return Flag(bool(s["drifted"]), bool(s["accuracy_drop"]),
                tuple(Alert(**a) for a in s["alerts"]))  # type: ignore[attr-defined]
