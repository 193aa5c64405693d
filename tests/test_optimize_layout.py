"""The channels-last classifier head that optimize tries before static int8: exact on the
float model, and onnxruntime's int8 graph loses a layout Transpose."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeloop._onnx import optimized_graph, session
from edgeloop.compress import Int8Static, apply_pass
from edgeloop.compress.layout import ChannelsLastHead, find_heads
from edgeloop.data import Dataset
from edgeloop.errors import ModelError


def _cnn(head: str, rank: int = 1) -> onnx.ModelProto:
    """x (N, 2, 12[, 12]) -> Conv(8) -> Relu -> Flatten|Reshape -> Gemm|MatMul -> (N, 5)."""
    rng = np.random.default_rng(0)
    spatial = (12,) * rank
    k = 8 * int(np.prod(spatial))
    conv_w = rng.normal(size=(8, 2, *(3,) * rank)).astype(np.float32)
    inits = [numpy_helper.from_array(conv_w, "cw"),
             numpy_helper.from_array(rng.normal(size=8).astype(np.float32), "cb"),
             numpy_helper.from_array(np.array([0, -1], np.int64), "flat")]
    nodes = [helper.make_node("Conv", ["x", "cw", "cb"], ["c"], pads=[1, 1] * rank, name="conv"),
             helper.make_node("Relu", ["c"], ["r"], name="relu")]
    if head == "gemm-transB":
        nodes.append(helper.make_node("Flatten", ["r"], ["f"], axis=1, name="flatten"))
        w = rng.normal(size=(5, k)).astype(np.float32)
        nodes.append(helper.make_node("Gemm", ["f", "w", "b"], ["y"], transB=1, name="head"))
        inits += [numpy_helper.from_array(w, "w"),
                  numpy_helper.from_array(rng.normal(size=5).astype(np.float32), "b")]
    else:
        nodes.append(helper.make_node("Reshape", ["r", "flat"], ["f"], name="flatten"))
        w = rng.normal(size=(k, 5)).astype(np.float32)
        op = "Gemm" if head == "gemm" else "MatMul"
        nodes.append(helper.make_node(op, ["f", "w"], ["y"], name="head"))
        inits.append(numpy_helper.from_array(w, "w"))
    graph = helper.make_graph(
        nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                     ["N", 2, *spatial])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize(("head", "rank"), [("gemm-transB", 1), ("gemm", 1), ("matmul", 1),
                                            ("gemm-transB", 2)])
def test_rewrite_is_exact_on_the_float_model(head: str, rank: int) -> None:
    model = _cnn(head, rank)
    x = np.random.default_rng(1).normal(size=(4, 2, *(12,) * rank)).astype(np.float32)
    out = apply_pass(ChannelsLastHead(), model)
    before = session(model).run(None, {"x": x})[0]
    after = session(out).run(None, {"x": x})[0]
    np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-4)
    assert Counter(n.op_type for n in out.graph.node)["Transpose"] == 1


def test_int8_graph_loses_the_layout_transpose() -> None:
    model = _cnn("gemm-transB")
    calib = Dataset({"x": np.random.default_rng(2).normal(size=(64, 2, 12)).astype(np.float32)})
    plain = apply_pass(Int8Static(channels_last_head=False), model, calib)
    moved = apply_pass(Int8Static(), model, calib)     # channels_last_head by default

    def transposes(m: onnx.ModelProto) -> int:
        return Counter(n.op_type for n in optimized_graph(m).graph.node)["Transpose"]

    assert transposes(moved) < transposes(plain)


def test_no_head_is_a_model_error() -> None:
    model = _cnn("matmul")
    model.graph.output[0].name = "f"          # the flat tensor is a graph output: no rewrite
    model.graph.node.pop()
    assert find_heads(model) == []
    with pytest.raises(ModelError, match="channels-last-head found no"):
        apply_pass(ChannelsLastHead(), model)
