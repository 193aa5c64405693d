"""edgeloop: compress, measure, ship and watch ML models on edge devices.

The public API is what ``__all__`` lists; everything else is internal.
"""

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
from edgeloop.export import to_onnx
from edgeloop.measure import EvalReport, LatencyConfig, evaluate
from edgeloop.optimize import OptimizeConfig, OptimizeResult, optimize
from edgeloop.report import write_report
from edgeloop.targets import Target, get_target
from edgeloop.zoo import load_torch, train_zoo_model

__version__ = "0.1.0"

__all__ = [
    "DataError",
    "Dataset",
    "EdgeloopError",
    "EvalReport",
    "LatencyConfig",
    "ModelError",
    "OptimizeConfig",
    "OptimizeResult",
    "Target",
    "TransportError",
    "UsageError",
    "VerificationError",
    "__version__",
    "evaluate",
    "get_target",
    "load_builtin",
    "load_npz",
    "load_torch",
    "make_scheme",
    "optimize",
    "run_pass",
    "save_npz",
    "to_onnx",
    "train_zoo_model",
    "write_report",
]
