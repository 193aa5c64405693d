"""How sure a classifier is: calibrated probabilities and the confidence a cascade acts on.

Temperature scaling (Guo et al., "On Calibration of Modern Neural Networks", ICML 2017)
divides a stage's logits by one scalar ``T`` fitted on validation data to minimise the
negative log-likelihood. NLL is convex in the inverse temperature ``b = 1/T`` (its second
derivative is the variance of the logit under the softmax), so a few Newton steps on
``b`` find the optimum; numpy only, as everything that runs on a device.

A confidence is larger when the stage is surer: ``max-softmax`` (the top probability),
``margin`` (top-1 minus top-2 probability) or ``entropy`` (the negated entropy, in nats,
so 0 is certain).
"""

from __future__ import annotations

import numpy as np

from edgeloop.errors import DataError, UsageError, one_of

__all__ = ["MEASURES", "TemperatureScaler", "confidence", "nll", "softmax"]

MEASURES = ("max-softmax", "margin", "entropy")


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Class probabilities of ``logits`` (samples x classes) divided by ``temperature``."""
    z = np.asarray(logits, np.float64) / temperature
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def confidence(probs: np.ndarray, measure: str = "max-softmax") -> np.ndarray:
    """One confidence per sample of ``probs`` (samples x classes); larger is surer."""
    if measure == "max-softmax":
        return probs.max(axis=-1)
    if measure == "margin":
        if probs.shape[-1] < 2:
            return np.ones(probs.shape[:-1])
        top2 = np.partition(probs, -2, axis=-1)[..., -2:]
        return top2[..., 1] - top2[..., 0]
    if measure == "entropy":
        return (probs * np.log(np.clip(probs, 1e-300, None))).sum(axis=-1)
    raise one_of("measure", MEASURES, measure)


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood (nats) of ``labels`` under ``softmax(logits / T)``."""
    z = np.asarray(logits, np.float64) / temperature
    m = z.max(axis=1)
    lse = m + np.log(np.exp(z - m[:, None]).sum(axis=1))
    return float((lse - z[np.arange(len(z)), labels]).mean())


def _check(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    z, y = np.asarray(logits, np.float64), np.asarray(labels)
    if z.ndim != 2 or y.shape != (len(z),) or len(z) == 0:
        raise DataError(f"temperature scaling needs logits (samples x classes) and one label "
                        f"per sample; got logits {z.shape} and labels {y.shape}")
    if y.min() < 0 or y.max() >= z.shape[1]:
        raise DataError(f"labels must be class ids in [0, {z.shape[1]}); got {y.min()}..{y.max()}")
    return z, y.astype(np.int64)


class TemperatureScaler:
    """Fits one temperature to a classifier's validation logits (scikit-learn style:
    ``fit`` returns self, learned state ends in ``_``)."""

    def __init__(self, *, max_iter: int = 50, tol: float = 1e-10) -> None:
        self.max_iter = max_iter      # Newton steps at most
        self.tol = tol                # stop when a step changes the NLL by less (nats)

    def fit(self, logits: np.ndarray, labels: np.ndarray) -> TemperatureScaler:
        """Find ``T`` minimising the NLL of ``labels`` under ``softmax(logits / T)``."""
        z, y = _check(logits, labels)
        zy = z[np.arange(len(z)), y]
        b = 1.0
        f = nll(z, y)
        self.nll_before_ = f
        for _ in range(self.max_iter):
            p = softmax(z * b)
            mean = (p * z).sum(1)
            grad = float((mean - zy).mean())
            hess = float(((p * z * z).sum(1) - mean**2).mean())
            step = grad / hess if hess > 1e-12 else np.sign(grad) * 0.5 * b
            # damped: keep b positive and never let the NLL go up
            while True:
                nb = float(np.clip(b - step, b / 10, b * 10))
                nf = nll(z * nb, y)
                if nf <= f or abs(step) < 1e-12:
                    break
                step /= 2
            done = f - nf < self.tol
            b, f = nb, min(f, nf)
            if done:
                break
        self.temperature_ = 1.0 / b
        self.nll_after_ = f
        return self

    def predict_proba(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated class probabilities of ``logits``."""
        if not hasattr(self, "temperature_"):
            raise UsageError("this TemperatureScaler is not fitted yet; call "
                             "fit(logits, labels) first")
        return softmax(logits, self.temperature_)
