"""A cascade as one signed bundle: every stage model and its cascade.json, published,
verified and installed together.

The bundle's model (``model.onnx`` in the slot) is the cascade's last stage, the one that
answers whatever the others are unsure of; the other stages ship beside it as
``stage1.onnx``, ... and ``cascade.json`` is rewritten to name them so. The device
verifies each file against the signed manifest at install and at every start, and the
runtime serves the cascade from the slot, reporting to probation as for a single model.

The publisher's figures and reference predictions, and the device's health check, are
the whole cascade's as the runtime serves it (:func:`served_cascade`, registered for
bundles that ship ``cascade.json``; see :mod:`edgeloop.bundle.served`): a broken small
stage answers most inputs, so a check of the last stage alone would pass it.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from edgeloop._io import sha256_file
from edgeloop.bundle import Manifest, build_manifest, publish_bundle
from edgeloop.bundle.served import Served
from edgeloop.data import Dataset
from edgeloop.device.cascade import CASCADE_FILE, Cascade
from edgeloop.errors import VerificationError

__all__ = ["publish_cascade", "served_cascade"]


def publish_cascade(cascade: str | os.PathLike[str], repo: str | os.PathLike[str], *,
                    keys: str | os.PathLike[str], name: str, version: str,
                    golden: Dataset | None = None, min_metric: float | None = None,
                    passphrase: str | None = None) -> Manifest:
    """Sign and publish the cascade file ``cascade`` (from :func:`build_cascade`) with all
    its stage models as bundle ``name`` ``version`` of ``repo``."""
    path = Path(cascade)
    c = Cascade.load(path)
    sources = [path.parent / s.model for s in c.stages]
    for s, src in zip(c.stages, sources, strict=True):
        if not src.is_file():
            raise VerificationError(f"cascade {str(path)!r} names {s.model!r}, which does not "
                                    "exist")
        if s.sha256 and sha256_file(src) != s.sha256:
            raise VerificationError(f"{str(src)!r} is not the model cascade {str(path)!r} "
                                    "was built with (sha256 differs)")
    names = [f"stage{i}.onnx" for i in range(1, len(sources))] + ["model.onnx"]
    d = json.loads(path.read_text())
    for stage, slot_name in zip(d["stages"], names, strict=True):
        stage["model"] = slot_name
    with tempfile.TemporaryDirectory(prefix="edgeloop-cascade-") as tmp:
        slot_json = Path(tmp) / CASCADE_FILE
        slot_json.write_text(json.dumps(d, indent=1))
        files: dict[str, str | os.PathLike[str]] = dict(zip(names[:-1], sources[:-1],
                                                           strict=True))
        files[CASCADE_FILE] = slot_json
        manifest = build_manifest(sources[-1], name=name, version=version, golden=golden,
                                  min_metric=min_metric, files=files)
        publish_bundle(repo, sources[-1], keys=keys, manifest=manifest, passphrase=passphrase,
                       files=files)
    return manifest


def served_cascade(model: Path) -> Served:
    """The cascade whose last stage is ``model`` (its ``cascade.json`` beside it) as the
    runtime serves it: the answers a health check or a publisher measures."""
    from edgeloop.device.policy import Policy
    from edgeloop.device.runtime import Runtime

    runtime = Runtime(None, Policy(cascade=model.with_name(CASCADE_FILE)))
    return Served(runtime.inputs, runtime.infer)
