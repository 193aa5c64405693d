"""edgeloop: compress, measure, ship and watch ML models on edge devices.

The public API is what ``__all__`` lists; everything else is internal. Names are imported
on first use, so a device that only needs ``edgeloop.bundle`` never imports torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING as _TYPE_CHECKING

from edgeloop._lazy import lazy_names
from edgeloop.bundle.served import register as _register_loader

if _TYPE_CHECKING:
    from pathlib import Path

    from edgeloop.bundle.served import Served

__version__ = "0.1.0"

_SOURCES = {
    "make_scheme": "edgeloop.compress", "run_pass": "edgeloop.compress",
    "Dataset": "edgeloop.data", "load_builtin": "edgeloop.data", "load_npz": "edgeloop.data",
    "save_npz": "edgeloop.data",
    "DataError": "edgeloop.errors", "EdgeloopError": "edgeloop.errors",
    "ModelError": "edgeloop.errors", "TransportError": "edgeloop.errors",
    "UsageError": "edgeloop.errors", "VerificationError": "edgeloop.errors",
    "to_onnx": "edgeloop.export", "to_tflite": "edgeloop.export",
    "to_coreml": "edgeloop.export", "export_checkpoint": "edgeloop.export",
    "BenchConfig": "edgeloop.bench", "BenchReport": "edgeloop.bench",
    "RemoteConfig": "edgeloop._ssh", "remote_bench": "edgeloop._ssh",
    "EvalReport": "edgeloop.measure", "LatencyConfig": "edgeloop.measure",
    "evaluate": "edgeloop.measure",
    "OptimizeConfig": "edgeloop.optimize", "OptimizeResult": "edgeloop.optimize",
    "write_report": "edgeloop.report",
    "Target": "edgeloop.targets", "get_target": "edgeloop.targets",
    "load_torch": "edgeloop.zoo", "train_zoo_model": "edgeloop.zoo",
}

__all__ = [
    "BenchConfig",
    "BenchReport",
    "DataError",
    "Dataset",
    "EdgeloopError",
    "EvalReport",
    "LatencyConfig",
    "ModelError",
    "OptimizeConfig",
    "OptimizeResult",
    "RemoteConfig",
    "Target",
    "TransportError",
    "UsageError",
    "VerificationError",
    "__version__",
    "evaluate",
    "export_checkpoint",
    "get_target",
    "load_builtin",
    "load_npz",
    "load_torch",
    "make_scheme",
    "remote_bench",
    "run_pass",
    "save_npz",
    "to_coreml",
    "to_onnx",
    "to_tflite",
    "train_zoo_model",
    "write_report",
]


__getattr__, __dir__ = lazy_names(__name__, _SOURCES)


def _served_cascade(model: Path) -> Served:
    from edgeloop.device.bundle import served_cascade

    return served_cascade(model)


# The composition root: the bundle layer measures a cascade bundle with the device
# package's runner without importing it (edgeloop.bundle.served explains why here).
_register_loader("cascade.json", _served_cascade)
