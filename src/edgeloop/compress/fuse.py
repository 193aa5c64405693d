"""Graph preparation before quantization.

- :class:`Preprocess`: onnxruntime's own pre-processing (symbolic shape inference, its
  basic graph optimizations such as constant folding and Conv+BatchNorm fusion, and ONNX
  shape inference), which its quantizer documents as the step before quantizing.
- :func:`gemm_to_matmul`: rewrites ``Gemm(x, W, b)`` with constant weights into
  ``MatMul(x, W') + b``, because onnxruntime's block-wise weight quantizers only handle
  MatMul.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnxruntime.quantization.shape_inference import quant_pre_process

from edgeloop._onnx import attr
from edgeloop.compress.base import Pass, PassContext

PREPARATION_KEY = "edgeloop.preparation"

# onnxruntime's pre-processing, from the most to the least thorough: (name, keyword
# arguments of quant_pre_process). Symbolic shape inference gives up on some exports
# (e.g. BERT exported by torch's TorchScript exporter: "Incomplete symbolic shape
# inference"); the quantizer still works from ONNX's own shape inference.
_LADDER = (
    ("symbolic-shapes", {}),
    ("symbolic-shapes-merged", {"auto_merge": True}),
    ("onnx-shapes", {"skip_symbolic_shape": True}),
    ("onnx-shapes-unoptimized", {"skip_symbolic_shape": True, "skip_optimization": True}),
)


@dataclass
class Preprocess(Pass):
    """onnxruntime's quantization pre-processing (graph optimization and shape inference),
    with fallbacks: when a step fails on this graph the next, less thorough form is used,
    and as a last resort the graph as given. ``used_`` names the form used and ``tried_``
    why the ones before it failed; the output model records both under
    :data:`PREPARATION_KEY` in its metadata."""

    name: ClassVar[str] = "preprocess"

    def apply(self, model: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto:
        src = ctx.save(model, "preprocess-in.onnx")
        out = ctx.scratch("preprocessed.onnx")
        self.tried_: list[tuple[str, str]] = []
        for step, kwargs in _LADDER:
            try:
                quant_pre_process(str(src), str(out), **kwargs)
                result = onnx.load(out)
            except Exception as e:  # onnxruntime raises bare Exceptions here
                self.tried_.append((step, _first_line(e)))
                continue
            self.used_ = step
            return record_preparation(result, step, self.tried_)
        self.used_ = "none"
        plain = onnx.ModelProto()
        plain.CopyFrom(model)
        return record_preparation(plain, "none", self.tried_)


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:200]


def record_preparation(model: onnx.ModelProto, used: str,
                       tried: list[tuple[str, str]]) -> onnx.ModelProto:
    """Store which graph preparation ``model`` went through (and why more thorough ones
    were skipped) in its metadata, replacing an earlier record."""
    value = json.dumps({"used": used, "failed": [{"step": s, "error": e} for s, e in tried]})
    kept = [p for p in model.metadata_props if p.key != PREPARATION_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    model.metadata_props.append(onnx.StringStringEntryProto(key=PREPARATION_KEY, value=value))
    return model


def read_preparation(model: onnx.ModelProto) -> dict[str, object] | None:
    """The preparation record :func:`record_preparation` stored, or ``None``."""
    for prop in model.metadata_props:
        if prop.key == PREPARATION_KEY:
            return json.loads(prop.value)
    return None


def gemm_to_matmul(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with every constant-weight Gemm (on 2-D input) as MatMul [+ Add]."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    inits = {i.name: i for i in graph.initializer}
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        if (node.op_type != "Gemm" or node.input[1] not in inits
                or attr(node, "transA", 0) or attr(node, "alpha", 1.0) != 1.0
                or (attr(node, "beta", 1.0) != 1.0 and len(node.input) > 2
                    and node.input[2] not in inits)):
            nodes.append(node)
            continue
        w = numpy_helper.to_array(inits[node.input[1]])
        if attr(node, "transB", 0):
            w = w.T
        w_name = f"{node.input[1]}_matmul"
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w), w_name))
        has_bias = len(node.input) > 2 and node.input[2]
        mm_out = f"{node.output[0]}_matmul" if has_bias else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], w_name], [mm_out],
                                      name=f"{node.name}_MatMul"))
        if has_bias:
            bias = node.input[2]
            beta = float(attr(node, "beta", 1.0))
            if beta != 1.0:
                scaled = numpy_helper.to_array(inits[bias]) * beta
                bias = f"{bias}_scaled"
                graph.initializer.append(numpy_helper.from_array(scaled.astype(np.float32),
                                                                 bias))
            nodes.append(helper.make_node("Add", [mm_out, bias], [node.output[0]],
                                          name=f"{node.name}_Add"))
    del graph.node[:]
    graph.node.extend(nodes)
    used = {i for n in graph.node for i in n.input}
    keep = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return out


def drop_zero_bias_zero_points(model: onnx.ModelProto) -> onnx.ModelProto:
    """Remove all-zero int32 zero points from bias DequantizeLinear nodes (zero is the
    default, so the graph means the same), and drop intermediate value_info.

    onnxruntime still fuses these into QLinearConv/QGemm; on small CNNs it trims about 5%
    of the int8 file. Weight zero points stay: the QGemm fusion needs them.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    inits = {i.name: i for i in graph.initializer}
    for node in graph.node:
        if (node.op_type == "DequantizeLinear" and len(node.input) == 3
                and node.input[2] in inits and node.input[0] in inits
                and inits[node.input[2]].data_type == onnx.TensorProto.INT32
                and not numpy_helper.to_array(inits[node.input[2]]).any()):
            del node.input[2]
    used = {i for n in graph.node for i in n.input}
    keep = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    del graph.value_info[:]
    return out
