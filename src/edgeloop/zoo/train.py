"""Supervised training of zoo models on the built-in data sets (CPU, a minute or two)."""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgeloop._progress import progress
from edgeloop._trainconfig import TrainConfig
from edgeloop.data import Dataset, load_builtin
from edgeloop.zoo._registry import ARCHS, build, save_torch
from edgeloop.zoo.exits import MNIST1DCNNExits, joint_loss


def _logits_and_labels(data: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    if data.labels is None:
        from edgeloop.errors import DataError

        raise DataError("training data has no `labels` array")
    (x,) = data.inputs.values()
    return torch.from_numpy(x), torch.from_numpy(data.labels)


@torch.no_grad()
def accuracy(model: nn.Module, data: Dataset, *, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``model`` on ``data``, in [0, 1], ``batch_size`` samples at a
    time (eval mode)."""
    x, y = _logits_and_labels(data)
    model.eval()
    right = sum(int((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
                for i in range(0, len(y), batch_size))
    return right / max(len(y), 1)


def train(model: nn.Module, train_data: Dataset, val_data: Dataset,
          config: TrainConfig | None = None, *,
          loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
          after_step: Callable[[], None] | None = None,
          forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
          description: str = "training") -> nn.Module:
    """Train ``model`` in place with AdamW and a cosine schedule; keep the weights of the
    epoch with the best validation accuracy. Returns the model in eval mode.

    ``loss(logits, idx)`` scores one batch, given the indices of its samples in
    ``train_data``; the default is cross-entropy with the labels. ``after_step`` runs after
    every optimiser step (e.g. to keep pruned weights at zero). ``forward(x)`` gives what
    ``loss`` scores (default: the model's output; an early-exit model gives every exit's)."""
    config = config or TrainConfig()
    torch.manual_seed(config.seed)
    x, y = _logits_and_labels(train_data)
    forward = forward or model
    if loss is None:
        def loss(logits: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            return nn.functional.cross_entropy(logits, y[idx])
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps = config.epochs * -(-len(x) // config.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=steps)
    gen = torch.Generator().manual_seed(config.seed)
    best, best_state = -1.0, copy.deepcopy(model.state_dict())
    for _ in progress(range(config.epochs), description, total=config.epochs):
        model.train()
        for idx in torch.randperm(len(x), generator=gen).split(config.batch_size):
            opt.zero_grad()
            loss(forward(x[idx]), idx).backward()
            opt.step()
            sched.step()
            if after_step is not None:
                after_step()
        acc = accuracy(model, val_data)
        if acc > best:
            best, best_state = acc, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    return model.eval()


def train_zoo_model(arch: str, out_dir: str | os.PathLike[str], *,
                    config: TrainConfig | None = None, **arch_config: object) -> dict[str, float]:
    """Train zoo model ``arch`` on its built-in data set and write ``out_dir/model.pt`` and
    ``out_dir/model.onnx`` (for an early-exit model also its segments,
    ``out_dir/exit1.onnx``, ``exit2.onnx``, ...). Returns validation and test accuracy.
    ``config.seed`` fixes the initial weights as well as the training order: the same seed
    gives the same model."""
    from edgeloop.export import segments_to_onnx, to_onnx

    config = config or TrainConfig()
    torch.manual_seed(config.seed)
    model = build(arch, **arch_config)
    entry = ARCHS[arch]
    train_data = load_builtin(entry.dataset, "train")
    val_data = load_builtin(entry.dataset, "val")
    objective: dict[str, object] = {}
    if isinstance(model, MNIST1DCNNExits):
        forward, loss = joint_loss(model, _logits_and_labels(train_data)[1])
        objective = {"forward": forward, "loss": loss}
    train(model, train_data, val_data, config, description=f"training {arch}",
          **objective)  # type: ignore[arg-type]
    out = Path(out_dir)
    save_torch(out / "model.pt", model, arch, arch_config)
    sample = torch.from_numpy(np.ascontiguousarray(train_data.inputs["x"][:2]))
    to_onnx(model, sample, out / "model.onnx")
    if isinstance(model, MNIST1DCNNExits):
        segments_to_onnx(model.segments(), sample, out, stem="exit")
    return {"val_accuracy": accuracy(model, val_data),
            "test_accuracy": accuracy(model, load_builtin(entry.dataset, "test"))}
