"""The device runtime: serves the active verified model (reporting to the updater while it
is on probation), or a cascade of models / an early-exit model's segments, under a
:class:`Policy` loaded from TOML.

:class:`Runtime` serves; :class:`Answer` is one prediction. :func:`build_cascade` runs
candidate stages on validation data, fits a temperature per stage
(:class:`TemperatureScaler`) and chooses thresholds (:func:`choose_thresholds`, pure, with
the accuracy/latency curve); :func:`evaluate_thresholds` scores thresholds on other data.
:func:`publish_cascade` signs a cascade (every stage and its cascade.json) as one bundle,
which a device installs and its runtime serves with probation like a single model.
The offload client is :mod:`edgeloop.device.offload` (``OffloadClient``, ``OffloadPolicy``);
a policy's ``[offload]`` table (:class:`OffloadRule`) wires it into the runtime. The
device's local HTTP API is :mod:`edgeloop.device.http` (needs the ``[serve]`` extra).
Each answer carries its energy (:class:`EnergyMeter`, :mod:`edgeloop.device.energy`);
:meth:`Runtime.predict_stream` thins a stream of windows under a policy's ``[stream]``
table (:class:`StreamRule`, :mod:`edgeloop.device.stream`).
:func:`probation_cost_ratio` and :func:`bad_input_calls` measure probation (what it costs
an inference; that malformed input never counts against the model).

Names are imported on first use; nothing here imports torch.
"""

from edgeloop._lazy import lazy_names

_SOURCES = {
    "Answer": ".runtime", "RunSummary": ".runtime", "Runtime": ".runtime",
    "summarize": ".runtime", "RuntimeStats": ".runtime",
    "OffloadRule": ".policy", "Policy": ".policy", "StreamRule": ".policy",
    "EnergyMeter": ".energy",
    "Cascade": ".cascade", "CurvePoint": ".cascade", "Stage": ".cascade",
    "ThresholdChoice": ".cascade", "build_cascade": ".cascade",
    "choose_thresholds": ".cascade", "evaluate_thresholds": ".cascade",
    "MEASURES": ".calibration", "TemperatureScaler": ".calibration", "confidence": ".calibration",
    "softmax": ".calibration",
    "publish_cascade": ".bundle",
    "bad_input_calls": ".probation", "malformed_feeds": ".probation",
    "probation_cost_ratio": ".probation",
}

__all__ = [
    "MEASURES",
    "Answer",
    "Cascade",
    "CurvePoint",
    "EnergyMeter",
    "OffloadRule",
    "Policy",
    "RunSummary",
    "Runtime",
    "RuntimeStats",
    "Stage",
    "StreamRule",
    "TemperatureScaler",
    "ThresholdChoice",
    "bad_input_calls",
    "build_cascade",
    "choose_thresholds",
    "confidence",
    "evaluate_thresholds",
    "malformed_feeds",
    "probation_cost_ratio",
    "publish_cascade",
    "softmax",
    "summarize",
]


__getattr__, __dir__ = lazy_names(__name__, _SOURCES)
