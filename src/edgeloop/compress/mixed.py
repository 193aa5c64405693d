"""The ``int8`` scheme: the best int8 for this model, chosen by measurement.

1. **Graph preparation.** Candidates: the graph as given, onnxruntime's quantization
   pre-processing (shape inference, constant folding, its basic fusions), and
   (when it finds anything to fuse) onnxruntime's transformer fusions
   (``onnxruntime.transformers.optimizer``: Attention, SkipLayerNormalization, Gelu,
   EmbedLayerNormalization), kept only if the fused float model gives the float outputs.
   Fused attention also keeps the activation-by-activation products (scores, context) in
   float, where per-tensor int8 loses the most.
2. **Activation mode and weight granularity.** Each preparation is quantized in full
   with dynamic activations (per-channel and per-tensor int8 weights) and with static
   (QDQ, calibrated) activations (per-channel weights). Among the variants within
   ``max_error``, those within 5% of the fastest at batch 1 (timed interleaved, same
   run) count as equally fast and the most accurate of them wins; if none is within the
   bound, the most accurate one goes on to step 3.
   Embedding lookups (Gather, EmbedLayerNormalization) stay float unless
   ``quantize_lookups``: an int8 table only shrinks the file (a lookup does no
   arithmetic, and an int8 one adds a DequantizeLinear), while in trained transformers
   the embeddings are among the most sensitive layers.
3. **Float fallback.** The per-layer sensitivity of the chosen variant (output error with
   only that layer quantized, :mod:`~edgeloop.compress.sensitivity`) ranks the layers;
   a bisection on that ranking finds the fewest most-sensitive layers to keep in float so
   that the output is within ``max_error`` of the float model on the calibration data.

The error is ``1 - mean cosine`` of the first output against the float model on CALIB;
the default 0.005 is a mean cosine of at least 0.995. What was chosen and measured is
recorded in the output model's metadata (:func:`read_plan`) and in ``plan_``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
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

from edgeloop._onnx import session
from edgeloop._progress import status
from edgeloop.compress.base import Pass, PassContext
from edgeloop.compress.calibrate import NpzReader
from edgeloop.compress.fuse import Preprocess, drop_zero_bias_zero_points
from edgeloop.compress.sensitivity import (
    LOOKUP_OPS,
    LayerSensitivity,
    layer_sensitivity,
    output_error,
    weighted_nodes,
)
from edgeloop.data import Dataset
from edgeloop.errors import ModelError, UsageError
from edgeloop.measure import predict
from edgeloop.targets import Target, detect

__all__ = [
    "PLAN_KEY",
    "Int8",
    "Int8Plan",
    "TransformerFusion",
    "Variant",
    "interleaved_latency",
    "read_plan",
]

PLAN_KEY = "edgeloop.int8"
# (activations, per-channel weights): the fully quantized forms tried on each preparation.
FORMS = (("dynamic", True), ("dynamic", False), ("static", True))
_FUSION_TOLERANCE = 1e-4   # a fused float graph must match the original this closely
_SAME_SPEED = 0.05         # latencies within 5% count as a tie, broken by error


@dataclass(frozen=True)
class Variant:
    """One fully quantized candidate: its graph preparation, activation mode, weight
    granularity, output error on CALIB and median batch-1 latency (ms)."""

    preparation: str
    mode: str
    per_channel: bool
    error: float
    latency_ms: float


@dataclass
class Int8Plan:
    """What the ``int8`` pass measured and decided."""

    preparation: str
    mode: str
    per_channel: bool
    error: float                    # final 1 - mean cosine on CALIB
    max_error: float
    float_nodes: list[str]          # layers kept in float, most sensitive first
    variants: list[Variant]
    sensitivity: list[LayerSensitivity] = field(default_factory=list)

    def to_json(self) -> str:
        """The plan as JSON (what the model's metadata holds)."""
        return json.dumps(asdict(self))


def read_plan(model: onnx.ModelProto) -> dict[str, object] | None:
    """The plan the ``int8`` pass stored in ``model``, or ``None`` for other models."""
    for prop in model.metadata_props:
        if prop.key == PLAN_KEY:
            return json.loads(prop.value)
    return None


def interleaved_latency(models: Sequence[onnx.ModelProto], data: Dataset, *, batch: int = 1,
                        rounds: int = 5, runs: int = 20, warmup: int = 5,
                        threads: int = 0) -> list[float]:
    """Median latency (ms) of each model on the first ``batch`` samples of ``data``.

    Models take turns, ``runs`` calls each per round, so that load changes on a shared
    machine hit every model alike; each round starts one model later than the one before,
    so no model always runs right after the same other one (whose thread pool may still
    be spinning). The result is the median over rounds of each round's median.
    """
    sessions = [session(m, threads=threads) for m in models]
    feed = {k: np.ascontiguousarray(v[:batch]) for k, v in data.inputs.items()}
    feeds = [{i.name: feed[i.name] for i in s.get_inputs()} for s in sessions]
    for s, f in zip(sessions, feeds, strict=True):
        for _ in range(warmup):
            s.run(None, f)
    medians: list[list[float]] = [[] for _ in sessions]
    n = len(sessions)
    for r in range(rounds):
        for i in range(n):
            k = (r + i) % n
            s, f, out = sessions[k], feeds[k], medians[k]
            times = []
            for _ in range(runs):
                t0 = time.perf_counter()
                s.run(None, f)
                times.append(time.perf_counter() - t0)
            out.append(float(np.median(times)))
    return [float(np.median(m)) * 1e3 for m in medians]


def _hidden_size(model: onnx.ModelProto) -> int | None:
    """The width of the first LayerNormalization's scale, i.e. a transformer's hidden size."""
    inits = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "LayerNormalization" and node.input[1] in inits:
            return int(inits[node.input[1]].dims[-1])
    return None


def _transformer_fused(model: onnx.ModelProto, ctx: PassContext, calib: Dataset,
                       reference: np.ndarray) -> onnx.ModelProto | None:
    """onnxruntime's transformer fusions, or ``None`` when it fuses no attention.

    The fuser needs the number of heads and cannot always find it, so the usual head
    widths are tried in turn; a fusion counts only if the fused float model still gives
    the float outputs (a wrong head count changes them).
    """
    from onnxruntime.transformers.optimizer import optimize_model

    hidden = _hidden_size(model)
    if hidden is None:
        return None
    path = ctx.scratch("to-fuse.onnx")
    onnx.save(model, path)
    for head_dim in (64, 32, 128, 16):
        if hidden % head_dim:
            continue
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
        if output_error(out, calib, reference) <= _FUSION_TOLERANCE:
            return out
    return None


@dataclass
class TransformerFusion(Pass):
    """onnxruntime's transformer fusions (Attention, SkipLayerNormalization, BiasGelu,
    EmbedLayerNormalization) on a float model, with the head count found as in ``int8``
    step 1 and the fused float outputs checked against the original on CALIB. Raises
    :class:`ModelError` when no attention is fused (not a transformer, or not one the
    fuser recognises)."""

    name: ClassVar[str] = "transformer-fusion"
    needs_calib: ClassVar[bool] = True

    def apply(self, model: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto:
        calib = ctx.require_calib(self.name)
        fused = _transformer_fused(model, ctx, calib, predict(session(model), calib))
        if fused is None:
            raise ModelError("transformer-fusion fused no attention in this model (or the "
                             "fused model changed its float outputs)")
        return fused


@dataclass
class Int8(Pass):
    """int8 chosen per model by measurement; see the module docstring."""

    max_error: float = 0.005        # tolerated 1 - mean output cosine to float on CALIB
    quantize_lookups: bool = False  # int8 embedding tables (smaller file, no speed-up)
    calib_batch: int = 32           # samples per calibration batch (static mode)
    timing_rounds: int = 8          # interleaved rounds when timing the variants
    target: Target = field(default_factory=detect)
    name: ClassVar[str] = "int8"
    needs_calib: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if not 0.0 < self.max_error < 1.0:
            raise UsageError(f"`max-error` must be in (0, 1) (1 - mean cosine, e.g. 0.005); "
                             f"got {self.max_error}")

    def apply(self, model: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto:
        calib = ctx.require_calib(self.name)
        reference = predict(session(model), calib)
        preparations = {"none": model, "preprocess": Preprocess().apply(model, ctx)}
        fused = _transformer_fused(model, ctx, calib, reference)
        if fused is not None:
            preparations["fused"] = fused

        keys = [(p, m, pc) for p in preparations for m, pc in FORMS]
        full: dict[tuple[str, str, bool], onnx.ModelProto] = {}
        errors: dict[tuple[str, str, bool], float] = {}
        for key in list(keys):
            p, m, pc = key
            status(f"int8: quantizing {p} graph with {m} activations")
            try:
                full[key] = self._quantize(preparations[p], m, ctx, calib, per_channel=pc)
                errors[key] = output_error(full[key], calib, reference)
            except Exception:  # a form the quantizer cannot produce for this graph
                keys.remove(key)
                full.pop(key, None)
        if not keys:
            raise ModelError("int8: onnxruntime's quantizer failed on every variant")
        lat = interleaved_latency([full[k] for k in keys], calib, rounds=self.timing_rounds)
        variants = [Variant(*k, errors[k], t) for k, t in zip(keys, lat, strict=True)]
        chosen = _choose(variants, self.max_error)
        prep, mode, pc = chosen.preparation, chosen.mode, chosen.per_channel

        out, error, float_nodes, sens = full[prep, mode, pc], chosen.error, [], []
        if error > self.max_error:
            prepared = preparations[prep]
            nodes = [n for n in weighted_nodes(prepared, mode=mode)
                     if self.quantize_lookups or n.op_type not in LOOKUP_OPS]
            sens = layer_sensitivity(
                lambda only: self._quantize(prepared, mode, ctx, calib, per_channel=pc,
                                            only=only),
                nodes, calib, reference)
            out, error, float_nodes = self._fall_back(prepared, mode, pc,
                                                      [s.node for s in sens], ctx, calib,
                                                      reference)
        if mode == "static":
            out = drop_zero_bias_zero_points(out)
        self.plan_ = Int8Plan(prep, mode, pc, error, self.max_error, float_nodes, variants,
                              sens)
        out.metadata_props.append(
            onnx.StringStringEntryProto(key=PLAN_KEY, value=self.plan_.to_json()))
        return out

    def _fall_back(self, prepared: onnx.ModelProto, mode: str, per_channel: bool,
                   order: list[str],
                   ctx: PassContext, calib: Dataset, reference: np.ndarray,
                   ) -> tuple[onnx.ModelProto, float, list[str]]:
        """Bisection for the fewest leading layers of ``order`` to keep in float. Only
        measured results are returned, so a non-monotone error curve costs speed, never
        the error bound."""
        def attempt(k: int) -> tuple[onnx.ModelProto, float]:
            status(f"int8: {k} of {len(order)} layers in float")
            candidate = self._quantize(prepared, mode, ctx, calib, per_channel=per_channel,
                                       exclude=order[:k])
            return candidate, output_error(candidate, calib, reference)

        lo, hi = 0, len(order)      # lo: known to miss the bound; hi: assumed to meet it
        best: tuple[onnx.ModelProto, float] | None = None
        while hi - lo > 1:
            mid = (lo + hi) // 2
            candidate, err = attempt(mid)
            if err <= self.max_error:
                hi, best = mid, (candidate, err)
            else:
                lo = mid
        if best is None:
            best = attempt(hi)
            if best[1] > self.max_error:  # even with every weighted layer in float
                return prepared, output_error(prepared, calib, reference), list(order)
        return best[0], best[1], order[:hi]

    def _quantize(self, model: onnx.ModelProto, mode: str, ctx: PassContext, calib: Dataset,
                  *, per_channel: bool, only: list[str] | None = None,
                  exclude: Sequence[str] = ()
                  ) -> onnx.ModelProto:
        # A path, not the proto: the quantizer may move a proto's weights to external data
        # in its own temporary folder, which breaks the proto for the next call.
        src, out = ctx.scratch("int8-input.onnx"), ctx.scratch(f"int8-{mode}.onnx")
        onnx.save(model, src)
        registry = IntegerOpsRegistry if mode == "dynamic" else QDQRegistry
        op_types = [op for op in registry
                    if self.quantize_lookups or op not in LOOKUP_OPS]
        if mode == "dynamic":
            quantize_dynamic(src, out, per_channel=per_channel,
                             reduce_range=self.target.reduce_range,
                             weight_type=QuantType.QInt8, nodes_to_quantize=only,
                             nodes_to_exclude=list(exclude), op_types_to_quantize=op_types)
        else:
            act = QuantType.QUInt8 if self.target.activation_type == "uint8" else QuantType.QInt8
            quantize_static(src, out, NpzReader(calib, self.calib_batch),
                            quant_format=QuantFormat.QDQ, per_channel=per_channel,
                            reduce_range=self.target.reduce_range, activation_type=act,
                            weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax,
                            nodes_to_quantize=only, nodes_to_exclude=list(exclude),
                            op_types_to_quantize=op_types,
                            calibration_providers=["CPUExecutionProvider"])
        return onnx.load(out)


def _choose(variants: Sequence[Variant], max_error: float) -> Variant:
    """The fastest variant within ``max_error`` (near-ties go to the more accurate), else
    the most accurate."""
    within = [v for v in variants if v.error <= max_error]
    if not within:
        return min(variants, key=lambda v: v.error)
    fastest = min(v.latency_ms for v in within)
    return min((v for v in within if v.latency_ms <= fastest * (1 + _SAME_SPEED)),
               key=lambda v: v.error)
