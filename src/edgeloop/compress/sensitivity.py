"""Per-layer quantization sensitivity: how far the model's output moves on calibration data
when only that one layer is quantized.

The error of a model is ``1 - mean cosine`` between its first output and the float
model's, sample by sample, on the calibration set (0 is identical, the mean-cosine target
0.995 is an error of 0.005). Layers are ranked by the error they cause alone; the
:mod:`~edgeloop.compress.mixed` pass keeps the top of that ranking in float.

onnxruntime's quantizer does the quantizing (``nodes_to_quantize`` restricts it to one
node); this module only decides what to ask it and measures the result.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnxruntime.quantization.registry import IntegerOpsRegistry, QDQRegistry

from edgeloop._onnx import session
from edgeloop._progress import progress
from edgeloop.data import Dataset
from edgeloop.measure import fidelity, predict

__all__ = ["LOOKUP_OPS", "LayerSensitivity", "layer_sensitivity", "output_error", "weighted_nodes"]

# Ops that carry weights; the ones whose precision decides a model's accuracy and speed.
WEIGHTED_OPS = {"Conv", "ConvTranspose", "MatMul", "Gemm", "Attention", "LSTM", "Gather",
                "EmbedLayerNormalization"}

# Table lookups: quantizing them shrinks the file but does no integer arithmetic.
LOOKUP_OPS = {"Gather", "EmbedLayerNormalization"}

# Which input holds the weight (the table, for Gather); 1 for the others.
_WEIGHT_INPUT = {"Gather": 0}

# quantize(nodes_to_quantize) -> quantized model; the caller binds mode and settings.
Quantizer = Callable[[list[str]], onnx.ModelProto]


@dataclass(frozen=True)
class LayerSensitivity:
    """The output error (``1 - mean cosine`` to the float model) when only ``node`` is
    quantized."""

    node: str
    op_type: str
    error: float


def output_error(model: onnx.ModelProto, data: Dataset, reference: np.ndarray) -> float:
    """``1 - mean cosine`` between ``model``'s first output on ``data`` and ``reference``."""
    return 1.0 - fidelity(predict(session(model), data), reference).mean_cosine


def weighted_nodes(model: onnx.ModelProto, *, mode: str) -> list[onnx.NodeProto]:
    """Nodes the quantizer of ``mode`` (``dynamic`` or ``static``) would turn into integer
    arithmetic on weights: weighted ops it has a rule for, whose weight input is a constant
    (not an activation such as attention scores, nor a shape)."""
    registry = IntegerOpsRegistry if mode == "dynamic" else QDQRegistry
    consts = {i.name for i in model.graph.initializer}
    consts |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    out = []
    for node in model.graph.node:
        if node.op_type not in WEIGHTED_OPS or node.op_type not in registry:
            continue
        weight = node.input[_WEIGHT_INPUT.get(node.op_type, 1)]
        if node.op_type != "EmbedLayerNormalization" and weight not in consts:
            continue
        out.append(node)
    return out


def layer_sensitivity(quantize: Quantizer, nodes: Sequence[onnx.NodeProto], data: Dataset,
                      reference: np.ndarray) -> list[LayerSensitivity]:
    """Quantize each of ``nodes`` alone with ``quantize`` and measure the output error on
    ``data`` against ``reference``; most sensitive first (ties keep graph order)."""
    result = []
    for node in progress(nodes, "layer sensitivity", total=len(nodes)):
        err = output_error(quantize([node.name]), data, reference)
        result.append(LayerSensitivity(node.name, node.op_type, err))
    return sorted(result, key=lambda s: -s.error)
