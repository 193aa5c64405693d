"""The body/head split of a torch model, and the private head.

The **body** is every entry of the model's ``state_dict`` outside one name prefix, the
**head** (a classifier layer). The devices train the **shared model** together: the body
and a *global* head, the model a new device starts from; it is the only thing a federated
message carries. Each device also keeps a **private head**, fine-tuned from the global
head on its own data and stored in its state folder; it never leaves the device.
BatchNorm's ``num_batches_tracked`` counters stay local: an integer step count has no
meaningful average.

Why a global head and not only private ones (FedPer/FedRep train the body alone): a body
trained under heads that drift apart per device, or under one frozen random head
(FedBABU), fits no single head well: on MNIST-1D split over 100 devices (Dirichlet 0.3)
the global model then stayed 7 points or more under centralised training, where FedAvg
of the whole model followed by a head fine-tune on the device gets close to it.

References: Arivazhagan et al., "Federated Learning with Personalization Layers" (FedPer,
2019); Collins et al., "Exploiting Shared Representations for Personalized Federated
Learning" (FedRep, ICML 2021); Oh et al., "FedBABU" (ICLR 2022).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from edgeloop.errors import UsageError

__all__ = ["BodyHeadSplit", "split_model"]

_LOCAL_BUFFERS = ("num_batches_tracked",)


@dataclass(frozen=True)
class BodyHeadSplit:
    """Which ``state_dict`` entries of a model are shared (``body_keys``) and which stay on
    the device (``head_keys``, all under ``head``, a name prefix ending in ``.``)."""

    head: str
    body_keys: tuple[str, ...]
    head_keys: tuple[str, ...]

    def body(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The body's tensors of ``model`` (detached copies)."""
        state = model.state_dict()
        return {k: state[k].detach().clone() for k in self.body_keys}

    @property
    def shared_keys(self) -> tuple[str, ...]:
        """The shared model's entries: the body's, then the global head's."""
        return self.body_keys + self.head_keys

    def shared(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The shared model's tensors of ``model`` (detached copies)."""
        state = model.state_dict()
        return {k: state[k].detach().clone() for k in self.shared_keys}

    def shared_entries(self, model: nn.Module) -> int:
        """How many numbers the shared model of ``model`` holds (what DP noise covers)."""
        state = model.state_dict()
        return sum(state[k].numel() for k in self.shared_keys)

    def head_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The head's tensors of ``model`` (detached copies)."""
        state = model.state_dict()
        return {k: state[k].detach().clone() for k in self.head_keys}

    def load(self, model: nn.Module, part: dict[str, torch.Tensor], which: str) -> None:
        """Copy ``part`` (the ``which`` = "body", "head" or "shared" of a model of this
        architecture) into ``model``; every key of that part must be there, no other."""
        keys = set({"body": self.body_keys, "head": self.head_keys,
                    "shared": self.shared_keys}[which])
        if set(part) != keys:
            missing, extra = sorted(keys - set(part)), sorted(set(part) - keys)
            raise UsageError(f"the {which} does not fit the model: missing {missing[:3]}, "
                             f"unexpected {extra[:3]}")
        model.load_state_dict(part, strict=False)


def split_model(model: nn.Module, head: str | None = None) -> BodyHeadSplit:
    """Split ``model`` into a shared body and a private head.

    ``head`` names the head's parameter prefix (e.g. ``"head"`` or ``"net.4"``); by
    default it is ``head`` when the model has such a module, else its last ``nn.Linear``.
    A model with no such head, or whose head would leave no trainable body, is a
    :class:`UsageError`.
    """
    modules = dict(model.named_modules())
    if head is None:
        linears = [name for name, m in modules.items() if isinstance(m, nn.Linear)]
        if "head" in modules:
            head = "head"
        elif linears:
            head = linears[-1]
        else:
            raise UsageError(f"{type(model).__name__} has no `head` module and no nn.Linear "
                             "layer to keep on the device; name the head's prefix")
    prefix = head.rstrip(".") + "." if head else ""   # "": the model is one Linear
    keys = list(model.state_dict())
    head_keys = tuple(k for k in keys if k.startswith(prefix))
    body_keys = tuple(k for k in keys if not k.startswith(prefix)
                      and k.rpartition(".")[2] not in _LOCAL_BUFFERS)
    trainable_head = [n for n, p in model.named_parameters()
                      if n.startswith(prefix) and p.requires_grad]
    if not trainable_head:
        raise UsageError(f"`head` {head!r} names no trainable parameter of "
                         f"{type(model).__name__}; its modules: "
                         f"{', '.join(n for n in modules if n and '.' not in n)}")
    if not any(n in body_keys and p.requires_grad for n, p in model.named_parameters()):
        raise UsageError(f"`head` {head!r} covers every trainable parameter of "
                         f"{type(model).__name__}: no body is left to share")
    return BodyHeadSplit(prefix, body_keys, head_keys)
