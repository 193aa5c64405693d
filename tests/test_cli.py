"""The command line: end to end on a trained model, and every kind of bad input gets one
line, exit code 2, and no output file."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from edgeloop.cli import main


def cli(*args: object) -> tuple[int, str, str]:
    """Run the CLI in-process; returns (exit code, stdout, stderr)."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
        except SystemExit as e:
            code = int(e.code or 0)
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("scheme", ["int8", "int8-static", "int8-dynamic", "int4-weight", "binary",
                                    "ort-static", "ort-dynamic"])
def test_quantize_then_evaluate(scheme: str, cnn_dir: Path, mnist_npz: dict[str, Path],
                                tmp_path: Path) -> None:
    out = tmp_path / f"{scheme}.onnx"
    # int8's refusal of a model no faster than float depends on timing: not tested here
    extra = ["--allow-slower"] if scheme == "int8" else []
    code, stdout, stderr = cli("quantize", cnn_dir / "model.onnx", "--scheme", scheme,
                               "--data", mnist_npz["calib"], "--out", out, *extra)
    assert code == 0, stderr
    assert out.is_file() and out.stat().st_size < (cnn_dir / "model.onnx").stat().st_size
    code, stdout, stderr = cli("evaluate", out, "--data", mnist_npz["test"], "--reference",
                               cnn_dir / "model.onnx", "--runs", 5, "--json")
    assert code == 0, stderr
    report = json.loads(stdout)
    assert report["samples"] == 1000 and 0 <= report["accuracy"] <= 1
    assert report["fidelity"]["top1_agreement"] > (0.3 if scheme == "binary" else 0.95)
    assert [lat["batch"] for lat in report["latency"]] == [1, 32]


def test_evaluate_times_with_the_devices_threads(cnn_dir: Path, mnist_npz: dict[str, Path],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """`evaluate --threads 1` times the model (and runs the reference) on one intra-op
    thread, and its report says so."""
    import edgeloop.measure as measure
    seen: list[object] = []
    real_session = measure.session

    def spy(model: object, **kwargs: object) -> object:
        seen.append(kwargs.get("threads"))
        return real_session(model, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(measure, "session", spy)
    model = cnn_dir / "model.onnx"
    code, out, err = cli("evaluate", model, "--data", mnist_npz["test"], "--reference", model,
                         "--runs", 3, "--threads", 1, "--json")
    assert code == 0, err
    assert json.loads(out)["threads"] == 1 and seen == [1, 1]
    code, out, err = cli("evaluate", model, "--data", mnist_npz["test"], "--runs", 3,
                         "--threads", 1)
    assert code == 0 and " runs, 1 thread)" in out, err


def test_data_and_zoo_commands(tmp_path: Path) -> None:
    code, _, err = cli("data", "digits", "--split", "calib", "--out", tmp_path / "d.npz")
    assert code == 0, err
    with np.load(tmp_path / "d.npz") as f:
        assert f["x"].shape == (256, 1, 8, 8) and f["labels"].shape == (256,)
    code, out, err = cli("zoo", "train", "digits-cnn", "--epochs", "2", "--out", tmp_path / "z")
    assert code == 0, err
    assert (tmp_path / "z" / "model.onnx").is_file() and (tmp_path / "z" / "model.pt").is_file()
    assert "test accuracy" in out


def _write_npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def _bad_inputs(tmp: Path, model: Path) -> list[tuple[str, list[object], str]]:
    truncated = tmp / "truncated.onnx"
    truncated.write_bytes(model.read_bytes()[:2000])
    text = tmp / "notes.onnx"
    text.write_text("this is not a model\n")
    x = np.zeros((4, 40), np.float32)
    return [
        ("truncated model", [truncated, _write_npz(tmp / "ok.npz", x=x)], "not a valid ONNX"),
        ("non-ONNX file", [text, tmp / "ok.npz"], "not a valid ONNX"),
        ("missing input", [model, _write_npz(tmp / "a.npz", y=x)], "no array 'x'"),
        ("wrong dtype", [model, _write_npz(tmp / "b.npz", x=x.astype(np.float64))],
         "is float64; the model expects float32"),
        ("wrong shape", [model, _write_npz(tmp / "c.npz", x=x[:, :12])], "has shape (4, 12)"),
        ("NaN", [model, _write_npz(tmp / "d.npz", x=np.full((4, 40), np.nan, np.float32))],
         "NaN or Inf"),
        ("Inf", [model, _write_npz(tmp / "e.npz", x=np.full((4, 40), np.inf, np.float32))],
         "NaN or Inf"),
        ("empty npz", [model, _write_npz(tmp / "f.npz")], "holds no input arrays"),
        ("no samples", [model, _write_npz(tmp / "g.npz", x=x[:0])], "holds no samples"),
        ("missing model", [tmp / "nope.onnx", tmp / "ok.npz"], "does not exist"),
    ]


@pytest.mark.parametrize("scheme", ["int8-static", "int8-dynamic"])
def test_bad_input_one_line_exit_2_nothing_written(scheme: str, cnn_dir: Path,
                                                   tmp_path: Path) -> None:
    for label, (model, data), message in _bad_inputs(tmp_path, cnn_dir / "model.onnx"):
        if scheme == "int8-dynamic" and label in ("NaN", "Inf", "missing input", "wrong dtype",
                                                  "wrong shape", "empty npz", "no samples"):
            continue   # dynamic quantization reads no data; evaluate below covers those
        out = tmp_path / "out" / "q.onnx"
        code, _, err = cli("quantize", model, "--scheme", scheme, "--data", data, "--out", out)
        assert code == 2, label
        assert err.count("\n") == 1 and message in err, (label, err)
        assert not out.parent.exists() or not any(out.parent.iterdir()), label


def test_evaluate_bad_input(cnn_dir: Path, tmp_path: Path) -> None:
    for label, (model, data), message in _bad_inputs(tmp_path, cnn_dir / "model.onnx"):
        code, out, err = cli("evaluate", model, "--data", data, "--runs", 2)
        assert code == 2 and message in err and err.count("\n") == 1, (label, err)
        assert out == ""


def test_unknown_scheme_and_option(cnn_dir: Path, mnist_npz: dict[str, Path],
                                   tmp_path: Path) -> None:
    out = tmp_path / "q.onnx"
    code, _, err = cli("quantize", cnn_dir / "model.onnx", "--scheme", "int9", "--data",
                       mnist_npz["calib"], "--out", out)
    assert code == 2 and "`scheme` must be one of" in err and "got 'int9'" in err
    code, _, err = cli("quantize", cnn_dir / "model.onnx", "--scheme", "int8-static",
                       "--calibration", "kl", "--data", mnist_npz["calib"], "--out", out)
    assert code == 2 and "`calibration` must be one of minmax, entropy, percentile" in err
    code, _, err = cli("quantize", cnn_dir / "model.onnx", "--scheme", "int8-static",
                       "--target", "riscv", "--data", mnist_npz["calib"], "--out", out)
    assert code == 2 and "`target` must be one of auto" in err
    assert not out.exists()


def test_console_script_exit_code(tmp_path: Path) -> None:
    exe = Path(sys.executable).parent / "edgeloop"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "edgeloop"]
    r = subprocess.run([*cmd, "evaluate", str(tmp_path / "x.onnx"), "--data",
                        str(tmp_path / "x.npz")], capture_output=True, text=True,
                       env={**os.environ, "EDGELOOP_QUIET": "1"})
    assert r.returncode == 2 and r.stderr.startswith("error:") and r.stderr.count("\n") == 1
    assert "Traceback" not in r.stderr


def test_zoo_train_with_the_same_seed_gives_the_same_model(tmp_path: Path) -> None:
    from edgeloop.zoo import load_torch

    for run in ("a", "b"):
        main(["zoo", "train", "mnist1d-mlp", "--epochs", "1", "--seed", "3", "--out",
              str(tmp_path / run)])
    (a, _), (b, _) = (load_torch(tmp_path / run / "model.pt") for run in ("a", "b"))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(),
                                                 b.state_dict().values(), strict=True))
