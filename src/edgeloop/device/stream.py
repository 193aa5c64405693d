"""Adaptive rate for streams of windows (a sensor's consecutive readings): the two pure
decisions :meth:`Runtime.predict_stream <edgeloop.device.runtime.Runtime.predict_stream>`
makes for each window, under a policy's ``[stream]`` table
(:class:`~edgeloop.device.policy.StreamRule`).

* **Unchanged**: :func:`relative_change` of the window from the last *processed* one
  below ``min_change``: the last answer still stands. Comparing with the last processed
  window, not the previous one, keeps a slow drift from hiding behind small steps.
* **Energy budget**: :class:`EnergyBudget`, a token bucket in millijoules. Credit
  accrues at ``energy_budget_mw`` over stream time, at most ``burst_s`` seconds' worth
  (credit saved while nothing changes may pay for a burst, no more); a window runs when
  the credit covers the last processed window's energy, which it then spends. The rate
  falls as far as the budget needs and rises again when windows get cheaper or time
  passes unspent, and the energy spent by stream time ``t`` stays within
  ``budget x t`` plus the first window's (which always runs: there is no answer yet).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

__all__ = ["SKIP_BUDGET", "SKIP_UNCHANGED", "EnergyBudget", "relative_change"]

SKIP_UNCHANGED = "unchanged"
SKIP_BUDGET = "energy budget"


def relative_change(window: Mapping[str, np.ndarray], last: Mapping[str, np.ndarray]
                    ) -> float:
    """``||x - x_last|| / ||x_last||``, the L2 norms taken over all of ``last``'s inputs
    together (in float64). 0 for equal windows; ``inf`` when ``last`` is all zeros and
    ``window`` is not, or when an input's shape differs (a window of another length)."""
    diff = norm = 0.0
    for name, before in last.items():
        now = np.asarray(window[name])
        if now.shape != before.shape:
            return math.inf
        b = np.asarray(before, np.float64)
        diff += float(np.sum(np.square(now.astype(np.float64) - b)))
        norm += float(np.sum(np.square(b)))
    if norm == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return math.sqrt(diff / norm)


class EnergyBudget:
    """A token bucket holding millijoules of credit (see the module docstring).

    Call :meth:`allows` for every window with its stream time, and :meth:`spend` with
    the energy of each window that ran.
    """

    def __init__(self, budget_mw: float, *, burst_s: float) -> None:
        self.budget_mw = budget_mw
        self.burst_s = burst_s
        self.credit_mj = 0.0
        self._cost_mj: float | None = None     # the last processed window's energy
        self._t: float | None = None

    def allows(self, now_s: float) -> bool:
        """Accrue credit up to stream time ``now_s`` (seconds); whether a window may run
        now: the credit covers the last processed window's energy (none has run yet: yes)."""
        if self._t is not None:
            cap = max(self.budget_mw * self.burst_s, self._cost_mj or 0.0)
            self.credit_mj = min(self.credit_mj + self.budget_mw * max(now_s - self._t, 0.0),
                                 cap)
        self._t = now_s
        return self._cost_mj is None or self.credit_mj >= self._cost_mj

    def spend(self, mj: float) -> None:
        """A window ran and used ``mj`` millijoules."""
        self.credit_mj -= mj
        self._cost_mj = mj
