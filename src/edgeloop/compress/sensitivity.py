"""Per-layer quantization sensitivity: how far the model's output moves on calibration data
when only that one layer is quantized.

The error of a model compares its first output with the float model's, sample by sample
(:func:`compare_error`): ``1 - mean cosine`` of the outputs (0 is identical; the
mean-cosine target 0.995 is an error of 0.005) or, for classifiers, the share of top-1
decisions that change, ranked by ``1 - mean cosine`` of the class probabilities. The
:mod:`~edgeloop.compress.mixed` pass keeps the top of the ranking in float.

Asking onnxruntime's quantizer for one model per layer costs a quantization, a session
and a pass over the data for every layer: minutes on a mobile CNN. Instead,
:class:`SwitchableModel` builds **one** float graph in which every weighted layer also has
a fake-quantized twin (weights rounded the way onnxruntime rounds them, per channel or
per tensor, 7-bit where the target says so; the input quantized dynamically or with its
calibrated range), and a boolean graph input per layer selects which of the two outputs
flows on. One onnxruntime session then answers "this set of layers in int8" for any set,
which is what both the ranking and the bisection on it need. The error it predicts is
close to the real integer model's; the real model is always measured before it is kept.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization.registry import IntegerOpsRegistry, QDQRegistry

from edgeloop._onnx import attr, probe_session, session, sort_nodes
from edgeloop._progress import progress
from edgeloop.compress.equalize import quantize_weight, weight_axis
from edgeloop.data import Dataset, batches
from edgeloop.measure import PREDICT_BATCH, fidelity, predict

__all__ = [
    "COMPARES",
    "LOOKUP_OPS",
    "LayerSensitivity",
    "SwitchableModel",
    "compare_error",
    "float_tables",
    "output_error",
    "quantizer_names",
    "weighted_nodes",
]

# Ops that carry weights; the ones whose precision decides a model's accuracy and speed.
WEIGHTED_OPS = {"Conv", "ConvTranspose", "MatMul", "Gemm", "Attention", "LSTM", "Gather",
                "EmbedLayerNormalization"}

# Table lookups: quantizing them shrinks the file but does no integer arithmetic.
LOOKUP_OPS = {"Gather", "EmbedLayerNormalization"}

# Which input holds the weight (the table, for Gather); 1 for the others.
_WEIGHT_INPUT = {"Gather": 0}
# Which inputs of a lookup are tables: EmbedLayerNormalization's word, position and
# segment embeddings.
_TABLE_INPUTS = {"Gather": (0,), "EmbedLayerNormalization": (2, 3, 4)}

_STATIC_BATCH = 8   # samples per call of a static-mode switchable graph
# Layers the switchable graph can fake-quantize: a constant weight in input 1.
_SWITCHABLE = {"Conv", "MatMul", "Gemm"}


@dataclass(frozen=True)
class LayerSensitivity:
    """The output error (:func:`compare_error` to the float model) when only ``node`` is
    quantized."""

    node: str
    op_type: str
    error: float


# What an error compares: "outputs" (1 - mean cosine), "probabilities" (1 - mean cosine
# of the softmax over the last axis) or "top1" (share of changed top-1 decisions).
COMPARES = ("outputs", "probabilities", "top1")


def _softmax(x: np.ndarray) -> np.ndarray:
    z = np.exp(x - x.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def compare_error(outputs: np.ndarray, reference: np.ndarray, compare: str = "outputs",
                  ) -> float:
    """How far ``outputs`` are from ``reference`` by ``compare`` (see :data:`COMPARES`).

    Classifier logits share a large common part (every class the input is not), so their
    cosine stays near 1 while top-1 decisions flip: on a trained mobile CNN, logit cosine
    0.9999 with 17% of decisions changed. Class probabilities weigh the classes that
    compete for the top; "top1" counts the decisions themselves.
    """
    if compare == "top1":
        return 1.0 - fidelity(outputs, reference).top1_agreement
    if compare == "probabilities":
        outputs, reference = _softmax(outputs.astype(np.float64)), _softmax(
            reference.astype(np.float64))
    return 1.0 - fidelity(outputs, reference).mean_cosine


def output_error(model: onnx.ModelProto, data: Dataset, reference: np.ndarray,
                 compare: str = "outputs") -> float:
    """:func:`compare_error` of ``model``'s first output on ``data`` to ``reference``."""
    return compare_error(predict(session(model), data), reference, compare)


def _gemm_as_matmul(node: onnx.NodeProto) -> bool:
    """Whether onnxruntime's dynamic quantizer rewrites ``node`` as a MatMul (+ Add) named
    ``{name}_MatMul`` and quantizes that MatMul: a Gemm with alpha = beta = 1, no transA."""
    return (node.op_type == "Gemm" and float(attr(node, "alpha", 1.0)) == 1.0
            and float(attr(node, "beta", 1.0)) == 1.0 and not int(attr(node, "transA", 0)))


def quantizer_names(model: onnx.ModelProto, names: Iterable[str], *, mode: str) -> list[str]:
    """The names onnxruntime's quantizer of ``mode`` knows the named nodes by, for its
    ``nodes_to_exclude`` (the dynamic one renames each Gemm it rewrites as a MatMul)."""
    if mode != "dynamic":
        return list(names)
    renamed = {n.name for n in model.graph.node if _gemm_as_matmul(n)}
    return [f"{n}_MatMul" if n in renamed else n for n in names]


def weighted_nodes(model: onnx.ModelProto, *, mode: str) -> list[onnx.NodeProto]:
    """Nodes the quantizer of ``mode`` (``dynamic`` or ``static``) would turn into integer
    arithmetic on weights: weighted ops it has a rule for (the dynamic one runs most Gemms
    as MatMuls), whose weight input is a constant (not an activation such as attention
    scores, nor a shape)."""
    registry = IntegerOpsRegistry if mode == "dynamic" else QDQRegistry
    consts = {i.name for i in model.graph.initializer}
    consts |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    out = []
    for node in model.graph.node:
        has_rule = node.op_type in registry or (mode == "dynamic" and _gemm_as_matmul(node))
        if node.op_type not in WEIGHTED_OPS or not has_rule:
            continue
        weight = node.input[_WEIGHT_INPUT.get(node.op_type, 1)]
        if node.op_type != "EmbedLayerNormalization" and weight not in consts:
            continue
        out.append(node)
    return out


def float_tables(model: onnx.ModelProto) -> list[str]:
    """The float initializers that a lookup (:data:`LOOKUP_OPS`) reads as its table,
    sorted: what int8 lookups would shrink, and what a quantizer left in float."""
    floats = {i.name for i in model.graph.initializer
              if i.data_type == onnx.TensorProto.FLOAT}
    return sorted({node.input[k] for node in model.graph.node
                   for k in _TABLE_INPUTS.get(node.op_type, ())
                   if k < len(node.input) and node.input[k] in floats})


def _input_ranges(model: onnx.ModelProto, data: Dataset, tensors: list[str],
                  batch_size: int = 4) -> dict[str, tuple[float, float]]:
    """Min and max of each named intermediate tensor over ``data`` (the static range)."""
    sess = probe_session(model, tensors)
    names = [o.name for o in sess.get_outputs()]
    inputs = [i.name for i in sess.get_inputs()]
    lo: dict[str, float] = {}
    hi: dict[str, float] = {}
    for feed in batches(data, batch_size):
        values = dict(zip(names, sess.run(None, {k: feed[k] for k in inputs}), strict=True))
        for t in tensors:
            lo[t] = min(lo.get(t, 0.0), float(values[t].min()))
            hi[t] = max(hi.get(t, 0.0), float(values[t].max()))
    return {t: (lo[t], hi[t]) for t in tensors}


class SwitchableModel:
    """One onnxruntime session that runs ``model`` with any chosen set of its weighted
    layers fake-quantized (see the module docstring).

    ``mode`` is ``dynamic`` (input quantized per batch, uint8, as onnxruntime's dynamic
    quantizer does) or ``static`` (input quantized with its range on ``data``, uint8 or
    int8 by ``activation_type``). ``layers`` are the node names that get a twin; layers
    whose weight is not a constant Conv/MatMul/Gemm weight are left out (``layers_``
    lists the ones kept).
    """

    def __init__(self, model: onnx.ModelProto, layers: Iterable[str], data: Dataset, *,
                 mode: str, per_channel: bool, reduce_range: bool,
                 activation_type: str = "uint8") -> None:
        graph_model = onnx.ModelProto()
        graph_model.CopyFrom(model)
        graph = graph_model.graph
        inits = {i.name: i for i in graph.initializer}
        wanted = set(layers)
        nodes = [n for n in graph.node if n.name in wanted and n.op_type in _SWITCHABLE
                 and len(n.input) > 1 and n.input[1] in inits]
        ranges = (_input_ranges(model, data, sorted({n.input[0] for n in nodes}))
                  if mode == "static" else {})
        added: list[onnx.NodeProto] = []
        self.layers_: list[str] = []
        self._flags: list[str] = []
        done_inputs: dict[str, str] = {}
        for k, node in enumerate(nodes):
            w = numpy_helper.to_array(inits[node.input[1]])
            wq, _ = quantize_weight(w, axis=weight_axis(node), per_channel=per_channel,
                                    reduce_range=reduce_range)
            wq_name = f"edgeloop_fq_w{k}"
            graph.initializer.append(numpy_helper.from_array(wq, wq_name))
            x = node.input[0]
            if x not in done_inputs:
                done_inputs[x] = f"edgeloop_fq_x{k}"
                added.extend(_fake_quant_input(x, done_inputs[x], mode, ranges.get(x),
                                               activation_type, graph))
            flag = f"edgeloop_fq_on{k}"
            graph.input.append(helper.make_tensor_value_info(flag, TensorProto.BOOL, []))
            twin = onnx.NodeProto()
            twin.CopyFrom(node)
            twin.name = f"{node.name}_fq"
            twin.input[0], twin.input[1] = done_inputs[x], wq_name
            float_out, fq_out, out = f"{node.output[0]}_float", f"{node.output[0]}_fq", \
                node.output[0]
            node.output[0] = float_out
            twin.output[0] = fq_out
            added.extend([twin, helper.make_node("Where", [flag, fq_out, float_out], [out],
                                                 name=f"{node.name}_switch")])
            self.layers_.append(node.name)
            self._flags.append(flag)
        graph.node.extend(added)
        sort_nodes(graph)
        self._session = session(graph_model)
        self._inputs = [i.name for i in self._session.get_inputs()
                        if not i.name.startswith("edgeloop_fq_on")]
        # Dynamic activation ranges are per call, so the batch must be predict()'s, which
        # measures the real integer model; static ranges are fixed, and a small batch
        # bounds the memory of this doubled graph (a 224-px CNN's activations).
        self._batch = PREDICT_BATCH if mode == "dynamic" else _STATIC_BATCH

    def error(self, quantized: Iterable[str], data: Dataset, reference: np.ndarray,
              compare: str = "outputs") -> float:
        """:func:`compare_error` to ``reference`` with exactly ``quantized`` in int8."""
        on = set(quantized)
        flags = {f: np.array(name in on) for f, name in zip(self._flags, self.layers_,
                                                             strict=True)}
        outs = [self._session.run(None, {**{k: feed[k] for k in self._inputs}, **flags})[0]
                for feed in batches(data, self._batch)]
        return compare_error(np.concatenate(outs), reference, compare)

    def ranking(self, data: Dataset, reference: np.ndarray, op_types: dict[str, str],
                compare: str = "outputs") -> list[LayerSensitivity]:
        """Each layer's error when it alone is quantized; most sensitive first (ties keep
        graph order). ``op_types`` maps layer names to their op types (for the report).
        One layer rarely flips a decision on a sample, so "top1" ranks by probabilities."""
        by = "probabilities" if compare == "top1" else compare
        result = [LayerSensitivity(name, op_types.get(name, ""),
                                   self.error([name], data, reference, compare=by))
                  for name in progress(self.layers_, "layer sensitivity",
                                       total=len(self.layers_))]
        return sorted(result, key=lambda s: -s.error)

    def fewest_float(self, order: Sequence[str], data: Dataset, reference: np.ndarray,
                     max_error: float, compare: str = "outputs") -> int:
        """The smallest ``k`` such that keeping ``order[:k]`` float (everything else
        switchable in int8) meets ``max_error`` by this graph's prediction, found by
        bisection; ``len(order)`` when even that is needed."""
        everything = list(self.layers_)
        lo, hi = -1, len(order)     # lo: known to miss; hi: assumed to meet
        while hi - lo > 1:
            mid = (lo + hi) // 2
            kept = set(order[:mid])
            if self.error([n for n in everything if n not in kept], data, reference,
                          compare=compare) <= max_error:
                hi = mid
            else:
                lo = mid
        return hi


def _fake_quant_input(x: str, out: str, mode: str, rng: tuple[float, float] | None,
                      activation_type: str, graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """Nodes that quantize and dequantize activation ``x`` into ``out``."""
    if mode == "dynamic":
        q, s, z = f"{out}_q", f"{out}_s", f"{out}_z"
        return [helper.make_node("DynamicQuantizeLinear", [x], [q, s, z]),
                helper.make_node("DequantizeLinear", [q, s, z], [out])]
    lo, hi = rng if rng is not None else (0.0, 0.0)
    if activation_type == "uint8":
        scale = (hi - lo) / 255.0 or 1.0
        zero = np.uint8(np.clip(round(-lo / scale), 0, 255))
    else:
        scale = max(abs(lo), abs(hi)) / 127.0 or 1.0
        zero = np.int8(0)
    s_name, z_name = f"{out}_scale", f"{out}_zero"
    graph.initializer.extend([numpy_helper.from_array(np.array(scale, np.float32), s_name),
                              numpy_helper.from_array(np.array(zero), z_name)])
    return [helper.make_node("QuantizeLinear", [x, s_name, z_name], [f"{out}_q"]),
            helper.make_node("DequantizeLinear", [f"{out}_q", s_name, z_name], [out])]
