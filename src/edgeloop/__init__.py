"""edgeloop: compress, measure, ship and watch ML models on edge devices.

The public API is what ``__all__`` lists; everything else is internal.
"""

from edgeloop._ssh import RemoteConfig, remote_bench
from edgeloop.bench import BenchConfig, BenchReport
from edgeloop.compress import make_scheme, run_pass
from edgeloop.data import Dataset, load_builtin, load_npz, save_npz
from edgeloop.errors import (
    DataError,
    EdgeloopError,
    ModelError,
    TransportError,
    UsageError,
    VerificationError,
)
from edgeloop.export import export_checkpoint, to_coreml, to_onnx, to_tflite
from edgeloop.measure import EvalReport, LatencyConfig, evaluate
from edgeloop.targets import Target, get_target
from edgeloop.zoo import load_torch, train_zoo_model

__version__ = "0.1.0"

__all__ = [
    "BenchConfig",
    "BenchReport",
    "DataError",
    "Dataset",
    "EdgeloopError",
    "EvalReport",
    "LatencyConfig",
    "ModelError",
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
]
