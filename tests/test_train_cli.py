"""The training-time commands end to end, and bad input: one line, exit code 2, nothing
written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from edgeloop.cli import main
from edgeloop.data import Dataset, load_builtin, save_npz
from edgeloop.measure import graph_summary
from edgeloop.zoo import build, load_torch, save_torch


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("train-cli")
    save_npz(d / "train.npz", load_builtin("mnist1d", "train").take(slice(0, 256)))
    save_npz(d / "val.npz", load_builtin("mnist1d", "val").take(slice(0, 64)))
    save_torch(d / "model.pt", build("mnist1d-cnn", width=8).eval(), "mnist1d-cnn", {"width": 8})
    return d


def _fails(argv: list[str], capsys, match: str) -> None:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert match in err


def test_recipe_prune_distill_qat(files: Path) -> None:
    (files / "recipe.toml").write_text(
        'model = "model.pt"\ndata = "train.npz"\nval = "val.npz"\nout = "recipe-out"\n'
        '[[passes]]\npass = "prune"\nratio = 0.5\nsteps = 1\nfinetune_epochs = 1\n'
        '[[passes]]\npass = "distill"\nepochs = 1\n'
        '[[passes]]\npass = "qat"\nbits = 8\nepochs = 1\n')
    main(["compress", str(files / "recipe.toml"), "--runs", "5"])
    out = files / "recipe-out"
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "report.json"]
    report = json.loads((out / "report.json").read_text())
    assert [p["pass"] for p in report["passes"]] == ["prune", "distill", "qat"]
    for side in ("before", "after"):
        assert set(report[side]) >= {"accuracy", "parameters", "flops", "size_bytes",
                                     "latency_b1_ms", "latency_b32_ms"}
    assert report["ratio"]["flops"] < 0.35
    model = onnx.load(out / "model.onnx")
    onnx.checker.check_model(model)
    float_ops, int_ops, _ = graph_summary(model)
    assert float_ops == {} and int_ops


def test_prune_command_writes_a_loadable_smaller_checkpoint(files: Path) -> None:
    main(["prune", str(files / "model.pt"), "--data", str(files / "train.npz"), "--val",
          str(files / "val.npz"), "--structured", "0.5", "--steps", "1",
          "--finetune-epochs", "0", "--runs", "5", "--out", str(files / "pruned")])
    model, arch = load_torch(files / "pruned" / "model.pt")
    assert arch == "mnist1d-cnn" and model.features[0][0].out_channels == 4
    report = json.loads((files / "pruned" / "report.json").read_text())
    assert report["after"]["export_max_abs_diff"] <= 1e-4


def test_unstructured_report_shows_zip_gain(files: Path) -> None:
    main(["prune", str(files / "model.pt"), "--data", str(files / "train.npz"), "--val",
          str(files / "val.npz"), "--unstructured", "0.8", "--finetune-epochs", "0",
          "--runs", "5", "--out", str(files / "sparse")])
    report = json.loads((files / "sparse" / "report.json").read_text())
    assert report["after"]["nonzero_fraction"] == pytest.approx(0.2, abs=0.01)
    assert report["after"]["zip_bytes"] < 0.6 * report["before"]["zip_bytes"]
    assert any("no faster" in n for n in report["notes"])


def test_distill_command(files: Path) -> None:
    main(["distill", "--teacher", str(files / "model.pt"), "--student", "mnist1d-cnn",
          "--width", "2", "--data", str(files / "train.npz"), "--val", str(files / "val.npz"),
          "--epochs", "1", "--runs", "5", "--out", str(files / "student")])
    model, _ = load_torch(files / "student" / "model.pt")
    assert model.features[0][0].out_channels == 2


@pytest.mark.parametrize(("recipe", "message"), [
    ('[[passes]]\npass = "squash"\n', "`passes[0].pass` must be one of prune, "
     "prune-unstructured, distill, qat; got 'squash'"),
    ('[[passes]]\npass = "prune"\nratoi = 0.5\n', "`passes[0] field` must be one of"),
    ('[[passes]]\npass = "prune"\nratio = "half"\n', "`passes[0].ratio` must be a float"),
    ('[[passes]]\npass = "prune"\nratio = 1.5\n', "strictly between 0 and 1"),
    ('colour = "red"\n[[passes]]\npass = "qat"\n', "`recipe field` must be one of"),
    ('[[passes]]\npass = "qat"\n[[passes]]\npass = "prune"\n', "`qat` must be the last"),
    ('[[passes]]\npass = "qat"\ntarget = "riscv"\n', "`target` must be one of auto, "),
    ('[[passes]]\npass = "qat"\ntarget = 3\n', "generic; got 3"),
    ('[[passes]]\npass = "prune-unstructured"\n[[passes]]\npass = "prune"\n',
     "`prune` after `prune-unstructured` would discard its sparsity masks"),
    ('weights = 3\n[[passes]]\npass = "prune"\n', "`weights` must be a path"),
])
def test_bad_recipe(files: Path, capsys, recipe: str, message: str) -> None:
    head = 'model = "model.pt"\ndata = "train.npz"\nval = "val.npz"\nout = "bad-out"\n'
    lines = recipe.splitlines(keepends=True)
    top = "".join(line for line in lines if line.startswith(("colour", "weights")))
    (files / "bad.toml").write_text(head + top + "".join(
        line for line in lines if not line.startswith(("colour", "weights"))))
    _fails(["compress", str(files / "bad.toml")], capsys, message)
    assert not (files / "bad-out").exists()


def test_not_a_model(files: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    _fails(["qat", str(tmp_path / "junk.pt"), "--data", str(files / "train.npz"), "--val",
            str(files / "val.npz"), "--out", str(tmp_path / "out")], capsys,
           "is not a torch file")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("ratio", ["0", "1", "1.5"])
def test_ratio_out_of_range(files: Path, tmp_path: Path, capsys, ratio: str) -> None:
    _fails(["prune", str(files / "model.pt"), "--data", str(files / "train.npz"), "--val",
            str(files / "val.npz"), "--structured", ratio, "--out", str(tmp_path / "out")],
           capsys, "strictly between 0 and 1")
    assert not (tmp_path / "out").exists()


def test_qat_distillation_weight_out_of_range(files: Path, tmp_path: Path, capsys) -> None:
    _fails(["qat", str(files / "model.pt"), "--data", str(files / "train.npz"), "--val",
            str(files / "val.npz"), "--distill", "1.5", "--out", str(tmp_path / "out")],
           capsys, "`distill` must lie in [0, 1]; got 1.5")
    assert not (tmp_path / "out").exists()


def test_labels_outside_classes(files: Path, tmp_path: Path, capsys) -> None:
    data = load_builtin("mnist1d", "val").take(slice(0, 32))
    save_npz(tmp_path / "bad.npz", Dataset(data.inputs, np.full(32, 12, dtype=np.int64)))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "model.onnx").write_bytes(b"previous")
    _fails(["qat", str(files / "model.pt"), "--data", str(tmp_path / "bad.npz"), "--val",
            str(files / "val.npz"), "--out", str(tmp_path / "out")], capsys,
           "labels must lie in 0..9")
    assert (tmp_path / "out" / "model.onnx").read_bytes() == b"previous"


def test_zoo_train_mobile_with_width(tmp_path: Path) -> None:
    main(["zoo", "train", "mnist1d-mobile", "--width", "0.5", "--epochs", "1", "--out",
          str(tmp_path)])
    model, arch = load_torch(tmp_path / "model.pt")
    assert arch == "mnist1d-mobile" and model.stem[0].out_channels == 8
    assert any(m.groups > 1 for m in model.modules() if hasattr(m, "groups"))
    onnx.checker.check_model(onnx.load(tmp_path / "model.onnx"))
