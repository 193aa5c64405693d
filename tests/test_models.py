"""Models users bring (edgeloop.models): every form loads, trains, saves and reloads; every
wrong form is one line and exit code 2 with nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from edgeloop.cli import main
from edgeloop.compress.distill import Distill
from edgeloop.compress.prune import UnstructuredPrune, sparsity
from edgeloop.compress.trainbase import TrainContext
from edgeloop.data import Dataset, load_builtin, save_npz
from edgeloop.errors import ModelError, UsageError
from edgeloop.models import TextClassifier, load_model, save_model


class TinyNet(nn.Module):
    """A user's own module (pickled whole by torch.save)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


@pytest.fixture(scope="module")
def rgb(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("models")
    save_npz(d / "train.npz", load_builtin("digits-rgb", "train").take(slice(0, 128)))
    save_npz(d / "val.npz", load_builtin("digits-rgb", "val").take(slice(0, 64)))
    return d


def _same(a: nn.Module, b: nn.Module, x: torch.Tensor) -> bool:
    with torch.no_grad():
        return torch.allclose(a.eval()(x), b.eval()(x), atol=1e-5)


def test_whole_module_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = TinyNet().eval()
    torch.save(net, tmp_path / "net.pt")
    loaded = load_model(tmp_path / "net.pt")
    assert loaded.arch is None and isinstance(loaded.module, TinyNet)
    x = torch.randn(2, 3, 32, 32)
    assert _same(net, loaded.module, x)
    save_model(tmp_path / "again.pt", loaded)
    assert _same(net, load_model(tmp_path / "again.pt").module, x)


def test_factory_with_config_and_weights(tmp_path: Path) -> None:
    (tmp_path / "cfg.json").write_text(json.dumps({"num_classes": 10}))
    first = load_model("torchvision.models:resnet18", config=tmp_path / "cfg.json")
    torch.save(first.module.state_dict(), tmp_path / "w.pt")
    second = load_model("torchvision.models:resnet18", config=tmp_path / "cfg.json",
                        weights=tmp_path / "w.pt")
    assert _same(first.module, second.module, torch.randn(2, 3, 32, 32))
    assert second.module.fc.out_features == 10


def test_hugging_face_class_with_config(tmp_path: Path) -> None:
    cfg = {"vocab_size": 50, "hidden_size": 32, "num_hidden_layers": 1,
           "num_attention_heads": 2, "intermediate_size": 64, "num_labels": 3,
           "pad_token_id": 0}
    (tmp_path / "bert.json").write_text(json.dumps(cfg))
    loaded = load_model("transformers:BertForSequenceClassification",
                        config=tmp_path / "bert.json")
    assert isinstance(loaded.module, TextClassifier)
    ids = torch.tensor([[5, 6, 7, 0, 0], [8, 9, 10, 11, 12]])
    with torch.no_grad():
        logits = loaded.module(ids)
        # padding is masked: extra padding does not change the first sequence's logits
        longer = loaded.module(torch.cat([ids, torch.zeros(2, 3, dtype=torch.long)], 1))
    assert logits.shape == (2, 3)
    assert torch.allclose(logits[0], longer[0], atol=1e-5)
    torch.save(loaded.module.model.state_dict(), tmp_path / "hf.pt")   # the HF model's own
    again = load_model("transformers:BertForSequenceClassification",
                       config=tmp_path / "bert.json", weights=tmp_path / "hf.pt")
    with torch.no_grad():
        assert torch.allclose(again.module(ids), logits, atol=1e-5)


@pytest.mark.parametrize(("source", "kwargs", "error", "message"), [
    ("nosuchpackage.models:net", {}, ModelError, "cannot import 'nosuchpackage.models'"),
    ("torchvision.models:no_such_net", {}, ModelError, "has no 'no_such_net'"),
    ("missing/model.pt", {}, ModelError, "neither an existing file nor a factory"),
    ("torchvision.models:resnet18", {"config": {"colour": 1}}, ModelError,
     "cannot be built with config"),
])
def test_bad_sources(tmp_path: Path, source: str, kwargs: dict, error: type,
                     message: str) -> None:
    if "config" in kwargs:
        (tmp_path / "c.json").write_text(json.dumps(kwargs["config"]))
        kwargs = {"config": tmp_path / "c.json"}
    with pytest.raises(error, match=message):
        load_model(source, **kwargs)


def test_weights_that_do_not_fit(tmp_path: Path) -> None:
    torch.save(TinyNet().state_dict(), tmp_path / "w.pt")
    with pytest.raises(ModelError, match=r"do not fit torchvision\.models:resnet18"):
        load_model("torchvision.models:resnet18", weights=tmp_path / "w.pt")
    with pytest.raises(ModelError, match="holds weights only"):
        load_model(tmp_path / "w.pt")
    with pytest.raises(UsageError, match="go with a factory"):
        load_model(tmp_path / "w.pt", weights=tmp_path / "w.pt")


@pytest.mark.parametrize(("argv", "message"), [
    (["--model-x"], "No such option"),
    (["nosuchpackage.models:net"], "cannot import 'nosuchpackage.models'"),
    (["torchvision.models:resnet18", "--weights", "{tmp}/w.pt"], "do not fit"),
    (["torchvision.models:resnet18", "--structured", "1.5"], "strictly between 0 and 1"),
])
def test_cli_errors_are_one_line(rgb: Path, tmp_path: Path, capsys, argv: list[str],
                                 message: str) -> None:
    torch.save(TinyNet().state_dict(), tmp_path / "w.pt")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    extra = [] if "--structured" in argv else ["--structured", "0.5"]
    with pytest.raises(SystemExit) as e:
        main(["prune", *argv, *extra, "--data", str(rgb / "train.npz"), "--val",
              str(rgb / "val.npz"), "--out", str(tmp_path / "out")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "out").exists()


def test_user_module_through_the_cli(rgb: Path, tmp_path: Path) -> None:
    """A torch.save'd module: unstructured pruning, then the result reloads as a module."""
    torch.manual_seed(0)
    torch.save(TinyNet().eval(), tmp_path / "net.pt")
    main(["prune", str(tmp_path / "net.pt"), "--unstructured", "0.5", "--finetune-epochs", "1",
          "--data", str(rgb / "train.npz"), "--val", str(rgb / "val.npz"), "--runs", "3",
          "--out", str(tmp_path / "out")])
    out = load_model(tmp_path / "out" / "model.pt")
    assert isinstance(out.module, TinyNet)
    assert sparsity(out.module) == pytest.approx(0.5, abs=0.02)


def test_sparsity_survives_distillation() -> None:
    """prune-unstructured -> distill: the masks stay applied while distilling."""
    train, val = (load_builtin("digits-rgb", s).take(slice(0, 128)) for s in ("train", "val"))
    torch.manual_seed(0)
    model = TinyNet().eval()
    ctx = TrainContext(train, val, teacher=TinyNet().eval())
    model = UnstructuredPrune(ratio=0.8, steps=1, finetune_epochs=0).apply(model, ctx)
    zeros = {n: p == 0 for n, p in model.named_parameters() if n.endswith("weight")
             and p.dim() > 1}
    assert ctx.masks and sparsity(model) == pytest.approx(0.8, abs=0.01)
    model = Distill(epochs=2, batch_size=32).apply(model, ctx)
    assert sparsity(model) == pytest.approx(0.8, abs=0.01)
    for n, p in model.named_parameters():
        if n in zeros:
            assert bool((p[zeros[n]] == 0).all()), n


def test_factory_model_structured_pruning_through_the_cli(rgb: Path, tmp_path: Path) -> None:
    """A torchvision factory with config and weights: channels really removed, and the result
    reloads (a whole module) with the smaller shapes."""
    (tmp_path / "cfg.json").write_text(json.dumps({"num_classes": 10}))
    torch.manual_seed(0)
    start = load_model("torchvision.models:resnet18", config=tmp_path / "cfg.json")
    torch.save(start.module.state_dict(), tmp_path / "w.pt")
    main(["prune", "torchvision.models:resnet18", "--model-config", str(tmp_path / "cfg.json"),
          "--weights", str(tmp_path / "w.pt"), "--structured", "0.5", "--steps", "1",
          "--finetune-epochs", "0", "--data", str(rgb / "train.npz"), "--val",
          str(rgb / "val.npz"), "--runs", "3", "--out", str(tmp_path / "out")])
    out = load_model(tmp_path / "out" / "model.pt").module
    assert out.conv1.out_channels == 32 and out.fc.out_features == 10
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["ratio"]["flops"] < 0.4 and report["after"]["export_max_abs_diff"] < 1e-3


def test_hugging_face_class_pruned_through_the_cli(tmp_path: Path) -> None:
    """A Hugging Face class + config through `prune`: heads and FFN width removed, the export
    matches the pruned torch model."""
    cfg = {"vocab_size": 60, "hidden_size": 64, "num_hidden_layers": 2,
           "num_attention_heads": 4, "intermediate_size": 128, "num_labels": 3,
           "pad_token_id": 0}
    (tmp_path / "bert.json").write_text(json.dumps(cfg))
    rng = np.random.default_rng(0)
    for split, n in (("train", 64), ("val", 32)):
        ids = rng.integers(1, 60, (n, 16))
        ids[:, 12:] = 0   # padding
        save_npz(tmp_path / f"{split}.npz",
                 Dataset({"input_ids": ids.astype(np.int64)}, rng.integers(0, 3, n)))
    main(["prune", "transformers:BertForSequenceClassification", "--model-config",
          str(tmp_path / "bert.json"), "--structured", "0.5", "--steps", "1",
          "--finetune-epochs", "0", "--data", str(tmp_path / "train.npz"), "--val",
          str(tmp_path / "val.npz"), "--runs", "3", "--out", str(tmp_path / "out")])
    out = load_model(tmp_path / "out" / "model.pt").module
    assert isinstance(out, TextClassifier)
    layer = out.model.bert.encoder.layer[0]
    assert layer.intermediate.dense.out_features == 64
    assert layer.attention.self.query.out_features == 32   # 2 heads of 16 left
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["after"]["export_max_abs_diff"] < 1e-3 and report["ratio"]["flops"] < 0.8
