"""Per-layer sensitivity and the `int8` pass on a model with one layer made sensitive on
purpose: the input of its MatMul has one channel a thousand times larger than the rest,
so per-tensor int8 activations crush the other channels there and nowhere else."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeloop._onnx import session
from edgeloop.compress import SCHEMES, Int8, apply_pass, make_scheme
from edgeloop.compress.mixed import read_plan
from edgeloop.compress.sensitivity import SwitchableModel, output_error, weighted_nodes
from edgeloop.data import Dataset
from edgeloop.errors import DataError, UsageError
from edgeloop.measure import fidelity, predict
from edgeloop.targets import detect

SENSITIVE = "mm_outlier"
# 7-bit weights where this CPU's int8 products saturate (AVX2 without VNNI): the real
# integer model is then right, and the switchable graph has to predict it
REDUCE_RANGE = detect().reduce_range


def _outlier_mlp(outlier: float = 1000.0) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w1 = rng.normal(0, 0.3, (16, 32)).astype(np.float32)
    scale = np.ones(32, np.float32)
    scale[0] = outlier                    # one huge activation channel...
    w2 = rng.normal(0, 0.3, (32, 32)).astype(np.float32)
    w2[0] /= outlier                      # ...whose own contribution stays small
    w3 = rng.normal(0, 0.3, (32, 32)).astype(np.float32)
    w4 = rng.normal(0, 0.3, (32, 10)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h1"], name="mm_first"),
        helper.make_node("Relu", ["h1"], ["r1"]),
        helper.make_node("Mul", ["r1", "scale"], ["s1"]),
        helper.make_node("MatMul", ["s1", "w2"], ["h2"], name=SENSITIVE),
        helper.make_node("Relu", ["h2"], ["r2"]),
        helper.make_node("MatMul", ["r2", "w3"], ["h3"], name="mm_third"),
        helper.make_node("Relu", ["h3"], ["r3"]),
        helper.make_node("MatMul", ["r3", "w4"], ["logits"], name="mm_head"),
    ]
    inits = [numpy_helper.from_array(a, n) for a, n in
             ((w1, "w1"), (scale, "scale"), (w2, "w2"), (w3, "w3"), (w4, "w4"))]
    graph = helper.make_graph(
        nodes, "outlier_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


@pytest.fixture(scope="module")
def model() -> onnx.ModelProto:
    return _outlier_mlp()


@pytest.fixture(scope="module")
def calib() -> Dataset:
    x = np.random.default_rng(1).normal(size=(64, 16)).astype(np.float32)
    return Dataset({"x": x})


def _dynamic(model: onnx.ModelProto, tmp_path):
    from onnxruntime.quantization import quantize_dynamic

    def quantize(only: list[str]) -> onnx.ModelProto:
        out = tmp_path / "q.onnx"
        quantize_dynamic(model, out, per_channel=True, reduce_range=REDUCE_RANGE,
                         nodes_to_quantize=only)
        return onnx.load(out)
    return quantize


def test_weighted_nodes_are_the_matmuls(model):
    names = [n.name for n in weighted_nodes(model, mode="dynamic")]
    assert names == ["mm_first", SENSITIVE, "mm_third", "mm_head"]


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_layer_made_sensitive_ranks_first(model, calib, mode):
    ref = predict(session(model), calib)
    nodes = weighted_nodes(model, mode=mode)
    switch = SwitchableModel(model, [n.name for n in nodes], calib, mode=mode,
                             per_channel=True, reduce_range=False)
    ranking = switch.ranking(calib, ref, {n.name: n.op_type for n in nodes})
    assert ranking[0].node == SENSITIVE
    assert ranking[0].error > 10 * ranking[1].error
    assert all(s.error >= 0 for s in ranking)
    errors = [s.error for s in ranking]
    assert errors == sorted(errors, reverse=True)
    assert switch.error([], calib, ref) == pytest.approx(0.0, abs=1e-9)


def test_switchable_graph_predicts_the_real_integer_model(model, calib, tmp_path):
    """Oracle: onnxruntime's own dynamic quantizer on the same single layer."""
    ref = predict(session(model), calib)
    switch = SwitchableModel(model, [n.name for n in weighted_nodes(model, mode="dynamic")],
                             calib, mode="dynamic", per_channel=True,
                             reduce_range=REDUCE_RANGE)
    for name in ("mm_first", SENSITIVE):
        real = output_error(_dynamic(model, tmp_path)([name]), calib, ref)
        assert switch.error([name], calib, ref) == pytest.approx(real, rel=0.05, abs=1e-7)


def test_int8_meets_max_error_by_keeping_the_sensitive_layer_float(model, calib):
    ref = predict(session(model), calib)
    p = Int8(max_error=1e-3, compare="outputs", timing_rounds=1, smooth=False,
             faster_than_float=False)
    out = apply_pass(p, model, calib)
    plan = p.plan_
    full_errors = [v.error for v in plan.variants]
    assert min(full_errors) > 1e-3            # all-int8 misses the bound: fallback needed
    assert plan.float_nodes and plan.float_nodes[0] == SENSITIVE
    assert len(plan.float_nodes) < len(plan.sensitivity)   # not everything went float
    measured = output_error(out, calib, ref)
    assert measured <= 1e-3
    assert measured == pytest.approx(plan.error, abs=1e-9)
    assert read_plan(out)["float_nodes"] == plan.float_nodes
    quantized_ops = {n.op_type for n in out.graph.node}
    assert quantized_ops & {"MatMulInteger", "DynamicQuantizeLinear", "QuantizeLinear"}


def _sensitive_gemm(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with the sensitive MatMul as a Gemm with a (zero) bias."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    node = next(n for n in out.graph.node if n.name == SENSITIVE)
    node.op_type = "Gemm"
    node.input.append("gemm_bias")
    out.graph.initializer.append(numpy_helper.from_array(np.zeros(32, np.float32),
                                                         "gemm_bias"))
    return out


def test_dynamic_int8_keeps_an_excluded_gemm_float(calib, tmp_path):
    """onnxruntime's dynamic quantizer runs a Gemm as '{name}_MatMul': excluding the Gemm
    by its own name must still keep it float."""
    gemm = _sensitive_gemm(_outlier_mlp())
    assert SENSITIVE in [n.name for n in weighted_nodes(gemm, mode="dynamic")]
    out = apply_pass(make_scheme("int8-dynamic", nodes_to_exclude=[SENSITIVE]), gemm, calib)
    integer_weights = {n.input[1] for n in out.graph.node if n.op_type == "MatMulInteger"}
    assert len(integer_weights) == 3 and not any("w2" in w for w in integer_weights)


def test_int8_falls_back_by_layer_in_a_graph_whose_nodes_have_no_names(model, calib):
    """Hand-built graphs often leave node names empty; float fallback picks layers by name,
    so int8 names them (the device check's MLP once failed here: two '_fq' twins)."""
    unnamed = _sensitive_gemm(model)
    position = [n.name for n in unnamed.graph.node].index(SENSITIVE)
    for node in unnamed.graph.node:
        node.name = ""
    p = Int8(max_error=1e-3, compare="outputs", timing_rounds=1, smooth=False,
             faster_than_float=False)
    out = apply_pass(p, unnamed, calib)
    assert p.plan_.float_nodes[0] == f"edgeloop_node{position}"
    assert output_error(out, calib, predict(session(model), calib)) <= 1e-3


def test_int8_keeps_everything_int8_without_outliers(calib):
    p = Int8(max_error=0.01, compare="outputs", timing_rounds=1, faster_than_float=False)
    out = apply_pass(p, _outlier_mlp(outlier=1.0), calib)
    assert p.plan_.float_nodes == []
    assert p.plan_.sensitivity == []
    assert p.plan_.error <= 0.01
    ops = [n.op_type for n in out.graph.node]
    if p.plan_.mode == "dynamic":
        assert "MatMul" not in ops
    else:
        assert ops.count("DequantizeLinear") >= 4   # one per weight at least
    assert {v.mode for v in p.plan_.variants} == {"dynamic", "static"}


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.0, 3.0])
def test_max_error_out_of_range_is_a_usage_error(bad):
    with pytest.raises(UsageError, match="max-error"):
        make_scheme("int8", max_error=bad)


def test_int8_is_registered_and_needs_calibration(model):
    assert SCHEMES["int8"] is Int8
    with pytest.raises(DataError, match="calibration"):
        apply_pass(Int8(), model, None)


def _matmul_chain(width: int, depth: int) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits, nodes, prev = [], [], "x"
    for i in range(depth):
        inits.append(numpy_helper.from_array(
            (rng.standard_normal((width, width)) / width).astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"h{i}"]))
        prev = f"h{i}"
    nodes.append(helper.make_node("Identity", [prev], ["y"]))
    graph = helper.make_graph(
        nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, width])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_interleaved_latency_ranks_a_much_larger_model_slower():
    from edgeloop.measure import interleaved_latency

    small, large = _matmul_chain(256, 1), _matmul_chain(256, 40)   # 40x the work
    data = Dataset({"x": np.ones((4, 256), np.float32)})
    lat = interleaved_latency([small, large, small], data, batch=4, rounds=3, runs=5,
                              warmup=2, threads=1)
    assert len(lat) == 3 and all(t > 0 for t in lat)
    assert lat[1] > 3 * max(lat[0], lat[2])


def _conv_chain() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits, nodes, prev = [], [], "x"
    for i in range(3):
        inits += [numpy_helper.from_array(rng.normal(0, 0.3, (8, 8, 3, 3)).astype(np.float32),
                                          f"w{i}"),
                  numpy_helper.from_array(np.zeros(8, np.float32), f"b{i}")]
        nodes += [helper.make_node("Conv", [prev, f"w{i}", f"b{i}"], [f"c{i}"], name=f"conv{i}",
                                   pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"])]
        prev = f"r{i}"
    graph = helper.make_graph(
        nodes, "convs", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 16, 16])],
        [helper.make_tensor_value_info(prev, TensorProto.FLOAT, ["N", 8, 16, 16])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_layer_kept_float_in_static_int8_really_runs_in_float(tmp_path):
    """onnxruntime quantizes an excluded Conv's weights itself at load time when it sits
    between a DequantizeLinear and a QuantizeLinear; the fallback must prevent that."""
    from onnxruntime.quantization import QuantFormat, quantize_static

    from edgeloop._onnx import optimized_graph
    from edgeloop.compress.calibrate import NpzReader
    from edgeloop.compress.mixed import _float_inputs

    model = _conv_chain()
    data = Dataset({"x": np.random.default_rng(2).normal(size=(8, 8, 16, 16))
                    .astype(np.float32)})
    onnx.save(model, tmp_path / "m.onnx")
    quantize_static(tmp_path / "m.onnx", tmp_path / "q.onnx", NpzReader(data),
                    quant_format=QuantFormat.QDQ, per_channel=True, nodes_to_exclude=["conv1"])
    plain = onnx.load(tmp_path / "q.onnx")

    def float_convs(m: onnx.ModelProto) -> int:
        return sum(n.op_type in ("Conv", "FusedConv") for n in optimized_graph(m).graph.node)

    assert float_convs(plain) == 0            # onnxruntime made the excluded conv int8 anyway
    # conv1 runs in float; so may conv0, whose output is no longer quantized for conv1
    fixed = _float_inputs(plain, ["conv1"])
    assert 1 <= float_convs(fixed) <= 2
    # The quantizer dropped the Relu after conv0 (the quantized range clamps instead); the
    # float conv1 must still see clamped values. Unclamped, the cosine here is about 0.8.
    got, want = predict(session(fixed), data), predict(session(model), data)
    assert fidelity(got, want).mean_cosine > 0.99


def test_the_bound_compares_top1_decisions_of_classifier_logits_only(calib):
    from edgeloop.compress.mixed import _is_classifier

    logits = _outlier_mlp(outlier=1.0)                 # 2-D output [N, 10] of a MatMul
    assert _is_classifier(logits)
    assert not _is_classifier(_matmul_chain(16, 2))    # written by an Identity
    one_wide = _outlier_mlp(outlier=1.0)
    one_wide.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 1
    assert not _is_classifier(one_wide)                # a regression output decides nothing
    p = Int8(timing_rounds=1, faster_than_float=False)
    out = apply_pass(p, logits, calib)
    assert (p.plan_.compare, p.plan_.max_error) == ("top1", 0.02)
    got = fidelity(predict(session(out), calib), predict(session(logits), calib))
    assert p.plan_.error == pytest.approx(1 - got.top1_agreement, abs=1e-9)
    with pytest.raises(UsageError, match="compare"):
        make_scheme("int8", compare="cosine")
