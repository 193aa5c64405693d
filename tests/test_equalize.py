"""Cross-layer equalization, bias correction and the int32 bias guard, against onnxruntime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

from edgeloop._onnx import session
from edgeloop.compress import Int8Static, apply_pass
from edgeloop.compress.calibrate import NpzReader
from edgeloop.compress.equalize import (
    bias_safe_weight_scale,
    correct_bias,
    equalize,
    fold_batchnorm,
    quantize_weight,
    saturated_biases,
)
from edgeloop.data import Dataset
from edgeloop.errors import UsageError
from edgeloop.measure import fidelity, predict
from edgeloop.targets import TARGETS, detect

VNNI = TARGETS["x86-avx512-vnni"]
# The integer layout this CPU runs exactly (7-bit weights on AVX2 without VNNI): the real
# int8 models below are judged by their fidelity here, not by saturation.
HERE = detect()


def _images(n: int, seed: int) -> Dataset:
    """Smooth, image-like inputs (low-frequency noise upsampled), NCHW 3x16x16."""
    rng = np.random.default_rng(seed)
    coarse = rng.normal(0, 1, (n, 3, 4, 4)).astype(np.float32)
    return Dataset({"x": np.repeat(np.repeat(coarse, 4, 2), 4, 3)
                    + 0.1 * rng.normal(0, 1, (n, 3, 16, 16)).astype(np.float32)})


def _mobile_block(act: str, *, dead: bool = False, seed: int = 0) -> onnx.ModelProto:
    """conv 3x3 -> BatchNorm -> act -> depthwise 3x3 (stride 2) -> act -> pointwise -> act
    -> pointwise -> GlobalAveragePool -> Flatten -> Gemm: a MobileNet block in miniature.
    BatchNorm scales spread log-normally (sigma 1.5), as in pretrained models; with
    ``dead``, one channel's gamma is 1e-7 and its beta 2.0 (a near-dead channel)."""
    rng = np.random.default_rng(seed)
    inits = []

    def const(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
        return name

    def conv(x: str, name: str, c_out: int, c_in: int, k: int, **attrs: object) -> str:
        w = rng.normal(0, np.sqrt(2 / (c_in * k * k)), (c_out, c_in, k, k))
        if attrs.get("group", 1) != 1:   # depthwise: per-channel ranges spread 100x
            w *= rng.lognormal(0, 1.5, (c_out, 1, 1, 1))
        b = rng.normal(0, 0.1, c_out)
        nodes.append(helper.make_node("Conv", [x, const(f"{name}.w", w), const(f"{name}.b", b)],
                                      [name], name=name, **attrs))
        return name

    def activation(x: str, name: str) -> str:
        if act == "relu":
            nodes.append(helper.make_node("Relu", [x], [name], name=name))
        else:
            nodes.append(helper.make_node("Clip", [x, const(f"{name}.lo", 0.0),
                                                   const(f"{name}.hi", 6.0)], [name], name=name))
        return name

    nodes: list[onnx.NodeProto] = []
    h = conv("x", "conv1", 16, 3, 3, pads=[1, 1, 1, 1])
    gamma = rng.lognormal(0, 1.5, 16)
    beta = rng.normal(0, 0.2, 16)
    if dead:
        gamma[5], beta[5] = 1e-7, 2.0
    nodes.append(helper.make_node(
        "BatchNormalization", [h, const("bn.g", gamma), const("bn.b", beta),
                               const("bn.m", rng.normal(0, 0.1, 16)),
                               const("bn.v", rng.uniform(0.5, 2, 16))], ["bn"], name="bn"))
    h = activation("bn", "act1")
    h = conv(h, "dw", 16, 1, 3, group=16, pads=[1, 1, 1, 1], strides=[2, 2])
    h = activation(h, "act2")
    h = activation(conv(h, "pw", 24, 16, 1), "act3")
    h = conv(h, "pw2", 8, 24, 1)
    nodes.append(helper.make_node("GlobalAveragePool", [h], ["gap"], name="gap"))
    nodes.append(helper.make_node("Flatten", ["gap"], ["flat"], name="flat"))
    nodes.append(helper.make_node("Gemm", ["flat", const("fc.w", rng.normal(0, 1, (10, 8))),
                                           const("fc.b", np.zeros(10))], ["y"], name="fc",
                                  transB=1))
    graph = helper.make_graph(
        nodes, "block", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _close(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_batchnorm_folding_keeps_outputs() -> None:
    model = _mobile_block("relu")
    folded = fold_batchnorm(model)
    assert "BatchNormalization" not in {n.op_type for n in folded.graph.node}
    data = _images(16, 1)
    assert _close(predict(session(folded), data), predict(session(model), data)) < 1e-5


def test_equalization_keeps_float_outputs_and_equalizes_ranges() -> None:
    model = fold_batchnorm(_mobile_block("relu"))
    data = _images(32, 2)
    eq, pairs = equalize(model, relu6="skip")
    assert [(p.first, p.second) for p in pairs] == [("conv1", "dw"), ("dw", "pw"),
                                                    ("pw", "pw2")]
    assert _close(predict(session(eq), data), predict(session(model), data)) < 1e-4
    for p in pairs[:2]:   # the depthwise conv's spread (100x and more) must shrink
        assert p.spread_after < p.spread_before / 3, p
    dw = {i.name: numpy_helper.to_array(i) for i in eq.graph.initializer}["dw.w"]
    r = np.abs(dw).reshape(16, -1).max(1)
    assert r.max() / r.min() == pytest.approx(pairs[1].spread_after, rel=1e-3)


def test_relu6_bounded_is_exact_on_calibration_data() -> None:
    model = fold_batchnorm(_mobile_block("relu6"))
    calib = _images(64, 3)
    with pytest.raises(UsageError):
        equalize(model)           # bounded mode needs the calibration data
    eq, pairs = equalize(model, calib)
    assert len(pairs) == 3 and all(p.activation in ("Clip", "Identity") for p in pairs)
    ref = predict(session(model), calib)
    assert _close(predict(session(eq), calib), ref) < 1e-4
    assert pairs[0].spread_after < pairs[0].spread_before
    # "relu" (DFQ's replacement) changes the float function where ReLU6 clips.
    relu, _ = equalize(model, relu6="relu")
    assert "Clip" not in {n.op_type for n in relu.graph.node}
    assert not {"act1.hi", "act2.hi"} & {i.name for i in relu.graph.initializer}
    session(relu)


def test_quantize_weight_reproduces_onnxruntime() -> None:
    model = fold_batchnorm(_mobile_block("relu"))
    calib = _images(32, 4)
    for reduce_range in (False, True):
        target = TARGETS["x86-avx2"] if reduce_range else VNNI
        q = apply_pass(Int8Static(equalize=False, channels_last_head=False, target=target),
                       model, calib)
        inits = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
        floats = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        dq = {n.input[0]: n for n in q.graph.node if n.op_type == "DequantizeLinear"
              and inits.get(n.input[0], np.zeros(0, np.float32)).dtype == np.int8}
        for name in ("conv1.w", "dw.w", "pw.w"):
            node = dq[f"{name}_quantized"]
            scale = inits[node.input[1]].reshape(-1, 1, 1, 1)
            ort = inits[node.input[0]].astype(np.float32) * scale
            mine, _ = quantize_weight(floats[name], axis=0, per_channel=True,
                                      reduce_range=reduce_range)
            np.testing.assert_array_equal(mine, ort)


def test_bias_correction_removes_the_weight_rounding_shift() -> None:
    model = fold_batchnorm(_mobile_block("relu"))
    calib, held_out = _images(64, 5), _images(64, 6)
    corrected = correct_bias(model, calib, per_channel=False, batch_size=16)

    def rounded(m: onnx.ModelProto) -> onnx.ModelProto:
        """``m`` with every Conv weight replaced by Q(W), per tensor (biases kept)."""
        out = onnx.ModelProto()
        out.CopyFrom(m)
        for init in out.graph.initializer:
            if init.name.endswith(".w") and init.name != "fc.w":
                w, _ = quantize_weight(numpy_helper.to_array(init), axis=0,
                                       per_channel=False, reduce_range=False)
                init.CopyFrom(numpy_helper.from_array(w, init.name))
        return out

    ref = predict(session(model), held_out)
    shift = np.abs((predict(session(rounded(model)), held_out) - ref).mean(0)).mean()
    fixed = np.abs((predict(session(rounded(corrected)), held_out) - ref).mean(0)).mean()
    assert fixed < shift / 2, (fixed, shift)
    # And through onnxruntime's real int8 model (per-tensor weights, so rounding matters).
    plain = apply_pass(Int8Static(per_channel=False, equalize=False, target=HERE), model, calib)
    with_bc = apply_pass(Int8Static(per_channel=False, equalize=False, bias_correction=True,
                                    target=HERE), model, calib)
    err = [np.abs((predict(session(q), held_out) - ref).mean(0)).mean() for q in (plain, with_bc)]
    assert err[1] < err[0], err


def test_dead_channel_gets_no_saturated_int32_bias(tmp_path: Path) -> None:
    model = fold_batchnorm(_mobile_block("relu", dead=True))
    w = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    assert np.abs(w["conv1.w"][5]).max() < 1e-6 and abs(w["conv1.b"][5]) > 1.0
    calib, held_out = _images(64, 7), _images(128, 8)
    q = apply_pass(Int8Static(equalize=False, target=HERE), model, calib)
    assert saturated_biases(q) == {}
    f = fidelity(predict(session(q), held_out), predict(session(model), held_out))
    assert f.top1_agreement >= 0.9 and f.mean_cosine >= 0.99, f
    # Without onnxruntime's weight-scale adjustment the dead channel's bias overflows.
    onnx.save(model, tmp_path / "in.onnx")
    quantize_static(tmp_path / "in.onnx", tmp_path / "out.onnx", NpzReader(calib),
                    quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax,
                    extra_options={"QDQDisableWeightAdjustForInt32Bias": True})
    unguarded = onnx.load(tmp_path / "out.onnx")
    assert saturated_biases(unguarded)
    # The floor for code that quantizes biases itself.
    scale = np.abs(w["conv1.w"]).reshape(16, -1).max(1) / 127
    safe = bias_safe_weight_scale(scale, w["conv1.b"], 0.02)
    assert np.all(np.abs(w["conv1.b"] / (0.02 * safe.astype(np.float64))) < 2**31 - 1)
    assert np.array_equal(safe[np.arange(16) != 5], scale[np.arange(16) != 5].astype(np.float32))
