"""LiteRT export: the .tflite runs in the LiteRT interpreter (ai-edge-litert) and is
compared with PyTorch, the oracle, on real MNIST-1D inputs; int8 is really int8."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_cli import cli

pytest.importorskip("litert_torch", reason="the [tflite] extra is installed in CI")
pytest.importorskip("ai_edge_litert")

from ai_edge_litert.interpreter import Interpreter

from edgeloop.data import load_builtin
from edgeloop.errors import ModelError, UsageError
from edgeloop.export import TFLiteConfig, to_tflite
from edgeloop.zoo import load_torch


@pytest.fixture(scope="module")
def trained(cnn_dir: Path) -> torch.nn.Module:
    return load_torch(cnn_dir / "model.pt")[0]


@pytest.fixture(scope="module")
def test_x() -> torch.Tensor:
    return torch.from_numpy(load_builtin("mnist1d", "test").inputs["x"][:128])


def _interpreter_outputs(path: Path, x: np.ndarray) -> np.ndarray:
    """Our own oracle-side run: plain Interpreter tensors, one sample at a time."""
    it = Interpreter(model_path=str(path))
    it.allocate_tensors()
    (inp,), (out,) = it.get_input_details(), it.get_output_details()
    ys = []
    for row in x:
        it.set_tensor(inp["index"], row[None].astype(np.float32))
        it.invoke()
        ys.append(it.get_tensor(out["index"])[0])
    return np.stack(ys)


def test_float_tflite_matches_pytorch(trained: torch.nn.Module, test_x: torch.Tensor,
                                      tmp_path: Path) -> None:
    out = tmp_path / "m.tflite"
    check = to_tflite(trained, test_x, out)
    assert check.samples == len(test_x) and check.fidelity is not None
    assert check.fidelity.max_abs_diff <= 1e-4
    with torch.no_grad():
        want = trained(test_x).numpy()
    got = _interpreter_outputs(out, test_x.numpy())
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_int8_tflite_is_int8_and_agrees(trained: torch.nn.Module, tmp_path: Path) -> None:
    calib = torch.from_numpy(load_builtin("mnist1d", "calib").inputs["x"][:256])
    test = load_builtin("mnist1d", "test")
    f32, i8 = tmp_path / "f.tflite", tmp_path / "q.tflite"
    to_tflite(trained, calib, f32)
    check = to_tflite(trained, calib, i8, config=TFLiteConfig(quantize="int8", batch=8))
    assert check.fidelity is not None and check.fidelity.top1_agreement >= 0.9
    # Weights stored as int8: the file is far smaller than the float one.
    assert i8.stat().st_size < 0.45 * f32.stat().st_size
    it = Interpreter(model_path=str(i8))
    kinds = {d["dtype"] for d in it.get_tensor_details()}
    assert np.int8 in kinds
    assert it.get_input_details()[0]["dtype"] == np.int8
    # On held-out test data the int8 model keeps the float model's accuracy (within 3 pts).
    x = torch.from_numpy(test.inputs["x"][:512])
    from edgeloop.export import _run_tflite

    got = _run_tflite(i8, list(x.split(8)))
    with torch.no_grad():
        want = trained(x).numpy()
    acc_q = float((got.argmax(1) == test.labels[:512]).mean())
    acc_f = float((want.argmax(1) == test.labels[:512]).mean())
    assert acc_q >= acc_f - 0.03


def test_failed_check_writes_nothing(trained: torch.nn.Module, test_x: torch.Tensor,
                                     tmp_path: Path) -> None:
    out = tmp_path / "m.tflite"
    out.write_bytes(b"previous")
    with pytest.raises(ModelError, match="differs from PyTorch"):
        to_tflite(trained, test_x, out, config=TFLiteConfig(atol=0.0))
    assert out.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["m.tflite"]


def test_bad_config() -> None:
    with pytest.raises(UsageError, match="`quantize` must be one of none, int8; got 'int4'"):
        TFLiteConfig(quantize="int4")


def test_cli_export_tflite(cnn_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.tflite"
    code, stdout, stderr = cli("export", cnn_dir / "model.pt", "--to", "tflite", "--batch", "4",
                               "--out", out)
    assert code == 0, stderr
    assert "top-1 agreement" in stdout and out.is_file()
    assert Interpreter(model_path=str(out)).get_input_details()[0]["shape"].tolist() == [4, 40]
