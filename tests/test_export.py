"""ONNX exports checked against PyTorch, the oracle, on real data."""

from pathlib import Path

import numpy as np
import pytest
import torch

from edgeloop._onnx import load_model, run, session
from edgeloop.data import load_builtin
from edgeloop.export import to_onnx
from edgeloop.zoo import ARCHS, build, load_torch


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_export_matches_pytorch_at_any_batch(arch: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build(arch).eval()
    x = load_builtin(ARCHS[arch].dataset, "test").inputs["x"]
    to_onnx(model, torch.from_numpy(x[:2]), tmp_path / "m.onnx")
    sess = session(load_model(tmp_path / "m.onnx"))
    for n in (1, 7, 64):
        got = run(sess, {"x": x[:n]})
        with torch.no_grad():
            want = model(torch.from_numpy(x[:n])).numpy()
        assert got.shape == want.shape == (n, 10)
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_trained_zoo_model_roundtrips(cnn_dir: Path) -> None:
    model, arch = load_torch(cnn_dir / "model.pt")
    assert arch == "mnist1d-cnn"
    x = load_builtin("mnist1d", "test").inputs["x"][:50]
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(run(session(cnn_dir / "model.onnx"), {"x": x}), want, atol=1e-4)
