"""Compression passes. Each is a config dataclass with ``apply(model, ctx) -> model``;
:func:`run_pass` loads, applies, checks and writes atomically.

``make_scheme`` turns a scheme name and the options a user gave into a configured pass.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from edgeloop.compress.base import Pass, PassContext, apply_pass, run_pass
from edgeloop.compress.binary import Binary
from edgeloop.compress.fuse import Preprocess, gemm_to_matmul
from edgeloop.compress.int4 import Int4Weight
from edgeloop.compress.mixed import Int8
from edgeloop.compress.quantize import Int8Dynamic, Int8Static, OrtDynamic, OrtStatic
from edgeloop.errors import UsageError, one_of

__all__ = [
    "SCHEMES",
    "Binary",
    "Int4Weight",
    "Int8",
    "Int8Dynamic",
    "Int8Static",
    "OrtDynamic",
    "OrtStatic",
    "Pass",
    "PassContext",
    "Preprocess",
    "apply_pass",
    "gemm_to_matmul",
    "make_scheme",
    "run_pass",
]

SCHEMES: dict[str, type[Pass]] = {
    "int8": Int8,
    "int8-dynamic": Int8Dynamic,
    "int8-static": Int8Static,
    "int4-weight": Int4Weight,
    "binary": Binary,
    "ort-static": OrtStatic,
    "ort-dynamic": OrtDynamic,
}


def make_scheme(scheme: str, **options: Any) -> Pass:
    """The pass for ``scheme`` configured with ``options`` (``None`` values are ignored).

    An option the scheme does not take is an error, not silently dropped.
    """
    if scheme not in SCHEMES:
        raise one_of("scheme", list(SCHEMES), scheme)
    cls = SCHEMES[scheme]
    fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    given = {k: v for k, v in options.items() if v is not None}
    for key in given:
        if key not in fields:
            flag = "--" + key.replace("_", "-")
            raise UsageError(f"`{flag}` does not apply to scheme {scheme!r}")
    return cls(**given)
