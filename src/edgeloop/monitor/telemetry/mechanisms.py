"""Local differential privacy mechanisms: what a device applies to a value before the value
leaves it, and the unbiased estimator the collector applies to each output.

Every mechanism here is ε-LDP (Gaussian: (ε, δ)) with respect to its whole input: for any
two inputs and any output, the output's probabilities differ by at most a factor e^ε
(plus δ). Each one states its ε (and δ) as fields, which is what a report carries and
the device's ledger charges.

- :class:`RandomizedResponse`: k-ary randomized response, "generalized randomized
  response" (GRR, direct encoding; Warner 1965, Kairouz et al. 2014). Keeps the value
  with p = e^ε / (e^ε + k - 1), else reports one of the other k - 1 uniformly.
- :class:`UnaryEncoding`: optimized unary encoding (OUE; Wang, Blocki, Li and Jha,
  USENIX Security 2017). k bits: the value's bit is 1 with p = 1/2, every other bit is 1
  with q = 1 / (e^ε + 1). Its variance does not grow with k; GRR's does, so
  :func:`categorical` picks GRR while k < 3 e^ε + 2 and OUE beyond (same paper).
- :class:`Laplace`: clip to [lo, hi], add Laplace noise of scale (hi - lo) / ε.
- :class:`Gaussian`: clip to [lo, hi], add Gaussian noise whose sigma is the smallest that
  gives (ε, δ) exactly (the analytic Gaussian mechanism, Balle and Wang, ICML 2018);
  valid for every ε > 0, unlike the classical sigma = Δ sqrt(2 ln(1.25/δ)) / ε (ε < 1 only).
  It is also rho-zCDP with rho = Δ² / (2 sigma²) (:attr:`Gaussian.rho`).

Unbiased estimators, per report: for GRR and OUE, ``estimate(output)`` is a length-k
vector whose expectation is the one-hot vector of the input, ((y == v) - q) / (p - q);
for Laplace and Gaussian, the output itself (unbiased for the clipped input). Averages of
per-report estimates stay unbiased whatever mix of parameters the reports used.

Noise comes from ``secrets.SystemRandom`` (the operating system's CSPRNG) unless a
``random.Random`` is passed (tests). Numeric outputs are rounded to 1e-6; that is
post-processing and costs no privacy, but it is not a snapping mechanism: the
floating-point caveat of Mironov (CCS 2012) applies at the level of the rounding.
"""

from __future__ import annotations

import functools
import math
import random
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from edgeloop.errors import UsageError, one_of

__all__ = ["MECHANISMS", "Gaussian", "Laplace", "Mechanism", "RandomizedResponse",
           "UnaryEncoding", "categorical", "finite", "from_params"]

MAX_K = 4096          # categories a categorical mechanism accepts
MAX_EPSILON = 50.0    # beyond this e^ε overflows the estimators' precision (and means nothing)
_DIGITS = 6           # numeric outputs are rounded to this many decimals


def finite(value: object) -> bool:
    """Whether ``value`` is a real number (not a bool) that a float holds: JSON integers
    can be too large for one."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _system_rng() -> random.Random:
    return secrets.SystemRandom()


def _check_epsilon(epsilon: object) -> float:
    if not finite(epsilon) or not 0 < epsilon <= MAX_EPSILON:  # type: ignore[operator]
        raise UsageError(f"`epsilon` must be a number in (0, {MAX_EPSILON:g}]; got {epsilon!r}")
    return float(epsilon)


def _check_k(k: object) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or not 2 <= k <= MAX_K:
        raise UsageError(f"`k` (categories) must be an integer in [2, {MAX_K}]; got {k!r}")
    return k


def _check_range(lo: object, hi: object) -> tuple[float, float]:
    if not finite(lo) or not finite(hi) or not lo < hi:  # type: ignore[operator]
        raise UsageError(f"the clipping range must be finite numbers lo < hi; got "
                         f"[{lo!r}, {hi!r}]")
    return float(lo), float(hi)  # type: ignore[arg-type]


@dataclass(frozen=True)
class RandomizedResponse:
    """k-ary randomized response (GRR): ε-LDP for a value in ``range(k)``."""

    k: int
    epsilon: float
    name = "grr"
    delta = 0.0

    def __post_init__(self) -> None:
        _check_k(self.k)
        object.__setattr__(self, "epsilon", _check_epsilon(self.epsilon))

    @property
    def p(self) -> float:
        """Probability that the output is the input."""
        return math.exp(self.epsilon) / (math.exp(self.epsilon) + self.k - 1)

    @property
    def q(self) -> float:
        """Probability of each particular other value."""
        return 1.0 / (math.exp(self.epsilon) + self.k - 1)

    def privatize(self, value: int, rng: random.Random | None = None) -> int:
        """The randomized value for ``value`` (in ``range(k)``)."""
        if not 0 <= value < self.k:
            raise UsageError(f"value {value} is outside the {self.k} categories")
        rng = rng or _system_rng()
        if rng.random() < self.p:
            return value
        other = rng.randrange(self.k - 1)
        return other + (other >= value)

    def contains(self, output: object) -> bool:
        """Whether ``output`` is in this mechanism's output space."""
        return isinstance(output, int) and not isinstance(output, bool) \
            and 0 <= output < self.k

    def estimate(self, output: int) -> list[float]:
        """Per-category unbiased estimate of the input's one-hot vector."""
        span = self.p - self.q
        return [((v == output) - self.q) / span for v in range(self.k)]

    def params(self) -> dict[str, Any]:
        """The parameters a report carries (besides the output)."""
        return {"mech": self.name, "k": self.k, "epsilon": self.epsilon}


@dataclass(frozen=True)
class UnaryEncoding:
    """Optimized unary encoding (OUE): ε-LDP for a value in ``range(k)``, sent as k bits."""

    k: int
    epsilon: float
    name = "oue"
    delta = 0.0
    p = 0.5

    def __post_init__(self) -> None:
        _check_k(self.k)
        object.__setattr__(self, "epsilon", _check_epsilon(self.epsilon))

    @property
    def q(self) -> float:
        """Probability that a bit other than the input's is 1."""
        return 1.0 / (math.exp(self.epsilon) + 1.0)

    def privatize(self, value: int, rng: random.Random | None = None) -> list[int]:
        """The k randomized bits for ``value`` (in ``range(k)``)."""
        if not 0 <= value < self.k:
            raise UsageError(f"value {value} is outside the {self.k} categories")
        rng = rng or _system_rng()
        q = self.q
        return [int(rng.random() < (self.p if v == value else q)) for v in range(self.k)]

    def contains(self, output: object) -> bool:
        """Whether ``output`` is in this mechanism's output space (k bits)."""
        return isinstance(output, list) and len(output) == self.k and all(
            b in (0, 1) and not isinstance(b, bool) and isinstance(b, int) for b in output)

    def estimate(self, output: Sequence[int]) -> list[float]:
        """Per-category unbiased estimate of the input's one-hot vector."""
        span = self.p - self.q
        return [(b - self.q) / span for b in output]

    def params(self) -> dict[str, Any]:
        """The parameters a report carries (besides the output)."""
        return {"mech": self.name, "k": self.k, "epsilon": self.epsilon}


@dataclass(frozen=True)
class Laplace:
    """Clip to [lo, hi], add Laplace noise of scale (hi - lo) / ε: ε-LDP."""

    lo: float
    hi: float
    epsilon: float
    name = "laplace"
    delta = 0.0

    def __post_init__(self) -> None:
        lo, hi = _check_range(self.lo, self.hi)
        object.__setattr__(self, "lo", lo)
        object.__setattr__(self, "hi", hi)
        object.__setattr__(self, "epsilon", _check_epsilon(self.epsilon))

    @property
    def scale(self) -> float:
        """The noise scale b (standard deviation b √2)."""
        return (self.hi - self.lo) / self.epsilon

    def privatize(self, value: float, rng: random.Random | None = None) -> float:
        """The noisy clipped ``value``."""
        rng = rng or _system_rng()
        clipped = min(max(float(value), self.lo), self.hi)
        u = rng.random() - 0.5          # inverse CDF; u = -0.5 has probability 2^-53
        noise = -self.scale * math.copysign(1.0, u) * math.log1p(-2 * abs(u))
        return round(clipped + noise, _DIGITS)

    def contains(self, output: object) -> bool:
        """Whether ``output`` is in this mechanism's output space (a finite float)."""
        return finite(output)

    def estimate(self, output: float) -> float:
        """The output itself: unbiased for the clipped input."""
        return float(output)

    def params(self) -> dict[str, Any]:
        """The parameters a report carries (besides the output)."""
        return {"mech": self.name, "lo": self.lo, "hi": self.hi, "epsilon": self.epsilon}


def _phi(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def gaussian_delta(sigma: float, sensitivity: float, epsilon: float) -> float:
    """The exact δ of the Gaussian mechanism at ``epsilon`` (Balle and Wang 2018, Thm 8)."""
    a = sensitivity / (2 * sigma)
    b = epsilon * sigma / sensitivity
    return _phi(a - b) - math.exp(epsilon) * _phi(-a - b)


@dataclass(frozen=True)
class Gaussian:
    """Clip to [lo, hi], add N(0, sigma²) with the smallest sigma giving (ε, δ)-LDP."""

    lo: float
    hi: float
    epsilon: float
    delta: float
    name = "gaussian"

    def __post_init__(self) -> None:
        lo, hi = _check_range(self.lo, self.hi)
        object.__setattr__(self, "lo", lo)
        object.__setattr__(self, "hi", hi)
        object.__setattr__(self, "epsilon", _check_epsilon(self.epsilon))
        d = self.delta
        if not finite(d) or not 0 < d < 0.5:  # type: ignore[operator]
            raise UsageError(f"`delta` of the Gaussian mechanism must be in (0, 0.5); got {d!r}")
        object.__setattr__(self, "delta", float(d))

    @functools.cached_property
    def sigma(self) -> float:
        """The noise's standard deviation (bisection: the exact δ falls as sigma grows)."""
        sens = self.hi - self.lo
        lo, hi = 1e-3 * sens, sens
        while gaussian_delta(hi, sens, self.epsilon) > self.delta:
            lo, hi = hi, 2 * hi
        for _ in range(100):
            mid = math.sqrt(lo * hi)
            lo, hi = (mid, hi) if gaussian_delta(mid, sens, self.epsilon) > self.delta \
                else (lo, mid)
        return hi

    @property
    def rho(self) -> float:
        """The zero-concentrated DP parameter of the same noise: Δ² / (2 sigma²)."""
        return (self.hi - self.lo) ** 2 / (2 * self.sigma ** 2)

    def privatize(self, value: float, rng: random.Random | None = None) -> float:
        """The noisy clipped ``value``."""
        rng = rng or _system_rng()
        clipped = min(max(float(value), self.lo), self.hi)
        return round(clipped + rng.gauss(0.0, self.sigma), _DIGITS)

    contains = Laplace.contains
    estimate = Laplace.estimate

    def params(self) -> dict[str, Any]:
        """The parameters a report carries (besides the output)."""
        return {"mech": self.name, "lo": self.lo, "hi": self.hi, "epsilon": self.epsilon,
                "delta": self.delta}


Mechanism = RandomizedResponse | UnaryEncoding | Laplace | Gaussian
MECHANISMS: dict[str, type[Mechanism]] = {
    m.name: m for m in (RandomizedResponse, UnaryEncoding, Laplace, Gaussian)}
_PARAMS = {"grr": ("k", "epsilon"), "oue": ("k", "epsilon"),
           "laplace": ("lo", "hi", "epsilon"), "gaussian": ("lo", "hi", "epsilon", "delta")}


def categorical(k: int, epsilon: float, kind: str = "auto") -> RandomizedResponse | UnaryEncoding:
    """The categorical mechanism ``kind`` (grr, oue, or auto: the one of lower variance,
    GRR while k < 3 e^ε + 2)."""
    if kind == "auto":
        kind = "grr" if k < 3 * math.exp(min(epsilon, MAX_EPSILON)) + 2 else "oue"
    if kind == "grr":
        return RandomizedResponse(k, epsilon)
    if kind == "oue":
        return UnaryEncoding(k, epsilon)
    raise one_of("class mechanism", ["auto", "grr", "oue"], kind)


def from_params(params: Mapping[str, Any]) -> Mechanism:
    """The mechanism a report names (``params()`` plus nothing else but ``value``);
    raises :class:`UsageError` for an unknown mechanism or invalid parameters."""
    name = params.get("mech")
    if not isinstance(name, str) or name not in _PARAMS:
        raise one_of("mech", list(_PARAMS), name)
    expected = {"mech", "value", *_PARAMS[name]}
    if set(params) != expected:
        raise UsageError(f"a {name} field has keys {', '.join(sorted(expected))}; got "
                         f"{', '.join(sorted(params))}")
    return MECHANISMS[name](**{p: params[p] for p in _PARAMS[name]})  # type: ignore[arg-type]
