"""GPTQ rounding of int8 weights, against onnxruntime's own kernels and quantizer."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_equalize import HERE, _images, _mobile_block

from edgeloop._onnx import session
from edgeloop.compress import Int8Static, apply_pass
from edgeloop.compress.equalize import _Graph, fold_batchnorm
from edgeloop.compress.gptq import WeightRounder, _layers, _patches
from edgeloop.compress.mixed import Int8, read_plan
from edgeloop.data import Dataset
from edgeloop.measure import predict
from edgeloop.targets import TARGETS


@pytest.mark.parametrize("attrs", [
    {"pads": [1, 1, 1, 1]},
    {"pads": [0, 1, 2, 1], "strides": [2, 1]},
    {"pads": [2, 2, 2, 2], "dilations": [2, 2], "group": 4},
    {"pads": [1, 1, 1, 1], "strides": [2, 2], "group": 8},     # depthwise
])
def test_patches_times_weights_is_onnxruntimes_conv(attrs: dict[str, object]) -> None:
    """The patches GPTQ builds its statistics from are what the Conv multiplies."""
    rng = np.random.default_rng(0)
    groups = int(attrs.get("group", 1))  # type: ignore[call-overload]
    w = rng.normal(0, 1, (8, 8 // groups, 3, 3)).astype(np.float32)
    x = rng.normal(0, 1, (2, 8, 9, 7)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="c", **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, None)], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, None)], [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    ort = session(model).run(None, {"x": x})[0]
    (layer,) = _layers(_Graph(model), ["c"])
    mine = np.matmul(_patches(x, layer), layer.weight.transpose(0, 2, 1).astype(np.float32))
    # (groups, N * positions, out per group) -> (N, C_out, H, W)
    mine = mine.reshape(groups, 2, -1, 8 // groups).transpose(1, 0, 3, 2).reshape(ort.shape)
    np.testing.assert_allclose(mine, ort, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("target", ["x86-avx512-vnni", "x86-avx2"])
def test_gptq_lowers_every_layers_output_error_in_onnxruntimes_int8_model(
        target: str) -> None:
    """Each layer's own output error, measured by onnxruntime running the real int8
    model, falls; scales, zero points, graph and integer range stay the quantizer's."""
    model = fold_batchnorm(_mobile_block("relu"))
    calib, held_out = _images(64, 11), _images(64, 12)
    q = apply_pass(Int8Static(equalize=False, channels_last_head=False,
                              target=TARGETS[target]), model, calib)
    rounded, report = WeightRounder(model, calib)(q)
    assert {r.node for r in report} == {"conv1", "dw", "pw", "pw2", "fc"}
    # never worse than nearest rounding (a layer GPTQ cannot improve keeps it)
    assert all(r.gptq <= r.nearest for r in report), report
    assert sum(r.gptq < r.nearest for r in report) >= 4, report
    # 6 samples are 6 positions for the Gemm's 8 inputs: too few to trust, kept nearest
    few_rounded, few = WeightRounder(model, calib.take(slice(0, 6)))(q)
    assert {r.node for r in few} == {"conv1", "dw", "pw", "pw2"}
    np.testing.assert_array_equal(numpy_helper.to_array(
        {i.name: i for i in few_rounded.graph.initializer}["fc.w_quantized"]),
        numpy_helper.to_array({i.name: i for i in q.graph.initializer}["fc.w_quantized"]))

    before = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    after = {i.name: numpy_helper.to_array(i) for i in rounded.graph.initializer}
    assert [n.SerializeToString() for n in q.graph.node] == [
        n.SerializeToString() for n in rounded.graph.node]
    changed = [k for k in before if not np.array_equal(before[k], after[k])]
    assert changed and all(k.endswith("_quantized") for k in changed), changed
    limit = 64 if TARGETS[target].reduce_range else 127
    assert all(np.abs(after[k].astype(int)).max() <= limit for k in changed)

    # On held-out inputs, through onnxruntime: the float model with each weight replaced
    # by what the int8 model computes with (integers times scale) — so the only error is
    # weight rounding's, accumulated layer after layer.
    layers = ["conv1", "dw", "pw", "pw2", "fc"]
    ref = _outputs(model, layers, held_out)
    err = [np.mean([np.mean((_outputs(_dequantized(model, m), layers, held_out)[k] - ref[k])
                            ** 2) / np.mean(ref[k] ** 2) for k in layers])
           for m in (q, rounded)]
    assert err[1] < 0.7 * err[0], err


def _dequantized(model: onnx.ModelProto, quantized: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with each weight ``W`` replaced by ``quantized``'s ``W_quantized * scale``."""
    q = {i.name: numpy_helper.to_array(i) for i in quantized.graph.initializer}
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for init in out.graph.initializer:
        if q.get(f"{init.name}_quantized", np.zeros(0, np.int32)).dtype == np.int8:
            scale = q[f"{init.name}_scale"]
            ints = q[f"{init.name}_quantized"].astype(np.float32)
            shape = (-1,) + (1,) * (ints.ndim - 1) if scale.size > 1 else ()
            init.CopyFrom(numpy_helper.from_array(ints * scale.reshape(shape), init.name))
    return out


def _outputs(model: onnx.ModelProto, nodes: list[str], data: Dataset) -> dict[str, np.ndarray]:
    """The first output of each of ``nodes`` (by node name) on ``data``."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    tensors = [next(n.output[0] for n in probe.graph.node if n.name == name) for name in nodes]
    for t in tensors:
        probe.graph.output.append(helper.make_tensor_value_info(t, TensorProto.FLOAT, None))
    values = session(probe).run(tensors, {"x": data.inputs["x"]})
    return dict(zip(nodes, values, strict=True))


def test_int8_scheme_rounds_static_weights_by_gptq_and_says_so() -> None:
    model = _mobile_block("relu6", seed=3)
    calib, held_out = _images(96, 21), _images(96, 22)
    ref = predict(session(model), held_out)
    kept = apply_pass(Int8(gptq=False, max_error=0.5, compare="outputs", target=HERE,
                           faster_than_float=False), model, calib)
    gptq = apply_pass(Int8(max_error=0.5, compare="outputs", target=HERE,
                           faster_than_float=False), model, calib)
    plan = read_plan(gptq)
    assert plan is not None and plan["mode"] == "static"
    # all-int8 errors with both roundings, on CALIB, decide (same graph, same speed)
    notes = plan["notes"]
    assert any(n.startswith("int8 weights rounded by GPTQ: error") for n in notes), notes
    assert not any("GPTQ" in note for note in read_plan(kept)["notes"])  # type: ignore[index]

    def cos(m: onnx.ModelProto) -> float:
        out = predict(session(m), held_out)
        return float(np.mean(np.sum(out * ref, 1)
                             / np.linalg.norm(out, axis=1) / np.linalg.norm(ref, axis=1)))

    assert 1 - cos(gptq) < 1 - cos(kept), (cos(gptq), cos(kept))
