"""Fleet estimates from private reports: de-biasing and confidence intervals. Pure.

Each report's output goes through its mechanism's unbiased estimator (see
:mod:`edgeloop.monitor.telemetry.mechanisms`): a vector whose expectation is the one-hot of the
device's true class or drift flag, or the noisy clipped confidence itself. A device's
estimate is the mean over its reports; the fleet estimate is the mean over devices (every
device weighs the same, however often it reports). The interval is the normal one,
estimate ± z·s/√n with s the standard deviation across devices: it accounts for the
mechanisms' noise and for the real spread between devices, and reports from one device
being correlated does not make it too narrow. Estimates are unbiased, so a rare class
can come out slightly below 0; nothing is clipped.

The estimand: the class mix is the fleet's average share of predictions per class (each
device's share over the windows it reported); the drift rate is the average share of a
device's reports whose drift flag was set; the mean confidence is the average clipped
mean confidence.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Any

import numpy as np

from edgeloop.errors import UsageError
from edgeloop.monitor.telemetry.report import Report

__all__ = ["Estimate", "FleetSummary", "summarize"]


@dataclass(frozen=True)
class Estimate:
    """One estimated quantity, its interval and how many devices it rests on."""

    value: float
    low: float
    high: float
    devices: int


@dataclass(frozen=True)
class FleetSummary:
    """What :func:`summarize` found; ``class_mix`` maps the number of classes to one
    :class:`Estimate` per class (fleets may run models with different class counts)."""

    reports: int
    devices: int
    level: float
    epsilon_mean: float
    class_mix: dict[int, list[Estimate]]
    drift_rate: Estimate | None
    mean_confidence: Estimate | None

    def drift_above(self, rate: float) -> bool:
        """Whether the fleet's drift rate is above ``rate`` beyond doubt at the summary's
        level: its interval's lower bound is (a reason to ask for a federated round)."""
        e = self.drift_rate
        return e is not None and e.devices >= 2 and e.low > rate

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (intervals as numbers; NaN where one device gives no spread)."""
        def one(e: Estimate | None) -> dict[str, Any] | None:
            return None if e is None else {k: _num(v) for k, v in asdict(e).items()}

        return {"reports": self.reports, "devices": self.devices, "level": self.level,
                "epsilon_mean": self.epsilon_mean,
                "class_mix": {str(k): [one(e) for e in v] for k, v in self.class_mix.items()},
                "drift_rate": one(self.drift_rate),
                "mean_confidence": one(self.mean_confidence)}


def _num(v: float) -> float | None:
    return None if isinstance(v, float) and math.isnan(v) else v


class _PerDevice:
    """Sums of per-report estimates per device, for one quantity."""

    def __init__(self) -> None:
        self.sums: dict[str, np.ndarray] = {}
        self.counts: dict[str, int] = defaultdict(int)

    def add(self, device: str, est: np.ndarray) -> None:
        self.sums[device] = self.sums.get(device, 0.0) + est
        self.counts[device] += 1

    def fleet(self, z: float) -> list[Estimate]:
        means = np.stack([self.sums[d] / self.counts[d] for d in self.sums])
        n = len(means)
        mean = means.mean(axis=0)
        half = z * means.std(axis=0, ddof=1) / math.sqrt(n) if n > 1 \
            else np.full_like(mean, math.nan)
        return [Estimate(float(m), float(m - h), float(m + h), n)
                for m, h in zip(mean, half, strict=True)]


def summarize(reports: Iterable[Report], *, level: float = 0.95) -> FleetSummary:
    """Fleet estimates with ``level`` confidence intervals from parsed reports."""
    if not 0 < level < 1:
        raise UsageError(f"`level` must be in (0, 1); got {level}")
    z = NormalDist().inv_cdf(0.5 + level / 2)
    classes: dict[int, _PerDevice] = defaultdict(_PerDevice)
    drift, conf = _PerDevice(), _PerDevice()
    n = 0
    eps = 0.0
    devices: set[str] = set()
    for r in reports:
        n += 1
        eps += r.epsilon
        devices.add(r.device)
        for name, (mech, out) in r.fields.items():
            est = np.asarray(mech.estimate(out), dtype=np.float64)
            if name == "class":
                classes[mech.k].add(r.device, est)   # type: ignore[union-attr]
            elif name == "drift":
                drift.add(r.device, est[1:])
            else:
                conf.add(r.device, est.reshape(1))
    return FleetSummary(
        reports=n, devices=len(devices), level=level, epsilon_mean=eps / n if n else 0.0,
        class_mix={k: v.fleet(z) for k, v in sorted(classes.items())},
        drift_rate=drift.fleet(z)[0] if drift.sums else None,
        mean_confidence=conf.fleet(z)[0] if conf.sums else None)
