"""Knowledge distillation (Hinton, Vinyals and Dean, 2015, "Distilling the Knowledge in a
Neural Network"): the student learns from the teacher's temperature-softened outputs and
from the hard labels.

loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))
       + (1 - alpha) * cross_entropy(student, labels)

The T^2 factor keeps the soft term's gradients on the scale of the hard term's as T grows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from edgeloop._trainconfig import TrainConfig
from edgeloop.compress.trainbase import TorchPass, TrainContext, apply_masks
from edgeloop.data import Dataset
from edgeloop.errors import ModelError, UsageError
from edgeloop.zoo.losses import distillation_loss
from edgeloop.zoo.train import train

__all__ = ["Distill", "distillation_loss", "teacher_loss"]


@dataclass
class Distill(TorchPass):
    """Train the model given to :meth:`apply` (the student) from ``ctx.teacher``.

    ``alpha = 0`` trains on the hard labels alone: the no-distillation baseline, with the
    same optimiser, epochs and seed. Weights that ``ctx.masks`` marks (an earlier
    unstructured pruning) stay zero.
    """

    epochs: int = 30
    temperature: float = 4.0
    alpha: float = 0.7        # weight of the soft (teacher) term
    lr: float = 3e-3          # AdamW peak learning rate, one-cycle schedule
    batch_size: int = 128
    weight_decay: float = 1e-4
    seed: int = 0
    description: str = "distilling"   # the progress bar's label
    name: ClassVar[str] = "distill"

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise UsageError(f"`alpha` must lie in [0, 1]; got {self.alpha!r}")
        if self.temperature <= 0 or self.epochs < 1:
            raise UsageError("`temperature` must be > 0 and `epochs` >= 1")

    def apply(self, model: nn.Module, ctx: TrainContext) -> nn.Module:
        if ctx.teacher is None and self.alpha > 0:
            raise ModelError("distillation needs a teacher model")
        x, _ = _tensors(ctx.train)
        loss = None   # labels only
        if ctx.teacher is not None:
            with torch.no_grad():
                if ctx.teacher.eval()(x[:1]).shape[-1] != model(x[:1]).shape[-1]:
                    raise ModelError("teacher and student disagree on the number of classes")
            loss = teacher_loss(ctx.teacher, ctx.train, alpha=self.alpha,
                                temperature=self.temperature)

        config = TrainConfig(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr,
                             weight_decay=self.weight_decay, seed=self.seed)
        masks = ctx.masks
        return train(model, ctx.train, ctx.val, config, loss=loss,
                     after_step=(lambda: apply_masks(model, masks)) if masks else None,
                     description=self.description)


def teacher_loss(teacher: nn.Module, data: Dataset, *, alpha: float, temperature: float,
                 batch_size: int = 256) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The loss of :func:`edgeloop.zoo.train` (``loss(logits, idx)``) that distils from
    ``teacher``: its logits on every sample of ``data`` are computed once, in batches of
    ``batch_size``."""
    x, y = _tensors(data)
    teacher.eval()
    with torch.no_grad():
        logits = torch.cat([teacher(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])

    def loss(student: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return distillation_loss(student, logits[idx], y[idx], temperature=temperature,
                                 alpha=alpha)
    return loss


def _tensors(data: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    (x,) = data.inputs.values()
    assert data.labels is not None
    return torch.from_numpy(x), torch.from_numpy(data.labels)
