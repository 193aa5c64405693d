"""Make torchvision's model code importable beside the CPU build of torch.

PyPI's torchvision wheels are built against the CUDA build of torch; beside the CPU build
(which edgeloop pins) their C++ extension cannot load, and ``import torchvision`` then
fails while registering fake kernels for two operators the extension would have defined
(``torchvision::nms`` and ``torchvision::qnms``). transformers imports torchvision
whenever it is installed, so the failure reaches every transformers model too.

edgeloop uses only torchvision's pure-Python model definitions. Declaring the two
operators' schemas (without kernels) before the import is enough for it to succeed; a
call to either operator would still fail, with torch's own "no kernel" error.
"""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType

__all__ = ["ensure_importable", "import_torchvision"]

_SCHEMA = "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"
_library = None   # kept alive: dropping the Library object would remove the schemas


def ensure_importable() -> None:
    """Make ``import torchvision`` succeed (no-op when torchvision is absent or imports as
    it is); call it before importing torchvision or transformers."""
    global _library
    if _library is not None or importlib.util.find_spec("torchvision") is None:
        return
    try:
        import torchvision  # noqa: F401
        return
    except RuntimeError as e:
        if "torchvision::nms" not in str(e):
            raise
    import torch

    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]   # the failed import left half-initialised modules behind
    lib = torch.library.Library("torchvision", "DEF")
    for op in ("nms", "qnms"):
        lib.define(op + _SCHEMA)
    _library = lib


def import_torchvision() -> ModuleType:
    """``import torchvision``, made to work beside the CPU build of torch."""
    ensure_importable()
    import torchvision

    return torchvision
