"""A device installing a published body with its own head.

A bundle made by :func:`edgeloop.federated.personal.publish_body` ships, beside its ONNX
model (the new global body with the publisher's default head), the same model as a torch
checkpoint (``personal.pt``) and the head's name prefix (``personal.json``), signed and
verified like the model. A device that has a head of its own (``STATE/head.pt``, written
by the federated client or by on-device personalisation) rebuilds the ONNX model from the
published body and that head before the health check, so what is checked and served is
body + own head; a device with no head yet serves the bundle's default head. The head
never leaves the device.

This module imports neither torch nor ONNX: a device without them installs any bundle as
published, and needs the ``train`` extra only to combine a head it has.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from edgeloop.bundle.device import Adapt
from edgeloop.bundle.manifest import Manifest

__all__ = ["HEAD_FILE", "PERSONAL_MODEL", "PERSONAL_SPEC", "own_head"]

PERSONAL_MODEL = "personal.pt"    # bundle file: the torch checkpoint, body + default head
PERSONAL_SPEC = "personal.json"   # bundle file: {"format": 1, "head": "<prefix>"}
HEAD_FILE = "head.pt"             # the device's own head in its state folder (see .local)


def own_head(state_dir: str | os.PathLike[str]) -> Adapt:
    """The ``adapt`` hook of :meth:`edgeloop.bundle.Device.update` for the device at
    ``state_dir``: it rewrites a personalisable bundle's candidate as body + the device's
    own head when the device has one, and leaves every other bundle as published."""
    state = Path(state_dir)

    def adapt(candidate: Path, manifest: Manifest, files: Mapping[str, Path]) -> Manifest:
        if PERSONAL_MODEL not in files or not (state / HEAD_FILE).is_file():
            return manifest
        from edgeloop.federated.personal import with_head  # torch: only here

        return with_head(state, candidate, manifest, files)

    return adapt
