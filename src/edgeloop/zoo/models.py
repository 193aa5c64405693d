"""Reference architectures, small enough to train on a laptop CPU in under two minutes."""

from __future__ import annotations

import torch
from torch import nn


class MNIST1DCNN(nn.Module):
    """A 1-D CNN for MNIST-1D: four conv blocks (conv, BatchNorm, ReLU), then a linear head.

    The MNIST-1D paper's CNN reaches about 94% test accuracy; this one is a little wider so
    that it clears 93% reliably in a short CPU training run, and so that pruning and int8
    have real work to remove.
    """

    def __init__(self, width: int = 32, num_classes: int = 10, length: int = 40) -> None:
        super().__init__()
        w = width

        def block(cin: int, cout: int, k: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv1d(cin, cout, k, stride=stride, padding=k // 2),
                                 nn.BatchNorm1d(cout), nn.ReLU())

        self.features = nn.Sequential(
            block(1, w, 5, 1), block(w, 2 * w, 3, 2), block(2 * w, 2 * w, 3, 2),
            block(2 * w, 2 * w, 3, 1),
        )
        self.head = nn.Linear(2 * w * (length // 4), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.unsqueeze(1)).flatten(1))


class MNIST1DMLP(nn.Module):
    """A wide MLP for MNIST-1D: almost all of its weights sit in MatMul/Gemm layers."""

    def __init__(self, hidden: int = 1024, depth: int = 2, num_classes: int = 10,
                 length: int = 40) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = length
        for _ in range(depth):
            layers += [nn.Linear(cin, hidden), nn.ReLU()]
            cin = hidden
        layers.append(nn.Linear(cin, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class DigitsCNN(nn.Module):
    """A 2-D CNN for scikit-learn's 8x8 digits."""

    def __init__(self, width: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, padding=1, stride=2), nn.BatchNorm2d(2 * w), nn.ReLU(),
        )
        self.head = nn.Linear(2 * w * 16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))
