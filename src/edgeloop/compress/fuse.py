"""Graph preparation before quantization.

- :class:`Preprocess`: onnxruntime's own pre-processing (symbolic shape inference, its
  basic graph optimizations such as constant folding and Conv+BatchNorm fusion, and ONNX
  shape inference), which its quantizer documents as the step before quantizing.
- :func:`gemm_to_matmul`: rewrites ``Gemm(x, W, b)`` with constant weights into
  ``MatMul(x, W') + b``, because onnxruntime's block-wise weight quantizers only handle
  MatMul.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnxruntime.quantization.shape_inference import quant_pre_process

from edgeloop.compress.base import Pass, PassContext


@dataclass
class Preprocess(Pass):
    """onnxruntime's quantization pre-processing (graph optimization and shape inference)."""

    name: ClassVar[str] = "preprocess"

    def apply(self, model: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto:
        out = ctx.scratch("preprocessed.onnx")
        quant_pre_process(ctx.save(model, "preprocess-in.onnx"), out)
        return onnx.load(out)


def _attr(node: onnx.NodeProto, name: str, default: float | int) -> float | int:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def gemm_to_matmul(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with every constant-weight Gemm (on 2-D input) as MatMul [+ Add]."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    inits = {i.name: i for i in graph.initializer}
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        if (node.op_type != "Gemm" or node.input[1] not in inits
                or _attr(node, "transA", 0) or _attr(node, "alpha", 1.0) != 1.0
                or (_attr(node, "beta", 1.0) != 1.0 and len(node.input) > 2
                    and node.input[2] not in inits)):
            nodes.append(node)
            continue
        w = numpy_helper.to_array(inits[node.input[1]])
        if _attr(node, "transB", 0):
            w = w.T
        w_name = f"{node.input[1]}_matmul"
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w), w_name))
        has_bias = len(node.input) > 2 and node.input[2]
        mm_out = f"{node.output[0]}_matmul" if has_bias else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], w_name], [mm_out],
                                      name=f"{node.name}_MatMul"))
        if has_bias:
            bias = node.input[2]
            beta = float(_attr(node, "beta", 1.0))
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
