"""Export a torch model to ONNX, checked against PyTorch on the same input."""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from edgeloop._io import atomic_path
from edgeloop._onnx import run, session
from edgeloop.errors import ModelError

__all__ = ["to_onnx"]

INPUT_NAME = "x"
OUTPUT_NAME = "logits"


def to_onnx(model: nn.Module, sample: torch.Tensor, out: str | os.PathLike[str], *,
            opset: int = 20, atol: float = 1e-4) -> float:
    """Export ``model`` (one input ``x``, one output ``logits``, free batch axis) to ``out``.

    The export is run in onnxruntime on ``sample`` and compared to PyTorch; returns the max
    absolute difference, and raises :class:`ModelError` (writing nothing) above ``atol``.
    """
    model = model.eval()
    batch = torch.export.Dim("batch", min=1)
    buf = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(buf):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                model, (sample,), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_shapes=({0: batch},), opset_version=opset, dynamo=True,
                external_data=False)
    except Exception as e:
        raise ModelError(f"torch.onnx.export failed: {str(e).splitlines()[0][:300]}") from None
    proto: onnx.ModelProto = program.model_proto
    onnx.checker.check_model(proto)
    with torch.no_grad():
        expected = model(sample).numpy()
    got = run(session(proto), {INPUT_NAME: sample.numpy()})
    diff = float(np.max(np.abs(expected - got)))
    if diff > atol:
        raise ModelError(f"ONNX export differs from PyTorch by {diff:.2e} (> {atol:.0e})")
    with atomic_path(Path(out)) as tmp:
        onnx.save(proto, tmp)
    return diff
