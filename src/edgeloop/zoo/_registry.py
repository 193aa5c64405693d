"""Zoo names, their architectures and data sets, and the torch checkpoint format.

A checkpoint's ``config`` holds the architecture's keyword arguments plus, for a model whose
channels were pruned, ``layers``: ``{module name: {"in": n, "out": n, "groups": n}}`` for
every Conv / Linear / BatchNorm (BatchNorm uses ``out`` only). :func:`build` builds the
default model, then rebuilds those modules at their recorded shapes, so a pruned
``model.pt`` loads everywhere a zoo one does.
"""

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
from edgeloop.zoo.exits import MNIST1DCNNExits
from edgeloop.zoo.mobile import MobileNet1D
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
    "mnist1d-mobile": Arch(MobileNet1D, "mnist1d", (40,)),
    "mnist1d-cnn-exits": Arch(MNIST1DCNNExits, "mnist1d", (40,)),
}

LAYERS = "layers"  # config key for per-layer shapes of a pruned model


def layer_shapes(model: nn.Module) -> dict[str, dict[str, int]]:
    """The channel counts of every Conv / Linear / BatchNorm in ``model``, by module name."""
    shapes: dict[str, dict[str, int]] = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            shapes[name] = {"in": m.in_channels, "out": m.out_channels, "groups": m.groups}
        elif isinstance(m, nn.Linear):
            shapes[name] = {"in": m.in_features, "out": m.out_features}
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            shapes[name] = {"out": m.num_features}
    return shapes


def _resized(m: nn.Module, shape: dict[str, int]) -> nn.Module:
    if isinstance(m, nn.modules.conv._ConvNd):
        return type(m)(shape["in"], shape["out"], m.kernel_size, stride=m.stride,
                       padding=m.padding, dilation=m.dilation, groups=shape["groups"],
                       bias=m.bias is not None, padding_mode=m.padding_mode)
    if isinstance(m, nn.Linear):
        return nn.Linear(shape["in"], shape["out"], bias=m.bias is not None)
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return type(m)(shape["out"], eps=m.eps, momentum=m.momentum, affine=m.affine,
                       track_running_stats=m.track_running_stats)
    raise ModelError(f"cannot resize a {type(m).__name__}")


def resize_layers(model: nn.Module, layers: dict[str, dict[str, int]]) -> nn.Module:
    """Rebuild the named modules of ``model`` at the given shapes (fresh weights)."""
    modules = dict(model.named_modules())
    for name, shape in layers.items():
        if name not in modules:
            raise ModelError(f"checkpoint `layers` names {name!r}, which the model lacks")
        parent_name, _, child = name.rpartition(".")
        setattr(modules[parent_name], child, _resized(modules[name], shape))
    return model


def build(arch: str, **config: Any) -> nn.Module:
    """A freshly initialised zoo model."""
    if arch not in ARCHS:
        raise one_of("arch", sorted(ARCHS), arch)
    entry = ARCHS[arch]
    config = dict(config)
    layers = config.pop(LAYERS, None)
    model = entry.factory(**{**entry.defaults, **config})
    return resize_layers(model, layers) if layers else model


def save_torch(path: str | os.PathLike[str], model: nn.Module, arch: str,
               config: dict[str, Any]) -> None:
    """Write ``model`` as an edgeloop torch checkpoint (atomically)."""
    with atomic_path(path) as tmp:
        torch.save({"arch": arch, "config": dict(config), "state_dict": model.state_dict()}, tmp)


def load_torch(path: str | os.PathLike[str]) -> tuple[nn.Module, str]:
    """Load an edgeloop torch checkpoint; returns the module (in eval mode) and its arch."""
    model, arch, _ = load_checkpoint(path)
    return model, arch


def load_checkpoint(path: str | os.PathLike[str]) -> tuple[nn.Module, str, dict[str, Any]]:
    """Like :func:`load_torch`, and also the checkpoint's ``config``."""
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
    try:
        model = build(ckpt["arch"], **ckpt["config"])
        model.load_state_dict(ckpt["state_dict"])
    except (RuntimeError, TypeError, ValueError) as e:
        raise ModelError(f"{str(path)!r}: weights do not fit {ckpt['arch']}: "
                         f"{str(e).splitlines()[0]}") from None
    return model.eval(), ckpt["arch"], dict(ckpt["config"])
