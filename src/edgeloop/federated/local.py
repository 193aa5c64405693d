"""What a device does with its own data: train the shared model (with FedProx's proximal
term when asked), fine-tune its private head, and keep that head on disk.

The head lives in the device's state folder as ``head.pt`` (a ``state_dict`` written
atomically, read with ``weights_only=True``), never in Flower's ``Context.state``: that
record is serialised between rounds (pickled to Ray actors in simulation, sent as a
protobuf over the SuperNode's local runtime API in deployment).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from edgeloop._io import atomic_path
from edgeloop.data import Dataset
from edgeloop.errors import DataError
from edgeloop.federated.install import HEAD_FILE
from edgeloop.federated.split import BodyHeadSplit

__all__ = ["HEAD_FILE", "fit_local", "load_head", "save_head"]



def fit_local(model: nn.Module, split: BodyHeadSplit, data: Dataset, *, epochs: int,
              lr: float, batch_size: int = 32, head_epochs: int = 0,
              head_lr: float | None = None, momentum: float | None = None,
              weight_decay: float = 0.0, proximal_mu: float = 0.0, seed: int = 0) -> float:
    """Train ``model`` on ``data``: first ``head_epochs`` epochs of the head alone on the
    frozen body (Adam at ``head_lr``, default ``lr``), then ``epochs`` epochs of the whole
    model (Adam at ``lr``, or SGD with ``momentum`` when given: FedAvg's local solver;
    either with ``weight_decay``). Returns the mean loss of the last epoch. With
    ``proximal_mu`` > 0 the loss gains FedProx's ``mu/2 * ||w - w_global||^2`` over the
    shared parameters, ``w_global`` being what the model held on entry (Li et al.,
    "Federated Optimization in Heterogeneous Networks", MLSys 2020)."""
    if data.labels is None:
        raise DataError("a device's training data has no `labels` array")
    (x,) = (torch.from_numpy(a) for a in data.inputs.values())
    y = torch.from_numpy(data.labels)
    gen = torch.Generator().manual_seed(seed)
    shared = set(split.shared_keys)
    body = [(p, p.detach().clone()) for name, p in model.named_parameters() if name in shared]
    head = [p for name, p in model.named_parameters() if name.startswith(split.head)]

    def proximal() -> torch.Tensor | float:
        if proximal_mu == 0:
            return 0.0
        return proximal_mu / 2 * sum(((p - g) ** 2).sum() for p, g in body)

    loss = 0.0
    if head_epochs:
        model.eval()   # the body is frozen: BatchNorm keeps its statistics too
        opt = torch.optim.Adam(head, lr=lr if head_lr is None else head_lr)
        loss = _epochs(model, opt, x, y, head_epochs, batch_size, gen, lambda: 0.0)
    if epochs:
        model.train()
        params = list(model.parameters())
        opt = (torch.optim.Adam(params, lr=lr, weight_decay=weight_decay) if momentum is None
               else torch.optim.SGD(params, lr=lr, momentum=momentum,
                                    weight_decay=weight_decay))
        loss = _epochs(model, opt, x, y, epochs, batch_size, gen, proximal)
    model.eval()
    return loss


def _epochs(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
            epochs: int, batch_size: int, gen: torch.Generator,
            extra: Callable[[], torch.Tensor | float]) -> float:
    mean = 0.0
    for _ in range(epochs):
        total = 0.0
        for idx in torch.randperm(len(y), generator=gen).split(batch_size):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx]) + extra()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        mean = total / len(y)
    return mean


def save_head(model: nn.Module, split: BodyHeadSplit, folder: str | os.PathLike[str]) -> Path:
    """Write the head of ``model`` to ``folder/head.pt`` atomically; returns the path."""
    path = Path(folder) / HEAD_FILE
    with atomic_path(path, mode=0o600) as tmp:
        torch.save(split.head_state(model), tmp)
    return path


def load_head(model: nn.Module, split: BodyHeadSplit, folder: str | os.PathLike[str]
              ) -> bool:
    """Load ``folder/head.pt`` into ``model`` if the device has one; returns whether it
    had (a device that never trained keeps the model's initial head)."""
    path = Path(folder) / HEAD_FILE
    if not path.is_file():
        return False
    split.load(model, torch.load(path, map_location="cpu", weights_only=True), "head")
    return True
