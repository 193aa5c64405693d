"""Channels-last classifier head: fold the flatten's memory order into the head's weights.

onnxruntime runs int8 convolutions (QLinearConv) channels-last on CPU, so before a
``Flatten``/``Reshape`` to ``(N, C*S)`` it must transpose the feature map back to
channels-first, because the classifier's weights expect that order. Rewriting
``Reshape(T) -> Gemm(W)`` into ``Reshape(Transpose(T, channels last)) -> Gemm(W')``, with
the columns of ``W`` permuted to match, gives the same outputs; onnxruntime's transpose
optimizer then cancels the new Transpose against its own, and the model runs one layout
conversion fewer. The rewrite is exact (a permutation), so the float model keeps its outputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgeloop.compress.base import Pass, PassContext
from edgeloop.errors import ModelError

__all__ = ["ChannelsLastHead", "find_heads"]


@dataclass(frozen=True)
class _Head:
    flatten: str         # the Flatten/Reshape node
    feature: str         # the (N, C, *S) tensor it flattens
    shape: tuple[int, ...]   # (C, *S)
    weight: str          # the Gemm/MatMul weight initializer
    k_axis: int          # the weight axis of length C*prod(S)


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    return next((int(helper.get_attribute_value(a)) for a in node.attribute if a.name == name),
                default)


def find_heads(model: onnx.ModelProto) -> list[_Head]:
    """Every ``(N, C, *S) -> Flatten/Reshape to (N, C*S) -> Gemm/MatMul`` with constant
    weights, where the flattened tensor and the flat one have no other consumers."""
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes: dict[str, tuple[int | None, ...]] = {}
    for vi in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        dims = vi.type.tensor_type.shape.dim
        shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in dims)
    inits = {i.name: i for i in model.graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    outputs = {o.name for o in model.graph.output}
    heads = []
    for n in model.graph.node:
        if n.op_type not in ("Flatten", "Reshape"):
            continue
        if n.op_type == "Flatten" and _attr(n, "axis", 1) != 1:
            continue
        feature, flat = n.input[0], n.output[0]
        shape = shapes.get(feature, ())
        out_shape = shapes.get(flat, ())
        if (len(shape) < 3 or any(d is None for d in shape[1:]) or len(out_shape) != 2
                or out_shape[1] != int(np.prod(shape[1:]))  # type: ignore[arg-type]
                or feature in outputs or flat in outputs
                or len(consumers.get(feature, [])) != 1 or len(consumers.get(flat, [])) != 1):
            continue
        user = consumers[flat][0]
        if user.input[0] != flat or len(user.input) < 2 or user.input[1] not in inits:
            continue
        if user.op_type == "Gemm" and not _attr(user, "transA", 0):
            k_axis = 1 if _attr(user, "transB", 0) else 0
        elif user.op_type == "MatMul":
            k_axis = 0
        else:
            continue
        if sum(1 for c in consumers.get(user.input[1], [])) != 1:
            continue
        heads.append(_Head(n.name, feature, tuple(int(d) for d in shape[1:]),  # type: ignore[arg-type]
                           user.input[1], k_axis))
    return heads


@dataclass
class ChannelsLastHead(Pass):
    """Flatten feature maps channels-last and permute the classifier weights to match."""

    name: ClassVar[str] = "channels-last-head"

    def apply(self, model: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto:
        heads = find_heads(model)
        if not heads:
            raise ModelError("channels-last-head found no Flatten/Reshape feeding a Gemm or "
                             "MatMul with constant weights")
        out = onnx.ModelProto()
        out.CopyFrom(model)
        graph = out.graph
        inits = {i.name: i for i in graph.initializer}
        for head in heads:
            c, spatial = head.shape[0], head.shape[1:]
            w = numpy_helper.to_array(inits[head.weight])
            w_k_last = np.moveaxis(w, head.k_axis, -1)            # (O, C*S)
            permuted = np.moveaxis(w_k_last.reshape(-1, c, *spatial), 1, -1)
            w_new = np.moveaxis(permuted.reshape(w_k_last.shape), -1, head.k_axis)
            inits[head.weight].CopyFrom(numpy_helper.from_array(
                np.ascontiguousarray(w_new.astype(w.dtype)), head.weight))
            node = next(n for n in graph.node if n.name == head.flatten)
            moved = f"{head.feature}_channels_last"
            perm = [0, *range(2, len(head.shape) + 1), 1]
            transpose = helper.make_node("Transpose", [head.feature], [moved], perm=perm,
                                         name=f"{head.flatten}_channels_last")
            node.input[0] = moved
            graph.node.insert(list(graph.node).index(node), transpose)
        onnx.checker.check_model(out)
        return out
