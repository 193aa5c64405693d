"""The ``int8`` scheme: the best int8 for this model, chosen by measurement.

1. **Graph preparation.** onnxruntime's quantization pre-processing, falling back to less
   thorough forms where a step fails on this export (see
   :class:`~edgeloop.compress.fuse.Preprocess`); then, where they apply:
   onnxruntime's transformer fusions (Attention, SkipLayerNormalization, Gelu), kept only
   if the fused float model gives the float outputs — otherwise the reason is recorded;
   SmoothQuant scale migration (:mod:`~edgeloop.compress.smooth`) for matrix products
   whose inputs carry outlier channels, as pretrained transformers' do; and cross-layer
   equalization (:mod:`~edgeloop.compress.equalize`) for convolution chains, whose
   per-channel ranges spread over orders of magnitude in pretrained mobile CNNs.
2. **Activation mode and weight granularity.** Each preparation is quantized in full
   with dynamic activations (per-channel and per-tensor int8 weights) and with static
   (QDQ, calibrated) activations (per-channel weights). Every variant is timed at batch 1
   interleaved with the float model, with the intra-op threads the model will have on the
   device (``threads``; onnxruntime's float kernels gain more from extra cores than its
   int8 ones, so the answer can differ); variants that are not faster than float are out.
   Among the rest within ``max_error``, those within 5% of the fastest count as equally
   fast and the most accurate of them wins; if none is within the bound, the most
   accurate goes on to step 3. When no variant is faster than float, or the float
   fallback leaves a model no faster than float, narrower ones are quantized and timed in
   turn (:data:`SCOPES`): depthwise convolutions in float, then every convolution in
   float (the matrix products, e.g. a CNN's classifier head, int8).
   Static variants are also measured with their int8 weights rounded by GPTQ
   (:mod:`~edgeloop.compress.gptq`, the quantizer's scales kept), which replace nearest
   rounding where their error is no worse (``gptq``). Embedding lookups (Gather,
   EmbedLayerNormalization) stay float unless ``quantize_lookups``: an int8 table only
   shrinks the file.
3. **Float fallback.** One switchable fake-quantized graph
   (:class:`~edgeloop.compress.sensitivity.SwitchableModel`) ranks the layers of the
   chosen variant by the error each causes alone and bisects that ranking for the fewest
   most-sensitive layers to keep in float, on a sample of the calibration data. The real
   integer model with those layers excluded is then measured on all of it; the count
   doubles until a real model meets the bound, then is bisected back down between the
   last miss and the first hit (only measured models are kept).
4. **Shape annotations.** The result is timed with and without the shape annotations
   pre-processing left in it (:func:`fastest_annotation`): they let onnxruntime fuse
   more at load, and a fused kernel is not always the faster one.

The error compares the first output with the float model's on CALIB
(:func:`~edgeloop.compress.sensitivity.compare_error`). For classifiers (a 2-D output
written by a final Gemm/MatMul: logits) it is the share of top-1 decisions that change,
default at most 0.02 (top-1 agreement of at least 0.98), with layers ranked by how far
they move the class probabilities; logits' own cosine stays near 1 while decisions flip.
For every other model it is ``1 - mean cosine`` of the outputs, default 0.005 (a mean
cosine of at least 0.995). ``compare`` chooses explicitly. When no int8 form is faster than
float on this CPU, or the bound cannot be met with any layer in int8, the pass says so
(:class:`~edgeloop.errors.ModelError`) rather than return the float model. What was
chosen and measured is recorded in the output model's metadata (:func:`read_plan`) and
in ``plan_``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.registry import IntegerOpsRegistry, QDQRegistry
from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

from edgeloop._onnx import depthwise, name_nodes, session, sort_nodes
from edgeloop._progress import progress, status
from edgeloop.bench import profile_operators
from edgeloop.compress.base import Pass, PassContext
from edgeloop.compress.calibrate import NpzReader, static_calibration
from edgeloop.compress.equalize import equalize, fold_batchnorm
from edgeloop.compress.fuse import Preprocess, drop_zero_bias_zero_points, record_preparation
from edgeloop.compress.gptq import WeightRounder
from edgeloop.compress.sensitivity import (
    LOOKUP_OPS,
    LayerSensitivity,
    SwitchableModel,
    float_tables,
    output_error,
    quantizer_names,
    weighted_nodes,
)
from edgeloop.compress.smooth import smooth
from edgeloop.data import Dataset
from edgeloop.errors import ModelError, UsageError
from edgeloop.measure import COMPUTE_OPS, QDQ_OPS, interleaved_latency, predict, thread_count
from edgeloop.targets import Target, detect

__all__ = [
    "PLAN_KEY",
    "Int8",
    "Int8Plan",
    "TransformerFusion",
    "Variant",
    "fastest_annotation",
    "read_plan",
    "runs_per_round",
]

PLAN_KEY = "edgeloop.int8"
# (activations, per-channel weights): the fully quantized forms tried on each preparation.
FORMS = (("dynamic", True), ("dynamic", False), ("static", True))
_FUSION_TOLERANCE = 1e-4   # a fused float graph must match the original this closely
_SAME_SPEED = 0.05         # latencies within 5% count as a tie, broken by error
# Which weighted layers a variant has in int8, widest first: every one; all but the
# depthwise convolutions; only the matrix products (every convolution float). The
# narrower ones are tried when no variant of the wider is faster than float: on AVX2
# without VNNI, onnxruntime's int8 depthwise and small pointwise convolutions are no
# faster than its float ones, while a classifier's int8 head is.
SCOPES = ("all", "no-depthwise", "matmul-only")
_CONV_OPS = ("Conv", "ConvTranspose")
_SCOPE_TEXT = {"no-depthwise": "depthwise convolutions in float",
               "matmul-only": "every convolution in float"}
_Key = tuple[str, str, bool, str]   # a variant's preparation, mode, per-channel, scope


@dataclass(frozen=True)
class Variant:
    """One quantized candidate: its graph preparation, activation mode, weight
    granularity, output error on CALIB, median batch-1 latency (ms) and scope."""

    preparation: str
    mode: str
    per_channel: bool
    error: float
    latency_ms: float
    scope: str = "all"   # which weighted layers it has in int8 (see SCOPES)


@dataclass
class Int8Plan:
    """What the ``int8`` pass measured and decided."""

    preparation: str
    mode: str
    per_channel: bool
    error: float                    # final error on CALIB (see ``compare``)
    max_error: float
    float_nodes: list[str]          # layers kept in float, most sensitive first
    variants: list[Variant]
    # per-layer errors (for "top1": 1 - mean cosine of the class probabilities)
    sensitivity: list[LayerSensitivity] = field(default_factory=list)
    float_latency_ms: float = 0.0   # the float model, timed with the variants
    preprocess: str = ""            # the pre-processing form used (see fuse.Preprocess)
    notes: list[str] = field(default_factory=list)   # steps skipped, and why
    compare: str = "outputs"        # what the errors measure (sensitivity.COMPARES)
    threads: int = 0                # intra-op threads every latency was measured with
                                    # (0: onnxruntime's default, every core)
    scope: str = "all"              # the weighted layers that may be int8 (SCOPES); those
                                    # outside it are float and not in float_nodes

    def to_json(self) -> str:
        """The plan as JSON (what the model's metadata holds)."""
        return json.dumps(asdict(self))


def read_plan(model: onnx.ModelProto) -> dict[str, object] | None:
    """The plan the ``int8`` pass stored in ``model``, or ``None`` for other models."""
    for prop in model.metadata_props:
        if prop.key == PLAN_KEY:
            return json.loads(prop.value)
    return None


def _hidden_size(model: onnx.ModelProto) -> int | None:
    """The width of the first LayerNormalization's scale, i.e. a transformer's hidden size."""
    inits = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "LayerNormalization" and node.input[1] in inits:
            return int(inits[node.input[1]].dims[-1])
    return None


TIMING_TRIALS = 3   # independent interleaved timings behind each latency int8 decides on


def _timed(models: Sequence[onnx.ModelProto], data: Dataset, *, rounds: int, runs: int,
           threads: int) -> list[float]:
    """Batch-1 latency (ms) of each of ``models``: the median of :data:`TIMING_TRIALS`
    independent :func:`~edgeloop.measure.interleaved_latency` runs, fresh sessions each.

    The forms int8 chooses between often differ by only a few percent, and one
    interleaved run's ratio still moves by about 3% from one set of sessions to the next
    on a shared 2-vCPU machine, sometimes more (x86-avx512-vnni). One run could pick on
    noise."""
    trials = [interleaved_latency(models, data, rounds=rounds, runs=runs, threads=threads)
              for _ in range(TIMING_TRIALS)]
    return [float(np.median(ms)) for ms in zip(*trials, strict=True)]


def fastest_annotation(model: onnx.ModelProto, data: Dataset, *, rounds: int, runs: int,
                       threads: int, notes: list[str]) -> onnx.ModelProto:
    """``model``, or the same graph without its shape annotations (``value_info``) when
    that runs faster at batch 1 on this CPU (timed by :func:`_timed`), with a note
    saying so.

    Where shapes are annotated, onnxruntime fuses more at load, e.g. a residual Add and
    its LayerNorm into SkipLayerNormalization. The fused kernel is not always the faster
    one: on the corpus BERT (x86-avx512-vnni, onnxruntime 1.32) one SkipLayerNormalization
    took 0.56 ms where LayerNormalization plus Add took 0.11 ms."""
    if not model.graph.value_info:
        return model
    bare = onnx.ModelProto()
    bare.CopyFrom(model)
    del bare.graph.value_info[:]
    status("int8: timing the model with and without its shape annotations")
    annotated_ms, bare_ms = _timed([model, bare], data, rounds=rounds, runs=runs,
                                   threads=threads)
    if bare_ms >= annotated_ms:
        return model
    notes.append(f"shape annotations dropped: onnxruntime then fuses less and the model "
                 f"runs faster ({bare_ms:.2f} vs {annotated_ms:.2f} ms at batch 1)")
    return bare


# kernels that do a model's multiply-accumulate work, in float and in integers
_PRODUCT_OPS = COMPUTE_OPS | {"QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger",
                              "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QGemm",
                              "QAttention"}


def _time_split(int8: onnx.ModelProto, fp32: onnx.ModelProto, data: Dataset,
                threads: int, runs: int = 20) -> str:
    """Where ``int8``'s batch-1 time goes against ``fp32``'s, in onnxruntime's profiler
    (one phrase, for messages): the convolutions and matrix products, the Q/DQ
    conversions, and the other operators, naming the costliest of those."""
    feed = {k: v[:1] for k, v in data.inputs.items()}
    split: list[tuple[float, float, float, list[tuple[str, float]]]] = []
    for model in (int8, fp32):
        ops = profile_operators(model, feed, threads=threads, runs=runs, n=None)
        per_run = [(o.op_type, o.total_ms / (runs - 1)) for o in ops]
        rest = [(op, ms) for op, ms in per_run if op not in _PRODUCT_OPS | QDQ_OPS]
        split.append((sum(ms for op, ms in per_run if op in _PRODUCT_OPS),
                      sum(ms for op, ms in per_run if op in QDQ_OPS),
                      sum(ms for _, ms in rest), rest))
    (products, conversions, other, rest), (f_products, _, f_other, _) = split
    costliest = ", ".join(f"{op} {ms:.2f}" for op, ms in rest[:3])
    return (f"onnxruntime's profile at batch 1 (ms per run, int8 vs float): convolutions "
            f"and matrix products {products:.2f} vs {f_products:.2f}, Q/DQ conversions "
            f"{conversions:.2f}, other operators {other:.2f} vs {f_other:.2f}"
            + (f" (most: {costliest})" if costliest else ""))


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:200]


def _transformer_fused(model: onnx.ModelProto, ctx: PassContext, calib: Dataset,
                       reference: np.ndarray) -> tuple[onnx.ModelProto | None, str]:
    """onnxruntime's transformer fusions, or ``None`` and the reason they do not apply.

    The fuser needs the number of heads and cannot always find it, so the usual head
    widths are tried in turn; a fusion counts only if the fused float model still gives
    the float outputs (a wrong head count changes them).
    """
    from onnxruntime.transformers.optimizer import optimize_model

    hidden = _hidden_size(model)
    if hidden is None:
        return None, "no LayerNormalization with a constant scale: not a transformer"
    path = ctx.scratch("to-fuse.onnx")
    onnx.save(model, path)
    reason = "onnxruntime's fuser recognised no attention in this graph"
    for head_dim in (64, 32, 128, 16):
        if hidden % head_dim:
            continue
        try:
            fused = optimize_model(str(path), model_type="bert", opt_level=0,
                                   num_heads=hidden // head_dim, hidden_size=hidden)
            if not fused.get_fused_operator_statistics().get("Attention", 0):
                continue
            out = fused.model
            if not any(o.domain == "com.microsoft" for o in out.opset_import):
                out.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
            # The quantizer needs every tensor's type; only onnxruntime's symbolic shape
            # inference knows its contrib ops.
            out = SymbolicShapeInference.infer_shapes(out, auto_merge=True)
            if out is not None and output_error(out, calib, reference) <= _FUSION_TOLERANCE:
                return out, ""
            reason = "the fused graph changed the float outputs"
        except Exception as e:  # the fuser and shape inference raise bare Exceptions
            reason = f"fusion failed: {_first_line(e)}"
    return None, reason


@dataclass
class TransformerFusion(Pass):
    """onnxruntime's transformer fusions (Attention, SkipLayerNormalization, BiasGelu,
    EmbedLayerNormalization) on a float model, with the head count found as in ``int8``
    step 1 and the fused float outputs checked against the original on CALIB. Raises
    :class:`ModelError` with the reason when it does not apply."""

    name: ClassVar[str] = "transformer-fusion"
    needs_calib: ClassVar[bool] = True

    def apply(self, model: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto:
        calib = ctx.require_calib(self.name)
        fused, reason = _transformer_fused(model, ctx, calib, predict(session(model), calib))
        if fused is None:
            raise ModelError(f"transformer-fusion does not apply: {reason}")
        return fused


@dataclass
class Int8(Pass):
    """int8 chosen per model by measurement; see the module docstring."""

    max_error: float | None = None  # tolerated error on CALIB; None: 0.02 for "top1",
                                    # 0.005 for "outputs"
    compare: str = "auto"           # "outputs", "top1", or "auto" (top1 for classifiers)
    quantize_lookups: bool = False  # int8 embedding tables (smaller file, no speed-up)
    smooth: bool = True             # SmoothQuant variants where inputs have outliers
    smooth_alpha: float = 0.5       # share of the outlier spread moved into the weights
    equalize: bool = True           # cross-layer equalized variants of conv models
    gptq: bool = True               # GPTQ rounding of static int8 weights (gptq module)
    gptq_samples: int = 32          # calibration samples its layer statistics come from
    sensitivity_samples: int = 32   # calibration samples the float-fallback search uses
    timing_rounds: int = 8          # interleaved rounds when timing the variants
    faster_than_float: bool = True  # refuse int8 forms no faster than float (False when
                                    # only the file size matters)
    threads: int = 0                # intra-op threads the model will run with on the
                                    # device; speed is compared at this count (0: every core)
    target: Target = field(default_factory=detect)
    # static calibration (reader, quantizer options) per graph, for one apply()
    _calibrations: dict[int, tuple[NpzReader, dict[str, object]]] = field(
        default_factory=dict, init=False, repr=False)
    _rounders: dict[int, WeightRounder] = field(default_factory=dict, init=False,
                                                repr=False)
    # (graph, operator types) -> onnxruntime's calibration cache file for them
    _ranges: dict[tuple[int, tuple[str, ...]], Path] = field(default_factory=dict,
                                                             init=False, repr=False)
    # variant -> its error before float fallback with nearest and with GPTQ weights
    _gptq_errors: dict[_Key, tuple[float, float]] = field(
        default_factory=dict, init=False, repr=False)
    name: ClassVar[str] = "int8"
    needs_calib: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.compare not in ("auto", "outputs", "top1"):
            raise UsageError(f"`compare` must be auto, outputs or top1; got {self.compare!r}")
        if self.max_error is not None and not 0.0 < self.max_error < 1.0:
            raise UsageError(f"`max-error` must be in (0, 1) (e.g. 0.005 for outputs, 0.02 "
                             f"for top1); got {self.max_error}")
        if self.threads < 0:
            raise UsageError(f"`threads` must be >= 0 (0: every core); got {self.threads}")

    def apply(self, model: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto:
        calib = ctx.require_calib(self.name)
        self._calibrations.clear()
        self._rounders.clear()
        self._ranges.clear()
        self._gptq_errors.clear()
        self.gptq_ = False
        self.compare_ = self.compare if self.compare != "auto" else (
            "top1" if _is_classifier(model) else "outputs")
        self.max_error_ = self.max_error if self.max_error is not None else (
            0.02 if self.compare_ == "top1" else 0.005)
        reference = predict(session(model), calib)
        pre = Preprocess()
        preparations, notes = self._preparations(pre.apply(model, ctx), ctx, calib, reference)
        if pre.tried_:
            notes.append(f"pre-processing used {pre.used_}: "
                         + "; ".join(f"{s} failed ({e})" for s, e in pre.tried_))

        full: dict[_Key, onnx.ModelProto] = {}
        errors: dict[_Key, float] = {}
        # equalization exists for static activations; dynamic ones take the plain graph
        dynamic = _dynamic_pays(preparations["preprocess"])
        if not dynamic:
            notes.append("dynamic activations skipped: most weights are in convolutions, "
                         "which onnxruntime runs as ConvInteger, slower than float on CPUs")
        keys = [(p, m, pc, _widest_scope(preparations[p], m)) for p in preparations
                for m, pc in FORMS if m == "static" or (dynamic and not p.endswith("+equalize"))]
        self._quantize_variants(keys, preparations, ctx, calib, reference, full, errors,
                                notes)
        if not full:
            raise ModelError("int8: onnxruntime's quantizer failed on every variant ("
                             + notes[-1] + ")")
        status("int8: timing the variants against float")
        runs = runs_per_round(model, calib, threads=self.threads)
        float_ms, variants = self._time_variants(model, list(full), full, errors, calib, runs)
        faster = [v for v in variants
                  if v.latency_ms < float_ms or not self.faster_than_float]
        narrowed: list[str] = []
        initial = list(full)
        refusal: ModelError | None = None
        settled = None
        # The widest variants first; narrower scopes while none is faster than float, or
        # while the float fallback it needs leaves a model no faster than float.
        for scope in (None, *SCOPES[1:]):
            if scope is not None:
                keys = [(p, m, pc, scope) for p, m, pc, s in initial
                        if SCOPES.index(s) < SCOPES.index(scope)
                        and _narrows(preparations[p], scope, m)]
                if not keys:
                    continue
                narrowed.append(scope)
                self._quantize_variants(keys, preparations, ctx, calib, reference, full,
                                        errors, notes)
                status(f"int8: timing the variants with {_SCOPE_TEXT[scope]} against float")
                float_ms, more = self._time_variants(model, [k for k in keys if k in full],
                                                     full, errors, calib, runs)
                variants += more
                faster = [v for v in more
                          if v.latency_ms < float_ms or not self.faster_than_float]
            if not faster:
                continue
            try:
                settled = self._settle(faster, full, model, preparations, ctx, calib,
                                       reference, runs, notes)
                break
            except ModelError as e:   # the bound needs too many layers in float
                refusal, self.gptq_ = e, False
        if settled is None:
            tried = "".join(f"; also with {_SCOPE_TEXT[s]}" for s in narrowed)
            if refusal is not None:
                raise ModelError(f"{refusal}{tried}")
            best = min(variants, key=lambda v: v.latency_ms)
            raise ModelError(
                f"int8: no int8 form of this model is faster than float on this CPU "
                f"({self._where()}{tried}): the fastest, {best.preparation} {best.mode}"
                f"{'' if best.scope == SCOPES[0] else ' with ' + _SCOPE_TEXT[best.scope]}, "
                f"takes {best.latency_ms:.2f} ms at batch 1 against {float_ms:.2f} ms in "
                f"float; " + _time_split(full[best.preparation, best.mode, best.per_channel,
                                              best.scope], model, calib, self.threads))
        chosen, out, error, float_nodes, sens = settled
        prep, mode, pc, scope = chosen.preparation, chosen.mode, chosen.per_channel, chosen.scope
        scope_float = _scope_float(preparations[prep], scope, mode)
        if not self.quantize_lookups and any(n.op_type in LOOKUP_OPS
                                             for n in preparations[prep].graph.node):
            out, error = self._with_int8_lookups(preparations[prep], mode, pc, ctx, calib,
                                                 reference, [*scope_float, *float_nodes],
                                                 out, error, notes)
        if mode == "static":
            out = drop_zero_bias_zero_points(out)
        out = fastest_annotation(out, calib, rounds=self.timing_rounds, runs=runs,
                                 threads=self.threads, notes=notes)
        self.plan_ = Int8Plan(prep, mode, pc, error, self.max_error_, float_nodes, variants,
                              sens, float_ms, pre.used_, notes, self.compare_, self.threads,
                              scope)
        record_preparation(out, pre.used_, pre.tried_)
        out.metadata_props.append(
            onnx.StringStringEntryProto(key=PLAN_KEY, value=self.plan_.to_json()))
        return out

    def _where(self) -> str:
        """The CPU profile and thread count latencies were compared at, for messages."""
        return f"{self.target.name}, {thread_count(self.threads)}"

    def _settle(self, faster: Sequence[Variant], full: dict[_Key, onnx.ModelProto],
                model: onnx.ModelProto, preparations: dict[str, onnx.ModelProto],
                ctx: PassContext, calib: Dataset,
                reference: np.ndarray, runs: int, notes: list[str],
                ) -> tuple[Variant, onnx.ModelProto, float, list[str],
                           list[LayerSensitivity]]:
        """The variant chosen among ``faster`` (see :func:`_choose`), its model after any
        float fallback (step 3), that model's error, the layers it keeps float and their
        sensitivities (``full`` holds each variant's model); notes on the choice go to
        ``notes``. Raises :class:`ModelError` when the bound cannot be met, or only by a
        model no faster than float."""
        chosen = _choose(faster, self.max_error_)
        prep, mode, pc, scope = chosen.preparation, chosen.mode, chosen.per_channel, chosen.scope
        said: list[str] = []
        if scope != _widest_scope(preparations[prep], mode):
            said.append(f"{_SCOPE_TEXT[scope]}: no variant with more layers in int8 is "
                        f"faster than float on this CPU ({self._where()})")
        elif scope != SCOPES[0]:
            said.append(f"{_SCOPE_TEXT[scope]}: with dynamic activations onnxruntime runs "
                        f"int8 convolutions as ConvInteger, slower than float")
        if (prep, mode, pc, scope) in self._gptq_errors:
            nearest, gptq = self._gptq_errors[prep, mode, pc, scope]
            self.gptq_ = gptq <= nearest
            said.append(f"int8 weights rounded {'by GPTQ' if self.gptq_ else 'to nearest'}: "
                        f"error {gptq:.4f} with GPTQ, {nearest:.4f} with nearest rounding, "
                        f"before any float fallback (GPTQ statistics from {self.gptq_samples} "
                        f"calibration samples)")
        out, error = full[prep, mode, pc, scope], chosen.error
        float_nodes: list[str] = []
        sens: list[LayerSensitivity] = []
        if error > self.max_error_:
            out, error, float_nodes, sens = self._fall_back(
                preparations[prep], mode, pc, ctx, calib, reference, chosen.error,
                _scope_float(preparations[prep], scope, mode))
            status("int8: timing the mixed-precision model against float")
            mixed_ms, float_ms = _timed([out, model], calib, rounds=self.timing_rounds,
                                        runs=runs, threads=self.threads)
            if mixed_ms >= float_ms and self.faster_than_float:
                raise ModelError(
                    f"int8: meeting max-error {self.max_error_} ({self.compare_}) needs "
                    f"{len(float_nodes)} layers in float, and that model is no faster than "
                    f"float on this CPU ({self._where()}: "
                    f"{mixed_ms:.2f} vs {float_ms:.2f} ms at batch 1; "
                    f"{_time_split(out, model, calib, self.threads)}); the all-int8 "
                    f"model's error is {chosen.error:.4f}")
        notes.extend(said)
        return chosen, out, error, float_nodes, sens

    def _quantize_variants(self, keys: Sequence[_Key],
                           preparations: dict[str, onnx.ModelProto], ctx: PassContext,
                           calib: Dataset, reference: np.ndarray,
                           full: dict[_Key, onnx.ModelProto], errors: dict[_Key, float],
                           notes: list[str]) -> None:
        """Quantize each variant of ``keys`` into ``full`` with its error in ``errors``;
        a form the quantizer cannot produce for its graph gets a note instead."""
        for key in progress(keys, "int8: quantizing variants", total=len(keys)):
            p, m, pc, scope = key
            try:
                exclude = _scope_float(preparations[p], scope, m)
                full[key] = self._quantize(preparations[p], m, ctx, calib, per_channel=pc,
                                           exclude=exclude)
                errors[key] = output_error(full[key], calib, reference, self.compare_)
                if m == "static" and self.gptq:   # same graph and speed: keep the better
                    rounded = self._rounded(preparations[p], full[key], calib)
                    error = output_error(rounded, calib, reference, self.compare_)
                    self._gptq_errors[key] = (errors[key], error)
                    if error <= errors[key]:
                        full[key], errors[key] = rounded, error
            except Exception as e:  # a form the quantizer cannot produce for this graph
                full.pop(key, None)
                notes.append(f"{p} {m}{' per-channel' if pc else ''}"
                             f"{'' if scope == SCOPES[0] else ', ' + _SCOPE_TEXT[scope]}: "
                             f"{_first_line(e)}")

    def _time_variants(self, model: onnx.ModelProto, keys: Sequence[_Key],
                       full: dict[_Key, onnx.ModelProto], errors: dict[_Key, float],
                       calib: Dataset, runs: int) -> tuple[float, list[Variant]]:
        """The float model's batch-1 latency and the variants of ``keys``, timed with it."""
        lat = _timed([model, *(full[k] for k in keys)], calib, rounds=self.timing_rounds,
                     runs=runs, threads=self.threads)
        return lat[0], [Variant(p, m, pc, errors[p, m, pc, scope], t, scope)
                        for (p, m, pc, scope), t in zip(keys, lat[1:], strict=True)]

    def _preparations(self, prepared: onnx.ModelProto, ctx: PassContext, calib: Dataset,
                      reference: np.ndarray) -> tuple[dict[str, onnx.ModelProto], list[str]]:
        """The graphs to quantize, by name, every node named, and notes on the ones that
        do not apply."""
        preparations = {"preprocess": prepared}
        notes: list[str] = []
        if _hidden_size(prepared) is not None:
            status("int8: trying onnxruntime's transformer fusions")
            fused, reason = _transformer_fused(prepared, ctx, calib, reference)
            if fused is not None:
                preparations["fused"] = fused
            else:
                notes.append(f"transformer fusion skipped: {reason}")
        if self.equalize and any(n.op_type == "Conv" for n in prepared.graph.node):
            status("int8: cross-layer equalization")
            equalized, pairs = equalize(fold_batchnorm(prepared), calib)
            if pairs:
                preparations["preprocess+equalize"] = equalized
        if self.smooth:
            for name in list(preparations):
                smoothed, tensors = smooth(preparations[name], calib, alpha=self.smooth_alpha)
                if tensors:
                    preparations[f"{name}+smooth"] = smoothed
        for graph_model in preparations.values():   # float fallback picks layers by name
            name_nodes(graph_model.graph, "edgeloop_node")
        return preparations, notes

    def _with_int8_lookups(self, prepared: onnx.ModelProto, mode: str, per_channel: bool,
                           ctx: PassContext, calib: Dataset, reference: np.ndarray,
                           float_nodes: list[str], out: onnx.ModelProto, error: float,
                           notes: list[str]) -> tuple[onnx.ModelProto, float]:
        """The same model with int8 embedding tables, when that stays within the bound: a
        smaller file at the same speed (a lookup does no arithmetic)."""
        status("int8: trying int8 embedding tables")
        candidate = self._quantize(prepared, mode, ctx, calib, per_channel=per_channel,
                                   exclude=float_nodes, lookups=True)
        left, before = float_tables(candidate), float_tables(out)
        if len(left) >= len(before):
            notes.append(f"embedding tables kept float: onnxruntime's {mode} quantizer has "
                         f"no int8 form of their lookups ({', '.join(left[:3])})")
            return out, error
        err = output_error(candidate, calib, reference, self.compare_)
        if err <= self.max_error_:
            notes.append(f"embedding tables in int8 (error {err:.5f})"
                         + (f"; {len(left)} left float by onnxruntime's {mode} quantizer"
                            if left else ""))
            return candidate, err
        notes.append(f"embedding tables kept float: in int8 the error would be {err:.5f}")
        return out, error

    def _fall_back(self, prepared: onnx.ModelProto, mode: str, per_channel: bool,
                   ctx: PassContext, calib: Dataset, reference: np.ndarray,
                   full_error: float, scope_float: Sequence[str],
                   ) -> tuple[onnx.ModelProto, float, list[str], list[LayerSensitivity]]:
        """The fewest most-sensitive layers to keep in float (module docstring, step 3),
        besides ``scope_float``, which stay float in any case. Only measured results are
        returned, so an optimistic prediction costs time, never the error bound."""
        nodes = [n for n in weighted_nodes(prepared, mode=mode)
                 if (self.quantize_lookups or n.op_type not in LOOKUP_OPS)
                 and n.name not in scope_float]
        sample = calib.take(slice(0, self.sensitivity_samples))
        status(f"int8: ranking {len(nodes)} layers by sensitivity")
        switch = SwitchableModel(prepared, [n.name for n in nodes], sample, mode=mode,
                                 per_channel=per_channel,
                                 reduce_range=self.target.reduce_range,
                                 activation_type=self.target.activation_type)
        sens = switch.ranking(sample, reference[:len(sample)],
                              {n.name: n.op_type for n in nodes}, self.compare_)
        ranked = {s.node for s in sens}
        # layers the switchable graph cannot model go float last
        order = [s.node for s in sens] + [n.name for n in nodes if n.name not in ranked]
        k = switch.fewest_float(order, sample, reference[:len(sample)], self.max_error_,
                                self.compare_)
        # Real models from here: double k until one meets the bound, then bisect between
        # the last miss and that hit (the prediction is a guide, never the verdict).
        k = max(k, 1)   # all-int8 is already known to miss
        miss, hit = 0, None
        while hit is None or hit[0] - miss > 1:
            status(f"int8: {k} of {len(order)} layers in float")
            candidate = self._quantize(prepared, mode, ctx, calib, per_channel=per_channel,
                                       exclude=[*scope_float, *order[:k]])
            error = output_error(candidate, calib, reference, self.compare_)
            if error <= self.max_error_:
                hit = (k, candidate, error)
            elif k >= len(order):
                raise ModelError(
                    f"int8: cannot meet max-error {self.max_error_} ({self.compare_}) on "
                    f"this model: all-int8 error {full_error:.3g}; with all {len(order)} "
                    f"weighted layers in float the rest of the quantized graph still "
                    f"costs {error:.3g}")
            else:
                miss = k
            k = (miss + hit[0]) // 2 if hit is not None else min(len(order),
                                                                  max(k + 1, 2 * k))
        k, candidate, error = hit
        return candidate, error, order[:k], sens

    def _quantize(self, model: onnx.ModelProto, mode: str, ctx: PassContext, calib: Dataset,
                  *, per_channel: bool, exclude: Sequence[str] = (),
                  lookups: bool = False) -> onnx.ModelProto:
        # A path, not the proto: the quantizer may move a proto's weights to external data
        # in its own temporary folder, which breaks the proto for the next call.
        src, out = ctx.scratch("int8-input.onnx"), ctx.scratch(f"int8-{mode}.onnx")
        onnx.save(model, src)
        registry = IntegerOpsRegistry if mode == "dynamic" else QDQRegistry
        op_types = [op for op in registry
                    if lookups or self.quantize_lookups or op not in LOOKUP_OPS]
        if mode == "dynamic":
            quantize_dynamic(src, out, per_channel=per_channel,
                             reduce_range=self.target.reduce_range,
                             weight_type=QuantType.QInt8,
                             nodes_to_exclude=quantizer_names(model, exclude, mode=mode),
                             op_types_to_quantize=op_types)
        else:
            act = QuantType.QUInt8 if self.target.activation_type == "uint8" else QuantType.QInt8
            if id(model) not in self._calibrations:   # one pass over CALIB per graph
                self._calibrations[id(model)] = static_calibration(model, calib)
            reader, options = self._calibrations[id(model)]
            reader.rewind()
            # onnxruntime's own calibration run (an augmented copy of the graph, a session)
            # is the same for every call on this graph and operator set: made once
            key = (id(model), tuple(op_types))
            if key not in self._ranges:
                self._ranges[key] = ctx.scratch(f"int8-ranges-{len(self._ranges)}.json")
                self._ranges[key].unlink(missing_ok=True)   # a previous apply's
            quantize_static(src, out, reader, calibration_cache_path=self._ranges[key],
                            quant_format=QuantFormat.QDQ, per_channel=per_channel,
                            reduce_range=self.target.reduce_range, activation_type=act,
                            weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax,
                            nodes_to_exclude=list(exclude),
                            op_types_to_quantize=op_types,
                            calibration_providers=["CPUExecutionProvider"],
                            extra_options=options)
            quantized = _float_inputs(onnx.load(out), exclude)
            return self._rounded(model, quantized, calib) if self.gptq_ else quantized
        return onnx.load(out)

    def _rounded(self, prepared: onnx.ModelProto, quantized: onnx.ModelProto,
                 calib: Dataset) -> onnx.ModelProto:
        """``quantized`` (made from ``prepared``) with GPTQ-rounded int8 weights."""
        if id(prepared) not in self._rounders:
            self._rounders[id(prepared)] = WeightRounder(
                prepared, calib.take(slice(0, self.gptq_samples)))
        return self._rounders[id(prepared)](quantized)[0]


def _is_classifier(model: onnx.ModelProto) -> bool:
    """Whether the first output looks like classifier logits: 2-D with a known width of at
    least 2 (a 1-wide regression output has no decisions), written by a Gemm or MatMul
    (directly or through the Add of its bias). ``compare`` overrides this guess."""
    dims = model.graph.output[0].type.tensor_type.shape.dim
    if len(dims) != 2 or dims[1].dim_value < 2:
        return False
    out = model.graph.output[0]
    producer = {o: n for n in model.graph.node for o in n.output}
    node = producer.get(out.name)
    if node is not None and node.op_type == "Add":
        node = next((producer[i] for i in node.input if i in producer
                     and producer[i].op_type == "MatMul"), None)
    return node is not None and node.op_type in ("Gemm", "MatMul")


def _scope_float(model: onnx.ModelProto, scope: str, mode: str) -> list[str]:
    """The names of ``model``'s weighted layers that ``scope`` (:data:`SCOPES`) leaves in
    float under the quantizer of ``mode``."""
    if scope == SCOPES[0]:
        return []
    convs = [n for n in weighted_nodes(model, mode=mode) if n.op_type in _CONV_OPS]
    if scope == "matmul-only":
        return [n.name for n in convs]
    inits = {i.name: i for i in model.graph.initializer}
    return [n.name for n in convs
            if n.input[1] in inits and depthwise(n, inits[n.input[1]].dims)]


def _narrows(model: onnx.ModelProto, scope: str, mode: str) -> bool:
    """Whether ``scope`` leaves some, but not all, of ``model``'s weighted layers float."""
    return 0 < len(_scope_float(model, scope, mode)) < len(weighted_nodes(model, mode=mode))


def _widest_scope(model: onnx.ModelProto, mode: str) -> str:
    """The widest scope (:data:`SCOPES`) worth quantizing ``model`` in with activations of
    ``mode``: with dynamic ones, convolutions stay float where the model has matrix
    products too (onnxruntime runs them as ConvInteger, many times slower than float)."""
    return "matmul-only" if mode == "dynamic" and _narrows(model, "matmul-only", mode) \
        else SCOPES[0]


def _dynamic_pays(model: onnx.ModelProto) -> bool:
    """Whether dynamic activations can pay off: most weights are in matrix products
    (MatMulInteger is fast everywhere), not convolutions (ConvInteger is not)."""
    sizes = {i.name: int(np.prod(i.dims)) for i in model.graph.initializer}
    conv = sum(sizes.get(n.input[1], 0) for n in model.graph.node
               if n.op_type == "Conv" and len(n.input) > 1)
    products = sum(sizes.get(n.input[1], 0) for n in model.graph.node
                   if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1)
    return products >= conv


def runs_per_round(model: onnx.ModelProto, data: Dataset, *, batch: int = 1,
                   seconds: float = 0.1, threads: int = 0) -> int:
    """Timed calls per model and round for :func:`~edgeloop.measure.interleaved_latency`:
    about ``seconds`` of ``model``'s time at ``batch`` with ``threads`` intra-op threads,
    3 to 20 calls (slow models need fewer to be timed reliably)."""
    sess = session(model, threads=threads)
    feed = {i.name: data.inputs[i.name][:batch] for i in sess.get_inputs()}
    sess.run(None, feed)
    start = time.perf_counter()
    sess.run(None, feed)
    return int(np.clip(seconds / max(time.perf_counter() - start, 1e-6), 3, 20))


def _float_inputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """Feed the excluded layers ``names`` of a QDQ model their float input.

    The quantizer leaves an excluded Conv/Gemm with float weights but between a
    DequantizeLinear and a QuantizeLinear (its neighbours are int8); onnxruntime's
    WeightBiasQuantization then quantizes its weights per tensor at load time and runs it
    as QLinearConv, so the layer would not be float at all (and worse than per-channel).
    Reading the tensor before its Q/DQ pair keeps it float. That pair also clamps: the
    quantizer removes a Relu or Clip after a Conv and lets the quantized range do its
    work, so the float input is clamped to the same range (a float Clip, which
    onnxruntime fuses into the producing Conv), only not rounded. Where nothing else
    reads that pair, the producer's output is no longer quantized either, so the layer
    before may run in float too: the measured latency of the result accounts for it.
    """
    wanted = set(names)
    producer = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name: i for i in model.graph.initializer}
    clamped: dict[str, str] = {}
    for node in list(model.graph.node):
        if node.name not in wanted or not node.input:
            continue
        dq = producer.get(node.input[0])
        q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" \
            else None
        if q is None or q.op_type != "QuantizeLinear":
            continue
        if q.output[0] not in clamped:
            clamped[q.output[0]] = _clamp_like(q, inits, model.graph)
        node.input[0] = clamped[q.output[0]]
    _drop_dead_nodes(model.graph)
    sort_nodes(model.graph)
    return model


def _clamp_like(q: onnx.NodeProto, inits: dict[str, onnx.TensorProto],
                graph: onnx.GraphProto) -> str:
    """Append a float Clip of ``q``'s input to the range ``q`` can represent (its scale
    and zero point, per tensor) and return the clipped tensor's name."""
    scale = float(onnx.numpy_helper.to_array(inits[q.input[1]]))
    zero = onnx.numpy_helper.to_array(inits[q.input[2]])
    info = np.iinfo(zero.dtype)
    bounds = [scale * (float(b) - float(zero)) for b in (info.min, info.max)]
    out = f"{q.input[0]}_float_clamped"
    names = [f"{out}_min", f"{out}_max"]
    graph.initializer.extend(onnx.numpy_helper.from_array(np.array(b, dtype=np.float32), n)
                             for b, n in zip(bounds, names, strict=True))
    graph.node.append(onnx.helper.make_node("Clip", [q.input[0], *names], [out],
                                            name=f"{q.name}_float_clamp"))
    return out


def _drop_dead_nodes(graph: onnx.GraphProto) -> None:
    """Remove nodes none of whose outputs are used, until there are none."""
    while True:
        used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        live = [n for n in graph.node if any(o in used for o in n.output)]
        if len(live) == len(graph.node):
            return
        del graph.node[:]
        graph.node.extend(live)


def _choose(variants: Sequence[Variant], max_error: float) -> Variant:
    """The fastest variant within ``max_error`` (near-ties go to the more accurate), else
    the most accurate."""
    within = [v for v in variants if v.error <= max_error]
    if not within:
        return min(variants, key=lambda v: v.error)
    fastest = min(v.latency_ms for v in within)
    return min((v for v in within if v.latency_ms <= fastest * (1 + _SAME_SPEED)),
               key=lambda v: v.error)
