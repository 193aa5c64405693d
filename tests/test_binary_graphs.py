"""binary on graphs as users build them: unnamed nodes and an opset before BitwiseAnd."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from edgeloop._onnx import run, session
from edgeloop.compress import Binary, apply_pass
from edgeloop.data import Dataset


def test_unnamed_nodes_at_opset_17() -> None:
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((40, 64)).astype(np.float32)
    w2 = rng.standard_normal((64, 10)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "w2"], ["y"])], "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 40])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(np.ones(64, np.float32), "b1"),
         numpy_helper.from_array(w2, "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = rng.standard_normal((256, 40)).astype(np.float32)
    out = apply_pass(Binary(), model, Dataset({"x": x}))
    assert [n.name for n in model.graph.node] == ["", "", ""]   # the input is untouched
    assert sum(n.op_type == "BitwiseAnd" for n in out.graph.node) == 2   # both layers
    # the float model is the oracle; 1-bit weights on this random MLP keep ~0.7 cosine
    got, want = run(session(out), {"x": x}), run(session(model), {"x": x})
    cosine = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cosine.mean() > 0.6
