"""A device installing a published body with its own head.

A bundle made by :func:`edgeloop.federated.personal.publish_body` ships, beside its ONNX
model (the new global body with the publisher's default head), the same model as a torch
checkpoint (``personal.pt``) and the head's name prefix (``personal.json``), signed and
verified like the model. A device that has a head of its own (``STATE/head.pt``, written
by the federated client or by on-device personalisation) rebuilds the ONNX model from the
published body and that head before the health check, so what is checked and served is
body + own head; a device with no head yet serves the bundle's default head. The head
never leaves the device.

A head learnt on the device (:func:`edgeloop.federated.personal.personalise`) waits as
``STATE/head.pending-<sha256 of its model>.pt`` while its model is on probation:
:func:`settle_head` makes it ``head.pt`` once that model has passed, and drops it once
another model serves (a rollback), so the device's head is always one its served model
was built from or one it trained in federated rounds.

This module imports neither torch nor ONNX: a device without them installs any bundle as
published, and needs the ``train`` extra only to combine a head it has.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from edgeloop.bundle.device import Adapt, Device
from edgeloop.bundle.manifest import Manifest

__all__ = ["HEAD_FILE", "PERSONAL_MODEL", "PERSONAL_SPEC", "own_head", "pending_head",
           "settle_head"]

PERSONAL_MODEL = "personal.pt"    # bundle file: the torch checkpoint, body + default head
PERSONAL_SPEC = "personal.json"   # bundle file: {"format": 1, "head": "<prefix>"}
HEAD_FILE = "head.pt"             # the device's own head in its state folder (.local
                                  # writes it)


def pending_head(state_dir: str | os.PathLike[str], model_sha256: str) -> Path:
    """Where a head learnt on the device waits while the model ``model_sha256`` built from
    it is on probation."""
    return Path(state_dir) / f"head.pending-{model_sha256}.pt"


def settle_head(state_dir: str | os.PathLike[str]) -> Path | None:
    """The head file the device's model is built from, after settling pending heads (the
    module docstring): a pending head whose model still serves on probation, else
    ``head.pt``; None when the device has no head of its own."""
    state = Path(state_dir)
    current = Device(state).state()
    serving = current.current()
    waiting = None
    for path in sorted(state.glob("head.pending-*.pt")):
        if serving is None or path != pending_head(state, serving.sha256):
            path.unlink(missing_ok=True)       # its model was rolled back or replaced
        elif current.probation is None:
            os.replace(path, state / HEAD_FILE)  # its model passed probation
        else:
            waiting = path
    head = state / HEAD_FILE
    return waiting or (head if head.is_file() else None)


def own_head(state_dir: str | os.PathLike[str]) -> Adapt:
    """The ``adapt`` hook of :meth:`edgeloop.bundle.Device.update` for the device at
    ``state_dir``: it rewrites a personalisable bundle's candidate as body + the device's
    own head when the device has one, and leaves every other bundle as published."""

    def adapt(candidate: Path, manifest: Manifest, files: Mapping[str, Path]) -> Manifest:
        head = settle_head(state_dir)
        if PERSONAL_MODEL not in files or head is None:
            return manifest
        from edgeloop.federated.personal import with_head  # torch: only here

        return with_head(state_dir, head, candidate, manifest, files)

    return adapt
