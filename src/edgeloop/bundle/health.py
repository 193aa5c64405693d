"""Health decisions: commit a candidate model or not, and keep it after probation or not.

Pure functions over figures the device layer has measured (with :mod:`edgeloop.measure`);
nothing here loads models, reads files or looks at the clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the CLI reads HealthConfig's defaults without loading numpy
    from edgeloop.bundle.manifest import Floor

__all__ = [
    "HealthConfig",
    "Measured",
    "Probation",
    "Verdict",
    "judge",
    "probation_step",
]


@dataclass(frozen=True)
class HealthConfig:
    """How strict the device is with a new model."""

    latency_margin: float = 0.5      # candidate p50 may be at most 50% above the current one
    latency_slack_ms: float = 1.0    # ...plus this many ms (timer noise on tiny models)
    latency_runs: int = 30           # timed runs per model (batch 1)
    latency_seconds: float = 0.5     # stop timing a model after this many seconds
    probation_inferences: int = 50   # inferences watched after a commit
    probation_errors: int = 0        # errors tolerated during probation
    probation_boots: int = 3         # starts tolerated during probation (crash loop guard)


@dataclass(frozen=True)
class Measured:
    """What the device measured on a candidate (and its current model) before committing.

    ``load_error`` is set when the model did not load or raised at inference; then the
    other figures are absent.
    """

    load_error: str | None = None
    accuracy: float | None = None
    agreement: float | None = None
    reference_note: str | None = None
    latency_p50_ms: float | None = None
    current_latency_p50_ms: float | None = None


@dataclass(frozen=True)
class Verdict:
    """The outcome of a health check: ``ok`` and why, plus the figures it was based on."""

    ok: bool
    reason: str
    figures: dict[str, float] = field(default_factory=dict)


def judge(floor: Floor, measured: Measured, config: HealthConfig) -> Verdict:
    """Decide whether a candidate may be committed."""
    if measured.load_error is not None:
        return Verdict(False, measured.load_error)
    figures = {k: v for k, v in (("accuracy", measured.accuracy),
                                 ("agreement", measured.agreement),
                                 ("latency_p50_ms", measured.latency_p50_ms),
                                 ("current_latency_p50_ms", measured.current_latency_p50_ms))
               if v is not None}
    notes = []
    if measured.accuracy is not None:
        if floor.accuracy is not None and measured.accuracy < floor.accuracy:
            return Verdict(False, f"accuracy {measured.accuracy:.4f} on the golden set is "
                                  f"below the floor {floor.accuracy:.4f}", figures)
        if floor.accuracy is None:
            notes.append("manifest sets no accuracy floor")
    elif measured.agreement is not None:
        if measured.agreement < floor.agreement:
            return Verdict(False, f"top-1 agreement {measured.agreement:.4f} with the "
                                  f"publisher's recorded predictions is below the floor "
                                  f"{floor.agreement:.4f}", figures)
    else:
        notes.append(f"output check skipped: {measured.reference_note or 'no golden set'}")
    cur, new = measured.current_latency_p50_ms, measured.latency_p50_ms
    if cur is not None and new is not None:
        limit = cur * (1 + config.latency_margin) + config.latency_slack_ms
        if new > limit:
            return Verdict(False, f"latency p50 {new:.3f} ms is above the limit "
                                  f"{limit:.3f} ms (current model {cur:.3f} ms + "
                                  f"{config.latency_margin:.0%} + {config.latency_slack_ms} ms)",
                           figures)
    else:
        notes.append("latency check skipped: no current model")
    return Verdict(True, "passed" + ("; " + "; ".join(notes) if notes else ""), figures)


@dataclass(frozen=True)
class Probation:
    """What has been seen since a commit; persisted in the device state."""

    remaining: int
    errors: int = 0
    boots: int = 0
    baseline_p50_ms: float | None = None
    latencies_ms: tuple[float, ...] = ()


def probation_step(p: Probation, config: HealthConfig, *, ok: bool | None = None,
                   latency_ms: float | None = None, boot: bool = False
                   ) -> tuple[Probation | None, str | None]:
    """Account one event (an inference with its outcome, or a start of the runtime).

    Returns the new probation (``None`` when it is over and the model is kept) and a
    rollback reason (``None`` unless the model must be rolled back).
    """
    if boot:
        p = Probation(p.remaining, p.errors, p.boots + 1, p.baseline_p50_ms, p.latencies_ms)
        if p.boots > config.probation_boots:
            return p, f"runtime restarted {p.boots} times during probation (crash loop)"
        return p, None
    lat = p.latencies_ms + ((latency_ms,) if ok and latency_ms is not None else ())
    p = Probation(p.remaining - 1, p.errors + (0 if ok else 1), p.boots, p.baseline_p50_ms, lat)
    if p.errors > config.probation_errors:
        return p, f"{p.errors} inference error(s) during probation"
    if p.remaining > 0:
        return p, None
    if p.baseline_p50_ms is not None and lat:
        median = sorted(lat)[len(lat) // 2]
        limit = p.baseline_p50_ms * (1 + config.latency_margin) + config.latency_slack_ms
        if median > limit:
            return p, (f"median latency {median:.3f} ms during probation is above the "
                       f"limit {limit:.3f} ms (previous model {p.baseline_p50_ms:.3f} ms + "
                       f"{config.latency_margin:.0%} + {config.latency_slack_ms} ms)")
    return None, None
