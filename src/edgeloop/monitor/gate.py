"""The updater's extra check while the device is drifted: a candidate is compared with
the current model on the device's recent inputs (``STATE/monitor/recent.npz``, saved by
the :class:`~edgeloop.monitor.Monitor`), not only on the golden set, which no longer
looks like what the device sees.

Recent inputs carry no labels, so each model is judged by its label-free accuracy
estimate (CBPE with its own bundle's calibration, :mod:`~edgeloop.monitor.cbpe`); the
health check (:func:`edgeloop.bundle.health.judge`) refuses a candidate whose estimate
is below the current model's by more than the accuracy margin.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from edgeloop.data import Dataset, load_npz
from edgeloop.errors import EdgeloopError
from edgeloop.monitor.alerts import FOLDER, RECENT_FILE, drift_flag
from edgeloop.monitor.reference import Sketch
from edgeloop.monitor.signals import output_signals

__all__ = ["drifted_recent", "estimate_accuracy"]


def drifted_recent(state_dir: str | os.PathLike[str], model_sha256: str) -> Dataset | None:
    """The device's recent inputs if it is drifted under the model ``model_sha256``
    (None when it is not, or nothing readable was saved)."""
    if not drift_flag(state_dir, model_sha256=model_sha256).drifted:
        return None
    path = Path(state_dir) / FOLDER / RECENT_FILE
    with contextlib.suppress(EdgeloopError):
        return load_npz(path)
    return None


def estimate_accuracy(answer: Callable[[Mapping[str, np.ndarray]], np.ndarray],
                      data: Dataset, sketch_file: str | os.PathLike[str] | None
                      ) -> float | None:
    """A bundle's label-free accuracy estimate on ``data``: its answers' confidences
    through the calibration in its ``monitor.json`` (None without one)."""
    if sketch_file is None or not Path(sketch_file).is_file():
        return None
    sketch = Sketch.from_bytes(Path(sketch_file).read_bytes())
    if sketch.calibration is None:
        return None
    from edgeloop.measure import predict

    sig = output_signals(predict(answer, data), probabilities=sketch.probabilities)
    return sketch.calibration.estimate(sig.confidence)
