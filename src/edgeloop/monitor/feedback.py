"""Periodic evaluation: measured accuracy whenever labelled samples reach the device.

:func:`evaluate_feedback` runs the device's active bundle (as it is served, verified) on
labelled samples, measures its accuracy per window of about ``window`` samples next to the
label-free estimate for the same samples, and appends the windows to
``STATE/monitor/evaluations.json`` (the newest ``history`` kept), read-modify-written
under a lock so that concurrent feedback never loses an evaluation. A window whose
measured accuracy is below the golden set's by more than ``accuracy_drop`` and 3
binomial standard errors raises the ``feedback:accuracy`` alert; the next window that is
not lowers it. Nothing is written when the data or the device is at fault.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np

from edgeloop._io import locked, utc_now, write_bytes_atomic
from edgeloop.data import Dataset
from edgeloop.errors import DataError, UsageError, VerificationError
from edgeloop.monitor.alerts import EVALUATIONS_FILE, FOLDER, Alert
from edgeloop.monitor.reference import REFERENCE_FILE, Sketch
from edgeloop.monitor.signals import output_signals

__all__ = ["evaluate_feedback"]

DETECTOR = "feedback:accuracy"


def evaluate_feedback(state_dir: str | os.PathLike[str], data: Dataset, *,
                      window: int = 500, history: int = 100,
                      accuracy_drop: float = 0.05) -> list[dict[str, object]]:
    """Evaluate the active bundle of the device at ``state_dir`` on labelled ``data``;
    returns the new evaluation windows (samples, measured accuracy, label-free estimate
    when the bundle ships a calibration, model version) and records them."""
    from edgeloop.bundle import Device
    from edgeloop.bundle.served import served
    from edgeloop.data import check_against
    from edgeloop.measure import predict

    if window < 1 or history < 1:
        raise UsageError(f"`window` and `history` must be >= 1; got {window}, {history}")
    if data.labels is None:
        raise DataError("feedback needs labelled samples: the .npz has no `labels` array")
    device = Device(state_dir)
    active = device.active()
    if active is None:
        raise UsageError(f"device {str(state_dir)!r} has no model installed yet")
    path, manifest = active
    files = {f.name: path.with_name(f.name) for f in manifest.files}
    sketch = (Sketch.from_bytes(files[REFERENCE_FILE].read_bytes())
              if REFERENCE_FILE in files else None)
    with served(path, files, workdir=device.dir / "download") as bundle:
        check_against(data, bundle.inputs, source="the feedback data")
        outputs = predict(bundle.answer, data)
    if int(np.prod(outputs.shape[1:])) < 2:
        raise DataError(f"feedback needs a classifier's scores; the model answers "
                        f"{outputs.shape[1:]} per sample")
    sig = output_signals(outputs, probabilities=sketch.probabilities if sketch else False)
    correct = sig.classes == data.labels
    now = utc_now()
    golden = sketch.accuracy if sketch is not None else manifest.figures.get("accuracy")
    records = []
    # windows of about `window` samples: the data in max(1, round(n / window)) equal parts
    for part in np.array_split(np.arange(len(data)), max(1, round(len(data) / window))):
        n = len(part)
        acc = float(correct[part].mean())
        rec: dict[str, object] = {"time": now, "model": manifest.name,
                                  "version": manifest.version, "samples": n,
                                  "accuracy": acc}
        if sketch is not None and sketch.calibration is not None:
            rec["estimated_accuracy"] = sketch.calibration.estimate(sig.confidence[part])
        if golden is not None:
            band = max(accuracy_drop, 3 * np.sqrt(max(golden * (1 - golden), 1e-4) / n))
            rec["golden_accuracy"] = golden
            rec["dropped"] = bool(acc < golden - band)
        records.append(rec)
    folder = Path(state_dir) / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    with locked(folder / "lock"):
        try:
            saved = json.loads((folder / EVALUATIONS_FILE).read_bytes())
        except FileNotFoundError:
            saved = {}
        except (OSError, ValueError):
            saved = None
        if not isinstance(saved, dict) or not isinstance(saved.get("evaluations", []), list):
            raise VerificationError(f"{str(folder / EVALUATIONS_FILE)!r} is not readable "
                                    "feedback history; move it away to start a new one")
        evals = [*saved.get("evaluations", []), *records][-history:]
        alerts = saved.get("alerts") or [None]
        alert = alerts[0] if saved.get("model_sha256") == manifest.sha256 else None
        for rec in records:
            if rec.get("dropped"):
                evidence = (f"measured accuracy {rec['accuracy']:.1%} on {rec['samples']} "
                            f"labelled samples; golden set {golden:.1%}")
                if alert is None or not alert["active"]:
                    alert = asdict(Alert(DETECTOR, now, now, 0, 0, 1, evidence))
                else:
                    alert.update(last=now, evidence=evidence,
                                 detections=alert["detections"] + 1)
            elif alert is not None and "dropped" in rec:
                alert["active"] = False
        write_bytes_atomic(folder / EVALUATIONS_FILE, json.dumps(
            {"model_sha256": manifest.sha256, "evaluations": evals,
             "alerts": [] if alert is None else [alert]}).encode())
    return records
