"""Accuracy-budgeted search: the fastest model that stays within a metric budget.

Each candidate is built from edgeloop's own passes, evaluated on validation data against
the float model, and timed on this machine. A candidate is kept when its metric drop is
within ``max_drop`` and it is faster than the float model at the chosen batch size (by
``min_speedup``, so timing noise does not count as a gain); the fastest kept one wins, and
among those within ``tie_tolerance`` of it the smaller file.

Metrics and what a drop means:

- ``accuracy``: top-1 accuracy on the validation labels, in percent; drop = float accuracy
  minus candidate accuracy, in percentage points.
- ``agreement``: top-1 agreement with the float model's predictions, in percent (the float
  model scores 100); drop in percentage points.
- ``cosine``: mean cosine similarity of the outputs to the float model's (float = 1.0);
  drop = 1 - mean cosine.

The search is time-boxed: when the time budget runs out or on SIGINT it stops between (or
in the middle of) candidates, and the result still holds every candidate measured so far.
The budget runs from ``started_at`` (default: the call to :func:`optimize`; the CLI passes
the moment the command starts) and keeps ``reserve_s`` back for writing the results.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import re
import signal
import threading
import time
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from edgeloop._io import scratch_dir
from edgeloop._onnx import input_specs, load_model, model_bytes, optimized_graph, session
from edgeloop.compress import SCHEMES
from edgeloop.compress.base import Pass, apply_pass
from edgeloop.compress.fuse import Preprocess
from edgeloop.compress.int4 import Int4Weight
from edgeloop.compress.layout import find_heads
from edgeloop.compress.mixed import TransformerFusion
from edgeloop.compress.quantize import CALIBRATIONS, Int8Dynamic, Int8Static
from edgeloop.data import Dataset, check_against
from edgeloop.errors import DataError, EdgeloopError, UsageError, one_of
from edgeloop.measure import (
    COMPUTE_OPS,
    INTEGER_OPS,
    QDQ_OPS,
    WEIGHT_ONLY_OPS,
    LatencyConfig,
    fidelity,
    latency,
    predict,
)
from edgeloop.targets import Target

__all__ = [
    "METRICS",
    "Candidate",
    "CandidateResult",
    "OptimizeConfig",
    "OptimizeResult",
    "PassCandidate",
    "Source",
    "TorchCandidate",
    "default_candidates",
    "optimize",
    "parse_duration",
]

METRICS = ("accuracy", "agreement", "cosine")

# Statuses a candidate can end with.
FITS = "fits"
OVER_BUDGET = "over budget"
NOT_FASTER = "not faster"
FAILED = "failed"
BASELINE = "baseline"


@dataclass(frozen=True)
class OptimizeConfig:
    """What the search optimizes for and how long it may take."""

    metric: str = "accuracy"
    max_drop: float = 0.5            # in the metric's drop unit (see the module docstring)
    batch: int = 1                   # batch size the latency is ranked at
    extra_batches: tuple[int, ...] = (32,)  # also timed and reported
    time_budget_s: float = 600.0     # whole search, including the float baseline (s)
    reserve_s: float = 3.0           # kept back for writing results (s; at most 20%)
    started_at: float | None = None  # time.monotonic() the budget counts from (None: the call)
    tie_tolerance: float = 0.03      # latencies within this fraction count as a tie
    min_speedup: float = 1.02        # "faster than float" means by at least this factor,
                                     # above the timing noise of a shared machine
    latency: LatencyConfig = field(default_factory=lambda: LatencyConfig(
        warmup=5, min_runs=200, max_seconds=1.0, floor_runs=20))

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise one_of("metric", METRICS, self.metric)
        if not np.isfinite(self.max_drop) or self.max_drop < 0:
            raise UsageError(f"`max-drop` must be a number >= 0; got {self.max_drop}")
        if self.batch < 1:
            raise UsageError(f"`batch` must be >= 1; got {self.batch}")
        if not self.time_budget_s > 0:
            raise UsageError(f"`time-budget` must be > 0; got {self.time_budget_s}s")

    @property
    def batches(self) -> tuple[int, ...]:
        """Every batch size timed, the ranked one first."""
        return (self.batch, *[b for b in self.extra_batches if b != self.batch])


@dataclass
class Source:
    """What candidates are built from: the float ONNX model, calibration data and, when the
    input was a torch checkpoint, the module (with training data if given)."""

    model: onnx.ModelProto
    calib: Dataset
    target: Target
    torch_module: object | None = None   # torch.nn.Module; typed loosely to keep torch lazy
    train: Dataset | None = None
    checks: dict[Callable[[onnx.ModelProto], bool], bool] = field(default_factory=dict,
                                                                  repr=False)


class Candidate(ABC):
    """One point in the search: a name, a description, and how to build it."""

    name: str
    description: str
    quantized: bool = True   # meant to run in integer arithmetic (flags apply)

    @abstractmethod
    def build(self, source: Source) -> onnx.ModelProto:
        """The candidate model (raise :class:`EdgeloopError` if it does not apply)."""

    def applies(self, source: Source) -> bool:
        """Whether this candidate can be built from ``source`` at all."""
        return True


@dataclass
class PassCandidate(Candidate):
    """A candidate made by edgeloop passes applied in turn to the float ONNX model.

    ``make(target)`` returns one pass or a sequence of them; ``applies_to(model)``, when
    given, tells whether the candidate fits this model's graph at all.
    """

    name: str
    description: str
    make: Callable[[Target], Pass | Sequence[Pass]]
    quantized: bool = True
    applies_to: Callable[[onnx.ModelProto], bool] | None = None

    def applies(self, source: Source) -> bool:
        if self.applies_to is None:
            return True
        if self.applies_to not in source.checks:   # candidates share checks; run each once
            source.checks[self.applies_to] = self.applies_to(source.model)
        return source.checks[self.applies_to]

    def build(self, source: Source) -> onnx.ModelProto:
        passes = self.make(source.target)
        model = source.model
        for p in [passes] if isinstance(passes, Pass) else passes:
            model = apply_pass(p, model, source.calib)
        return model


@dataclass
class TorchCandidate(Candidate):
    """A candidate that changes the torch model itself (structured pruning,
    quantization-aware training): ``transform(module, train, calib, target)`` returns a new
    module, which is exported to ONNX — by ``export(module, calib, target)`` when given, else
    as a float model — and then optionally passed through ``then``.

    Only built when the input is a torch checkpoint and training data is given.
    """

    name: str
    description: str
    transform: Callable[[object, Dataset, Dataset, Target], object]
    then: Callable[[Target], Pass] | None = None
    export: Callable[[object, Dataset, Target], onnx.ModelProto] | None = None
    quantized: bool = False

    def applies(self, source: Source) -> bool:
        return source.torch_module is not None and source.train is not None

    def build(self, source: Source) -> onnx.ModelProto:
        import copy

        import torch

        from edgeloop.export import to_onnx

        assert source.train is not None
        module = self.transform(copy.deepcopy(source.torch_module), source.train,
                                source.calib, source.target)
        if self.export is not None:
            model = self.export(module, source.calib, source.target)
        else:
            sample = torch.from_numpy(np.ascontiguousarray(
                next(iter(source.calib.inputs.values()))[:2]))
            with scratch_dir() as tmp:
                path = tmp / "candidate.onnx"
                to_onnx(module, sample, path)  # type: ignore[arg-type]
                model = onnx.load(path)
        if self.then is not None:
            model = apply_pass(self.then(source.target), model, source.calib)
        return model


def _train_context(train: Dataset, calib: Dataset) -> object:
    """Training data for a torch candidate: the last tenth of ``train`` is held out for
    choosing epochs, so the optimizer's own VAL stays unseen until candidates are scored;
    ``calib`` calibrates the candidate's export, as it does every other candidate."""
    from edgeloop.compress.trainbase import TrainContext

    n_val = max(1, len(train) // 10)
    return TrainContext(train.take(slice(0, len(train) - n_val)),
                        train.take(slice(len(train) - n_val, len(train))), calib=calib)


def _pruned(ratio: float, epochs: int) -> Callable[[object, Dataset, Dataset, Target], object]:
    def transform(module: object, train: Dataset, calib: Dataset, target: Target) -> object:
        from edgeloop.compress.prune import StructuredPrune

        return StructuredPrune(ratio=ratio, finetune_epochs=epochs).apply(
            module, _train_context(train, calib))  # type: ignore[arg-type]
    return transform


def _qat(epochs: int) -> Callable[[object, Dataset, Dataset, Target], object]:
    def transform(module: object, train: Dataset, calib: Dataset, target: Target) -> object:
        from edgeloop.compress.qat import QAT

        return QAT(bits=8, epochs=epochs, target=target).apply(
            module, _train_context(train, calib))  # type: ignore[arg-type]
    return transform


def _qat_export(module: object, calib: Dataset, target: Target) -> onnx.ModelProto:
    from edgeloop.compress.qat import quantize_export

    return quantize_export(module, calib, bits=8, target=target)[0]  # type: ignore[arg-type]


def _has_head(model: onnx.ModelProto) -> bool:
    return bool(find_heads(model))


def torch_candidates(*, finetune_epochs: int = 9, qat_epochs: int = 4) -> list[Candidate]:
    """Candidates built by training: structured pruning (then static int8) and
    quantization-aware training, for a torch checkpoint given with training data."""
    out: list[Candidate] = []
    for ratio in (0.5, 0.3):
        out.append(TorchCandidate(
            f"prune-{ratio:.0%}/int8-static", f"{ratio:.0%} of channels pruned and "
            "fine-tuned, then static int8", _pruned(ratio, finetune_epochs),
            then=lambda t: Int8Static(target=t), quantized=True))
    out.append(TorchCandidate("prune-50%", "50% of channels pruned and fine-tuned, float",
                              _pruned(0.5, finetune_epochs)))
    out.append(TorchCandidate("qat-int8", "quantization-aware fine-tuning, int8 QDQ export",
                              _qat(qat_epochs), export=_qat_export, quantized=True))
    return out


def _has_layer_norm(model: onnx.ModelProto) -> bool:
    """Whether the graph has a LayerNormalization, i.e. may be a transformer to fuse."""
    return any(n.op_type == "LayerNormalization" for n in model.graph.node)


def default_candidates(config: OptimizeConfig | None = None) -> list[Candidate]:
    """edgeloop's ONNX candidates, most promising first so a short budget sees them.

    The mixed-precision ``int8`` scheme joins when :data:`edgeloop.compress.SCHEMES` has
    it (looked up at call time), aiming at the search's own goal when ``config`` gives a
    metric it can measure on calibration data (agreement: the share of changed top-1
    decisions; cosine: 1 - mean output cosine) and a drop it can take as a bound (a
    zero drop is not one: int8 then keeps its own default bound).
    """
    compare, scale = {"agreement": ("top1", 0.01), "cosine": ("outputs", 1.0)}.get(
        config.metric if config is not None else "", ("", 0.0))
    bound = config.max_drop * scale if config is not None else 0.0
    goal: dict[str, object] = ({"compare": compare, "max_error": bound}
                               if compare and 0.0 < bound < 1.0 else {})
    if config is not None:   # int8 judges speed at the threads the search times with
        goal["threads"] = config.latency.threads
    out: list[Candidate] = []
    # int8-mixed first: it is the one most likely to win, and on a large model it takes
    # most of a short budget (DistilBERT on x86-avx2: ~300 s; behind `fused`, a 6-minute
    # search ran out inside it)
    if "int8" in SCHEMES:   # edgeloop's own search (smoothing, equalization, mixed precision)
        cls = SCHEMES["int8"]
        takes_target = "target" in {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        out.append(PassCandidate(
            "int8-mixed", "int8 chosen by measurement, sensitive layers left in float",
            lambda t: cls(target=t, **goal) if takes_target else cls()))  # type: ignore[call-arg]
    out += [
        PassCandidate("fused", "graph optimization and fusion, float weights",
                      lambda t: Preprocess(), quantized=False),
        PassCandidate("int8-static/minmax/per-channel", "static int8 QDQ, MinMax, per channel",
                      lambda t: Int8Static(calibration="minmax", per_channel=True,
                                           channels_last_head=False, target=t)),
        PassCandidate("int8-dynamic/per-channel", "dynamic int8, per-channel weights",
                      lambda t: Int8Dynamic(per_channel=True, target=t)),
        PassCandidate("transformer-fused", "onnxruntime's transformer fusions "
                      "(Attention, SkipLayerNormalization, BiasGelu), float weights",
                      lambda t: TransformerFusion(), quantized=False,
                      applies_to=_has_layer_norm),
        PassCandidate("transformer-fused+int8-dynamic/per-channel",
                      "transformer fusions, then dynamic int8 (per-channel weights)",
                      lambda t: [TransformerFusion(),
                                 Int8Dynamic(per_channel=True, preprocess=False, target=t)],
                      applies_to=_has_layer_norm),
    ]
    out.append(PassCandidate("int4-weight", "int4 weights (blocks of 32), float activations",
                             lambda t: Int4Weight()))
    for calibration in CALIBRATIONS:
        for per_channel in (True, False):
            name = f"int8-static/{calibration}/{'per-channel' if per_channel else 'per-tensor'}"
            text = (f"static int8 QDQ, {calibration}, "
                    f"{'per channel' if per_channel else 'per tensor'}")
            if name != "int8-static/minmax/per-channel":
                out.append(PassCandidate(name, text, lambda t, c=calibration, p=per_channel:
                                         Int8Static(calibration=c, per_channel=p,
                                                    channels_last_head=False, target=t)))
            out.append(PassCandidate(
                f"{name}/cl-head", f"{text}, channels-last classifier head",
                lambda t, c=calibration, p=per_channel: Int8Static(
                    calibration=c, per_channel=p, channels_last_head=True, target=t),
                applies_to=_has_head))
    out.append(PassCandidate("int8-dynamic/per-tensor", "dynamic int8, per-tensor weights",
                             lambda t: Int8Dynamic(per_channel=False, target=t)))
    return out + torch_candidates()


@dataclass
class CandidateResult:
    """One measured (or failed) candidate."""

    name: str
    description: str
    status: str
    metric: float | None = None
    drop: float | None = None
    size_bytes: int | None = None
    latency_ms: dict[int, float] = field(default_factory=dict)   # batch -> p50 (ms)
    float_compute_ops: dict[str, int] = field(default_factory=dict)
    integer_ops: dict[str, int] = field(default_factory=dict)
    qdq_nodes: int = 0
    flags: list[str] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0             # building + evaluating + timing (s)


@dataclass
class OptimizeResult:
    """The whole search: the float baseline, every candidate, and the choice."""

    model: str
    metric: str
    max_drop: float
    target: str
    batch: int
    threads: int                      # intra-op threads every model was timed with (0: all)
    time_budget_s: float
    baseline: CandidateResult
    candidates: list[CandidateResult]
    chosen: str | None                # a candidate name, or None: the float model is kept
    stopped: str                      # "completed", "time budget" or "interrupted"
    elapsed_s: float
    best_model: onnx.ModelProto = field(repr=False)

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready dictionary (without the model itself)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
             if f.name != "best_model"}
        d["baseline"] = dataclasses.asdict(self.baseline)
        d["candidates"] = [dataclasses.asdict(c) for c in self.candidates]
        return d


class _Stop(BaseException):
    """Raised inside the search when the time budget runs out or SIGINT arrives."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@contextmanager
def _stoppable(seconds: float) -> Iterator[None]:
    """Turn the deadline (SIGALRM) and SIGINT into :class:`_Stop` in this block. Signal
    handlers only exist in the main thread; elsewhere the deadline is checked between
    candidates only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum: int, frame: object) -> None:
        raise _Stop("time budget")

    def on_int(signum: int, frame: object) -> None:
        raise _Stop("interrupted")

    old_alarm = signal.signal(signal.SIGALRM, on_alarm)
    old_int = signal.signal(signal.SIGINT, on_int)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1e-3))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_alarm)
        signal.signal(signal.SIGINT, old_int)


def parse_duration(text: str) -> float:
    """Seconds in ``"90"``, ``"90s"``, ``"10m"`` or ``"1h"`` (also ``"1.5m"``)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text)
    if not m or float(m.group(1)) <= 0:
        raise UsageError(f"`time-budget` must be a positive duration like 90s, 10m or 1h; "
                         f"got {text!r}")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def _score(metric: str, outputs: np.ndarray, reference: np.ndarray,
           labels: np.ndarray | None) -> float:
    if metric == "accuracy":
        assert labels is not None
        return 100.0 * float((outputs.argmax(-1) == labels).mean())
    f = fidelity(outputs, reference)
    return 100.0 * f.top1_agreement if metric == "agreement" else f.mean_cosine


def _graph_summary(model: onnx.ModelProto) -> tuple[dict[str, int], dict[str, int], int]:
    """Like :func:`edgeloop.measure.graph_summary` (float compute ops, integer ops, Q/DQ
    nodes in the graph onnxruntime runs), but without the Q/DQ pair at the model's edges:
    quantizing a float input and dequantizing a float output cannot be fused away."""
    graph = optimized_graph(model).graph
    inputs = {i.name for i in graph.input}
    outputs = {o.name for o in graph.output}
    ops = Counter(n.op_type for n in graph.node)
    edge = sum(1 for n in graph.node
               if (n.op_type == "QuantizeLinear" and n.input[0] in inputs)
               or (n.op_type == "DequantizeLinear" and n.output[0] in outputs))
    return ({k: v for k, v in ops.items() if k in COMPUTE_OPS},
            {k: v for k, v in ops.items() if k in INTEGER_OPS | WEIGHT_ONLY_OPS},
            sum(v for k, v in ops.items() if k in QDQ_OPS) - edge)


def _flags(quantized: bool, float_ops: dict[str, int], qdq: int) -> list[str]:
    """Why the target would not run a quantized candidate at integer speed."""
    if not quantized:
        return []
    flags = []
    if qdq:
        flags.append(f"{qdq} Q/DQ nodes left unfused inside the graph")
    if float_ops:
        ops = ", ".join(f"{k} x{v}" for k, v in sorted(float_ops.items()))
        flags.append(f"compute in float: {ops}")
    return flags


_PREDICT_BATCH = 16   # small calls, so that the deadline and SIGINT are seen between them
# The extra batch sizes are only reported, never ranked: a few runs do. At the ranked
# batch's floor (5 warm-up and 20 timed runs), batch 32 of DistilBERT (3.1 s a call on
# x86-avx2) took 78 s per candidate, a fifth of a 6-minute budget each.
_REPORTED_WARMUP, _REPORTED_FLOOR = 1, 3


def _measure(name: str, description: str, model: onnx.ModelProto, *, quantized: bool,
             config: OptimizeConfig, val: Dataset, reference: np.ndarray | None,
             reference_score: float | None) -> tuple[CandidateResult, np.ndarray]:
    sess = session(model, threads=config.latency.threads)
    outputs = predict(sess, val, _PREDICT_BATCH)
    ref = outputs if reference is None else reference
    score = _score(config.metric, outputs, ref, val.labels)
    drop = 0.0 if reference_score is None else reference_score - score
    float_ops, int_ops, qdq = _graph_summary(model)
    reported = dataclasses.replace(config.latency, warmup=_REPORTED_WARMUP,
                                   floor_runs=_REPORTED_FLOOR)
    lat = {b: latency(sess, val, b, config.latency if b == config.batch else reported).p50_ms
           for b in config.batches}
    result = CandidateResult(
        name=name, description=description, status=FITS, metric=score, drop=drop,
        size_bytes=model_bytes(model), latency_ms=lat, float_compute_ops=float_ops,
        integer_ops=int_ops, qdq_nodes=qdq, flags=_flags(quantized, float_ops, qdq))
    return result, outputs


def _choose(results: Sequence[CandidateResult], tolerance: float, batch: int
            ) -> CandidateResult | None:
    fits = [r for r in results if r.status == FITS]
    if not fits:
        return None
    fastest = min(r.latency_ms[batch] for r in fits)
    ties = [r for r in fits if r.latency_ms[batch] <= fastest * (1 + tolerance)]
    return min(ties, key=lambda r: (r.size_bytes or 0, r.latency_ms[batch]))


def optimize(model_path: str | os.PathLike[str], *, calib: Dataset, val: Dataset,
             target: Target, config: OptimizeConfig | None = None,
             candidates: Sequence[Candidate] | None = None, train: Dataset | None = None,
             on_start: Callable[[str, int, int], None] | None = None,
             on_result: Callable[[CandidateResult], None] | None = None) -> OptimizeResult:
    """Search ``candidates`` (default :func:`default_candidates`) for the fastest model on
    this machine whose ``config.metric`` drops at most ``config.max_drop`` on ``val``.

    ``model_path`` is an ONNX file or a torch model file (``.pt``: an edgeloop checkpoint
    or a ``torch.save``d module, see :mod:`edgeloop.models`), which is
    exported first. ``on_start(name, index, total)`` and ``on_result(result)`` report
    progress. Stops cleanly at the time budget or on SIGINT (main thread only); the result
    then holds what was measured so far.
    """
    config = config or OptimizeConfig()
    t0 = time.monotonic() if config.started_at is None else config.started_at
    deadline = t0 + config.time_budget_s - min(config.reserve_s, 0.2 * config.time_budget_s)
    if config.metric == "accuracy" and val.labels is None:
        raise DataError("metric `accuracy` needs labels: the validation .npz has no "
                        "`labels` array (use --metric agreement or cosine)")
    if train is not None and train.labels is None:
        raise DataError("the training .npz has no `labels` array; pruning and QAT need them")
    if train is not None and Path(model_path).suffix not in (".pt", ".pth"):
        raise UsageError("training data is used with a torch .pt model only (pruning and "
                         f"QAT change the torch model); got {str(model_path)!r}")
    source = _load_source(Path(model_path), calib=calib, train=train, target=target)
    check_against(val, input_specs(session(source.model)), source="validation data")
    pool = [c for c in (default_candidates(config) if candidates is None else candidates)
            if c.applies(source)]
    results: list[CandidateResult] = []
    stopped = "completed"
    baseline: CandidateResult | None = None
    # the candidates are built in this folder (onnxruntime's tools write beside the working
    # directory), and every fitting model is kept there until the choice is made
    with scratch_dir("edgeloop-opt-") as kept:
        with _stoppable(deadline - time.monotonic()):
            try:
                if on_start:
                    on_start("float", 0, len(pool))
                baseline, ref_out = _measure(
                    "float", "the input model, unchanged", source.model, quantized=False,
                    config=config, val=val, reference=None, reference_score=None)
                baseline.status = BASELINE
                if on_result:
                    on_result(baseline)
                for i, cand in enumerate(pool, start=1):
                    if time.monotonic() >= deadline:
                        raise _Stop("time budget")
                    if on_start:
                        on_start(cand.name, i, len(pool))
                    result, model = _try(cand, source, config, val, ref_out, baseline)
                    if result.status == FITS:
                        # every fitting model is kept: a later, faster one can move the
                        # tie window so that an earlier, smaller one wins
                        onnx.save(model, kept / f"{len(results)}.onnx")
                    results.append(result)
                    if on_result:
                        on_result(result)
            except _Stop as stop:
                stopped = stop.reason
        chosen = _choose(results, config.tie_tolerance, config.batch)
        index = next((i for i, r in enumerate(results) if r is chosen), None)
        best = source.model if index is None else onnx.load(kept / f"{index}.onnx")
    if baseline is None:
        baseline = CandidateResult("float", "the input model, unchanged", "not measured",
                                   size_bytes=model_bytes(source.model),
                                   error=f"stopped ({stopped}) before it was measured")
    return OptimizeResult(
        model=str(model_path), metric=config.metric, max_drop=config.max_drop,
        target=target.name, batch=config.batch, threads=config.latency.threads,
        time_budget_s=config.time_budget_s, baseline=baseline, candidates=results,
        chosen=chosen.name if chosen else None, stopped=stopped,
        elapsed_s=time.monotonic() - t0, best_model=best)


def _try(cand: Candidate, source: Source, config: OptimizeConfig, val: Dataset,
         ref_out: np.ndarray, baseline: CandidateResult
         ) -> tuple[CandidateResult, onnx.ModelProto | None]:
    start = time.monotonic()
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the calibrators print to stdout
            model = cand.build(source)
        result, _ = _measure(cand.name, cand.description, model, quantized=cand.quantized,
                             config=config, val=val, reference=ref_out,
                             reference_score=baseline.metric)
    except EdgeloopError as e:
        return CandidateResult(cand.name, cand.description, FAILED, error=str(e),
                               seconds=time.monotonic() - start), None
    result.seconds = time.monotonic() - start
    assert result.drop is not None
    ms, base_ms = result.latency_ms[config.batch], baseline.latency_ms[config.batch]
    if result.drop > config.max_drop + 1e-12:
        result.status = OVER_BUDGET
        result.error = f"{config.metric} drop {result.drop:.4g} > max drop {config.max_drop:g}"
    elif ms * config.min_speedup > base_ms:
        result.status = NOT_FASTER
        result.error = (f"{ms:.4g} ms against {base_ms:.4g} ms in float at batch "
                        f"{config.batch} ({base_ms / ms:.2f}x)")
    return result, model


def _load_source(path: Path, *, calib: Dataset, train: Dataset | None,
                 target: Target) -> Source:
    if path.suffix in (".pt", ".pth"):
        import torch

        from edgeloop.export import to_onnx
        from edgeloop.models import load_model as load_torch_model

        module = load_torch_model(path).module
        sample = torch.from_numpy(np.ascontiguousarray(
            next(iter(calib.inputs.values()))[:2]))
        with scratch_dir() as tmp:
            onnx_path = tmp / "float.onnx"
            to_onnx(module, sample, onnx_path)
            model = load_model(onnx_path)
        source = Source(model, calib, target, torch_module=module, train=train)
    else:
        source = Source(load_model(path), calib, target)
    check_against(calib, input_specs(session(source.model)), source="calibration data")
    return source
