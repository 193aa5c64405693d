"""The reference sketch: what the monitor compares a device's stream with.

Computed at publish time from the golden set (:func:`sketch_bundle`) and shipped in the
bundle as the signed file ``monitor.json`` beside the model (a bundle file, so the
manifest's sha256 covers it and the device verifies it with the slot). It holds, in a
few kilobytes whatever the data set's size:

- per input feature (see :mod:`~edgeloop.monitor.signals`): the reference quantiles that
  cut its values into ``bins`` bins, and how many golden samples fell in each;
- the model's outputs on the golden set: whether they are logits or probabilities, the
  mean and standard deviation of confidence and entropy, the predicted-class counts;
- with labels: the CBPE calibration (:mod:`~edgeloop.monitor.cbpe`), the golden
  accuracy and the spread of calibrated confidences (for the estimate's alert band).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from edgeloop._io import write_bytes_atomic
from edgeloop.data import Dataset
from edgeloop.errors import DataError, UsageError, VerificationError
from edgeloop.monitor.alerts import REFERENCE_FILE
from edgeloop.monitor.cbpe import Calibration, fit_calibration
from edgeloop.monitor.signals import (
    features,
    group_starts,
    looks_like_probabilities,
    output_signals,
)
from edgeloop.monitor.twosample import bin_counts

__all__ = ["REFERENCE_FILE", "Sketch", "sketch_bundle"]

FORMAT = 1


@dataclass(frozen=True)
class Sketch:
    """The reference sketch (see the module docstring). Build it with :meth:`from_data`."""

    samples: int
    inputs: tuple[str, ...]            # the model inputs the features come from, in order
    width: int                         # their flattened length per sample
    starts: tuple[int, ...]            # where each feature group starts in that row
    edges: tuple[tuple[float, ...], ...]   # per feature: bins - 1 ascending cut points
    counts: tuple[tuple[int, ...], ...]    # per feature: golden samples per bin
    probabilities: bool                # the outputs are probabilities (else logits)
    class_counts: tuple[int, ...]
    confidence: tuple[float, float]    # mean, standard deviation
    entropy: tuple[float, float]
    calibration: Calibration | None = None
    accuracy: float | None = None      # on the golden set, when it has labels
    calibrated_std: float | None = None    # of the calibrated confidences on it

    @classmethod
    def from_data(cls, inputs: Mapping[str, np.ndarray], outputs: np.ndarray,
                  labels: np.ndarray | None = None, *, bins: int = 8,
                  max_features: int = 64) -> Sketch:
        """The sketch of a golden set's ``inputs`` (name -> array, samples first), the
        model's ``outputs`` on them and, optionally, their ``labels``."""
        if bins < 2 or max_features < 1:
            raise UsageError(f"`bins` must be >= 2 and `max_features` >= 1; got {bins}, "
                             f"{max_features}")
        names = tuple(inputs)
        n = len(outputs)
        if n < 2 * bins:
            raise DataError(f"a reference sketch needs at least {2 * bins} golden samples; "
                            f"got {n}")
        width = sum(int(np.prod(np.shape(inputs[k])[1:])) for k in names)
        starts = group_starts(width, max_features)
        x = features(inputs, names, starts)
        edges = np.quantile(x, np.arange(1, bins) / bins, axis=0).T     # (D, bins - 1)
        probs = looks_like_probabilities(outputs)
        sig = output_signals(outputs, probabilities=probs)
        k = int(np.prod(np.shape(outputs)[1:]))
        if k < 2:
            raise DataError(f"the monitor needs a classifier's scores; the model answers "
                            f"{np.shape(outputs)[1:]} per sample")
        calibration = accuracy = spread = None
        if labels is not None:
            correct = sig.classes == np.asarray(labels)
            calibration = fit_calibration(sig.confidence, correct)
            accuracy = float(correct.mean())
            spread = float(calibration(sig.confidence).std())
        return cls(
            samples=n, inputs=names, width=width, starts=tuple(starts.tolist()),
            edges=tuple(tuple(e) for e in edges.tolist()),
            counts=tuple(tuple(c) for c in bin_counts(x, edges).tolist()),
            probabilities=probs,
            class_counts=tuple(np.bincount(sig.classes, minlength=k).tolist()),
            confidence=(float(sig.confidence.mean()), float(sig.confidence.std())),
            entropy=(float(sig.entropy.mean()), float(sig.entropy.std())),
            calibration=calibration, accuracy=accuracy, calibrated_std=spread)

    def to_bytes(self) -> bytes:
        """Canonical JSON (sorted keys)."""
        return json.dumps({"format": FORMAT, **asdict(self)}, sort_keys=True,
                          separators=(",", ":")).encode()

    def write(self, folder: str | os.PathLike[str]) -> Path:
        """Write :meth:`to_bytes` atomically as ``folder/monitor.json``; returns its path
        (for a bundle's ``files``)."""
        path = Path(folder) / REFERENCE_FILE
        write_bytes_atomic(path, self.to_bytes())
        return path

    @classmethod
    def from_bytes(cls, data: bytes) -> Sketch:
        """Parse :meth:`to_bytes`; raise :class:`VerificationError` if malformed."""
        try:
            d = json.loads(data)
            if d.pop("format") != FORMAT:
                raise ValueError("unknown format")
            cal = d.pop("calibration")
            tup = {k: tuple(tuple(r) for r in d.pop(k)) for k in ("edges", "counts")}
            s = cls(calibration=Calibration(tuple(cal["x"]), tuple(cal["y"])) if cal else None,
                    **tup, **{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
            if len(s.edges) != len(s.starts) or len(s.counts) != len(s.starts):
                raise ValueError("features disagree in number")
            return s
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise VerificationError(f"monitor reference sketch is malformed ({e})") from None


def sketch_bundle(model: str | os.PathLike[str], golden: Dataset, *,
                  files: Mapping[str, str | os.PathLike[str]] | None = None,
                  bins: int = 8, max_features: int = 64) -> Sketch:
    """The sketch of the bundle of ``model`` (and its ``files``) on ``golden``, its
    outputs taken as the device will serve it (:func:`edgeloop.bundle.served.served`)."""
    from edgeloop.bundle.served import served
    from edgeloop.data import check_against
    from edgeloop.measure import predict

    with served(Path(model), files or {}) as bundle:
        check_against(golden, bundle.inputs, source="the golden set")
        outputs = predict(bundle.answer, golden)
    names = [s.name for s in bundle.inputs]
    return Sketch.from_data({k: golden.inputs[k] for k in names}, outputs, golden.labels,
                            bins=bins, max_features=max_features)
