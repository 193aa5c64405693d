"""On-device continual learning of the private head, and the body's way into the release loop.

:func:`personalise` is what a device does with labelled feedback (``edgeloop device
personalise``): the newest slice of the feedback is held back; the head alone (the body
frozen, BatchNorm in eval mode) is fine-tuned on the replay buffer
(:class:`~edgeloop.federated.buffer.ReplayBuffer`) plus the rest of the feedback; the
**forgetting guard** then evaluates the current head and the new one on the held-back
slice and, when the device has a labelled golden set, on it too, and keeps the new head
only if it is better on the slice and loses at most ``golden_tolerance`` on the golden
set. A kept head is exported with the body to ONNX (checked against torch) and installed
through the device's update path (:meth:`edgeloop.bundle.Device.install_local`): health
check on the golden set, commit, probation, rollback. The new head becomes
``STATE/head.pt`` only once its model has passed probation
(:func:`~edgeloop.federated.install.settle_head`); a failed health check or a rollback
leaves the previous model serving and the previous head in place. The feedback joins the
buffer either way.

:func:`publish_body` is the server's side: a new global body (``body.pt`` of a federated
run) with the model's default head, published as a signed bundle that devices combine
with their own head (:mod:`edgeloop.federated.install`).

Both need torch (the ``train`` extra); a device without it still installs bundles.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgeloop._io import atomic_path, sha256_file, write_text_atomic
from edgeloop._onnx import input_specs, session
from edgeloop.bundle import Device, HealthConfig, Manifest, build_manifest, publish_bundle
from edgeloop.bundle.slots import keep_known_good
from edgeloop.data import Dataset, InputSpec, check_against
from edgeloop.errors import DataError, ModelError, UsageError
from edgeloop.export import to_onnx
from edgeloop.federated.buffer import ReplayBuffer
from edgeloop.federated.install import (
    PERSONAL_MODEL,
    PERSONAL_SPEC,
    pending_head,
    settle_head,
)
from edgeloop.federated.local import fit_local
from edgeloop.federated.split import BodyHeadSplit, split_model
from edgeloop.models import load_model, save_model
from edgeloop.monitor import REFERENCE_FILE, sketch_bundle
from edgeloop.zoo import ARCHS
from edgeloop.zoo.train import accuracy

__all__ = ["PersonalConfig", "PersonalResult", "personalise", "publish_body", "with_head"]

_ACTION = "personalise"   # the device history's name for an install of a personalised head


@dataclass(frozen=True)
class PersonalConfig:
    """How a device fine-tunes its head. Every field is checked on construction."""

    epochs: int = 20                 # passes of head-only training over buffer + feedback
    lr: float = 1e-2                 # Adam learning rate
    batch_size: int = 32             # samples per step
    holdout: float = 0.25            # fraction of the newest feedback held back
    min_holdout: int = 8             # samples held back at least
    golden_tolerance: float = 0.02   # golden-set accuracy the new head may lose, in [0, 1]
    max_samples: int = 2048          # replay buffer cap, samples
    max_bytes: int = 1 << 20         # replay buffer cap, bytes of arrays
    seed: int = 0                    # shuffling and the buffer's draws

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "min_holdout", "max_samples", "max_bytes"):
            if getattr(self, name) < 1:
                raise UsageError(f"`{name}` must be at least 1; got {getattr(self, name)}")
        if not 0 < self.holdout < 1:
            raise UsageError(f"`holdout` must be in (0, 1); got {self.holdout:g}")
        if not self.lr > 0:
            raise UsageError(f"`lr` must be > 0; got {self.lr:g}")
        if not 0 <= self.golden_tolerance <= 1:
            raise UsageError(f"`golden_tolerance` must be in [0, 1]; got "
                             f"{self.golden_tolerance:g}")


@dataclass(frozen=True)
class PersonalResult:
    """What :func:`personalise` did; accuracies in [0, 1] (golden: None without a labelled
    golden set). ``kept`` is ``"new"`` (installed, health check passed) or ``"current"``
    (the guard kept the current head)."""

    kept: str
    reason: str
    feedback_samples: int
    trained_samples: int          # buffer + feedback not held back
    holdout_samples: int
    buffer_samples: int           # after this feedback joined it
    holdout_before: float
    holdout_after: float
    golden_before: float | None
    golden_after: float | None
    version: str                  # the bundle version the head personalises

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return asdict(self)


def personalise(state_dir: str | os.PathLike[str], data: Dataset, *,
                config: PersonalConfig | None = None,
                health: HealthConfig | None = None) -> PersonalResult:
    """Fine-tune the head of the device at ``state_dir`` on labelled feedback ``data``
    (samples in the order they came) and install it if the guard and the health check
    pass (module docstring). ``health`` configures the health check and probation.

    Raises :class:`DataError` for feedback without labels or of the wrong shape,
    :class:`UsageError` when the active bundle carries no torch model with a head split
    (publish it with :func:`publish_body`), and :class:`VerificationError` when the new
    model fails its health check (the previous one keeps serving) or, before any
    training, while the current model is on probation with the last known-good one in
    the slot an install would overwrite.
    """
    config = config or PersonalConfig()
    if data.labels is None:
        raise DataError("personalisation needs labelled feedback: the .npz has no `labels` "
                        "array")
    device = Device(state_dir, config=health)
    active = device.active()
    if active is None:
        raise UsageError(f"device {str(state_dir)!r} has no model installed yet")
    path, manifest = active
    files = {f.name: path.with_name(f.name) for f in manifest.files}
    if PERSONAL_MODEL not in files:
        raise UsageError(f"{manifest.name} {manifest.version} carries no torch model with a "
                         "body/head split to personalise; publish it with `edgeloop "
                         "federated publish-body`")
    specs = _one_input(path, manifest)
    check_against(data, specs, source="the feedback data")
    n_hold = max(config.min_holdout, round(len(data) * config.holdout))
    if len(data) < n_hold + 1:
        raise DataError(f"personalisation needs more than {n_hold} labelled samples (the "
                        f"newest {n_hold} are held back to judge the new head); got "
                        f"{len(data)}")
    labels = np.asarray(data.labels)
    if not np.issubdtype(labels.dtype, np.integer) or labels.shape != (len(data),):
        raise DataError(f"`labels` must be one integer class per sample; got "
                        f"{labels.dtype} of shape {labels.shape}")

    model, split = _personal_model(files)
    _load_head(model, split, settle_head(state_dir))
    with torch.no_grad():
        classes = model(torch.from_numpy(next(iter(data.inputs.values()))[:1])).shape[-1]
    if labels.min() < 0 or labels.max() >= classes:
        raise DataError(f"`labels` must be classes 0..{classes - 1} of the model; got "
                        f"{labels.min()}..{labels.max()}")
    keep_known_good(device.state(), f"a personalised {manifest.name} {manifest.version}")
    buffer = ReplayBuffer(state_dir, max_samples=config.max_samples,
                          max_bytes=config.max_bytes, seed=config.seed)
    held, _ = buffer.read()
    fresh, holdout = data.take(slice(0, len(data) - n_hold)), data.take(slice(-n_hold, None))
    train = fresh if held is None else _concat(held, fresh)
    golden = device.golden()
    golden = golden if golden is not None and golden.labels is not None else None

    with torch.no_grad():
        before = accuracy(model, holdout), None if golden is None else accuracy(model, golden)
        loss_before = _loss(model, holdout)
    fit_local(model, split, train, epochs=0, head_epochs=config.epochs, lr=config.lr,
              batch_size=config.batch_size, seed=config.seed)
    with torch.no_grad():
        after = accuracy(model, holdout), None if golden is None else accuracy(model, golden)
        loss_after = _loss(model, holdout)
    kept, reason = _guard(before, after, (loss_before, loss_after), config.golden_tolerance)
    stored = buffer.add(data)
    result = PersonalResult(
        kept="new" if kept else "current", reason=reason, feedback_samples=len(data),
        trained_samples=len(train), holdout_samples=n_hold, buffer_samples=len(stored),
        holdout_before=before[0], holdout_after=after[0], golden_before=before[1],
        golden_after=after[1], version=manifest.version)
    if not kept:
        return result
    with tempfile.TemporaryDirectory(prefix="edgeloop-personal-") as tmp:
        candidate = Path(tmp) / "model.onnx"
        _export(model, specs[0], candidate)
        files = _resketch(candidate, files, golden, Path(tmp))
        personal = _described(manifest, candidate, files)
        device.install_local(candidate, personal, files=files, action=_ACTION)
    # committed: the head waits for its model's probation (install.settle_head)
    with atomic_path(pending_head(state_dir, personal.sha256), mode=0o600) as tmp:
        torch.save(split.head_state(model), tmp)
    return result


def _guard(before: tuple[float, float | None], after: tuple[float, float | None],
           losses: tuple[float, float], tolerance: float) -> tuple[bool, str]:
    """Whether the new head replaces the current one, and why (the forgetting guard)."""
    (hold0, gold0), (hold1, gold1) = before, after
    if gold0 is not None and gold1 is not None and gold1 < gold0 - tolerance:
        return False, (f"kept the current head: the new one loses {gold0 - gold1:.1%} on the "
                       f"golden set (tolerance {tolerance:.1%})")
    if hold1 > hold0 or (hold1 == hold0 and losses[1] < losses[0]):
        return True, f"new head: {hold0:.1%} -> {hold1:.1%} on the held-back feedback"
    return False, (f"kept the current head: the new one is not better on the held-back "
                   f"feedback ({hold0:.1%} -> {hold1:.1%})")


def _loss(model: nn.Module, data: Dataset) -> float:
    (x,) = data.inputs.values()
    return float(nn.functional.cross_entropy(model(torch.from_numpy(x)),
                                             torch.from_numpy(np.asarray(data.labels))))


def _concat(a: Dataset, b: Dataset) -> Dataset:
    assert a.labels is not None and b.labels is not None
    return Dataset({k: np.concatenate([a.inputs[k], b.inputs[k]]) for k in a.inputs},
                   np.concatenate([a.labels, b.labels]).astype(b.labels.dtype))


def _personal_model(files: Mapping[str, Path]) -> tuple[nn.Module, BodyHeadSplit]:
    """The bundle's torch model (body + default head) and its split."""
    try:
        spec = json.loads(files[PERSONAL_SPEC].read_text())
        head = str(spec["head"])
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise ModelError(f"the bundle's {PERSONAL_SPEC} is unreadable ({e})") from None
    model = load_model(files[PERSONAL_MODEL]).module.eval()
    return model, split_model(model, head)


def _export(model: nn.Module, spec: InputSpec, out: Path) -> None:
    """``model`` to ONNX at ``out`` for an input like ``spec`` (checked against torch)."""
    shape = [1 if d is None else d for d in spec.shape]
    sample = torch.from_numpy(np.random.default_rng(0).normal(size=shape).astype(spec.dtype))
    to_onnx(model.eval(), sample, out, input_name=spec.name)


def _one_input(model: Path, manifest: Manifest) -> list[InputSpec]:
    specs = input_specs(session(model))
    if len(specs) != 1:
        raise ModelError(f"{manifest.name} {manifest.version} has {len(specs)} inputs; "
                         "a personalised model takes one")
    return specs


def _load_head(model: nn.Module, split: BodyHeadSplit, head: Path | None) -> None:
    if head is not None:
        split.load(model, torch.load(head, map_location="cpu", weights_only=True), "head")


def with_head(state_dir: str | os.PathLike[str], head: Path, candidate: Path,
              manifest: Manifest, files: Mapping[str, Path]) -> Manifest:
    """Rewrite ``candidate`` (a verified personalisable bundle's model, its other
    ``files`` beside it) as its body + the ``head`` file, and its drift reference on the
    golden set of the device at ``state_dir``; returns the manifest of the files written.
    What :func:`edgeloop.federated.install.own_head` calls when the device has a head."""
    model, split = _personal_model(files)
    _load_head(model, split, head)
    specs = _one_input(candidate, manifest)
    with tempfile.TemporaryDirectory(prefix="edgeloop-personal-",
                                     dir=candidate.parent) as tmp:
        _export(model, specs[0], Path(tmp) / "model.onnx")
        os.replace(Path(tmp) / "model.onnx", candidate)
        new = _resketch(candidate, files, Device(state_dir).golden(), Path(tmp))
        if new is not files:
            os.replace(new[REFERENCE_FILE], files[REFERENCE_FILE])
    return _described(manifest, candidate, files)


def _resketch(model: Path, files: Mapping[str, Path], golden: Dataset | None,
              folder: Path) -> Mapping[str, Path]:
    """``files`` with the drift monitor's reference sketch (when the bundle ships one)
    redrawn for ``model`` on the device's ``golden`` set, written in ``folder``: a head of
    the device's own answers differently from the one the publisher sketched."""
    if REFERENCE_FILE not in files or golden is None:
        return files
    return {**files, REFERENCE_FILE: sketch_bundle(model, golden).write(folder)}


def _described(manifest: Manifest, model: Path, files: Mapping[str, Path]) -> Manifest:
    """``manifest`` with the sha256 and size of ``model`` and of its ``files``."""
    entries = tuple(replace(f, sha256=sha256_file(files[f.name]),
                            size_bytes=files[f.name].stat().st_size) for f in manifest.files)
    return replace(manifest, sha256=sha256_file(model), size_bytes=model.stat().st_size,
                   files=entries)


def publish_body(body: str | os.PathLike[str], *, model: str | os.PathLike[str],
                 repo: str | os.PathLike[str], keys: str | os.PathLike[str], name: str,
                 version: str, golden: Dataset | None = None, min_metric: float | None = None,
                 head: str | None = None, passphrase: str | None = None) -> Manifest:
    """Publish ``body`` (a ``state_dict`` of the body's entries, e.g. ``body.pt`` of
    ``edgeloop federated simulate --out``) into ``model`` (any form
    :func:`edgeloop.models.load_model` reads; its head is the bundle's default head) as
    ``name`` ``version`` of the repository ``repo``: the ONNX model (checked against
    torch), figures and floor on ``golden`` (its reference sketch for the drift monitor
    too), and the torch checkpoint + head prefix that devices combine with their own
    head. ``head`` names the head's prefix (default: :func:`split_model`'s)."""
    loaded = load_model(model)
    split = split_model(loaded.module, head)
    try:
        state = torch.load(body, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many unrelated types for a bad file
        raise ModelError(f"{os.fspath(body)!r} is not a torch state_dict file "
                         f"({type(e).__name__})") from None
    if not isinstance(state, dict):
        raise ModelError(f"{os.fspath(body)!r} holds a {type(state).__name__}, not the "
                         "body's state_dict")
    split.load(loaded.module, state, "body")
    if golden is not None:
        (x,) = golden.inputs.values()
        sample = torch.from_numpy(x[:1])
    elif loaded.arch is not None:
        sample = torch.randn(1, *ARCHS[loaded.arch].sample_shape)
    else:
        raise UsageError("give a golden set: the export needs a sample input of a model "
                         "that is not a zoo checkpoint")
    with tempfile.TemporaryDirectory(prefix="edgeloop-publish-body-") as folder:
        tmp = Path(folder)
        onnx_path = tmp / "model.onnx"
        to_onnx(loaded.module.eval(), sample, onnx_path)
        save_model(tmp / PERSONAL_MODEL, loaded)
        write_text_atomic(tmp / PERSONAL_SPEC, json.dumps({"format": 1, "head": split.head}))
        files = {PERSONAL_MODEL: tmp / PERSONAL_MODEL, PERSONAL_SPEC: tmp / PERSONAL_SPEC}
        if golden is not None:
            files[REFERENCE_FILE] = sketch_bundle(onnx_path, golden).write(tmp)
        manifest = build_manifest(onnx_path, name=name, version=version, golden=golden,
                                  min_metric=min_metric, files=files)
        publish_bundle(repo, onnx_path, keys=keys, manifest=manifest, passphrase=passphrase,
                       files=files)
    return manifest
