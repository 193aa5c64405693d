"""The pass protocol: a config dataclass with ``apply(model, ctx) -> model``.

:func:`run_pass` does the rest once for every pass: loading and checking the input,
a scratch folder (also the working directory while the pass runs, so that nothing the
quantization engine writes lands anywhere else), checking that onnxruntime can load the
result, the atomic write, and wrapping errors from the quantization engine in edgeloop's
words.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import onnx

from edgeloop._io import atomic_path, scratch_dir
from edgeloop._onnx import input_specs, load_model, session
from edgeloop.data import Dataset, check_against
from edgeloop.errors import DataError, EdgeloopError, ModelError


@dataclass
class PassContext:
    """What a pass may use besides the model: calibration data and a scratch folder."""

    workdir: Path
    calib: Dataset | None = None

    def require_calib(self, pass_name: str) -> Dataset:
        """The calibration data, or a clear error for passes that cannot run without it."""
        if self.calib is None:
            raise DataError(f"{pass_name} needs calibration data (--data CALIB.npz)")
        return self.calib

    def scratch(self, name: str) -> Path:
        """A path in the scratch folder."""
        return self.workdir / name

    def save(self, model: onnx.ModelProto, name: str) -> Path:
        """Write ``model`` to the scratch folder and return its path. onnxruntime's
        quantizers are given paths, not protos: some of them rewrite a proto they are
        handed (moving its weights to external data files)."""
        path = self.scratch(name)
        onnx.save(model, path)
        return path


class Pass(ABC):
    """A model-to-model transformation. Subclasses are dataclasses holding the config."""

    name: ClassVar[str]
    needs_calib: ClassVar[bool] = False

    @abstractmethod
    def apply(self, model: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto:
        """Return the transformed model; never modify ``model`` in place."""


def apply_pass(p: Pass, model: onnx.ModelProto, calib: Dataset | None = None) -> onnx.ModelProto:
    """Run ``p`` on an in-memory model: checks calibration data against the model's inputs,
    runs the pass in a scratch folder (:func:`~edgeloop._io.scratch_dir`, removed
    afterwards), and checks that onnxruntime loads the result."""
    if p.needs_calib:
        if calib is None:
            raise DataError(f"{p.name} needs calibration data (--data CALIB.npz)")
        check_against(calib, input_specs(session(model)), source="calibration data")
    with scratch_dir() as tmp:
        ctx = PassContext(tmp, calib)
        try:
            out = p.apply(model, ctx)
        except EdgeloopError:
            raise
        except Exception as e:  # the quantization engine's own errors
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelError(f"{p.name} failed on this model: {msg[:300]}") from None
    _strip_debug_info(out)
    session(out)
    return out


def _strip_debug_info(model: onnx.ModelProto) -> None:
    """Drop per-node exporter metadata (source locations, module paths): on small models it
    is a fifth of the file, and a device has no use for it."""
    for node in model.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""


def run_pass(p: Pass, model_path: str | os.PathLike[str], out_path: str | os.PathLike[str],
             calib: Dataset | None = None) -> onnx.ModelProto:
    """Load ``model_path``, apply ``p`` and write ``out_path`` atomically. On any error
    nothing is written."""
    out = apply_pass(p, load_model(model_path), calib)
    with atomic_path(out_path) as tmp:
        onnx.save(out, tmp)
    return out
