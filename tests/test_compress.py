"""Each post-training scheme on trained models: outputs against the float model as the
oracle, the ops onnxruntime really runs, and the file sizes."""

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from edgeloop._onnx import load_model, run, session
from edgeloop.compress import (
    Binary,
    Int4Weight,
    Int8Dynamic,
    Int8Static,
    OrtStatic,
    apply_pass,
    gemm_to_matmul,
    make_scheme,
)
from edgeloop.data import load_builtin
from edgeloop.errors import DataError, UsageError
from edgeloop.measure import fidelity, graph_summary, predict

CALIB = load_builtin("mnist1d", "calib")
TEST = load_builtin("mnist1d", "test")


def _outputs(model: onnx.ModelProto) -> np.ndarray:
    return predict(session(model), TEST)


@pytest.fixture(scope="module")
def cnn(cnn_dir: Path) -> onnx.ModelProto:
    return load_model(cnn_dir / "model.onnx")


@pytest.fixture(scope="module")
def mlp(mlp_dir: Path) -> onnx.ModelProto:
    return load_model(mlp_dir / "model.onnx")


def test_int8_static_runs_integer_kernels_and_shrinks(cnn: onnx.ModelProto) -> None:
    q = apply_pass(Int8Static(), cnn, CALIB)
    float_ops, int_ops, qdq = graph_summary(q)
    assert not float_ops, f"compute left in float: {float_ops}"
    assert int_ops == {"QLinearConv": 4, "QGemm": 1}
    assert qdq <= 2     # only the model's input quantize and output dequantize
    assert q.ByteSize() <= 0.3 * cnn.ByteSize()
    f = fidelity(_outputs(q), _outputs(cnn))
    assert f.mean_cosine > 0.999 and f.top1_agreement > 0.98


def test_int8_static_at_least_as_faithful_as_stock(cnn: onnx.ModelProto) -> None:
    ref = _outputs(cnn)
    ours = fidelity(_outputs(apply_pass(Int8Static(), cnn, CALIB)), ref)
    stock = fidelity(_outputs(apply_pass(OrtStatic(), cnn, CALIB)), ref)
    assert ours.sqnr_db >= stock.sqnr_db - 0.5


@pytest.mark.parametrize("calibration", ["entropy", "percentile"])
def test_other_calibrations(cnn: onnx.ModelProto, calibration: str) -> None:
    q = apply_pass(Int8Static(calibration=calibration), cnn, CALIB)
    assert fidelity(_outputs(q), _outputs(cnn)).top1_agreement > 0.97


def test_int8_dynamic(mlp: onnx.ModelProto) -> None:
    q = apply_pass(Int8Dynamic(), mlp)
    _, int_ops, _ = graph_summary(q)
    assert set(int_ops) & {"DynamicQuantizeMatMul", "MatMulIntegerToFloat", "MatMulInteger"}
    assert fidelity(_outputs(q), _outputs(mlp)).mean_cosine > 0.999


def test_gemm_to_matmul_is_exact(mlp: onnx.ModelProto) -> None:
    rewritten = gemm_to_matmul(mlp)
    assert not any(n.op_type == "Gemm" for n in rewritten.graph.node)
    np.testing.assert_allclose(_outputs(rewritten), _outputs(mlp), atol=1e-5)


def test_int4_weight(mlp: onnx.ModelProto) -> None:
    q = apply_pass(Int4Weight(block_size=32), mlp)
    _, int_ops, _ = graph_summary(q)
    assert int_ops == {"MatMulNBits": 3}
    assert q.ByteSize() <= 0.2 * mlp.ByteSize()
    assert fidelity(_outputs(q), _outputs(mlp)).mean_cosine > 0.99


def _linear_weights(model: onnx.ModelProto) -> list[tuple[np.ndarray, np.ndarray]]:
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    layers = []
    for n in model.graph.node:
        if n.op_type == "Gemm":
            trans_b = next((a.i for a in n.attribute if a.name == "transB"), 0)
            w = inits[n.input[1]]
            layers.append((w if trans_b else w.T, inits[n.input[2]]))
    return layers   # each weight as (out, in)


def test_binary_without_data_matches_numpy_sign_model(mlp: onnx.ModelProto) -> None:
    q = apply_pass(Binary(), mlp)
    # Oracle: the same MLP in numpy with W replaced by mean|W| * sign(W) per output row.
    h = TEST.inputs["x"].astype(np.float64)
    layers = _linear_weights(mlp)
    for i, (w, b) in enumerate(layers):
        wb = np.abs(w).mean(1, keepdims=True) * np.where(w >= 0, 1.0, -1.0)
        h = h @ wb.T + b
        if i < len(layers) - 1:
            h = np.maximum(h, 0)
    np.testing.assert_allclose(_outputs(q), h, rtol=1e-3, atol=1e-3)
    # Bits are packed in the file and unpacked by constant folding when the session loads.
    assert q.ByteSize() <= 0.06 * mlp.ByteSize()
    float_ops, _, _ = graph_summary(q)
    assert sum(float_ops.values()) == 3


def test_binary_refit_beats_plain_scale(mlp: onnx.ModelProto) -> None:
    ref = _outputs(mlp)
    plain = fidelity(_outputs(apply_pass(Binary(), mlp)), ref)
    refit = fidelity(_outputs(apply_pass(Binary(), mlp, CALIB)), ref)
    assert refit.mean_cosine > plain.mean_cosine + 0.05


def test_binary_on_convolutions(cnn: onnx.ModelProto) -> None:
    q = apply_pass(Binary(), cnn, CALIB)
    assert q.ByteSize() <= 0.15 * cnn.ByteSize()
    assert fidelity(_outputs(q), _outputs(cnn)).mean_cosine > 0.3


def test_static_needs_calibration_that_fits(cnn: onnx.ModelProto) -> None:
    with pytest.raises(DataError, match="needs calibration data"):
        apply_pass(Int8Static(), cnn, None)
    wrong = CALIB.take(slice(0, 8))
    wrong.inputs["x"] = wrong.inputs["x"][:, :20]
    with pytest.raises(DataError, match="has shape"):
        apply_pass(Int8Static(), cnn, wrong)


def test_make_scheme_validates() -> None:
    with pytest.raises(UsageError, match="`scheme` must be one of"):
        make_scheme("int9")
    with pytest.raises(UsageError, match="`--block-size` does not apply to scheme 'binary'"):
        make_scheme("binary", block_size=64)
    with pytest.raises(UsageError, match="`calibration` must be one of minmax"):
        make_scheme("int8-static", calibration="kl")
    with pytest.raises(UsageError, match="power of two"):
        make_scheme("int4-weight", block_size=48)
    assert make_scheme("int4-weight", block_size=64, calibration=None).block_size == 64


def test_passes_do_not_modify_their_input(cnn: onnx.ModelProto) -> None:
    before = cnn.SerializeToString()
    apply_pass(Binary(), cnn, CALIB)
    apply_pass(Int8Static(), cnn, CALIB)
    assert cnn.SerializeToString() == before
    assert run(session(cnn), {"x": TEST.inputs["x"][:1]}).shape == (1, 10)
