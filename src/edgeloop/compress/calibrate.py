"""Feeding calibration data to onnxruntime's calibrators."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader

from edgeloop._onnx import probe_session
from edgeloop.data import Dataset, batches


class NpzReader(CalibrationDataReader):
    """Serves a :class:`Dataset` to onnxruntime's calibrators in batches.

    Small batches keep the calibrators' collected activations (histograms for entropy and
    percentile) within memory on large models.
    """

    def __init__(self, data: Dataset, batch_size: int = 32) -> None:
        self.data = data
        self.batch_size = batch_size
        self._it: Iterator[dict[str, np.ndarray]] = batches(data, batch_size)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = batches(self.data, self.batch_size)



def minmax_overrides(model: onnx.ModelProto, data: Dataset, *,
                     batch_size: int = 4) -> dict[str, list[dict[str, np.float32]]]:
    """Every float tensor's min and max over ``data``, as onnxruntime quantizer
    ``TensorQuantOverrides`` (``rmin``/``rmax``: it derives scale and zero point itself).

    onnxruntime's MinMax calibrator keeps every intermediate tensor of every calibration
    batch until it has seen them all: gigabytes on a transformer or a 224-px CNN (its
    ``CalibMaxIntermediateOutputs`` option drops data instead of reducing it). Here the
    ranges are reduced batch by batch, so memory is bounded by one batch; the quantizer
    then calibrates on one sample and takes these ranges as given.
    """
    tensors = [o for n in model.graph.node for o in n.output if o]
    sess = probe_session(model, tensors)
    outs = [o for o in sess.get_outputs() if o.type == "tensor(float)"]
    index = {o.name: k for k, o in enumerate(sess.get_outputs())}
    inputs = [i.name for i in sess.get_inputs()]
    float_inputs = [i.name for i in sess.get_inputs() if i.type == "tensor(float)"]
    lo: dict[str, float] = {}
    hi: dict[str, float] = {}
    for feed in batches(data, batch_size):
        values = sess.run(None, {k: feed[k] for k in inputs})
        named = [(o.name, values[index[o.name]]) for o in outs]
        named += [(k, feed[k]) for k in float_inputs]
        for name, v in named:
            if v.size:
                lo[name] = min(lo.get(name, np.inf), float(v.min()))
                hi[name] = max(hi.get(name, -np.inf), float(v.max()))
    return {t: [{"rmin": np.float32(lo[t]), "rmax": np.float32(hi[t])}] for t in lo}


def static_calibration(model: onnx.ModelProto, data: Dataset
                       ) -> tuple[NpzReader, dict[str, object]]:
    """The data reader and ``extra_options`` that make ``quantize_static`` calibrate with
    MinMax ranges streamed over ``data`` (see :func:`minmax_overrides`)."""
    return (NpzReader(data.take(slice(0, 1)), 1),
            {"TensorQuantOverrides": minmax_overrides(model, data)})
