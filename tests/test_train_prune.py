"""Structured and unstructured pruning, against an oracle: removing channels must compute
exactly what the original model computes with those channels' consumers zeroed."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch

from edgeloop.compress.prune import (
    StructuredPrune,
    UnstructuredPrune,
    _remove,
    channel_groups,
    sparsity,
    zipped_size,
)
from edgeloop.compress.trainbase import TrainContext, count_flops, sample_of
from edgeloop.data import load_builtin
from edgeloop.errors import ModelError, UsageError
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


@pytest.mark.parametrize(("arch", "config"), [("mnist1d-cnn", {"width": 8}),
                                              ("mnist1d-mobile", {"width": 0.5}),
                                              ("mnist1d-mlp", {"hidden": 32})])
def test_removing_channels_equals_zeroing_their_consumers(arch: str, config: dict) -> None:
    pruned = _randomised(arch, **config)
    reference = copy.deepcopy(pruned)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for g, g_ref in zip(channel_groups(pruned), channel_groups(reference), strict=True):
            keep = torch.randperm(g.size, generator=gen)[: g.size // 2].sort().values
            dropped = torch.ones(g.size, dtype=torch.bool)
            dropped[keep] = False
            for m, span in g_ref.consumers:
                cols = (dropped.nonzero()[:, 0][:, None] * span + torch.arange(span)).flatten()
                m.weight[:, cols] = 0
            _remove(g, keep)
        np.testing.assert_allclose(pruned(X).numpy(), reference(X).numpy(), atol=1e-5)
    assert sum(p.numel() for p in pruned.parameters()) < sum(
        p.numel() for p in reference.parameters())


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


@pytest.mark.parametrize("importance", ["l2", "taylor"])
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


def test_unknown_architecture_is_a_model_error() -> None:
    with pytest.raises(ModelError, match="channel coupling"):
        channel_groups(torch.nn.Sequential(torch.nn.Linear(4, 4)))
