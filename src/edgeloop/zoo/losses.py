"""Training losses shared by the zoo's trainer and the compression passes."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["distillation_loss"]


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, *,
                      temperature: float, alpha: float) -> torch.Tensor:
    """Knowledge distillation's loss (Hinton, Vinyals and Dean, 2015) for one batch of
    logits: ``alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) +
    (1 - alpha) * cross_entropy(student, labels)`` with ``T = temperature``; the ``T^2``
    keeps the soft term's gradients on the hard term's scale as ``T`` grows."""
    soft = nn.functional.kl_div(nn.functional.log_softmax(student / temperature, -1),
                                nn.functional.log_softmax(teacher / temperature, -1),
                                reduction="batchmean", log_target=True)
    hard = nn.functional.cross_entropy(student, labels)
    return alpha * temperature**2 * soft + (1 - alpha) * hard
