"""Structured pruning of arbitrary graphs (zoo models, torchvision CNNs, a BERT encoder) and
unstructured pruning, checked against an oracle: the exported ONNX graph has smaller weight
shapes and onnxruntime computes what the pruned PyTorch model computes."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from _tiers import tiered

from edgeloop.compress.prune import (
    StructuredPrune,
    UnstructuredPrune,
    sparsity,
    zipped_size,
)
from edgeloop.compress.trainbase import TrainContext, count_flops, count_params, sample_of
from edgeloop.data import Dataset, load_builtin
from edgeloop.errors import UsageError
from edgeloop.export import to_onnx
from edgeloop.zoo import LAYERS, build, layer_shapes, load_torch, save_torch

TRAIN = load_builtin("mnist1d", "train").take(slice(0, 384))
VAL = load_builtin("mnist1d", "val").take(slice(0, 128))
X = torch.from_numpy(VAL.inputs["x"][:64])


def _randomised(arch: str, **config: object) -> torch.nn.Module:
    """A model with non-trivial BatchNorm statistics, in eval mode."""
    torch.manual_seed(0)
    model = build(arch, **config)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def test_pruned_checkpoint_reloads_and_exports_smaller_shapes(tmp_path) -> None:
    model = _randomised("mnist1d-cnn", width=8)
    flops = count_flops(model, X)
    pruned = StructuredPrune(ratio=0.5, steps=2, finetune_epochs=0).apply(
        model, TrainContext(TRAIN, VAL))
    assert count_flops(pruned, X) / flops < 0.35
    save_torch(tmp_path / "model.pt", pruned, "mnist1d-cnn",
               {"width": 8, LAYERS: layer_shapes(pruned)})
    loaded, arch = load_torch(tmp_path / "model.pt")
    assert arch == "mnist1d-cnn"
    with torch.no_grad():
        np.testing.assert_array_equal(loaded(X).numpy(), pruned(X).numpy())
    assert to_onnx(loaded, sample_of(VAL), tmp_path / "model.onnx") <= 1e-4
    graph = onnx.load(tmp_path / "model.onnx").graph
    conv_out = [tuple(t.dims) for t in graph.initializer if t.name.endswith("0.weight")]
    assert conv_out[:2] == [(4, 1, 5), (8, 4, 3)]
    assert tuple(loaded.head.weight.shape) == (10, 8 * 10)   # the classes are never pruned


@pytest.mark.parametrize(("arch", "config"), [("mnist1d-mobile", {"width": 0.5}),
                                              ("mnist1d-mlp", {"hidden": 32})])
def test_other_zoo_models_reload_pruned(arch: str, config: dict, tmp_path) -> None:
    pruned = StructuredPrune(ratio=0.5, steps=1, finetune_epochs=0).apply(
        _randomised(arch, **config), TrainContext(TRAIN, VAL))
    assert count_params(pruned) < 0.5 * count_params(_randomised(arch, **config))
    save_torch(tmp_path / "model.pt", pruned, arch, {**config, LAYERS: layer_shapes(pruned)})
    loaded, _ = load_torch(tmp_path / "model.pt")
    with torch.no_grad():
        np.testing.assert_array_equal(loaded(X).numpy(), pruned(X).numpy())


@pytest.mark.parametrize("importance", ["l1", "l2", "taylor"])
def test_importance_keeps_the_channels_that_matter(importance: str) -> None:
    model = _randomised("mnist1d-cnn", width=8)
    with torch.no_grad():  # make channels 0..3 of the first conv far larger than the rest
        model.features[0][0].weight[:4] *= 50
        model.features[0][1].weight[:4] *= 50
    pruned = StructuredPrune(ratio=0.5, steps=1, finetune_epochs=0,
                             importance=importance).apply(copy.deepcopy(model),
                                                          TrainContext(TRAIN, VAL))
    kept = pruned.features[0][0].weight
    np.testing.assert_array_equal(kept.detach().numpy(),
                                  model.features[0][0].weight[:4].detach().numpy())


def test_iterative_fine_tuning_recovers_accuracy() -> None:
    from edgeloop.zoo.train import TrainConfig, accuracy, train

    data = load_builtin("mnist1d", "train").take(slice(0, 2000))
    model = train(build("mnist1d-cnn", width=8), data, VAL, TrainConfig(epochs=8))
    assert accuracy(model, VAL) > 0.5
    no_ft = StructuredPrune(ratio=0.5, steps=2, finetune_epochs=0).apply(
        copy.deepcopy(model), TrainContext(data, VAL))
    ft = StructuredPrune(ratio=0.5, steps=2, finetune_epochs=4, lr=3e-3).apply(
        copy.deepcopy(model), TrainContext(data, VAL))
    assert accuracy(ft, VAL) > accuracy(no_ft, VAL) + 0.05


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_unstructured_sparsity_and_compressed_size(scope: str, tmp_path) -> None:
    model = _randomised("mnist1d-cnn", width=8)
    dense = to_onnx(copy.deepcopy(model), sample_of(VAL), tmp_path / "dense.onnx")
    sparse_model = UnstructuredPrune(ratio=0.8, scope=scope, steps=2, finetune_epochs=0).apply(
        model, TrainContext(TRAIN, VAL))
    assert sparsity(sparse_model) == pytest.approx(0.8, abs=0.01)
    assert dense <= 1e-4
    assert to_onnx(sparse_model, sample_of(VAL), tmp_path / "sparse.onnx") <= 1e-4
    d, s = ((tmp_path / f).read_bytes() for f in ("dense.onnx", "sparse.onnx"))
    assert abs(len(s) - len(d)) < 0.05 * len(d)  # stored dense: same size
    assert zipped_size(s) < 0.6 * zipped_size(d)


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.2, 1.5])
def test_ratio_outside_open_interval_is_rejected(ratio: float) -> None:
    with pytest.raises(UsageError, match="strictly between 0 and 1"):
        StructuredPrune(ratio=ratio)
    with pytest.raises(UsageError, match="strictly between 0 and 1"):
        UnstructuredPrune(ratio=ratio)



def test_taylor_scoring_leaves_batchnorm_statistics_alone() -> None:
    model = _randomised("mnist1d-cnn", width=8)
    before = {n: (m.running_mean.clone(), m.running_var.clone(), int(m.num_batches_tracked))
              for n, m in model.named_modules()
              if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
    pruned = StructuredPrune(ratio=0.5, steps=2, finetune_epochs=0, importance="taylor").apply(
        model, TrainContext(TRAIN, VAL))
    for name, m in pruned.named_modules():
        if name in before:   # the kept channels' statistics, exactly as they were
            mean, var, tracked = before[name]
            assert m.num_features < len(mean) and int(m.num_batches_tracked) == tracked
            assert torch.isin(m.running_mean, mean).all() and torch.isin(m.running_var, var).all()


def _vision_data() -> tuple[Dataset, Dataset]:
    return (load_builtin("digits-rgb", "train").take(slice(0, 64)),
            load_builtin("digits-rgb", "val").take(slice(0, 16)))


def _pruning_oracle(model: torch.nn.Module, train: Dataset, val: Dataset, tmp_path,
                    **prune: object) -> torch.nn.Module:
    """Prune ``model``; check the export against onnxruntime and its weight shapes, FLOPs
    and parameters against the original. Returns the pruned model."""
    sample = sample_of(val, 4)
    model.eval()
    flops, params = count_flops(model, sample), count_params(model)
    weights = sum(m.weight.numel() for m in model.modules()
                  if isinstance(m, torch.nn.modules.conv._ConvNd | torch.nn.Linear))
    pruned = StructuredPrune(**{"ratio": 0.5, "steps": 1, "finetune_epochs": 0, **prune}).apply(
        model, TrainContext(train, val))
    assert count_flops(pruned, sample) < 0.6 * flops
    assert count_params(pruned) < 0.75 * params
    assert to_onnx(pruned, sample_of(val, 2), tmp_path / "pruned.onnx") <= 1e-4
    proto = onnx.load(tmp_path / "pruned.onnx")
    init = {t.name: int(np.prod(t.dims)) for t in proto.graph.initializer}
    onnx_weights = sum(init.get(n.input[1], 0) for n in proto.graph.node
                       if n.op_type in ("Conv", "Gemm", "MatMul"))
    assert 0 < onnx_weights < 0.75 * weights
    sess = ort.InferenceSession(str(tmp_path / "pruned.onnx"), providers=["CPUExecutionProvider"])
    (name,) = (i.name for i in sess.get_inputs())
    (got,) = sess.run(None, {name: sample.numpy()})
    with torch.no_grad():
        want = pruned(sample).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4 * float(np.abs(want).max()))
    return pruned


@pytest.mark.parametrize("arch", tiered(["mobilenet_v2", "resnet18", "efficientnet_b0"],
                                        {"mobilenet_v2", "efficientnet_b0"}))
def test_torchvision_models_prune_to_smaller_graphs(arch: str, tmp_path) -> None:
    from edgeloop._torchvision import import_torchvision

    torch.manual_seed(0)
    model = getattr(import_torchvision().models, arch)(num_classes=10)
    for m in model.modules():   # trained-looking BatchNorm, so outputs are not ~0
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    train, val = _vision_data()
    pruned = _pruning_oracle(model, train, val, tmp_path)
    last = [m for m in pruned.modules() if isinstance(m, torch.nn.Linear)][-1]
    assert last.out_features == 10


class _Branches(torch.nn.Module):
    """A user's own module: two branches concatenated on channels, then a conv that reads
    the concatenation, a residual add and a squeeze-excitation gate."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.a = torch.nn.Conv2d(16, 16, 3, padding=1)
        self.b = torch.nn.Conv2d(16, 32, 1)
        self.mix = torch.nn.Conv2d(48, 16, 3, padding=1)
        self.se = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Conv2d(16, 8, 1),
                                      torch.nn.ReLU(), torch.nn.Conv2d(8, 16, 1),
                                      torch.nn.Sigmoid())
        self.head = torch.nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.relu(self.stem(x))
        y = torch.relu(self.mix(torch.cat([torch.relu(self.a(s)), torch.relu(self.b(s))], 1)))
        y = (y + s) * self.se(y)
        return self.head(y.mean((2, 3)))


def test_concatenation_residual_and_gate_in_a_users_module(tmp_path) -> None:
    torch.manual_seed(0)
    train, val = _vision_data()
    pruned = _pruning_oracle(_Branches(), train, val, tmp_path)
    assert (pruned.a.out_channels, pruned.b.out_channels) == (8, 16)
    assert pruned.mix.in_channels == 24   # the concatenation's both halves shrank
    assert pruned.mix.out_channels == pruned.stem.out_channels == 8   # coupled by the add
    assert pruned.se[1].in_channels == 8 and pruned.se[3].out_channels == 8


def _tiny_bert() -> tuple[torch.nn.Module, Dataset]:
    from edgeloop._torchvision import ensure_importable

    ensure_importable()
    from transformers import BertConfig, BertForSequenceClassification

    from edgeloop.models import TextClassifier

    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=128, num_labels=3,
                        max_position_embeddings=32)
    gen = np.random.default_rng(0)
    data = Dataset({"input_ids": gen.integers(1, 100, (64, 16)).astype(np.int64)},
                   gen.integers(0, 3, 64).astype(np.int64))
    return TextClassifier(BertForSequenceClassification(config)), data


@pytest.mark.parametrize("importance", ["l2", "taylor"])
def test_bert_loses_whole_heads_and_ffn_width(importance: str, tmp_path) -> None:
    model, data = _tiny_bert()
    pruned = _pruning_oracle(model, data, data, tmp_path, importance=importance, steps=2)
    for layer in pruned.model.bert.encoder.layer:
        attn = layer.attention.self
        assert attn.num_attention_heads == 2 and attn.attention_head_size == 16
        assert attn.query.out_features == attn.key.out_features == attn.value.out_features == 32
        assert layer.attention.output.dense.in_features == 32
        assert layer.intermediate.dense.out_features == 64
        assert layer.output.dense.out_features == 64   # the residual stream is kept
    assert pruned.model.classifier.out_features == 3


def test_min_channels_is_a_floor_for_every_layer() -> None:
    pruned = StructuredPrune(ratio=0.8, steps=2, finetune_epochs=0, min_channels=3).apply(
        build("mnist1d-cnn", width=4), TrainContext(TRAIN, VAL))
    assert {v["out"] for k, v in layer_shapes(pruned).items() if k != "head"} == {3}


@pytest.mark.parametrize(("round_to", "width"), [(1, 44), (8, 48)])
def test_aligned_layers_stay_aligned(round_to: int, width: int) -> None:
    pruned = StructuredPrune(ratio=0.3, steps=2, finetune_epochs=0, round_to=round_to).apply(
        build("mnist1d-mlp", hidden=64), TrainContext(TRAIN, VAL))
    assert [m.out_features for m in pruned.net if isinstance(m, torch.nn.Linear)] == [
        width, width, 10]
