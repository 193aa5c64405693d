"""Optimiser settings for training zoo models, kept apart from :mod:`edgeloop.zoo`.

The command line shows these defaults in ``--help`` and must do so without importing
torch (devices run edgeloop without it), so the dataclass lives in a module that imports
nothing heavy. It is public as :class:`edgeloop.zoo.TrainConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["TrainConfig"]


@dataclass
class TrainConfig:
    """Optimiser settings. The defaults train every zoo model in under two minutes."""

    epochs: int = 40
    batch_size: int = 128
    lr: float = 3e-3          # AdamW peak learning rate, cosine-decayed to 0
    weight_decay: float = 1e-4
    seed: int = 0
