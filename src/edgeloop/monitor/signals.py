"""What the monitor watches, computed for a batch of answers at once (numpy only).

Output signals come from the model's first output: its class probabilities (a softmax
of logits, or the probabilities themselves when the model ends in a softmax), and from
them the confidence (top probability), the normalised entropy (0: sure, 1: uniform) and
the predicted class. Input signals are per-feature values: every input of a sample
flattened into one row and, when longer than ``max_features``, averaged over that many
contiguous groups (an embedding-like summary whose cost does not grow with the input).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["OutputSignals", "features", "looks_like_probabilities", "output_signals"]


def looks_like_probabilities(output: np.ndarray) -> bool:
    """True if every row of ``output`` is non-negative and sums to 1 (a softmax head)."""
    rows = np.asarray(output, np.float64).reshape(len(output), -1)
    return bool((rows >= 0).all() and np.allclose(rows.sum(1), 1.0, atol=1e-3))


class OutputSignals:
    """Confidence (top probability), normalised entropy and predicted class of each row
    of an output."""

    __slots__ = ("classes", "confidence", "entropy")

    def __init__(self, confidence: np.ndarray, entropy: np.ndarray,
                 classes: np.ndarray) -> None:
        self.confidence, self.entropy, self.classes = confidence, entropy, classes


def output_signals(output: np.ndarray, *, probabilities: bool) -> OutputSignals:
    """The signals of a batch of model outputs (rows = samples; a (N, K) score array or
    anything that flattens to it, K >= 2). ``probabilities``: the rows already are
    probabilities (otherwise they are logits)."""
    z = np.asarray(output).reshape(len(output), -1)
    if z.dtype not in (np.float32, np.float64):
        z = z.astype(np.float64)
    k = z.shape[1]
    if probabilities:
        p = np.clip(z, 0.0, None)
        p /= np.maximum(p.sum(1, keepdims=True), 1e-300)
        classes = p.argmax(1)
        with np.errstate(divide="ignore", invalid="ignore"):
            h = -np.where(p > 0, p * np.log(p), 0.0).sum(1)
        confidence = p.max(1)
    else:
        # softmax of z - max(z): the top class's term is exp(0) = 1, so its probability
        # is 1 / sum(exp) and the entropy is log(sum) - sum(p * (z - max))
        classes = z.argmax(1)
        z = z - z.max(1, keepdims=True)
        e = np.exp(z)
        total = e.sum(1)
        confidence = 1.0 / total
        h = np.log(total) - (e * z).sum(1) * confidence
    return OutputSignals(confidence, h / np.log(k) if k > 1 else np.zeros(len(z)), classes)


def group_starts(width: int, max_features: int) -> np.ndarray:
    """Where each of ``min(width, max_features)`` contiguous feature groups starts."""
    g = min(width, max_features)
    return np.linspace(0, width, g + 1).astype(np.int64)[:-1]


def features(feed: Mapping[str, np.ndarray], names: Sequence[str], starts: np.ndarray
             ) -> np.ndarray:
    """Per-sample feature rows of ``feed``'s inputs ``names`` (in that order,
    each flattened), averaged over the groups beginning at ``starts``."""
    rows = [np.asarray(feed[n]).reshape(len(feed[n]), -1) for n in names]
    flat = rows[0] if len(rows) == 1 else np.concatenate(rows, axis=1)
    if len(starts) == flat.shape[1]:
        return flat
    sizes = np.diff(np.append(starts, flat.shape[1]))
    return np.add.reduceat(flat, starts, axis=1, dtype=np.float64) / sizes
