"""Publisher side: describe a model file as a bundle manifest (figures from ``evaluate``)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from edgeloop._io import sha256_file
from edgeloop._onnx import load_model, session
from edgeloop.bundle.manifest import (
    BundleFile,
    Floor,
    Manifest,
    Reference,
    TensorSpec,
    check_file_name,
    golden_digest,
    parse_version,
)
from edgeloop.bundle.served import served, served_latency
from edgeloop.data import Dataset, check_against
from edgeloop.errors import UsageError
from edgeloop.measure import predict, top1_accuracy

__all__ = ["build_manifest"]


def build_manifest(model: str | os.PathLike[str], *, name: str, version: str,
                   golden: Dataset | None = None, min_metric: float | None = None,
                   min_agreement: float = 0.99, accuracy_slack: float = 0.02,
                   files: Mapping[str, str | os.PathLike[str]] | None = None) -> Manifest:
    """The manifest for ``model`` published as ``name`` ``version``.

    With a ``golden`` set, the bundle's accuracy and batch-1 latency on it are recorded
    with its own top-1 predictions (the reference a device without labels compares
    against), all measured as a device serves the bundle
    (:func:`~edgeloop.bundle.served.served`: a cascade as a cascade; publish latency is
    measured briefly, as a figure to read: devices time for themselves). The accuracy
    floor is ``min_metric``, or the measured accuracy minus ``accuracy_slack`` when not
    given. ``files`` (name in the slot -> path) ship beside
    the model, signed and verified alike (a cascade's other stages and its cascade.json).
    """
    path = Path(model)
    if not name or "/" in name or name.startswith("."):
        raise UsageError(f"`name` must be a non-empty name without '/'; got {name!r}")
    parse_version(version)
    sess = session(load_model(path))
    inputs = tuple(TensorSpec(i.name, i.type, tuple(d if isinstance(d, int) else None
                                                    for d in i.shape))
                   for i in sess.get_inputs())
    outputs = tuple(TensorSpec(o.name, o.type, tuple(d if isinstance(d, int) else None
                                                     for d in o.shape))
                    for o in sess.get_outputs())
    extra = []
    for fname, fpath in (files or {}).items():
        check_file_name(fname)
        fp = Path(fpath)
        if not fp.is_file():
            raise UsageError(f"bundle file {str(fp)!r} does not exist")
        extra.append(BundleFile(fname, f"{name}/{version}.{fname}", sha256_file(fp),
                                fp.stat().st_size))
    figures: dict[str, float] = {}
    reference = None
    accuracy_floor = min_metric
    if golden is not None:
        with served(path, files or {}) as bundle:      # as a device will serve it
            check_against(golden, bundle.inputs, source="the golden set")
            answers = predict(bundle.answer, golden)
            figures["latency_p50_ms"] = served_latency([bundle], golden, rounds=3, runs=10,
                                                       warmup=3)[0]
        figures["samples"] = float(len(golden))
        if golden.labels is not None:
            figures["accuracy"] = top1_accuracy(answers, golden.labels)
            if accuracy_floor is None:
                accuracy_floor = max(0.0, figures["accuracy"] - accuracy_slack)
        reference = Reference(golden_sha256=golden_digest(golden),
                              top1=answers.argmax(-1).tolist())
    manifest = Manifest(
        files=tuple(extra),
        name=name, version=version, model_target=f"{name}/{version}.onnx",
        sha256=sha256_file(path), size_bytes=path.stat().st_size, inputs=inputs, outputs=outputs,
        figures=figures, floor=Floor(accuracy=accuracy_floor, agreement=min_agreement),
        reference=reference)
    return manifest
