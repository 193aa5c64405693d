"""SmoothQuant scale migration on an encoder block whose LayerNorm output has outlier
channels, as pretrained transformers' do, and which also feeds a residual add (so the
scales cannot fold into the LayerNorm and a Mul is inserted)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import QuantType, quantize_dynamic

from edgeloop._onnx import session
from edgeloop.compress import apply_pass
from edgeloop.compress.sensitivity import output_error
from edgeloop.compress.smooth import Smooth, channel_max, smooth
from edgeloop.data import Dataset
from edgeloop.errors import UsageError
from edgeloop.measure import predict

HIDDEN, OUTLIERS = 64, (5, 40)


def _block(*, residual: bool, outlier_gain: float = 60.0) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    gamma = np.ones(HIDDEN, np.float32)
    gamma[list(OUTLIERS)] = outlier_gain  # two channels this many times larger
    w_q = rng.normal(0, 0.1, (HIDDEN, HIDDEN)).astype(np.float32)
    w_v = rng.normal(0, 0.1, (HIDDEN, HIDDEN)).astype(np.float32)
    w_o = rng.normal(0, 0.1, (2 * HIDDEN, HIDDEN)).astype(np.float32)
    nodes = [
        helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["ln"], axis=-1),
        helper.make_node("MatMul", ["ln", "w_q"], ["q"], name="q_proj"),
        helper.make_node("MatMul", ["ln", "w_v"], ["v"], name="v_proj"),
        helper.make_node("Concat", ["q", "v"], ["qv"], axis=-1),
        helper.make_node("Relu", ["qv"], ["r"]),
        helper.make_node("MatMul", ["r", "w_o"], ["o"], name="o_proj"),
    ]
    if residual:
        nodes.append(helper.make_node("Add", ["o", "ln"], ["y"]))
    else:
        nodes.append(helper.make_node("Identity", ["o"], ["y"]))
    inits = [numpy_helper.from_array(a, n) for a, n in (
        (gamma, "gamma"), (np.zeros(HIDDEN, np.float32), "beta"), (w_q, "w_q"),
        (w_v, "w_v"), (w_o, "w_o"))]
    graph = helper.make_graph(
        nodes, "block", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, HIDDEN])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, HIDDEN])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture(scope="module")
def data() -> Dataset:
    return Dataset({"x": np.random.default_rng(1).normal(size=(48, 8, HIDDEN)).astype(np.float32)})


@pytest.mark.parametrize("residual", [True, False])
def test_smoothing_keeps_the_float_outputs_and_evens_the_channels(data, residual):
    model = _block(residual=residual)
    smoothed, tensors = smooth(model, data)
    assert tensors == ["ln"]                     # o_proj's input has no outliers: untouched
    ref, got = predict(session(model), data), predict(session(smoothed), data)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
    ops = [n.op_type for n in smoothed.graph.node]
    # the residual needs the unscaled LayerNorm output: a Mul is inserted; without it the
    # scales fold into the LayerNorm
    assert ("Mul" in ops) == residual
    product_input = next(n.input[0] for n in smoothed.graph.node if n.name == "q_proj")
    before = channel_max(model, data, ["ln"])["ln"]
    after = channel_max(smoothed, data, [product_input])[product_input]
    assert before.max() / np.median(before) > 30
    assert after.max() / np.median(after) < before.max() / np.median(before) / 4


@pytest.mark.parametrize("residual", [True, False])
def test_a_moderate_spread_is_smoothed_only_where_no_mul_is_needed(data, residual):
    """Outlier channels 6x the rest: worth folding into the LayerNorm (free), not worth
    an inserted Mul (below ``mul_min_ratio``); a lower bar smooths it either way."""
    model = _block(residual=residual, outlier_gain=6.0)
    ratio = channel_max(model, data, ["ln"])["ln"]
    assert 4 < ratio.max() / np.median(ratio) < 8
    assert smooth(model, data)[1] == ([] if residual else ["ln"])
    smoothed, tensors = smooth(model, data, mul_min_ratio=4.0)
    assert tensors == ["ln"]
    assert ("Mul" in [n.op_type for n in smoothed.graph.node]) == residual


def test_smoothing_cuts_the_dynamic_int8_error(data, tmp_path):
    """Oracle: onnxruntime's stock dynamic quantizer on the model before and after."""
    model = _block(residual=True)
    ref = predict(session(model), data)
    errors = []
    for m in (model, apply_pass(Smooth(), model, data)):
        onnx.save(m, tmp_path / "m.onnx")
        quantize_dynamic(tmp_path / "m.onnx", tmp_path / "q.onnx", weight_type=QuantType.QInt8,
                         per_channel=True)
        errors.append(output_error(onnx.load(tmp_path / "q.onnx"), data, ref))
    assert errors[1] < errors[0] / 3


def test_alpha_out_of_range_is_a_usage_error():
    with pytest.raises(UsageError, match="alpha"):
        Smooth(alpha=1.5)
