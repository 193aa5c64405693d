"""What the training-time passes (prune, QAT, distill) share: their protocol, the data they
train on, counting parameters and FLOPs, and the before/after report.

A training-time pass is a config dataclass with ``apply(model, ctx) -> model`` like the
post-training passes, but on a torch module: it trains in PyTorch, and the result is
exported to ONNX and measured in onnxruntime by :func:`report`.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from edgeloop._io import write_text_atomic
from edgeloop.data import Dataset
from edgeloop.errors import DataError, UsageError
from edgeloop.measure import LatencyConfig, evaluate

__all__ = ["ModelFigures", "TorchPass", "TrainContext", "apply_masks", "check_labels",
           "count_flops",
           "count_params", "figures", "require_ratio", "sample_of",
           "write_report"]


@dataclass
class TrainContext:
    """Data a training-time pass may use. ``teacher`` is the model the recipe started from;
    ``calib`` is the data the final export calibrates on (``None``: the first 256 training
    samples). ``masks`` (parameter name -> 0/1 tensor) are the zeros an unstructured
    pruning pass made; every later pass that trains keeps them zero (:func:`apply_masks`
    after each optimiser step)."""

    train: Dataset
    val: Dataset
    teacher: nn.Module | None = None
    calib: Dataset | None = None
    masks: dict[str, torch.Tensor] = field(default_factory=dict)


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Zero the entries of ``model``'s parameters that ``masks`` (by parameter name) mark
    with 0, in place."""
    for name, mask in masks.items():
        model.get_parameter(name).mul_(mask)


class TorchPass(ABC):
    """A torch-to-torch training-time pass; subclasses are dataclasses holding the config."""

    name: ClassVar[str]

    @abstractmethod
    def apply(self, model: nn.Module, ctx: TrainContext) -> nn.Module:
        """Return the compressed model (a new module; ``model`` may be changed in place)."""


def require_ratio(field: str, value: float) -> None:
    """Raise unless 0 < ``value`` < 1."""
    if not 0.0 < value < 1.0:
        raise UsageError(f"`{field}` must be a ratio strictly between 0 and 1; got {value!r}")


def sample_of(data: Dataset, n: int = 2) -> torch.Tensor:
    """The first ``n`` inputs of ``data`` as a tensor (for export and tracing)."""
    (x,) = data.inputs.values()
    return torch.from_numpy(np.ascontiguousarray(x[:n]))


@torch.no_grad()
def check_labels(model: nn.Module, data: Dataset, *, source: str) -> None:
    """Raise :class:`DataError` unless ``data`` has labels within the model's classes and
    inputs the model accepts."""
    if data.labels is None:
        raise DataError(f"{source} has no `labels` array; training needs labels")
    if len(data.inputs) != 1:
        raise DataError(f"{source} must hold exactly one input array; got {sorted(data.inputs)}")
    model.eval()
    try:
        classes = model(sample_of(data, 1)).shape[-1]
    except RuntimeError as e:
        raise DataError(f"{source}: the model does not accept its inputs "
                        f"({str(e).splitlines()[0][:200]})") from None
    lo, hi = int(data.labels.min()), int(data.labels.max())
    if lo < 0 or hi >= classes:
        raise DataError(f"{source}: labels must lie in 0..{classes - 1} (the model has "
                        f"{classes} classes); got labels from {lo} to {hi}")


def count_params(model: nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_flops(model: nn.Module, sample: torch.Tensor) -> int:
    """FLOPs of one sample's forward pass: 2 per multiply-accumulate in Conv and Linear
    layers (the layers that dominate; BatchNorm, ReLU and adds are not counted)."""
    total = 0

    def hook(m: nn.Module, _inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(m, nn.modules.conv._ConvNd):
            per_output = m.in_channels // m.groups * int(np.prod(m.kernel_size))
            total += 2 * out[0].numel() * per_output
        else:
            total += 2 * m.in_features * m.out_features

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, nn.modules.conv._ConvNd | nn.Linear)]
    try:
        model.eval()(sample[:1])
    finally:
        for h in handles:
            h.remove()
    return total


@dataclass
class ModelFigures:
    """One side of a before/after report."""

    accuracy: float
    parameters: int
    flops: int
    size_bytes: int
    latency_b1_ms: float
    latency_b32_ms: float
    export_max_abs_diff: float | None = None
    nonzero_fraction: float | None = None
    zip_bytes: int | None = None


def figures(onnx_path: str | os.PathLike[str], model: nn.Module, val: Dataset, *,
            latency_config: LatencyConfig | None = None,
            export_max_abs_diff: float | None = None) -> ModelFigures:
    """Measure an exported model in onnxruntime; parameters and FLOPs come from ``model``,
    the torch module it was exported from."""
    rep = evaluate(onnx_path, val, batches_to_time=(1, 32),
                   latency_config=latency_config or LatencyConfig(min_runs=100, max_seconds=2))
    lat = {s.batch: s.p50_ms for s in rep.latency}
    return ModelFigures(accuracy=float(rep.accuracy or 0.0), parameters=count_params(model),
                        flops=count_flops(model, sample_of(val)), size_bytes=rep.size_bytes,
                        latency_b1_ms=lat[1], latency_b32_ms=lat[32],
                        export_max_abs_diff=export_max_abs_diff)


def write_report(path: str | os.PathLike[str], *, before: ModelFigures, after: ModelFigures,
                 passes: list[dict[str, object]], notes: list[str]) -> dict[str, object]:
    """Write report.json (atomically): both sides, their ratios, the passes that ran."""
    b, a = asdict(before), asdict(after)
    ratios = {k: (a[k] / b[k] if b[k] else None) for k in
              ("parameters", "flops", "size_bytes", "latency_b1_ms", "latency_b32_ms")}
    report: dict[str, object] = {
        "before": b, "after": a, "ratio": ratios,
        "accuracy_drop_points": round(100 * (b["accuracy"] - a["accuracy"]), 3),
        "passes": passes, "notes": notes}
    write_text_atomic(path, json.dumps(report, indent=2) + "\n")
    return report
