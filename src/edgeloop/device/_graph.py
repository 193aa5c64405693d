"""A stage's confidence computed inside its own ONNX graph.

On a device, the decision "answer or go on" must cost less than the stage it may save.
Computing it in numpy after the run costs several microseconds of Python per stage (as
much as a small model); appended to the graph, onnxruntime computes it in the same run
for about one. The graph gains one output, :data:`CONFIDENCE`, of shape (samples,): the
same numbers :func:`edgeloop.device.calibration.confidence` gives on
``softmax(logits / T)``.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgeloop.errors import ModelError, one_of

__all__ = ["CONFIDENCE", "with_confidence"]

CONFIDENCE = "edgeloop_confidence"


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _reduce(op: str, x: str, out: str, opset: int, since: int,
            inits: list[onnx.TensorProto]) -> onnx.NodeProto:
    """``op`` over the last axis, dropping it; axes as an input from opset ``since`` on."""
    if opset >= since:
        name = f"{out}_axes"
        inits.append(numpy_helper.from_array(np.array([-1], np.int64), name))
        return helper.make_node(op, [x, name], [out], keepdims=0)
    return helper.make_node(op, [x], [out], axes=[-1], keepdims=0)


def with_confidence(model: onnx.ModelProto, *, temperature: float,
                    measure: str = "max-softmax") -> onnx.ModelProto:
    """A copy of ``model`` whose last output is the calibrated confidence of its first
    output (logits, samples x classes) under ``measure``."""
    from edgeloop.device.calibration import MEASURES

    if measure not in MEASURES:
        raise one_of("measure", MEASURES, measure)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    if any(o.name == CONFIDENCE for o in g.output):
        raise ModelError(f"the model already has an output named {CONFIDENCE!r}")
    opset = _opset(m)
    if g.output[0].type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
        raise ModelError(f"a stage's first output must be float32 logits; "
                         f"{g.output[0].name!r} is not")
    logits = g.output[0].name
    p = f"{CONFIDENCE}_"
    inits = [numpy_helper.from_array(np.array(temperature, np.float32), p + "T")]
    nodes = [helper.make_node("Div", [logits, p + "T"], [p + "scaled"]),
             helper.make_node("Softmax", [p + "scaled"], [p + "probs"], axis=-1)]
    if measure == "max-softmax":
        nodes.append(_reduce("ReduceMax", p + "probs", CONFIDENCE, opset, 18, inits))
    elif measure == "margin":
        inits.append(numpy_helper.from_array(np.array([2], np.int64), p + "k"))
        nodes += [helper.make_node("TopK", [p + "probs", p + "k"], [p + "top2", p + "idx"],
                                   axis=-1),
                  _reduce("ReduceMax", p + "top2", p + "first", opset, 18, inits),
                  _reduce("ReduceMin", p + "top2", p + "second", opset, 18, inits),
                  helper.make_node("Sub", [p + "first", p + "second"], [CONFIDENCE])]
    else:
        nodes += [helper.make_node("LogSoftmax", [p + "scaled"], [p + "logp"], axis=-1),
                  helper.make_node("Mul", [p + "probs", p + "logp"], [p + "plogp"]),
                  _reduce("ReduceSum", p + "plogp", CONFIDENCE, opset, 13, inits)]
    g.node.extend(nodes)
    g.initializer.extend(inits)
    g.output.append(helper.make_tensor_value_info(CONFIDENCE, onnx.TensorProto.FLOAT, None))
    return m
