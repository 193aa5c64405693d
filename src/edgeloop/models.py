"""Loading the PyTorch models users bring, for every training-time command.

Three forms (the same for ``prune``, ``qat``, ``distill`` and recipes):

- an edgeloop checkpoint (``model.pt`` from ``edgeloop train`` or a compression command):
  a dict with ``arch``, ``config`` and ``state_dict``, loaded with ``weights_only=True``;
- a whole module saved with ``torch.save(model)``: unpickling runs code from the file and
  needs the module's classes importable, so only load files you trust;
- an importable factory, ``package.module:callable`` (e.g. ``torchvision.models:resnet18``),
  called with the keyword arguments of an optional JSON config, then given the weights of
  an optional ``state_dict`` file. A Hugging Face model class (e.g.
  ``transformers:BertForSequenceClassification``) takes its JSON config as its
  ``PretrainedConfig`` and is wrapped in :class:`TextClassifier`.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["TextClassifier"]


class TextClassifier(nn.Module):
    """A Hugging Face sequence classifier as a one-input module: ``forward(input_ids)``
    returns the logits, with the attention mask derived from the padding token (a token
    equal to ``pad_token_id`` is padding). Training, pruning and export then treat it like
    any single-input classifier; the data holds ``input_ids`` and ``labels``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.pad_token_id = int(getattr(model.config, "pad_token_id", None) or 0)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        mask = (input_ids != self.pad_token_id).long()
        return self.model(input_ids=input_ids, attention_mask=mask).logits
