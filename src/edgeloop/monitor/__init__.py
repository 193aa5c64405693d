"""On-device model monitoring: streaming drift detection (river's ADWIN, Page-Hinkley
and KSWIN on the model's outputs; windowed two-sample tests of inputs and predicted-class
mix against a reference sketch shipped in the bundle), a label-free accuracy estimate
(CBPE), periodic evaluation on labelled feedback, and the flags the loop reads.

- :func:`sketch_bundle` (publish side): the reference :class:`Sketch` of a bundle on its
  golden set, shipped as the signed bundle file ``monitor.json``.
- :class:`Monitor` (device side): ``observe(feed, output)`` per answer; state saved in
  ``STATE/monitor/`` at a bounded rate and resumed after a restart.
- :func:`evaluate_feedback`: measured accuracy per window on labelled samples.
- :func:`monitor_status` / :func:`drift_flag`: what the runtime (offload while drifted),
  the updater (a candidate checked on recent inputs), ``edgeloop device personalise
  --if-flagged``, ``edgeloop device report`` (its default values) and ``edgeloop device
  status`` read; the fleet's de-biased drift rate (``edgeloop telemetry summary
  --round-above``) says when a federated round is due.

Names are imported on first use (river only with :class:`Monitor`). No torch.
"""

from edgeloop._lazy import lazy_names

_SOURCES = {
    "Alert": ".alerts", "Flag": ".alerts", "drift_flag": ".alerts",
    "monitor_status": ".alerts",
    "Calibration": ".cbpe", "fit_calibration": ".cbpe",
    "MonitorConfig": ".config",
    "evaluate_feedback": ".feedback",
    "Monitor": ".monitor",
    "REFERENCE_FILE": ".alerts", "Sketch": ".reference", "sketch_bundle": ".reference",
}

__all__ = [
    "REFERENCE_FILE",
    "Alert",
    "Calibration",
    "Flag",
    "Monitor",
    "MonitorConfig",
    "Sketch",
    "drift_flag",
    "evaluate_feedback",
    "fit_calibration",
    "monitor_status",
    "sketch_bundle",
]

__getattr__, __dir__ = lazy_names(__name__, _SOURCES)
