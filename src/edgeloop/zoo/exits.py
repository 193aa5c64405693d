"""An early-exit CNN for MNIST-1D: ``mnist1d-cnn``'s four conv blocks, the later ones
wider, with exit heads after intermediate blocks (BranchyNet: Teerapittayanon et al., ICPR 2016).

All exits train jointly on the weighted sum of their losses: the final exit's
cross-entropy, and for each earlier exit a distillation loss from the final exit (its
softened outputs, not back-propagated into it) mixed with the cross-entropy ("self
distillation", as in Phuong and Lampert, ICCV 2019: an early exit learns which inputs
are easy from the whole network and becomes both more accurate and better calibrated; on
MNIST-1D at ``mnist1d-cnn``'s widths the first exit answered 90% of the validation inputs within a
0.5-point budget, against 67% trained on the labels alone). For the device the
model is cut into *segments* (:meth:`MNIST1DCNNExits.segments`): segment ``i`` takes the
previous segment's features and returns ``(exit logits, features)``, the last returns the
final logits, so the runtime runs segment 2 only when exit 1 was unsure
(:mod:`edgeloop.device.cascade`, chained stages).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
from torch import nn

from edgeloop.errors import UsageError
from edgeloop.zoo.losses import distillation_loss

__all__ = ["MNIST1DCNNExits", "Segment", "joint_loss"]


def _block(cin: int, cout: int, k: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv1d(cin, cout, k, stride=stride, padding=k // 2),
                         nn.BatchNorm1d(cout), nn.ReLU())


class Segment(nn.Module):
    """Blocks ``features[start:stop]`` of the body and one exit head. ``first`` takes the
    raw (samples x length) input; all but the last also return the features."""

    def __init__(self, blocks: nn.Sequential, head: nn.Linear, *, first: bool,
                 last: bool) -> None:
        super().__init__()
        self.blocks, self.head, self.first, self.last = blocks, head, first, last

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        h = self.blocks(x.unsqueeze(1) if self.first else x)
        logits = self.head(h.flatten(1))
        return logits if self.last else (logits, h)


class MNIST1DCNNExits(nn.Module):
    """``MNIST1DCNN``'s four conv blocks and linear head, block ``i`` with
    ``width * channels[i]`` channels, plus a linear exit head after each block listed in
    ``exits`` (1-based; the final head is the last exit). ``forward`` returns the final
    exit's logits, ``forward_exits`` every exit's. ``weights`` weigh each exit's loss in
    :func:`joint_loss`; ``distill`` is the weight of the distillation term in an earlier
    exit's loss (0: labels alone) at ``temperature``.

    The default puts the compute late: blocks of 64, 128, 192 and 192 channels, so the
    first exit (after block 2, its head included) costs 23% of the whole model's
    multiply-adds and the last two blocks, which only unsure inputs reach, 78%. With
    ``mnist1d-cnn``'s even widths (``width=32, channels=(1, 2, 2, 2)``) exit 1 costs 37%,
    and no thresholds halved the model's latency (``benchmarks/bench_runtime.py``)."""

    def __init__(self, width: int = 64, num_classes: int = 10, length: int = 40,
                 exits: tuple[int, ...] | list[int] = (2, 3),
                 weights: tuple[float, ...] | list[float] | None = None,
                 distill: float = 0.7, temperature: float = 4.0,
                 channels: tuple[int, ...] | list[int] = (1, 2, 3, 3)) -> None:
        super().__init__()
        if len(channels) != 4 or not all(isinstance(m, int) and m >= 1 for m in channels):
            raise UsageError(f"`channels` must be 4 integers >= 1, one multiplier of the "
                             f"width per block; got {list(channels)}")
        c = [width * m for m in channels]
        self.features = nn.Sequential(
            _block(1, c[0], 5, 1), _block(c[0], c[1], 3, 2), _block(c[1], c[2], 3, 2),
            _block(c[2], c[3], 3, 1),
        )
        self.head = nn.Linear(c[3] * (length // 4), num_classes)
        exits = tuple(int(e) for e in exits)
        if list(exits) != sorted(set(exits)) or not all(1 <= e < len(self.features)
                                                        for e in exits):
            raise UsageError(f"`exits` must be increasing block numbers in 1..."
                             f"{len(self.features) - 1}; got {list(exits)}")
        # (channels, length) after each block
        shapes = [(c[0], length), (c[1], length // 2), (c[2], length // 4), (c[3], length // 4)]
        self.exit_after = exits
        self.exit_heads = nn.ModuleList(
            nn.Linear(shapes[e - 1][0] * shapes[e - 1][1], num_classes) for e in exits)
        n = len(exits) + 1
        self.weights = tuple(float(v) for v in (weights or [1.0] * n))
        if len(self.weights) != n or any(v < 0 for v in self.weights):
            raise UsageError(f"`weights` must be {n} non-negative numbers, one per exit; got "
                             f"{list(self.weights)}")
        if not 0.0 <= distill <= 1.0 or temperature <= 0:
            raise UsageError(f"`distill` must lie in [0, 1] and `temperature` be > 0; got "
                             f"{distill!r} and {temperature!r}")
        self.distill, self.temperature = float(distill), float(temperature)

    def forward_exits(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every exit's logits, the final one last."""
        h, out, heads = x.unsqueeze(1), [], dict(zip(self.exit_after, self.exit_heads,
                                                     strict=True))
        for i, block in enumerate(self.features, start=1):
            h = block(h)
            if i in heads:
                out.append(heads[i](h.flatten(1)))
        out.append(self.head(h.flatten(1)))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_exits(x)[-1]

    def segments(self) -> list[Segment]:
        """The model cut after each exit (sharing this model's modules)."""
        cuts = [0, *self.exit_after, len(self.features)]
        heads = [*self.exit_heads, self.head]
        return [Segment(self.features[a:b], heads[i], first=i == 0, last=i == len(heads) - 1)
                for i, (a, b) in enumerate(itertools.pairwise(cuts))]


def joint_loss(model: MNIST1DCNNExits, labels: torch.Tensor) -> tuple[
        Callable[[torch.Tensor], torch.Tensor],
        Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    """The training objective: ``forward(x)`` giving every exit's logits stacked
    (samples x exits x classes), and ``loss(stacked, idx)``, the weighted sum of each
    exit's loss with ``labels[idx]`` (see the module docstring)."""
    weights = [float(w) for w in model.weights]

    def forward(x: torch.Tensor) -> torch.Tensor:
        return torch.stack(model.forward_exits(x), 1)

    def loss(stacked: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        y, final = labels[idx], stacked[:, -1]
        total = weights[-1] * nn.functional.cross_entropy(final, y)
        for i, w in enumerate(weights[:-1]):
            total = total + w * distillation_loss(stacked[:, i], final.detach(), y,
                                                  temperature=model.temperature,
                                                  alpha=model.distill)
        return total

    return forward, loss
