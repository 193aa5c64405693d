"""A mobile-style 1-D backbone: depthwise-separable convolutions in inverted residual blocks.

The block follows the MobileNetV2 design (Sandler et al., 2018, "MobileNetV2: Inverted
Residuals and Linear Bottlenecks"): a 1x1 expansion, a depthwise convolution, a linear 1x1
projection, and a residual add when the block keeps its shape. ``width`` scales every
channel count (the width multiplier), so a smaller model is one argument away.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["InvertedResidual", "MobileNet1D"]

# (output channels at width 1.0, stride, blocks) per stage
_STAGES = ((16, 1, 1), (24, 2, 2), (32, 2, 2))


def _scaled(channels: int, width: float) -> int:
    return max(4, round(channels * width))


class InvertedResidual(nn.Module):
    """1x1 expand -> BN -> ReLU -> depthwise k -> BN -> ReLU -> 1x1 project -> BN (+ input)."""

    def __init__(self, cin: int, cout: int, *, stride: int, expand: int, kernel: int = 5) -> None:
        super().__init__()
        hidden = cin * expand
        self.residual = stride == 1 and cin == cout
        self.expand = nn.Sequential(nn.Conv1d(cin, hidden, 1, bias=False),
                                    nn.BatchNorm1d(hidden), nn.ReLU())
        self.depthwise = nn.Sequential(
            nn.Conv1d(hidden, hidden, kernel, stride=stride, padding=kernel // 2, groups=hidden,
                      bias=False),
            nn.BatchNorm1d(hidden), nn.ReLU())
        self.project = nn.Sequential(nn.Conv1d(hidden, cout, 1, bias=False), nn.BatchNorm1d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.depthwise(self.expand(x)))
        return x + y if self.residual else y


class MobileNet1D(nn.Module):
    """Stem convolution, three stages of inverted residual blocks, a linear head on the
    flattened feature map (MNIST-1D's classes depend on position, so no global pooling)."""

    def __init__(self, width: float = 1.0, expand: int = 4, num_classes: int = 10,
                 length: int = 40) -> None:
        super().__init__()
        cin = _scaled(16, width)
        self.stem = nn.Sequential(nn.Conv1d(1, cin, 5, padding=2, bias=False),
                                  nn.BatchNorm1d(cin), nn.ReLU())
        blocks: list[nn.Module] = []
        for channels, stride, repeats in _STAGES:
            cout = _scaled(channels, width)
            for i in range(repeats):
                blocks.append(InvertedResidual(cin, cout, stride=stride if i == 0 else 1,
                                               expand=expand))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(cin * (length // 4), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x.unsqueeze(1))).flatten(1))
