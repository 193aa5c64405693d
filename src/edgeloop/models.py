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

import importlib
import io
import json
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgeloop._io import write_bytes_atomic
from edgeloop.errors import ModelError, UsageError

__all__ = ["LoadedModel", "TextClassifier", "load_model", "model_bytes", "save_model"]

_FACTORY = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")


@dataclass
class LoadedModel:
    """A model ready to train: the module (eval mode) and, for an edgeloop checkpoint, its
    zoo ``arch`` and ``config`` (``arch`` is ``None`` for a module a user brought)."""

    module: nn.Module
    arch: str | None = None
    config: dict[str, Any] = field(default_factory=dict)


def load_model(source: str | os.PathLike[str], *,
               weights: str | os.PathLike[str] | None = None,
               config: str | os.PathLike[str] | None = None) -> LoadedModel:
    """Load ``source`` in one of the forms of the module docstring. ``weights`` (a
    ``state_dict`` file) and ``config`` (a JSON file of keyword arguments, or a Hugging
    Face config) go with a factory only. Every failure is a :class:`ModelError` (or
    :class:`UsageError` for a wrong combination) naming what was wrong."""
    text = os.fspath(source)
    if Path(text).exists():
        if weights is not None or config is not None:
            raise UsageError(f"--weights and --model-config go with a factory "
                             f"(package.module:callable), not with the file {text!r}")
        return _load_file(Path(text))
    if not _FACTORY.fullmatch(text):
        raise ModelError(f"model {text!r} is neither an existing file nor a factory "
                         f"`package.module:callable` (e.g. torchvision.models:resnet18)")
    module = _call_factory(text, _read_config(config))
    if weights is not None:
        _load_weights(module, Path(weights), text)
    return LoadedModel(module.eval())


def model_bytes(model: LoadedModel) -> bytes:
    """``model`` as the bytes of a ``.pt`` file: an edgeloop checkpoint for a zoo model (its
    pruned layer shapes recorded), else the whole module (``torch.save(module)``);
    :func:`load_model` reads either back."""
    from edgeloop.zoo import LAYERS, layer_shapes

    buf = io.BytesIO()
    if model.arch is not None:
        torch.save({"arch": model.arch,
                    "config": {**model.config, LAYERS: layer_shapes(model.module)},
                    "state_dict": model.module.state_dict()}, buf)
    else:
        torch.save(model.module, buf)
    return buf.getvalue()


def save_model(path: str | os.PathLike[str], model: LoadedModel) -> None:
    """Write ``model`` (:func:`model_bytes`) atomically."""
    write_bytes_atomic(path, model_bytes(model))


def _load_file(path: Path) -> LoadedModel:
    from edgeloop.zoo import load_checkpoint

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:   # not plain tensors: a whole pickled module
        obj = _load_pickled(path)
    except Exception as e:  # torch raises many unrelated types for a bad file
        raise ModelError(f"{str(path)!r} is not a torch file ({type(e).__name__})") from None
    if isinstance(obj, nn.Module):
        return LoadedModel(obj.eval())
    if isinstance(obj, dict) and {"arch", "config", "state_dict"} <= obj.keys():
        module, arch, cfg = load_checkpoint(path)
        return LoadedModel(module, arch, cfg)
    if isinstance(obj, dict):
        raise ModelError(f"{str(path)!r} holds weights only (a state_dict); give the "
                         f"architecture as a factory: --model package.module:callable "
                         f"--weights {path}")
    raise ModelError(f"{str(path)!r} holds a {type(obj).__name__}, not a model")


def _load_pickled(path: Path) -> Any:
    _prepare_imports()
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (ModuleNotFoundError, AttributeError) as e:
        raise ModelError(f"{str(path)!r} is a pickled module whose class cannot be imported "
                         f"here ({e}); install the package that defines it") from None
    except Exception as e:  # unpickling raises many unrelated types for a bad file
        raise ModelError(f"{str(path)!r} is not a torch file ({type(e).__name__})") from None


def _prepare_imports() -> None:
    """torchvision (and transformers, which imports it) need a shim beside the CPU torch."""
    from edgeloop._torchvision import ensure_importable

    ensure_importable()


def _read_config(config: str | os.PathLike[str] | None) -> dict[str, Any]:
    if config is None:
        return {}
    try:
        doc = json.loads(Path(config).read_text())
    except OSError as e:
        raise UsageError(f"cannot read model config {os.fspath(config)!r}: {e.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"model config {os.fspath(config)!r} is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise UsageError(f"model config {os.fspath(config)!r} must be a JSON object of "
                         f"keyword arguments; got {type(doc).__name__}")
    return doc


def _call_factory(spec: str, kwargs: dict[str, Any]) -> nn.Module:
    module_name, attr = spec.split(":")
    _prepare_imports()
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise ModelError(f"cannot import {module_name!r} for model {spec!r}: {e}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ModelError(f"{module_name!r} has no {attr!r} (model {spec!r})")
        obj = getattr(obj, part)
    if isinstance(obj, type) and issubclass(obj, nn.Module) and hasattr(obj, "config_class"):
        # a Hugging Face model class: the JSON is its PretrainedConfig
        try:
            model = obj(obj.config_class.from_dict(kwargs))
        except (TypeError, ValueError) as e:
            raise ModelError(f"{spec!r} does not accept this config: {e}") from None
        return TextClassifier(model)
    if not callable(obj):
        raise ModelError(f"{spec!r} is not callable")
    try:
        model = obj(**kwargs)
    except (TypeError, ValueError) as e:
        raise ModelError(f"{spec!r} cannot be built with config {kwargs}: "
                         f"{str(e).splitlines()[0]}") from None
    if not isinstance(model, nn.Module):
        raise ModelError(f"{spec!r} returned a {type(model).__name__}, not a torch module")
    return model


def _load_weights(module: nn.Module, path: Path, spec: str) -> None:
    if not path.is_file():
        raise ModelError(f"weights {str(path)!r} do not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many unrelated types for a bad file
        raise ModelError(f"weights {str(path)!r} are not a torch state_dict "
                         f"({type(e).__name__})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]   # an edgeloop checkpoint's weights
    if not isinstance(state, dict):
        raise ModelError(f"weights {str(path)!r} are not a state_dict")
    # a Hugging Face model's own state_dict fits the model inside TextClassifier
    target = module.model if isinstance(module, TextClassifier) and not any(
        k.startswith("model.") for k in state) else module
    try:
        target.load_state_dict(state)
    except RuntimeError as e:
        raise ModelError(f"weights {str(path)!r} do not fit {spec}: "
                         f"{' '.join(str(e).split())[:300]}") from None


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
