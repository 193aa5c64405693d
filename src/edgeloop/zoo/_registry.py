"""Zoo names, their architectures and data sets, and the torch checkpoint format."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgeloop._io import atomic_path
from edgeloop.errors import ModelError, one_of
from edgeloop.zoo.models import MNIST1DCNN, MNIST1DMLP, DigitsCNN


@dataclass(frozen=True)
class Arch:
    """A zoo entry: how to build the module, which built-in data set it trains on, and the
    shape of one input sample."""

    factory: Callable[..., nn.Module]
    dataset: str
    sample_shape: tuple[int, ...]
    defaults: dict[str, Any] = field(default_factory=dict)


ARCHS: dict[str, Arch] = {
    "mnist1d-cnn": Arch(MNIST1DCNN, "mnist1d", (40,)),
    "mnist1d-mlp": Arch(MNIST1DMLP, "mnist1d", (40,)),
    "digits-cnn": Arch(DigitsCNN, "digits", (1, 8, 8)),
}


def build(arch: str, **config: Any) -> nn.Module:
    """A freshly initialised zoo model."""
    if arch not in ARCHS:
        raise one_of("arch", sorted(ARCHS), arch)
    entry = ARCHS[arch]
    return entry.factory(**{**entry.defaults, **config})


def save_torch(path: str | os.PathLike[str], model: nn.Module, arch: str,
               config: dict[str, Any]) -> None:
    """Write ``model`` as an edgeloop torch checkpoint (atomically)."""
    with atomic_path(path) as tmp:
        torch.save({"arch": arch, "config": dict(config), "state_dict": model.state_dict()}, tmp)


def load_torch(path: str | os.PathLike[str]) -> tuple[nn.Module, str]:
    """Load an edgeloop torch checkpoint; returns the module (in eval mode) and its arch."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"torch model {str(path)!r} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many unrelated types for a bad file
        raise ModelError(f"{str(path)!r} is not a torch checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or not {"arch", "config", "state_dict"} <= ckpt.keys():
        raise ModelError(f"{str(path)!r} is not an edgeloop checkpoint: expected a dict with "
                         "`arch`, `config` and `state_dict`")
    model = build(ckpt["arch"], **ckpt["config"])
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:
        raise ModelError(f"{str(path)!r}: weights do not fit {ckpt['arch']}: "
                         f"{str(e).splitlines()[0]}") from None
    return model.eval(), ckpt["arch"]
