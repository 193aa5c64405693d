"""Pruning: structured (whole channels removed) and unstructured (magnitude sparsity).

Structured pruning removes output channels and everything coupled to them, so the exported
ONNX graph has smaller Conv/Gemm shapes and really does less work. Channels are pruned in
*groups*: every layer that produces a channel (conv/linear outputs, their BatchNorm, the
depthwise convolution that maps it one-to-one, and every producer feeding the same
residual add) and every layer that consumes it (the next layer's inputs, or the columns of a
linear head after a flatten) lose the same indices together.

Importance of a channel: the L1 or L2 norm of its producer weights (each producer normalised
by its mean so layers joined by a residual add weigh equally), or the first-order Taylor
criterion of Molchanov et al. (2019, "Importance Estimation for Neural Network Pruning"):
the squared sum of weight x gradient over the channel's parameters, averaged over batches.
The schedule is iterative: ``steps`` rounds of pruning, each followed by fine-tuning.

Unstructured pruning zeroes the smallest weights (globally or per layer) with
``torch.nn.utils.prune``. onnxruntime's CPU kernels run a sparse weight exactly as fast as a
dense one; the gain is the compressed download, which the report shows.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from edgeloop.compress.trainbase import TorchPass, TrainContext, require_ratio
from edgeloop.errors import ModelError, UsageError, one_of
from edgeloop.zoo.mobile import MobileNet1D
from edgeloop.zoo.models import MNIST1DCNN, MNIST1DMLP, DigitsCNN
from edgeloop.zoo.train import TrainConfig, train

__all__ = ["IMPORTANCES", "ChannelGroup", "StructuredPrune", "UnstructuredPrune",
           "channel_groups", "sparsity", "zipped_size"]

IMPORTANCES = ("l1", "l2", "taylor")


@dataclass
class ChannelGroup:
    """Layers that share one set of channels.

    ``producers``: (module, kind) with kind ``out`` (conv/linear output), ``bn`` or ``dw``
    (depthwise conv: its input and output are the channel). ``consumers``: (module, span)
    where the module's input dimension holds ``span`` entries per channel (1 for a conv, the
    flattened length for a linear head after a flatten).
    """

    producers: list[tuple[nn.Module, str]] = field(default_factory=list)
    consumers: list[tuple[nn.Module, int]] = field(default_factory=list)

    @property
    def size(self) -> int:
        m, kind = self.producers[0]
        return m.num_features if kind == "bn" else m.weight.shape[0]


def _chain_groups(model: nn.Module) -> list[ChannelGroup]:
    """A plain chain: each conv/linear (with its BatchNorm) feeds the next one."""
    kinds = nn.modules.conv._ConvNd | nn.Linear | nn.modules.batchnorm._BatchNorm
    layers = [m for m in model.modules() if isinstance(m, kinds)]
    groups: list[ChannelGroup] = []
    current: ChannelGroup | None = None
    for m in layers:
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            assert current is not None
            current.producers.append((m, "bn"))
            continue
        if current is not None:
            cin = m.in_channels if isinstance(m, nn.modules.conv._ConvNd) else m.in_features
            current.consumers.append((m, cin // current.size))
            groups.append(current)
        current = ChannelGroup([(m, "out")])
    return groups  # the last layer's outputs are the classes: never pruned


def _mobile_groups(model: MobileNet1D) -> list[ChannelGroup]:
    """Hidden channels of each inverted residual block, and each residual stream (every
    producer whose output is added into it, and every block that reads it)."""
    groups: list[ChannelGroup] = []
    stream = ChannelGroup([(model.stem[0], "out"), (model.stem[1], "bn")])
    for block in model.blocks:
        stream.consumers.append((block.expand[0], 1))
        groups.append(ChannelGroup(
            [(block.expand[0], "out"), (block.expand[1], "bn"), (block.depthwise[0], "dw"),
             (block.depthwise[1], "bn")], [(block.project[0], 1)]))
        producers = [(block.project[0], "out"), (block.project[1], "bn")]
        if block.residual:
            stream.producers += producers
        else:
            groups.append(stream)
            stream = ChannelGroup(producers)
    stream.consumers.append((model.head, model.head.in_features // stream.size))
    groups.append(stream)
    return groups


_GROUPERS: dict[type, Callable[[nn.Module], list[ChannelGroup]]] = {
    MNIST1DCNN: _chain_groups, MNIST1DMLP: _chain_groups, DigitsCNN: _chain_groups,
    MobileNet1D: _mobile_groups,  # type: ignore[dict-item]
}


def channel_groups(model: nn.Module) -> list[ChannelGroup]:
    """The prunable channel groups of ``model`` (zoo architectures only)."""
    grouper = _GROUPERS.get(type(model))
    if grouper is None:
        raise ModelError(f"structured pruning does not know the channel coupling of "
                         f"{type(model).__name__}; it supports "
                         f"{', '.join(sorted(t.__name__ for t in _GROUPERS))}")
    return grouper(model)


def _norm_scores(group: ChannelGroup, p: int) -> torch.Tensor:
    score = torch.zeros(group.size)
    for m, kind in group.producers:
        w = m.weight.detach()
        s = w.abs() if kind == "bn" else w.flatten(1).norm(p=p, dim=1)
        score += s / s.mean().clamp_min(1e-12)
    return score


def _taylor_scores(model: nn.Module, groups: list[ChannelGroup], ctx: TrainContext,
                   batches: int = 8, batch_size: int = 128) -> list[torch.Tensor]:
    (x,) = ctx.train.inputs.values()
    x = torch.from_numpy(x)
    y = torch.from_numpy(ctx.train.labels)
    scores = [torch.zeros(g.size) for g in groups]
    model.train()
    gen = torch.Generator().manual_seed(0)
    for idx in torch.randperm(len(x), generator=gen)[: batches * batch_size].split(batch_size):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        for g, s in zip(groups, scores, strict=True):
            for m, _ in g.producers:
                for prm in (m.weight, m.bias):
                    if prm is not None and prm.grad is not None:
                        s += (prm.detach() * prm.grad).flatten(1).sum(1).pow(2) if prm.dim() > 1 \
                            else (prm.detach() * prm.grad).pow(2)
    model.zero_grad()
    model.eval()
    return scores


def _slice(prm: nn.Parameter | torch.Tensor | None, keep: torch.Tensor,
           dim: int) -> nn.Parameter | torch.Tensor | None:
    if prm is None:
        return None
    out = prm.detach().index_select(dim, keep).clone()
    return nn.Parameter(out) if isinstance(prm, nn.Parameter) else out


def _remove(group: ChannelGroup, keep: torch.Tensor) -> None:
    n = len(keep)
    for m, kind in group.producers:
        m.weight = _slice(m.weight, keep, 0)
        if m.bias is not None:
            m.bias = _slice(m.bias, keep, 0)
        if kind == "bn":
            m.running_mean = _slice(m.running_mean, keep, 0)
            m.running_var = _slice(m.running_var, keep, 0)
            m.num_features = n
        elif isinstance(m, nn.Linear):
            m.out_features = n
        else:
            m.out_channels = n
            if kind == "dw":
                m.in_channels = m.groups = n
    for m, span in group.consumers:
        cols = (keep[:, None] * span + torch.arange(span)).flatten()
        m.weight = _slice(m.weight, cols, 1)
        if isinstance(m, nn.Linear):
            m.in_features = len(cols)
        else:
            m.in_channels = len(cols)


@dataclass
class StructuredPrune(TorchPass):
    """Remove ``ratio`` of the channels of every channel group, in ``steps`` rounds, each
    followed by fine-tuning (``finetune_epochs`` in total, split over the rounds)."""

    ratio: float = 0.5
    importance: str = "l1"
    steps: int = 3
    finetune_epochs: int = 12
    lr: float = 1e-3            # AdamW peak learning rate while fine-tuning
    min_channels: int = 2       # never prune a group below this many channels
    seed: int = 0
    name: ClassVar[str] = "prune"

    def __post_init__(self) -> None:
        require_ratio("ratio", self.ratio)
        if self.importance not in IMPORTANCES:
            raise one_of("importance", IMPORTANCES, self.importance)
        if self.steps < 1 or self.finetune_epochs < 0:
            raise UsageError("`steps` must be >= 1 and `finetune_epochs` >= 0")

    def apply(self, model: nn.Module, ctx: TrainContext) -> nn.Module:
        groups = channel_groups(model)
        original = [g.size for g in groups]
        epochs = _split(self.finetune_epochs, self.steps)
        for step in range(1, self.steps + 1):
            keep_fraction = 1.0 - self.ratio * step / self.steps
            if self.importance == "taylor":
                scores = _taylor_scores(model, groups, ctx)
            else:
                p = 1 if self.importance == "l1" else 2
                scores = [_norm_scores(g, p) for g in groups]
            for g, s, n0 in zip(groups, scores, original, strict=True):
                target = max(min(self.min_channels, n0), round(n0 * keep_fraction))
                if target < g.size:
                    keep = s.topk(target).indices.sort().values
                    _remove(g, keep)
            if epochs[step - 1]:
                train(model, ctx.train, ctx.val,
                      TrainConfig(epochs=epochs[step - 1], lr=self.lr, seed=self.seed + step),
                      description=f"fine-tuning after pruning step {step}/{self.steps}")
        return model.eval()


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _prunable(model: nn.Module) -> list[tuple[nn.Module, str]]:
    return [(m, "weight") for m in model.modules()
            if isinstance(m, nn.modules.conv._ConvNd | nn.Linear)]


@dataclass
class UnstructuredPrune(TorchPass):
    """Zero ``ratio`` of the Conv/Linear weights by magnitude, over all layers at once
    (``scope = "global"``) or in every layer (``"layer"``), in ``steps`` rounds with
    fine-tuning under the mask. The masks go to ``ctx.masks`` so that later passes keep
    the zeros."""

    ratio: float = 0.8
    scope: str = "global"
    steps: int = 3
    finetune_epochs: int = 12
    lr: float = 1e-3
    seed: int = 0
    name: ClassVar[str] = "prune-unstructured"

    def __post_init__(self) -> None:
        require_ratio("ratio", self.ratio)
        if self.scope not in ("global", "layer"):
            raise one_of("scope", ["global", "layer"], self.scope)

    def apply(self, model: nn.Module, ctx: TrainContext) -> nn.Module:
        params = _prunable(model)
        epochs = _split(self.finetune_epochs, self.steps)
        for step in range(1, self.steps + 1):
            # the fraction of the *remaining* weights to prune now to reach the schedule
            done = 1.0 - self.ratio * (step - 1) / self.steps
            amount = 1.0 - (1.0 - self.ratio * step / self.steps) / done
            if self.scope == "global":
                torch_prune.global_unstructured(params, pruning_method=torch_prune.L1Unstructured,
                                                amount=amount)
            else:
                for m, name in params:
                    torch_prune.l1_unstructured(m, name, amount=amount)
            if epochs[step - 1]:
                train(model, ctx.train, ctx.val,
                      TrainConfig(epochs=epochs[step - 1], lr=self.lr, seed=self.seed + step),
                      description=f"fine-tuning after pruning step {step}/{self.steps}")
        for m, name in params:
            torch_prune.remove(m, name)
        names = {id(m): n for n, m in model.named_modules()}
        ctx.masks.update({f"{names[id(m)]}.weight".lstrip("."): (m.weight != 0).float()
                          for m, _ in params})
        return model.eval()


def sparsity(model: nn.Module) -> float:
    """Fraction of Conv/Linear weights that are exactly zero."""
    total = zeros = 0
    for m, _ in _prunable(model):
        total += m.weight.numel()
        zeros += int((m.weight == 0).sum())
    return zeros / total


def zipped_size(data: bytes) -> int:
    """Size of ``data`` in a deflate-compressed zip: what a sparse model costs to download."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as z:
        z.writestr("model.onnx", data)
    return len(buf.getvalue())
