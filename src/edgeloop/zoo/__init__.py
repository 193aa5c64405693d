"""Reference models that edgeloop trains itself, and the checkpoint format for torch models.

A torch model file (``model.pt``) is a ``torch.save`` of a dict with ``arch`` (a zoo
name), ``config`` (keyword arguments for the architecture) and ``state_dict``. It loads
with ``weights_only=True``, so opening one never runs code. A model whose channels were
pruned records its per-layer shapes in ``config["layers"]`` (``{module name: {"in", "out",
"groups"}}``); :func:`build` rebuilds those layers at their shapes before loading weights.
"""

from edgeloop.zoo._registry import (
    ARCHS,
    LAYERS,
    Arch,
    build,
    layer_shapes,
    load_checkpoint,
    load_torch,
    save_torch,
)
from edgeloop.zoo.train import TrainConfig, train, train_zoo_model

__all__ = ["ARCHS", "LAYERS", "Arch", "TrainConfig", "build", "layer_shapes", "load_checkpoint",
           "load_torch", "save_torch", "train", "train_zoo_model"]
