"""The device's privacy ledger: how much ε (and δ) its reports have spent, against the
budget its owner set.

Accounting is **basic sequential composition** over a **sliding window**: the reports
sent in any window of ``period_s`` seconds spend at most ``epsilon`` and ``delta`` in
total (the sums of their ε and δ). Basic composition is loose (advanced or Rényi
composition would allow more reports for the same guarantee) but holds for any mix of
mechanisms and needs nothing but a sum. Spending is recorded before a report exists, so
a crash can only over-count. An entry recorded "in the future" (the clock went back)
stays in the window until the clock passes it.

The budget is the device owner's setting (``edgeloop device privacy``), never the
collector's. A device with no budget set sends nothing.

This module is pure: :class:`Ledger` is a value, :meth:`Ledger.charge` returns the next
one or raises. :mod:`edgeloop.monitor.telemetry.client` reads and writes it in the state folder.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, replace
from typing import Any

from edgeloop.errors import UsageError, VerificationError
from edgeloop.monitor.telemetry.mechanisms import finite

__all__ = ["Budget", "Ledger", "Spend", "format_period", "parse_period"]

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_period(text: str) -> int:
    """Seconds in a period written as a count and a unit: 30m, 12h, 1d, 1w (or 3600s)."""
    m = re.fullmatch(r"\s*(\d+)\s*([smhdw])\s*", text)
    if not m or int(m.group(1)) == 0:
        raise UsageError(f"`period` must be a positive count and a unit s, m, h, d or w "
                         f"(e.g. 1d); got {text!r}")
    return int(m.group(1)) * _UNITS[m.group(2)]


def _positive(name: str, value: object, *, zero: bool = False) -> float:
    ok = finite(value) and (value >= 0 if zero else value > 0)  # type: ignore[operator]
    if not ok:
        raise UsageError(f"`{name}` must be a finite number {'>=' if zero else '>'} 0; "
                         f"got {value!r}")
    return float(value)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Budget:
    """What the owner allows per sliding window of ``period_s`` seconds."""

    epsilon: float          # total ε per window
    period_s: int           # window length, seconds
    delta: float = 0.0      # total δ per window; 0 allows only pure-ε mechanisms

    def __post_init__(self) -> None:
        object.__setattr__(self, "epsilon", _positive("budget", self.epsilon))
        if isinstance(self.period_s, bool) or not isinstance(self.period_s, int) \
                or self.period_s < 1:
            raise UsageError(f"`period` must be at least one second; got {self.period_s!r}")
        object.__setattr__(self, "delta", _positive("delta budget", self.delta, zero=True))
        if self.delta >= 1:
            raise UsageError(f"`delta budget` must be below 1; got {self.delta}")


MIN_KEEP_S = 30 * 86400     # spends are kept at least this long (seconds)


@dataclass(frozen=True)
class Spend:
    """One report's cost: when (unix seconds), its sequence number, ε and δ."""

    time: float
    seq: int
    epsilon: float
    delta: float = 0.0


@dataclass(frozen=True)
class Ledger:
    """Budget, the next sequence number, and the spends of the last ``keep_s`` seconds
    (at least :data:`MIN_KEEP_S`, or the longest period a budget of this device has had):
    a period widened later, up to that reach, still counts every spend it covers."""

    budget: Budget | None = None
    next_seq: int = 1
    spends: tuple[Spend, ...] = field(default_factory=tuple)
    keep_s: int = 0

    def window(self, now: float) -> tuple[Spend, ...]:
        """The spends that count at ``now``."""
        if self.budget is None:
            return ()
        start = now - self.budget.period_s
        return tuple(s for s in self.spends if s.time > start)

    def spent(self, now: float) -> tuple[float, float]:
        """(ε, δ) spent in the window ending at ``now``."""
        w = self.window(now)
        return math.fsum(s.epsilon for s in w), math.fsum(s.delta for s in w)

    def charge(self, epsilon: float, delta: float, now: float) -> tuple[Ledger, int]:
        """The ledger after one more report costing (``epsilon``, ``delta``) at ``now``,
        and that report's sequence number; raises :class:`UsageError` if the budget
        does not allow it (nothing changes then)."""
        epsilon = _positive("epsilon", epsilon)
        delta = _positive("delta", delta, zero=True)
        b = self.budget
        if b is None:
            raise UsageError("this device has no privacy budget, so it sends no telemetry; "
                             "its owner sets one with `edgeloop device privacy STATE "
                             "--budget EPSILON --period 1d`")
        if epsilon > b.epsilon:
            raise UsageError(f"a report of ε {epsilon:g} exceeds the whole budget of ε "
                             f"{b.epsilon:g} per {format_period(b.period_s)}")
        eps, dlt = self.spent(now)
        slack = 1e-9 * b.epsilon           # sums of decimal fractions, e.g. ten times 0.1
        if eps + epsilon > b.epsilon + slack:
            w = self.window(now)
            free_at = _free_at(w, b, epsilon, now)
            raise UsageError(f"privacy budget spent: {eps:g} of ε {b.epsilon:g} used in the "
                             f"last {format_period(b.period_s)}, this report needs {epsilon:g}; "
                             f"enough is free again in {format_period(free_at)}")
        if delta > 0 and b.delta == 0:
            raise UsageError(f"this report needs δ {delta:g} (the Gaussian mechanism) but the "
                             "budget allows no δ, only pure-ε mechanisms such as Laplace; the "
                             "owner allows δ with `edgeloop device privacy --delta`")
        if dlt + delta > b.delta * (1 + 1e-9):
            raise UsageError(f"privacy budget spent: δ {dlt:g} of {b.delta:g} used in the last "
                             f"{format_period(b.period_s)}, this report needs δ {delta:g} (the "
                             "owner allows δ with `edgeloop device privacy --delta`)")
        spend = Spend(now, self.next_seq, epsilon, delta)
        keep = max(self.keep_s, MIN_KEEP_S, b.period_s)
        kept = (*(s for s in self.spends if s.time > now - keep), spend)
        return replace(self, next_seq=self.next_seq + 1, spends=kept, keep_s=keep), spend.seq

    def with_budget(self, budget: Budget) -> Ledger:
        """The same ledger under a new budget: what was spent still counts, in a wider
        period too; a period longer than the spends kept reach back is refused
        (:class:`UsageError`: it would count spends the ledger no longer holds)."""
        reach = max(self.keep_s, MIN_KEEP_S)
        if self.budget is not None and budget.period_s > reach:
            raise UsageError(f"a period of {format_period(budget.period_s)} would count "
                             f"spends older than this ledger keeps "
                             f"({format_period(reach)}); set at most "
                             f"{format_period(reach)}")
        return replace(self, budget=budget, keep_s=max(reach, budget.period_s))

    def to_bytes(self) -> bytes:
        """The JSON the state folder holds."""
        b = self.budget
        doc: dict[str, Any] = {
            "format": 1, "composition": "basic",
            "budget": None if b is None else {"epsilon": b.epsilon, "delta": b.delta,
                                              "period_s": b.period_s},
            "next_seq": self.next_seq, "keep_s": self.keep_s,
            "spends": [[s.time, s.seq, s.epsilon, s.delta] for s in self.spends]}
        return json.dumps(doc, indent=1).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Ledger:
        """Parse :meth:`to_bytes`; a damaged ledger raises :class:`VerificationError`
        (never silently starts a fresh budget)."""
        try:
            doc = json.loads(data)
            b = doc["budget"]
            budget = None if b is None else Budget(epsilon=b["epsilon"], delta=b["delta"],
                                                   period_s=b["period_s"])
            spends = tuple(Spend(float(t), int(s), float(e), float(d))
                           for t, s, e, d in doc["spends"])
            ledger = cls(budget, int(doc["next_seq"]), spends, int(doc.get("keep_s", 0)))
        except (ValueError, KeyError, TypeError, UsageError) as e:
            raise VerificationError(f"the privacy ledger is damaged ({type(e).__name__}: "
                                    f"{str(e)[:100]}); no report is sent until it is "
                                    "repaired") from None
        if ledger.next_seq < 1:
            raise VerificationError("the privacy ledger is damaged (next_seq < 1)")
        return ledger


def _free_at(window: tuple[Spend, ...], budget: Budget, need: float, now: float) -> float:
    """Seconds until enough of the window has expired for a report costing ``need``."""
    left = math.fsum(s.epsilon for s in window)
    for s in sorted(window, key=lambda s: s.time):
        left -= s.epsilon
        if left + need <= budget.epsilon * (1 + 1e-9):
            return max(s.time + budget.period_s - now, 0.0)
    return float(budget.period_s)


def format_period(seconds: float) -> str:
    """A duration the way people write periods: 19h, 1d, 2.5d, 45m, 30s."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.3g}{unit}"
    return f"{seconds:.0f}s"
