"""Health decisions: commit a candidate model or not, and keep it after probation or not.

Pure functions over figures the device layer has measured (with :mod:`edgeloop.measure`);
nothing here loads models, reads files or looks at the clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the CLI reads HealthConfig's defaults without loading numpy
    from collections.abc import Sequence

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

    accuracy_margin: float = 0.01    # with no accuracy floor in the manifest, the candidate's
    #                                  golden-set accuracy may be at most this far (absolute)
    #                                  below the current model's
    latency_margin: float = 0.5      # candidate p50 may be at most 50% above the current one
    latency_slack_ms: float = 1.0    # ...plus this many ms (timer noise on tiny models)
    latency_rounds: int = 5          # interleaved rounds timing candidate and current model
    latency_runs: int = 10           # timed runs per model and round (batch 1)
    probation_inferences: int = 50   # inferences watched after a commit
    probation_errors: int = 0        # model errors tolerated during probation
    probation_boots: int = 3         # device boots tolerated during probation (crash loop)
    # probation counters are written to the pointer after this many inferences or seconds
    # (whichever comes first), at a model error and at the verdict. A write costs ~12 ms
    # (two fsyncs); every 1000 inferences that more than doubled a 26 us model's cost
    # (benchmarks/bench_runtime.py), every 100,000 it is under 0.5% at any model speed
    probation_save_inferences: int = 100_000
    probation_save_seconds: float = 10.0


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
    current_accuracy: float | None = None
    # while the device is drifted: both models' label-free accuracy estimates on its
    # recent inputs (edgeloop.monitor.gate)
    recent_samples: int | None = None
    recent_estimate: float | None = None
    current_recent_estimate: float | None = None


@dataclass(frozen=True)
class Verdict:
    """The outcome of a health check: ``ok`` and why, plus the figures it was based on.

    ``retry`` is set when only latency failed: one slow measurement (a busy or throttled
    device) rejects this attempt, not the version, which a later update may try again.
    """

    ok: bool
    reason: str
    figures: dict[str, float] = field(default_factory=dict)
    retry: bool = False


def judge(floor: Floor, measured: Measured, config: HealthConfig) -> Verdict:
    """Decide whether a candidate may be committed."""
    if measured.load_error is not None:
        return Verdict(False, measured.load_error)
    figures = {k: v for k, v in (("accuracy", measured.accuracy),
                                 ("agreement", measured.agreement),
                                 ("latency_p50_ms", measured.latency_p50_ms),
                                 ("current_latency_p50_ms", measured.current_latency_p50_ms),
                                 ("current_accuracy", measured.current_accuracy),
                                 ("recent_estimate", measured.recent_estimate),
                                 ("current_recent_estimate", measured.current_recent_estimate))
               if v is not None}
    notes = []
    new_est, cur_est = measured.recent_estimate, measured.current_recent_estimate
    if new_est is not None and cur_est is not None:
        if new_est < cur_est - config.accuracy_margin:
            return Verdict(False, f"the device is drifted, and on its {measured.recent_samples} "
                                  f"recent inputs the candidate's label-free accuracy estimate "
                                  f"{new_est:.4f} is below the current model's {cur_est:.4f} - "
                                  f"{config.accuracy_margin}", figures)
        notes.append(f"checked on the drifted device's {measured.recent_samples} recent inputs")
    if measured.accuracy is not None:
        if floor.accuracy is not None and measured.accuracy < floor.accuracy:
            return Verdict(False, f"accuracy {measured.accuracy:.4f} on the golden set is "
                                  f"below the floor {floor.accuracy:.4f}", figures)
        cur_acc = measured.current_accuracy
        if floor.accuracy is None and cur_acc is not None:
            if measured.accuracy < cur_acc - config.accuracy_margin:
                return Verdict(False, f"accuracy {measured.accuracy:.4f} on the golden set is "
                                      f"below the current model's {cur_acc:.4f} - "
                                      f"{config.accuracy_margin} (the manifest sets no floor)",
                               figures)
            notes.append("manifest sets no accuracy floor: compared with the current model")
        elif floor.accuracy is None:
            notes.append("manifest sets no accuracy floor and there is no current model")
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
                           figures, retry=True)
    else:
        notes.append("latency check skipped: no current model")
    return Verdict(True, "passed" + ("; " + "; ".join(notes) if notes else ""), figures)


@dataclass(frozen=True)
class Probation:
    """What has been seen since a commit; persisted in the device state.

    ``boot_id`` is the device boot (see :func:`edgeloop.bundle.device.boot_id`) the
    probation last saw: boots are counted, not process starts.

    ``latencies_ms`` is a bounded, evenly spaced sample of the successful inferences'
    latencies (every ``latency_every``-th of the ``latency_seen`` so far; at most
    :data:`LATENCY_SAMPLE` * 2): the pointer stays small however long probation is.
    """

    remaining: int
    errors: int = 0
    boots: int = 0
    baseline_p50_ms: float | None = None
    latencies_ms: tuple[float, ...] = ()
    boot_id: str | None = None
    latency_every: int = 1
    latency_seen: int = 0


LATENCY_SAMPLE = 512   # probation keeps between this many and twice as many latencies


def probation_step(p: Probation, config: HealthConfig, *,
                   latencies_ms: Sequence[float] = (), failed: int = 0,
                   boot_id: str | None = None) -> tuple[Probation | None, str | None]:
    """Account what happened since ``p`` was saved: the inferences that ran, as their
    latencies per sample (ms, in order), and ``failed`` model errors; or a start of the
    runtime during the device boot ``boot_id``.

    A start counts only when the device has booted since the probation last saw it: a
    device that keeps rebooting is in a crash loop, a process started per request is not.
    Only model faults are reported as failed inferences (a caller's malformed input is
    not the model's fault). Returns the new probation (``None`` when it is over and the
    model is kept) and a rollback reason (``None`` unless the model must be rolled back).
    """
    if boot_id is not None:
        if boot_id == p.boot_id:
            return p, None
        p = replace(p, boots=p.boots + 1, boot_id=boot_id)
        if p.boots > config.probation_boots:
            return p, f"device booted {p.boots} times during probation (crash loop)"
        return p, None
    lat, every = _sampled(p, latencies_ms)
    p = replace(p, remaining=p.remaining - len(latencies_ms) - failed, latencies_ms=lat,
                latency_every=every, latency_seen=p.latency_seen + len(latencies_ms),
                errors=p.errors + failed)
    if p.errors > config.probation_errors:
        return p, f"{p.errors} model error(s) at inference during probation"
    if p.remaining > 0:
        return p, None
    if p.baseline_p50_ms is not None and p.latencies_ms:
        median = sorted(p.latencies_ms)[len(p.latencies_ms) // 2]
        limit = p.baseline_p50_ms * (1 + config.latency_margin) + config.latency_slack_ms
        if median > limit:
            return p, (f"median latency {median:.3f} ms during probation is above the "
                       f"limit {limit:.3f} ms (previous model {p.baseline_p50_ms:.3f} ms + "
                       f"{config.latency_margin:.0%} + {config.latency_slack_ms} ms)")
    return None, None


def _sampled(p: Probation, new_ms: Sequence[float]) -> tuple[tuple[float, ...], int]:
    """``p``'s latency sample with ``new_ms`` (the next latencies, in order) taken in:
    every ``latency_every``-th latency is kept, and at 2 x :data:`LATENCY_SAMPLE` kept
    the sample is thinned to every other one and the stride doubles. The result does not
    depend on how the latencies were split between saves; numpy slices, no Python loop
    per latency (a save may carry 100,000)."""
    import numpy as np  # here: the CLI reads HealthConfig without loading numpy

    kept, every, seen = np.asarray(p.latencies_ms), p.latency_every, p.latency_seen
    new = np.asarray(new_ms, dtype=np.float64)
    parts, count = [kept], len(kept)
    while len(new):
        first = -seen % every                        # index in ``new`` of the next one kept
        room = 2 * LATENCY_SAMPLE - count            # kept before the next thinning
        take = new[first::every][:room]
        if len(take) < room:                         # all of ``new`` fits
            parts.append(take)
            count += len(take)
            break
        used = first + (room - 1) * every + 1        # through the one that fills the sample
        parts.append(take)
        kept = np.concatenate(parts)[::2]
        parts, count = [kept], len(kept)
        every *= 2
        seen += used
        new = new[used:]
    return tuple(float(v) for v in np.concatenate(parts)), every
