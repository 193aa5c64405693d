"""Measuring streams data through the model in batches: memory does not grow with the
number of samples beyond the outputs, and batched predictions equal one-call ones."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeloop._onnx import run, session
from edgeloop.data import Dataset, load_npz
from edgeloop.measure import PREDICT_BATCH, predict

SIDE, CHANNELS = 64, 64
ACTIVATION_MB = CHANNELS * SIDE * SIDE * 4 / 2**20   # the widest tensor, per sample


def _wide_cnn() -> onnx.ModelProto:
    """A 1x1 conv to 64 channels at 64x64, pooled, then a 10-way classifier: cheap to
    run, but each sample's activations take 1 MB."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((CHANNELS, 3, 1, 1)).astype(np.float32),
                                     "w"),
             numpy_helper.from_array(rng.standard_normal((CHANNELS, 10)).astype(np.float32),
                                     "fc")]
    node = helper.make_node
    nodes = [node("Conv", ["x", "w"], ["c"]), node("Relu", ["c"], ["r"]),
             node("GlobalAveragePool", ["r"], ["p"]), node("Flatten", ["p"], ["f"]),
             node("MatMul", ["f", "fc"], ["y"])]
    graph = helper.make_graph(
        nodes, "wide",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, SIDE, SIDE])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _images(n: int) -> np.ndarray:
    return np.random.default_rng(n).standard_normal((n, 3, SIDE, SIDE)).astype(np.float32)


def test_batched_predictions_equal_one_call() -> None:
    sess = session(_wide_cnn())
    x = _images(2 * PREDICT_BATCH + 5)
    whole = run(sess, {"x": x})
    for batch in (PREDICT_BATCH, 7):
        np.testing.assert_allclose(predict(sess, Dataset({"x": x}), batch), whole,
                                   rtol=1e-5, atol=1e-5)


def test_loaded_npz_is_memory_mapped_and_equal(tmp_path: Path) -> None:
    x = _images(10)
    np.savez(tmp_path / "plain.npz", x=x, labels=np.arange(10))
    np.savez_compressed(tmp_path / "packed.npz", x=x)
    plain, packed = load_npz(tmp_path / "plain.npz"), load_npz(tmp_path / "packed.npz")
    assert isinstance(plain.inputs["x"], np.memmap)
    assert not isinstance(packed.inputs["x"], np.memmap)   # compressed: read whole
    np.testing.assert_array_equal(plain.inputs["x"], x)
    np.testing.assert_array_equal(packed.inputs["x"], x)
    plain.inputs["x"][0] = 0.0                              # copy-on-write: file unchanged
    np.testing.assert_array_equal(load_npz(tmp_path / "plain.npz").inputs["x"], x)


def _evaluate_peak_mb(model: Path, n: int, tmp_path: Path) -> float:
    data = tmp_path / f"x{n}.npz"
    np.savez(data, x=_images(n), labels=np.zeros(n, np.int64))
    exe = Path(sys.executable).parent / "edgeloop"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "edgeloop"]
    r = subprocess.run([*cmd, "evaluate", str(model), "--data", str(data), "--runs", "1",
                        "--seconds", "0", "--json"], capture_output=True, text=True,
                       env={**os.environ, "EDGELOOP_QUIET": "1"}, timeout=300)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["samples"] == n and report["accuracy"] is not None
    return float(report["peak_rss_mb"])


@pytest.mark.slow
def test_evaluate_peak_memory_does_not_grow_with_samples(tmp_path: Path) -> None:
    model = tmp_path / "wide.onnx"
    onnx.save(_wide_cnn(), model)
    small, large = (_evaluate_peak_mb(model, n, tmp_path) for n in (64, 512))
    # Run as one batch, the 448 extra samples would need at least one more 448 MB tensor;
    # streamed, only their 24 MB of input (mapped from the file) and their outputs remain.
    one_batch_extra = (512 - 64) * ACTIVATION_MB
    assert small > 0 and large - small < 0.2 * one_batch_extra, (small, large)
