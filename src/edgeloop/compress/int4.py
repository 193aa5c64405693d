"""Block-wise int4 weight-only quantization (onnxruntime's MatMulNBits).

Weights of every MatMul (and Gemm, rewritten to MatMul first) are stored as 4-bit integers
with one float scale per block of ``block_size`` values along the reduction axis;
activations stay in float. This shrinks the file about 6x and suits memory-bound layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import onnx

from edgeloop.compress.base import Pass, PassContext
from edgeloop.compress.fuse import gemm_to_matmul
from edgeloop.errors import ModelError, UsageError


@dataclass
class Int4Weight(Pass):
    """int4 weights in blocks of ``block_size`` along K (a power of two, at least 16)."""

    block_size: int = 32
    symmetric: bool = True
    accuracy_level: int = 4   # MatMulNBits compute type: 4 = int8 activations (fastest on CPU)
    name: ClassVar[str] = "int4-weight"

    def __post_init__(self) -> None:
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise UsageError(f"`block_size` must be a power of two >= 16; got {self.block_size}")

    def apply(self, model: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto:
        # imported here: it pulls in onnx-ir and onnxruntime's weight-only quantizers,
        # which no other scheme needs (half a second on every `edgeloop quantize`)
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        model = gemm_to_matmul(model)
        quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=self.block_size,
                                         is_symmetric=self.symmetric,
                                         accuracy_level=self.accuracy_level)
        quantizer.process()
        out: onnx.ModelProto = quantizer.model.model
        if not any(n.op_type == "MatMulNBits" for n in out.graph.node):
            raise ModelError("int4-weight found no MatMul or Gemm with constant weights")
        return out
