"""A cascade: stages smallest first; a stage answers when its calibrated confidence clears
its threshold, otherwise the next one runs, and the last always answers.

An early-exit model is the same thing whose stages pass features along: segment ``i``
takes segment ``i - 1``'s outputs (``features_*``) instead of the data and returns
``(exit logits, features)``, so a later segment only runs when an earlier exit was unsure
(a *chained* stage). Both are described by one ``cascade.json``, written by
:func:`build_cascade` (``edgeloop cascade``)::

    {"format": 1, "measure": "max-softmax", "max_drop": 0.5, "safety": 0.0,
     "latency_batch": 1,
     "stages": [{"name", "model" (path relative to cascade.json), "sha256", "chained",
                 "temperature", "threshold" (null: never answers), "latency_ms" (per
                 sample, timed in calls of latency_batch samples),
                 "accuracy" (alone), "nll_before", "nll_after"}, ...],
     "expected": {"accuracy", "mean_latency_ms", "answered" (fraction per stage),
                  "reference_accuracy", "reference_latency_ms" (the last stage alone),
                  optional "baseline": {"model", "accuracy", "latency_ms"}},
     "curve": [{"thresholds", "accuracy", "mean_latency_ms", "answered"}, ...]}

The thresholds are chosen by :func:`choose_thresholds`, a pure function of the stages'
confidences and correctness on validation data and their batch-1 latencies: the lowest
expected mean latency whose accuracy is within ``max_drop`` points of the last stage
alone. A stage whose threshold is null never answers; it does not even run unless a
chained stage after it needs its features.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from edgeloop._io import sha256_file, write_text_atomic
from edgeloop.data import Dataset, InputSpec, check_against
from edgeloop.device.calibration import MEASURES, TemperatureScaler, confidence, softmax
from edgeloop.errors import DataError, ModelError, UsageError, one_of

__all__ = [
    "CASCADE_FILE",
    "Cascade",
    "CurvePoint",
    "Stage",
    "ThresholdChoice",
    "build_cascade",
    "choose_thresholds",
    "evaluate_thresholds",
    "needed_stages",
]

FORMAT = 1
CASCADE_FILE = "cascade.json"     # its name in a device slot
_CHUNK = 20_000_000     # booleans per vectorised block of the threshold search


@dataclass(frozen=True)
class Stage:
    """One stage of a cascade (see the module docstring for the fields)."""

    name: str
    model: str
    sha256: str = ""
    chained: bool = False       # takes the previous stage's outputs, not the data
    temperature: float = 1.0
    threshold: float | None = None   # answers when confidence >= threshold; None: never
    latency_ms: float = 0.0     # per sample at latency_batch, measured at build time
    accuracy: float | None = None
    nll_before: float | None = None
    nll_after: float | None = None


@dataclass(frozen=True)
class CurvePoint:
    """Thresholds (one per stage but the last; None = never answers) and what they give."""

    thresholds: tuple[float | None, ...]
    accuracy: float
    mean_latency_ms: float
    answered: tuple[float, ...]     # fraction of samples each stage answers


@dataclass(frozen=True)
class ThresholdChoice:
    """What :func:`choose_thresholds` chose, the reference it was held to, and the
    accuracy/latency trade-off curve (the Pareto front over every combination tried)."""

    chosen: CurvePoint
    reference_accuracy: float
    reference_latency_ms: float
    curve: tuple[CurvePoint, ...]


@dataclass(frozen=True)
class Cascade:
    """A cascade file's content; model paths are relative to the file's folder."""

    stages: tuple[Stage, ...]
    measure: str = "max-softmax"
    max_drop: float = 0.5           # accuracy points
    safety: float = 0.0             # standard errors kept from the budget
    latency_batch: int = 1          # samples per call the stages were timed at
    expected: dict[str, object] = field(default_factory=dict)
    curve: tuple[CurvePoint, ...] = ()

    def thresholds(self) -> tuple[float | None, ...]:
        """Each stage's threshold but the last's."""
        return tuple(s.threshold for s in self.stages[:-1])

    def with_thresholds(self, thresholds: Sequence[float | None]) -> Cascade:
        """This cascade with other thresholds (``inf`` or None: the stage never answers)."""
        if len(thresholds) != len(self.stages) - 1:
            raise UsageError(f"`thresholds` must hold {len(self.stages) - 1} value(s), one per "
                             f"stage but the last; got {len(thresholds)}")
        t = [None if v is None or v == math.inf else float(v) for v in thresholds]
        return replace(self, stages=tuple(replace(s, threshold=v) for s, v in
                                          zip(self.stages, [*t, None], strict=True)))

    def to_json(self) -> str:
        d = asdict(self)
        d["format"] = FORMAT
        return json.dumps(d, indent=1)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Cascade:
        """Read a cascade file; one-line :class:`UsageError` if it is missing or malformed."""
        p = Path(path)
        if not p.is_file():
            raise UsageError(f"cascade file {str(p)!r} does not exist")
        try:
            d = json.loads(p.read_text())
            if d.pop("format") != FORMAT:
                raise ValueError(f"unknown format (expected {FORMAT})")
            stages = tuple(Stage(**s) for s in d.pop("stages"))
            if len(stages) < 2:
                raise ValueError("a cascade has at least two stages")
            curve = tuple(CurvePoint(tuple(c["thresholds"]), c["accuracy"],
                                     c["mean_latency_ms"], tuple(c["answered"]))
                          for c in d.pop("curve"))
            c = cls(stages=stages, curve=curve, **d)
            if c.measure not in MEASURES:
                raise one_of("measure", MEASURES, c.measure)
            return c
        except (ValueError, KeyError, TypeError, AttributeError, UsageError) as e:
            raise UsageError(f"{str(p)!r} is not a valid cascade file ({e})") from None


# --- choosing thresholds (pure) ---------------------------------------------------------

def needed_stages(finite: np.ndarray, chained: Sequence[bool]) -> np.ndarray:
    """Which stages run (for the samples that reach them), given which thresholds are
    finite (``... x K-1``): a stage runs if it may answer, if it is the last, or if the
    next stage runs and takes its features."""
    k = len(chained)
    needed = np.ones((*finite.shape[:-1], k), bool)
    for i in range(k - 2, -1, -1):
        needed[..., i] = finite[..., i] | (chained[i + 1] & needed[..., i + 1])
    return needed


def _score(t: np.ndarray, conf: np.ndarray, correct: np.ndarray, lat: np.ndarray,
           chained: Sequence[bool]
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Accuracy, mean latency, answered fractions, and the share of samples on which the
    cascade and the last stage differ in being right, of each threshold row of ``t``
    (C x K-1) on samples with confidences ``conf`` (K-1 x n) and ``correct`` (K x n)."""
    k, n = correct.shape
    answers = conf[None, :, :] >= t[:, :, None]                  # C x K-1 x n
    first = np.where(answers.any(1), answers.argmax(1), k - 1)   # C x n
    right = correct[first, np.arange(n)]
    accuracy = right.mean(1)
    differ = (right != correct[k - 1][None]).mean(1)
    cum = np.cumsum(needed_stages(np.isfinite(t), chained) * lat, axis=1)
    latency = np.take_along_axis(cum, first, 1).mean(1)
    answered = np.stack([(first == i).mean(1) for i in range(k)], axis=1)
    return accuracy, latency, answered, differ


def _inputs(confidences: Sequence[np.ndarray], correct: Sequence[np.ndarray],
            latencies_ms: Sequence[float], chained: Sequence[bool] | None
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[bool]]:
    k = len(correct)
    if k < 2 or len(latencies_ms) != k or len(confidences) not in (k - 1, k):
        raise UsageError(f"a cascade needs at least two stages, with one latency each and a "
                         f"confidence for every stage but the last; got {len(confidences)} "
                         f"confidences, {k} correctness arrays and {len(latencies_ms)} latencies")
    conf = np.stack([np.asarray(c, np.float64) for c in confidences[:k - 1]])
    ok = np.stack([np.asarray(c, bool) for c in correct])
    chain = [False] * k if chained is None else [bool(c) for c in chained]
    return conf, ok, np.asarray(latencies_ms, np.float64), chain


def _point(t: np.ndarray, acc: float, lat: float, answered: np.ndarray) -> CurvePoint:
    return CurvePoint(tuple(None if not np.isfinite(v) else float(v) for v in t), float(acc),
                      float(lat), tuple(float(a) for a in answered))


def evaluate_thresholds(confidences: Sequence[np.ndarray], correct: Sequence[np.ndarray],
                        latencies_ms: Sequence[float], thresholds: Sequence[float | None], *,
                        chained: Sequence[bool] | None = None) -> CurvePoint:
    """Accuracy, expected mean latency and answered fractions of a cascade with
    ``thresholds`` (None or ``inf``: never answers) on samples whose per-stage
    confidences and correctness are given (e.g. a held-out split)."""
    conf, ok, lat, chain = _inputs(confidences, correct, latencies_ms, chained)
    t = np.array([[np.inf if v is None else v for v in thresholds]], np.float64)
    acc, mean, answered, _ = _score(t, conf, ok, lat, chain)
    return _point(t[0], acc[0], mean[0], answered[0])


def choose_thresholds(confidences: Sequence[np.ndarray], correct: Sequence[np.ndarray],
                      latencies_ms: Sequence[float], *, max_drop: float,
                      chained: Sequence[bool] | None = None, safety: float = 0.0,
                      max_combinations: int = 50_000) -> ThresholdChoice:
    """The thresholds with the lowest expected mean latency whose accuracy is at most
    ``max_drop`` points below the last stage's alone (ties: the more accurate).

    ``confidences[i]`` and ``correct[i]`` are stage ``i``'s confidence and whether its
    answer is right, per validation sample (the last stage's confidence is not needed);
    ``latencies_ms[i]`` its batch-1 latency; ``chained[i]`` whether it takes the previous
    stage's features. Every combination of candidate thresholds is scored (quantiles of
    each stage's confidences, plus "never"), at most ``max_combinations`` of them; the
    last stage alone is one of them, so a choice always exists.

    ``safety`` standard errors of the paired accuracy difference (cascade vs last stage,
    sample by sample) are kept between the validation estimate and the budget, so that
    the budget also holds on data the thresholds were not chosen on: 0 trusts the
    validation set; 1.64 holds the budget with about 95% confidence (normal approximation)
    but needs a large validation set to leave the small stages any work.
    """
    if not max_drop >= 0:
        raise UsageError(f"`max_drop` must be >= 0 (accuracy points); got {max_drop}")
    if not safety >= 0:
        raise UsageError(f"`safety` must be >= 0 (standard errors); got {safety}")
    conf, ok, lat, chain = _inputs(confidences, correct, latencies_ms, chained)
    k, n = ok.shape
    per_stage = max(2, int(max_combinations ** (1 / (k - 1))))
    grids = [np.append(np.unique(np.quantile(c, np.linspace(0, 1, per_stage - 1))), np.inf)
             for c in conf]
    mesh = np.stack(np.meshgrid(*grids, indexing="ij"), -1).reshape(-1, k - 1)
    chunk = max(1, _CHUNK // max(1, n * (k - 1)))
    parts = [_score(mesh[i:i + chunk], conf, ok, lat, chain) for i in range(0, len(mesh), chunk)]
    acc, mean, answered, differ = (np.concatenate([p[j] for p in parts]) for j in range(4))
    ref = np.full(k - 1, np.inf)
    ref_acc, ref_lat, _, _ = _score(ref[None], conf, ok, lat, chain)
    drop = ref_acc[0] - acc
    se = np.sqrt(np.maximum(differ - drop**2, 0) / n)
    feasible = drop + safety * se <= max_drop / 100 + 1e-12
    order = np.lexsort((-acc, mean))          # by latency, then the more accurate first
    best = next(i for i in order if feasible[i])
    curve, top = [], -1.0
    for i in order:                           # the Pareto front: each point more accurate
        if acc[i] > top + 1e-12:
            curve.append(_point(mesh[i], acc[i], mean[i], answered[i]))
            top = acc[i]
    return ThresholdChoice(chosen=_point(mesh[best], acc[best], mean[best], answered[best]),
                           reference_accuracy=float(ref_acc[0]),
                           reference_latency_ms=float(ref_lat[0]), curve=tuple(curve))


# --- building a cascade from models and validation data -------------------------------

def build_cascade(models: Sequence[str | os.PathLike[str]], val: Dataset, *,
                  max_drop: float = 0.5, measure: str = "max-softmax", safety: float = 0.0,
                  out: str | os.PathLike[str] | None = None,
                  baseline: str | os.PathLike[str] | None = None,
                  latency_rounds: int = 5, latency_runs: int = 20,
                  latency_batch: int = 1) -> Cascade:
    """Run every stage on ``val`` (labels needed), fit a temperature per stage, time each
    stage (interleaved, one thread, with its confidence computed in the graph: as the
    runtime runs them) and choose the thresholds (:func:`choose_thresholds`).

    Stages are timed in calls of ``latency_batch`` samples, the batch size the device
    will run at, and their cost per sample enters the choice: at batch 1 a small stage
    costs mostly onnxruntime's fixed cost per call, so it saves less than its size
    suggests; in batches that cost is shared and a later stage runs only on the rows
    no earlier stage was sure about.

    ``baseline``, a model over the same inputs (e.g. an early-exit model in one piece,
    ``model.onnx``), is measured beside them for comparison (``expected["baseline"]``:
    accuracy and batch-1 latency, timed in the same turns). Writes ``out``
    (cascade.json) atomically when given; nothing is written if anything is wrong."""
    from edgeloop._onnx import input_specs, load_model, session
    from edgeloop._progress import progress
    from edgeloop.data import batches
    from edgeloop.device._graph import with_confidence
    from edgeloop.measure import PREDICT_BATCH, interleaved_latency, predict

    if not max_drop >= 0:
        raise UsageError(f"`max-drop` must be >= 0 (accuracy points); got {max_drop}")
    if not safety >= 0:
        raise UsageError(f"`safety` must be >= 0 (standard errors); got {safety}")
    if measure not in MEASURES:
        raise one_of("measure", MEASURES, measure)
    if len(models) < 2:
        raise UsageError(f"a cascade needs at least two models, smallest first; got {len(models)}")
    if isinstance(latency_batch, bool) or not isinstance(latency_batch, int) or not (
            1 <= latency_batch <= min(PREDICT_BATCH, len(val))):
        raise UsageError(f"`latency_batch` must be an integer in 1..{min(PREDICT_BATCH, len(val))}"
                         f" (samples per timed call); got {latency_batch!r}")
    if val.labels is None:
        raise DataError("the validation data has no `labels` array; a cascade's thresholds "
                        "are chosen on labelled data")
    paths = [Path(m) for m in models]
    sessions = [session(load_model(p), threads=1) for p in paths]
    chained = [False]
    first_inputs = input_specs(sessions[0])
    check_against(val, first_inputs, source=f"validation data for {paths[0].name!r}")
    for p, prev, s in zip(paths[1:], sessions, sessions[1:], strict=False):
        names = {i.name for i in s.get_inputs()}
        if names <= {o.name for o in prev.get_outputs()[1:]}:
            chained.append(True)
            continue
        chained.append(False)
        specs = input_specs(s)
        if [(i.name, i.dtype, i.shape[1:]) for i in specs] != \
                [(i.name, i.dtype, i.shape[1:]) for i in first_inputs]:
            raise ModelError(f"{p.name!r} takes inputs {_shown(specs)} but {paths[0].name!r} "
                             f"takes {_shown(first_inputs)}: a cascade's stages take the same "
                             "inputs (or, early-exit segments, the previous one's outputs)")

    logits: list[list[np.ndarray]] = [[] for _ in paths]
    first_row: dict[str, np.ndarray] = {k: v[:latency_batch] for k, v in val.inputs.items()}
    steps = progress(batches(val, PREDICT_BATCH), "running the stages on validation data",
                     total=-(-len(val) // PREDICT_BATCH))
    for feed in steps:
        prev: dict[str, np.ndarray] = {}
        for i, s in enumerate(sessions):
            f = prev if chained[i] else feed
            try:
                outs = s.run(None, {x.name: f[x.name] for x in s.get_inputs()})
            except Exception as e:
                raise ModelError(f"{paths[i].name!r} failed on the validation data: "
                                 f"{str(e).strip().splitlines()[0][:200]}") from None
            prev = {o.name: v for o, v in zip(s.get_outputs(), outs, strict=True)}
            logits[i].append(outs[0])
            for name, v in prev.items():
                first_row.setdefault(name, v[:latency_batch])
    z = [np.concatenate(parts) for parts in logits]
    classes = {p.name: a.shape[1:] for p, a in zip(paths, z, strict=True)}
    if any(a.ndim != 2 for a in z) or len(set(classes.values())) != 1:
        shown = ", ".join(f"{k} {tuple(v)}" for k, v in classes.items())
        raise ModelError(f"a cascade's stages must output logits over the same classes "
                         f"(samples x classes); got {shown}")
    n_classes = z[0].shape[1]
    if val.labels.min() < 0 or val.labels.max() >= n_classes:
        raise DataError(f"validation labels must be class ids in [0, {n_classes}); got "
                        f"{val.labels.min()}..{val.labels.max()}")

    scalers = [TemperatureScaler().fit(a, val.labels) for a in z]
    conf = [confidence(softmax(a, s.temperature_), measure)
            for a, s in zip(z, scalers, strict=True)]
    correct = [a.argmax(1) == val.labels for a in z]
    # timed as the runtime runs them: with the calibrated confidence in the graph
    timed = [session(with_confidence(load_model(p), temperature=s.temperature_,
                                     measure=measure), threads=1)
             for p, s in zip(paths, scalers, strict=True)]
    base = None
    if baseline is not None:
        base = session(load_model(baseline), threads=1)
        check_against(val, input_specs(base), source=f"validation data for "
                                                     f"{Path(baseline).name!r}")
        base_out = predict(base, val)
        if base_out.shape[1:] != z[0].shape[1:]:
            raise ModelError(f"baseline {Path(baseline).name!r} outputs {base_out.shape[1:]}; "
                             f"the stages output {z[0].shape[1:]}")
        timed.append(base)
    times = [t / latency_batch for t in interleaved_latency(
        timed, Dataset(first_row), batch=latency_batch, rounds=latency_rounds,
        runs=latency_runs, warmup=5)]
    base_ms = times.pop() if base is not None else None
    choice = choose_thresholds(conf, correct, times, max_drop=max_drop, chained=chained,
                               safety=safety)

    home = Path(out).resolve().parent if out is not None else Path.cwd()
    stages = tuple(
        Stage(name=name, model=os.path.relpath(p.resolve(), home), sha256=sha256_file(p),
              chained=c, temperature=float(s.temperature_), threshold=t,
              latency_ms=float(ms), accuracy=float(ok.mean()), nll_before=float(s.nll_before_),
              nll_after=float(s.nll_after_))
        for name, p, c, s, t, ms, ok in zip(_names(paths), paths, chained, scalers,
                                            [*choice.chosen.thresholds, None], times, correct,
                                            strict=True))
    expected = {"accuracy": choice.chosen.accuracy,
                "mean_latency_ms": choice.chosen.mean_latency_ms,
                "answered": list(choice.chosen.answered),
                "reference_accuracy": choice.reference_accuracy,
                "reference_latency_ms": choice.reference_latency_ms,
                "samples": len(val)}
    if base is not None:
        expected["baseline"] = {
            "model": os.path.relpath(Path(baseline).resolve(), home),  # type: ignore[arg-type]
            "accuracy": float((base_out.argmax(1) == val.labels).mean()),
            "latency_ms": base_ms}
    cascade = Cascade(stages=stages, measure=measure, max_drop=float(max_drop),
                      safety=float(safety), latency_batch=latency_batch,
                      expected=expected, curve=choice.curve)
    if out is not None:
        write_text_atomic(out, cascade.to_json())
    return cascade


def _names(paths: Sequence[Path]) -> list[str]:
    """Stage names: the file stems, or folder/stem where stems repeat (``cnn/model``)."""
    names = [p.stem for p in paths]
    if len(set(names)) < len(names):
        names = [f"{p.parent.name}/{p.stem}" for p in paths]
    if len(set(names)) < len(names):
        names = [f"stage{i}" for i in range(1, len(paths) + 1)]
    return names


def _shown(specs: Sequence[InputSpec]) -> str:
    return ", ".join(f"{s.name} {s.dtype} {tuple('N' if d is None else d for d in s.shape)}"
                     for s in specs)
