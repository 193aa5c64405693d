"""Feeding calibration data to onnxruntime's calibrators."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

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
