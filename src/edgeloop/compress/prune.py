"""Pruning: structured (whole channels and attention heads removed) and unstructured
(magnitude sparsity).

Structured pruning removes output channels and everything coupled to them, so the exported
ONNX graph has smaller Conv/Gemm/MatMul shapes and really does less work. The coupling is
not written per model: torch-pruning's dependency graph (Fang et al., 2023, "DepGraph:
Towards Any Structural Pruning") traces the model and groups every layer that must lose the
same channels (BatchNorm, depthwise convolutions, residual adds, squeeze-excitation gates,
flattened linear heads). Transformers lose whole attention heads (query, key and value
together, each head keeping its size) and feed-forward width; their residual stream, whose
width the embeddings fix, is kept. The layer that writes the model's output is never pruned.

Importance of a channel group: the L1 or L2 norm of its weights over every coupled layer,
or the first-order Taylor criterion of Molchanov et al. (2019, "Importance Estimation for
Neural Network Pruning"), |weight x gradient| summed over the group, with gradients taken
in eval mode so that BatchNorm statistics stay as trained. The schedule is iterative:
``steps`` rounds of pruning, each followed by fine-tuning that distils from the unpruned
model (Hinton et al., 2015), which recovers more accuracy than the labels alone.

Unstructured pruning zeroes the smallest weights (globally or per layer) with
``torch.nn.utils.prune``. onnxruntime's CPU kernels run a sparse weight exactly as fast as a
dense one; the gain is the compressed download, which the report shows.
"""

from __future__ import annotations

import copy
import io
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from edgeloop.compress.distill import teacher_loss
from edgeloop.compress.trainbase import TorchPass, TrainContext, require_ratio, sample_of
from edgeloop.errors import ModelError, UsageError, one_of
from edgeloop.zoo.train import TrainConfig, train

__all__ = ["IMPORTANCES", "StructuredPrune", "UnstructuredPrune", "sparsity", "zipped_size"]

IMPORTANCES = ("l1", "l2", "taylor")


@dataclass
class StructuredPrune(TorchPass):
    """Remove ``ratio`` of the channels of every channel group (and of the attention heads
    of every attention layer), in ``steps`` rounds, each followed by fine-tuning
    (``finetune_epochs`` in total, split over the rounds) that distils from the unpruned
    model: ``ctx.teacher`` if set, else a copy of the model as given."""

    ratio: float = 0.5
    importance: str = "l1"
    steps: int = 3
    finetune_epochs: int = 24
    lr: float = 2e-3            # AdamW peak learning rate while fine-tuning
    batch_size: int = 128       # fine-tuning batch (samples)
    min_channels: int = 2       # never prune a group below this many channels
    round_to: int = 8           # a layer whose width is a multiple of this stays one
    distill_alpha: float = 0.3  # weight of the teacher's softened outputs; 0: labels only
    temperature: float = 4.0
    taylor_batches: int = 8     # batches of 64 samples whose gradients score channels
    seed: int = 0
    name: ClassVar[str] = "prune"

    def __post_init__(self) -> None:
        require_ratio("ratio", self.ratio)
        if self.importance not in IMPORTANCES:
            raise one_of("importance", IMPORTANCES, self.importance)
        if (self.steps < 1 or self.finetune_epochs < 0 or self.min_channels < 1
                or self.round_to < 1):
            raise UsageError("`steps` must be >= 1, `finetune_epochs` >= 0, and "
                             "`min_channels` and `round_to` >= 1")
        if not 0.0 <= self.distill_alpha <= 1.0 or self.temperature <= 0:
            raise UsageError(f"`distill_alpha` must lie in [0, 1] and `temperature` be > 0; "
                             f"got {self.distill_alpha!r} and {self.temperature!r}")

    def apply(self, model: nn.Module, ctx: TrainContext) -> nn.Module:
        import torch_pruning as tp

        epochs = _split(self.finetune_epochs, self.steps)
        loss = None   # labels only, unless there is fine-tuning that distils
        if self.finetune_epochs and self.distill_alpha > 0:
            teacher = ctx.teacher if ctx.teacher is not None else copy.deepcopy(model)
            loss = teacher_loss(teacher, ctx.train, alpha=self.distill_alpha,
                                temperature=self.temperature)
        sample = sample_of(ctx.train, 2)
        model.eval()
        heads = _attention_heads(model)
        ignored = [_output_layer(model, sample),
                   *(m for m in model.modules() if isinstance(m, nn.Embedding))]
        initial = {m: _out(m) for m in model.modules() if _out(m) and m not in ignored}
        importance = (tp.importance.GroupTaylorImportance() if self.importance == "taylor"
                      else tp.importance.GroupMagnitudeImportance(
                          p=1 if self.importance == "l1" else 2))
        for step in range(1, self.steps + 1):
            # One pruner per round, each told how many channels and heads to keep: a
            # single iterative torch-pruning pruner applies the cumulative head ratio to the
            # heads left, not to the original count, and so removes too many.
            keep = 1.0 - self.ratio * step / self.steps
            ratios, head_ratios = _round_ratios(initial, heads, keep, self.min_channels,
                                                self.round_to)
            if self.importance == "taylor":
                _accumulate_gradients(model, ctx, self.taylor_batches, self.seed + step)
            try:
                pruner = tp.pruner.BasePruner(
                    model, sample, importance=importance, pruning_ratio=0.0,
                    pruning_ratio_dict=ratios, ignored_layers=ignored,
                    num_heads={m: int(a.num_attention_heads) for a, qkv in heads.items()
                               for m in qkv},
                    prune_num_heads=bool(heads), prune_head_dims=False,
                    head_pruning_ratio_dict=head_ratios)
            except (RuntimeError, ValueError, TypeError) as e:
                raise ModelError(f"torch-pruning cannot trace {type(model).__name__}: "
                                 f"{str(e).splitlines()[0][:200]}") from None
            pruner.step()
            model.zero_grad(set_to_none=True)
            _fix_attention(heads)
            if epochs[step - 1]:
                train(model, ctx.train, ctx.val,
                      TrainConfig(epochs=epochs[step - 1], lr=self.lr,
                                  batch_size=self.batch_size, seed=self.seed + step),
                      loss=loss, description=f"fine-tuning after pruning step {step}/{self.steps}")
        return model.eval()


def _output_layer(model: nn.Module, sample: torch.Tensor) -> nn.Module:
    """The Conv/Linear whose output the model returns (else the last one to run)."""
    ran: list[tuple[nn.Module, torch.Tensor]] = []
    handles = [m.register_forward_hook(lambda m, _i, out: ran.append((m, out)))
               for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd | nn.Linear)]
    try:
        with torch.no_grad():
            out = model(sample)
    finally:
        for h in handles:
            h.remove()
    if not ran:
        raise ModelError(f"{type(model).__name__} has no Conv or Linear layer to prune")
    for m, o in reversed(ran):
        if o is out:
            return m
    return ran[-1][0]


def _out(m: nn.Module) -> int:
    if isinstance(m, nn.modules.conv._ConvNd):
        return int(m.out_channels)
    return int(m.out_features) if isinstance(m, nn.Linear) else 0


def _attention_heads(model: nn.Module) -> dict[nn.Module, list[nn.Linear]]:
    """Attention modules laid out like Hugging Face's BERT family (``query``/``key``/
    ``value`` linears, ``num_attention_heads``, ``attention_head_size``): module -> qkv."""
    found = {}
    for m in model.modules():
        qkv = [getattr(m, n, None) for n in ("query", "key", "value")]
        if (all(isinstance(x, nn.Linear) for x in qkv) and hasattr(m, "num_attention_heads")
                and hasattr(m, "attention_head_size")):
            found[m] = qkv
    return found  # type: ignore[return-value]


def _fix_attention(heads: dict[nn.Module, list[nn.Linear]]) -> None:
    """Set each attention module's head count to what pruning left (head size unchanged)."""
    for m, qkv in heads.items():
        m.num_attention_heads = qkv[0].out_features // int(m.attention_head_size)
        m.all_head_size = qkv[0].out_features


def _round_ratios(initial: dict[nn.Module, int], heads: dict[nn.Module, list[nn.Linear]],
                  keep: float, min_channels: int, round_to: int) -> tuple[
                      dict[nn.Module, float], dict[nn.Module, float]]:
    """This round's torch-pruning ratios, relative to the current sizes, that leave
    ``int(initial * keep)`` channels (at least ``min_channels``; the nearest multiple of
    ``round_to`` if the layer started as one) in every layer and ``int(initial heads *
    keep)`` heads (at least one) in every attention module. torch-pruning keeps
    ``int(n * (1 - ratio))`` channels and removes ``ceil(heads * ratio)`` heads: the
    half-unit margins make both exact.

    Why ``round_to``: onnxruntime's CPU convolutions work on blocks of 8 or 16 channels;
    ResNet-18 pruned 30% to unaligned widths (44, 89, 179, 358) ran 1.5x *slower* than the
    unpruned model at batch 32 on x86-avx512-vnni."""
    ratios, head_ratios = {}, {}
    for m, n0 in initial.items():
        target = int(n0 * keep + 1e-6)
        if n0 % round_to == 0 and n0 > round_to:
            target = min(n0, max(round_to, round_to * round(target / round_to)))
        target = max(min(min_channels, n0), target)
        n = _out(m)
        if target < n:
            ratios[m] = 1.0 - (target + 0.5) / n
    for a, qkv in heads.items():
        h0 = qkv[0].out_features // int(a.attention_head_size)   # heads now
        h0_initial = initial[qkv[0]] // int(a.attention_head_size)
        drop = h0 - max(1, int(h0_initial * keep + 1e-6))
        for m in qkv:
            ratios.pop(m, None)
            if drop > 0:   # the query/key/value group needs a width ratio to reach its heads
                ratios[m] = head_ratios[m] = (drop - 0.5) / h0
    return ratios, head_ratios


def _batches(ctx: TrainContext, n: int, batch_size: int,
             seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    (x,) = ctx.train.inputs.values()
    gen = torch.Generator().manual_seed(seed)
    for idx in torch.randperm(len(x), generator=gen)[: n * batch_size].split(batch_size):
        yield torch.from_numpy(np.ascontiguousarray(x[idx.numpy()])), idx


def _accumulate_gradients(model: nn.Module, ctx: TrainContext, batches: int,
                          seed: int) -> None:
    """Cross-entropy gradients of ``batches`` training batches, summed into ``.grad``. The
    model stays in eval mode: BatchNorm normalises with, and does not update, its running
    statistics."""
    if ctx.train.labels is None:
        raise ModelError("Taylor importance needs labelled training data")
    y = torch.from_numpy(ctx.train.labels)
    model.eval()
    model.zero_grad(set_to_none=True)
    for x, idx in _batches(ctx, batches, 64, seed):
        nn.functional.cross_entropy(model(x), y[idx]).backward()


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
    batch_size: int = 128       # fine-tuning batch (samples)
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
                      TrainConfig(epochs=epochs[step - 1], lr=self.lr,
                                  batch_size=self.batch_size, seed=self.seed + step),
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
