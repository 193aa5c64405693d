"""Label-free accuracy: confidence-based performance estimation (CBPE).

The method NannyML calls CBPE (its ``performance_estimation/confidence_based``
documentation): once a classifier's top-class confidence is *calibrated* on labelled
data the model was not trained on (P(correct | c) = c), the expected accuracy of any
window of answers is the mean of their calibrated confidences. It holds while P(y | x)
does not change (no concept drift) and inputs stay where calibration saw data; a
covariate or prior shift moves the estimate with the answers, which is the point.

Calibration is isotonic regression of correctness on confidence, fitted here by pool
adjacent violators (the textbook algorithm) and kept as knots for :func:`numpy.interp`,
so a device applies it with numpy alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgeloop.errors import UsageError

__all__ = ["Calibration", "fit_calibration"]


@dataclass(frozen=True)
class Calibration:
    """A non-decreasing map from confidence to P(correct), as knots (``x`` ascending)."""

    x: tuple[float, ...]
    y: tuple[float, ...]

    def __call__(self, confidence: np.ndarray) -> np.ndarray:
        """The calibrated confidences (clamped at the end knots)."""
        return np.interp(confidence, self.x, self.y)

    def estimate(self, confidence: np.ndarray) -> float:
        """The estimated accuracy of a window of answers with these confidences."""
        return float(self(confidence).mean())


def fit_calibration(confidence: np.ndarray, correct: np.ndarray, *,
                    max_knots: int = 64) -> Calibration:
    """Isotonic calibration of ``correct`` (bool per answer) on ``confidence``: pool
    adjacent violators over the distinct confidences in ascending order, each block kept
    as two knots (its lowest and highest confidence, at its accuracy), so that between
    blocks the map is linear, as scikit-learn's ``IsotonicRegression`` interpolates. Where
    that would be more than ``max_knots`` knots, neighbouring blocks are merged into
    about equal-count groups first (a weighted mean of non-decreasing values stays so)."""
    c = np.asarray(confidence, np.float64)
    ok = np.asarray(correct, np.float64)
    if c.shape != ok.shape or c.ndim != 1 or len(c) < 2 or max_knots < 2:
        raise UsageError("calibration needs at least 2 answers with a confidence and a "
                         f"correctness each, and max_knots >= 2; got {c.shape}, {ok.shape}, "
                         f"{max_knots}")
    xs, inverse = np.unique(c, return_inverse=True)        # ties pooled first
    hits = np.bincount(inverse, weights=ok)
    weights = np.bincount(inverse).astype(np.float64)
    # blocks: [sum of correct, count, lowest x, highest x], merged while not increasing
    blocks: list[list[float]] = []
    for x, h, w in zip(xs.tolist(), hits.tolist(), weights.tolist(), strict=True):
        blocks.append([h, w, x, x])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] >= blocks[-1][0] / blocks[-1][1]:
            h2, w2, _, hi = blocks.pop()
            blocks[-1][0] += h2
            blocks[-1][1] += w2
            blocks[-1][3] = hi
    b = np.array(blocks)
    groups = max_knots // 2
    if len(b) > groups:           # equal-count groups of neighbouring blocks
        cuts = np.searchsorted(np.cumsum(b[:, 1]), np.linspace(0, b[:, 1].sum(), groups + 1)[1:-1])
        starts = np.unique(np.r_[0, cuts])
        starts = starts[starts < len(b)]
        ends = np.r_[starts[1:], len(b)] - 1
        b = np.column_stack([np.add.reduceat(b[:, 0], starts), np.add.reduceat(b[:, 1], starts),
                             b[starts, 2], b[ends, 3]])
    y = b[:, 0] / b[:, 1]
    kx = np.column_stack([b[:, 2], b[:, 3]]).ravel()
    ky = np.repeat(y, 2)
    keep = np.r_[True, np.diff(kx) > 0]          # a one-value block is one knot
    return Calibration(tuple(kx[keep].tolist()), tuple(ky[keep].tolist()))
