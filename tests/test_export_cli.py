"""`edgeloop export`: ONNX through the command, and bad input gets one line and exit 2."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from test_cli import cli

from edgeloop._onnx import load_model, run, session
from edgeloop.data import Dataset, load_builtin, save_npz
from edgeloop.errors import UsageError
from edgeloop.export import export_checkpoint
from edgeloop.zoo import load_torch


def test_export_onnx_matches_pytorch(cnn_dir: Path, tmp_path: Path) -> None:
    import torch

    out = tmp_path / "m.onnx"
    code, _stdout, stderr = cli("export", cnn_dir / "model.pt", "--to", "onnx", "--out", out)
    assert code == 0, stderr
    x = load_builtin("mnist1d", "test").inputs["x"][:32]
    model = load_torch(cnn_dir / "model.pt")[0]
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(run(session(load_model(out)), {"x": x}), want, atol=1e-4)


@pytest.mark.parametrize(("args", "message"), [
    (["--to", "tfjs"], "`to` must be one of onnx, tflite, coreml; got 'tfjs'"),
    (["--to", "onnx", "--quantize", "int8"], "for --to tflite only"),
    (["--to", "tflite", "--quantize", "int4"], "`quantize` must be one of none, int8"),
    (["--to", "tflite", "--batch", "0"], "`batch` must be >= 1"),
])
def test_bad_options(args: list[str], message: str, cnn_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.out"
    code, _, stderr = cli("export", cnn_dir / "model.pt", "--out", out, *args)
    assert code == 2 and message in stderr
    assert len(stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_missing_checkpoint_and_bad_samples(cnn_dir: Path, tmp_path: Path) -> None:
    code, _, stderr = cli("export", tmp_path / "none.pt", "--to", "onnx", "--out",
                          tmp_path / "m.onnx")
    assert code == 2 and "does not exist" in stderr
    bad = tmp_path / "bad.npz"
    save_npz(bad, Dataset({"x": np.zeros((8, 7), np.float32)}))
    code, _, stderr = cli("export", cnn_dir / "model.pt", "--to", "onnx", "--data", bad,
                          "--out", tmp_path / "m.onnx")
    assert code == 2 and "samples must have shape (N, 40)" in stderr
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize(("to", "module", "extra"), [("tflite", "litert_torch", "tflite"),
                                                     ("coreml", "coremltools", "coreml")])
def test_missing_extra_names_it(to: str, module: str, extra: str, cnn_dir: Path,
                                tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail
    suffix = ".mlpackage" if to == "coreml" else ".tflite"
    with pytest.raises(UsageError, match=rf"pip install 'edgeloop\[{extra}\]'"):
        export_checkpoint(cnn_dir / "model.pt", to=to, out=tmp_path / f"m{suffix}")
