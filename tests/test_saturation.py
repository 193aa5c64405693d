"""Correct integer models on both x86 kinds, whatever CPU the tests run on.

On x86 without VNNI, onnxruntime's U8S8 kernels add pairs of uint8 x int8 products into
saturating int16s (AVX2 ``vpmaddubsw``), so full-range 8-bit weights give wrong results
there while the same model is exact on a VNNI machine. Two checks, both independent of the
CPU under test:

- :func:`edgeloop.targets.saturation_risks`, a pure check of a quantized graph, against
  graphs whose answer is known and against every scheme's output for ``x86-avx2``;
- the real AVX2 kernels: the models run under QEMU user-mode emulation of a Haswell CPU
  (AVX2, no AVX-512, no VNNI), where onnxruntime's MLAS dispatches its AVX2 kernels. The
  oracles hold on either kind of host: the exact integer result computed in float64, or
  onnxruntime with graph optimizations off (QDQ computed in float), and the float model.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

from edgeloop._onnx import session
from edgeloop.compress import SCHEMES, apply_pass
from edgeloop.compress.qat import quantize_export
from edgeloop.data import load_builtin
from edgeloop.targets import TARGETS, detect, saturation_risks
from edgeloop.zoo import load_checkpoint

AVX2 = TARGETS["x86-avx2"]
VNNI = TARGETS["x86-avx512-vnni"]
QEMU = shutil.which("qemu-x86_64")
emulated = pytest.mark.skipif(
    QEMU is None or platform.machine().lower() not in ("x86_64", "amd64"),
    reason="qemu-x86_64 not found (Debian/Ubuntu: apt-get install qemu-user): the AVX2 "
           "kernels cannot be run on this machine")
CALIB = load_builtin("mnist1d", "calib").take(slice(0, 256))
VAL = load_builtin("mnist1d", "val").take(slice(0, 200))


# --- hand-built graphs whose answer is known -----------------------------------------------

def _qdq(op: str, w: np.ndarray, *, act: type = np.uint8, group: int = 1) -> onnx.ModelProto:
    """x -> Q/DQ (8-bit ``act``) -> ``op`` with DQ(int8 ``w``) -> y. onnxruntime runs a
    MatMul as MatMulIntegerToFloat (float output: the integer sums show exactly); a Conv
    only fuses into QLinearConv with its output quantized too, so Conv gets an output Q/DQ
    whose range (scale 10) holds every sum. Only the kernel's arithmetic can go wrong."""
    inits = [numpy_helper.from_array(np.array(0.1, np.float32), "s"),
             numpy_helper.from_array(np.array(0, act), "z"),
             numpy_helper.from_array(w, "w"),
             numpy_helper.from_array(np.array(0.01, np.float32), "ws"),
             numpy_helper.from_array(np.array(0, np.int8), "wz"),
             numpy_helper.from_array(np.array(10.0, np.float32), "ys")]
    attrs = {"group": group} if op == "Conv" else {}
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"]),
             helper.make_node(op, ["xd", "wd"], ["c" if op == "Conv" else "y"],
                              name="compute", **attrs)]
    if op == "Conv":
        nodes += [helper.make_node("QuantizeLinear", ["c", "ys", "z"], ["cq"]),
                  helper.make_node("DequantizeLinear", ["cq", "ys", "z"], ["y"])]
    shape = [1, w.shape[1] * group, 8, 8] if op == "Conv" else [4, w.shape[0]]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, shape)], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _feed(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The largest activation the input's type holds (uint8 255 or int8 127), everywhere:
    the worst case for the int16 pair sums."""
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    top = 12.7 if model.graph.initializer[1].data_type == TensorProto.INT8 else 25.5
    return {"x": np.full(dims, top, np.float32)}


W127 = np.full((32, 8), 127, np.int8)
KNOWN = {   # name: (model, whether its products saturate int16 pairs on AVX2)
    "u8s8-full": (_qdq("MatMul", W127), True),
    "u8s8-7bit": (_qdq("MatMul", np.full((32, 8), 64, np.int8)), False),
    "u8s8-65": (_qdq("MatMul", np.full((32, 8), 65, np.int8)), True),
    "s8s8-full": (_qdq("MatMul", W127, act=np.int8), True),   # x86 runs int8 QDQ as uint8
    "conv-full": (_qdq("Conv", np.full((8, 8, 3, 3), 127, np.int8)), True),
    "depthwise-full": (_qdq("Conv", np.full((8, 1, 3, 3), 127, np.int8), group=8), False),
}


@pytest.mark.parametrize("name", list(KNOWN))
def test_saturation_risks_on_known_graphs(name: str) -> None:
    model, saturates = KNOWN[name]
    risks = saturation_risks(model, AVX2)
    assert bool(risks) == saturates
    if saturates:
        assert [(r.node, r.weight) for r in risks] == [("compute", "w")]
        assert "saturate int16 pairs" in str(risks[0])
    assert saturation_risks(model, TARGETS["generic"]) == risks
    for safe in ("x86-avx512-vnni", "arm64-dotprod", "arm64-neon"):
        assert saturation_risks(model, TARGETS[safe]) == []


def test_qoperator_models_are_checked(tmp_path: Path) -> None:
    """onnxruntime's own QOperator output: QLinearMatMul with uint8 activations is a risk;
    with int8 activations (MLAS's exact portable S8S8 kernel on x86) it is not, and
    reduce_range makes the uint8 one safe."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(size=(32, 8)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
              tmp_path / "f.onnx")

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter([{"x": rng.normal(size=(4, 32)).astype(np.float32)}])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.feeds, None)

    def quantized(act: QuantType, reduce_range: bool) -> onnx.ModelProto:
        out = tmp_path / "q.onnx"
        quantize_static(tmp_path / "f.onnx", out, Reader(), quant_format=QuantFormat.QOperator,
                        activation_type=act, weight_type=QuantType.QInt8,
                        reduce_range=reduce_range)
        return onnx.load(out)

    assert [r.op for r in saturation_risks(quantized(QuantType.QUInt8, False), AVX2)] == \
        ["QLinearMatMul"]
    assert saturation_risks(quantized(QuantType.QInt8, False), AVX2) == []
    assert saturation_risks(quantized(QuantType.QUInt8, True), AVX2) == []


# --- every scheme's output for the x86-avx2 profile ----------------------------------------

def _scheme(name: str, target: object) -> onnx.ModelProto:
    cls = SCHEMES[name]
    fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    options: dict[str, object] = {"target": target} if "target" in fields else {}
    if "faster_than_float" in fields:   # layout is under test here, not speed
        options["faster_than_float"] = False
    return cls(**options)  # type: ignore[return-value]


@pytest.fixture(scope="module")
def cnn(cnn_dir: Path) -> tuple[onnx.ModelProto, object]:
    return onnx.load(cnn_dir / "model.onnx"), load_checkpoint(cnn_dir / "model.pt")[0]


@pytest.mark.parametrize("name", [s for s in SCHEMES if not s.startswith("ort-")])
def test_every_scheme_for_avx2_passes_the_check(cnn, name: str) -> None:
    float_model, _ = cnn
    assert saturation_risks(apply_pass(_scheme(name, AVX2), float_model, CALIB), AVX2) == []


def test_qat_export_for_avx2_passes_and_full_range_fails(cnn) -> None:
    _, module = cnn
    assert saturation_risks(quantize_export(module, CALIB, target=AVX2)[0], AVX2) == []
    assert saturation_risks(quantize_export(module, CALIB, target=VNNI)[0], AVX2)


def test_qat_export_follows_the_profiles_activation_type(cnn) -> None:
    """arm64 profiles get int8 activations (S8S8) on the same grid: zero points shift by
    128 and the model computes the same function."""
    _, module = cnn
    s8 = quantize_export(module, CALIB, target=TARGETS["arm64-dotprod"])[0]
    u8 = quantize_export(module, CALIB, target=VNNI)[0]

    def zero_points(model: onnx.ModelProto) -> list[TensorProto]:
        inits = {t.name: t for t in model.graph.initializer}
        return [inits[n.input[2]] for n in model.graph.node if n.op_type == "QuantizeLinear"]

    assert zero_points(s8) and all(t.data_type == TensorProto.INT8 for t in zero_points(s8))
    assert all(t.data_type == TensorProto.UINT8 for t in zero_points(u8))
    x = {"x": VAL.inputs["x"]}
    np.testing.assert_allclose(session(s8).run(None, x)[0], session(u8).run(None, x)[0],
                               atol=1e-4)


@pytest.mark.parametrize("name", ["ort-static", "ort-dynamic"])
def test_stock_full_range_u8s8_fails_the_check(cnn, name: str) -> None:
    float_model, _ = cnn
    assert saturation_risks(apply_pass(SCHEMES[name](), float_model, CALIB), AVX2)


# --- the real AVX2 kernels, under emulation -------------------------------------------------

_RUNNER = """
import sys, numpy as np, onnxruntime as ort
opts = ort.SessionOptions()
opts.log_severity_level = 3
for path in sys.argv[1:]:
    feed = dict(np.load(path[:-len(".onnx")] + ".npz"))
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    np.save(path[:-len(".onnx")] + ".out.npy", sess.run(None, feed)[0])
"""


def _emulated(models: dict[str, tuple[onnx.ModelProto, dict[str, np.ndarray]]],
              folder: Path) -> dict[str, np.ndarray]:
    """Each model's output run by onnxruntime under ``qemu-x86_64 -cpu Haswell``."""
    paths = []
    for name, (model, feed) in models.items():
        onnx.save(model, folder / f"{name}.onnx")
        np.savez(folder / f"{name}.npz", **feed)
        paths.append(str(folder / f"{name}.onnx"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run([QEMU, "-cpu", "Haswell", sys.executable, "-c", _RUNNER, *paths],
                   check=True, env=env, capture_output=True, timeout=300)
    return {name: np.load(folder / f"{name}.out.npy") for name in models}


def _rel_err(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(a - ref).max() / np.abs(ref).max())


@emulated
def test_the_check_predicts_what_avx2_kernels_do(tmp_path: Path) -> None:
    """The oracle for :func:`saturation_risks`: a graph it flags goes wrong on real AVX2
    kernels, a graph it passes gives the exact result there. Natively, a flagged graph is
    exact on a VNNI machine and wrong on an AVX2 one."""
    results = _emulated({name: (model, _feed(model)) for name, (model, _) in KNOWN.items()},
                        tmp_path)
    host = detect()
    for name, avx2 in results.items():
        model, _ = KNOWN[name]
        expect, flagged = _qdq_reference(model), bool(saturation_risks(model, AVX2))
        assert (_rel_err(avx2, expect) > 1e-3) == flagged, name
        if host.name in ("x86-avx2", "x86-avx512-vnni"):
            native = session(model).run(None, _feed(model))[0]
            assert (_rel_err(native, expect) > 1e-3) == (flagged and host.saturates), name


def _qdq_reference(model: onnx.ModelProto) -> np.ndarray:
    """The exact result, in float64, of the model's integer arithmetic (dequantize,
    compute, and requantize where the graph does)."""
    import torch

    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    x = np.round(_feed(model)["x"] / inits["s"]).astype(np.float64) * inits["s"]
    w = inits["w"].astype(np.float64) * inits["ws"]
    node = next(n for n in model.graph.node if n.name == "compute")
    if node.op_type == "MatMul":
        y = x @ w
    else:
        group = next(a.i for a in node.attribute if a.name == "group")
        y = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w),
                                       groups=group).numpy()
        y = np.round(y / inits["ys"]) * inits["ys"]
    return y


def _unfused(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> np.ndarray:
    """onnxruntime with graph optimizations off: Q/DQ pairs stay unfused, so a QDQ model is
    computed in float from its integer values (its reference semantics), on any CPU."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
    return sess.run(None, feed)[0]


@emulated
def test_avx2_profile_outputs_are_correct_on_avx2_kernels(cnn, tmp_path: Path) -> None:
    """The x86-avx2 profile's int8-static, int8-dynamic and QAT export of a zoo CNN (and
    int4 weights, int8 activations) give onnxruntime's reference result on emulated AVX2
    and agree with fp32; the full-range layout the VNNI profile picks is right by the
    reference but goes wrong there, and the check flags exactly that one."""
    float_model, module = cnn
    feed = {"x": VAL.inputs["x"]}
    models = {
        "float": float_model,
        "int8-static": apply_pass(_scheme("int8-static", AVX2), float_model, CALIB),
        "int8-dynamic": apply_pass(_scheme("int8-dynamic", AVX2), float_model, CALIB),
        "qat-export": quantize_export(module, CALIB, target=AVX2)[0],
        "int4-weight": apply_pass(_scheme("int4-weight", AVX2), float_model, CALIB),
        "full-range": quantize_export(module, CALIB, target=VNNI)[0],
    }
    results = _emulated({k: (m, feed) for k, m in models.items()}, tmp_path)
    ref = _unfused(float_model, feed).argmax(1)

    def agreement(out: np.ndarray) -> float:
        return float((out.argmax(1) == ref).mean())

    for name, avx2 in results.items():
        reference = _unfused(models[name], feed)
        assert agreement(reference) >= 0.93, name
        correct = _rel_err(avx2, reference) < 0.01 and agreement(avx2) >= 0.93
        assert correct == (name != "full-range"), name
        assert bool(saturation_risks(models[name], AVX2)) == (name == "full-range"), name
