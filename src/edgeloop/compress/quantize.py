"""Int8 post-training quantization, with onnxruntime's quantizer as the engine.

- ``int8-dynamic``: weights int8 (per channel), activations quantized at run time.
- ``int8-static``: QDQ, per-channel weights, activation ranges from calibration data;
  first, cross-layer equalization and optionally bias correction
  (:mod:`~edgeloop.compress.equalize`).
- ``ort-static`` / ``ort-dynamic``: onnxruntime's ``quantize_static`` /
  ``quantize_dynamic`` with their defaults and no pre-processing, the baseline edgeloop is
  measured against.

The layout (U8S8 or S8S8, reduce-range) comes from the target profile, see
:mod:`edgeloop.targets`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import onnx
from onnxruntime.quantization import (
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)

from edgeloop.compress import equalize as eq
from edgeloop.compress.base import Pass, PassContext, apply_pass
from edgeloop.compress.calibrate import NpzReader, static_calibration
from edgeloop.compress.fuse import Preprocess, drop_zero_bias_zero_points, record_preparation
from edgeloop.compress.layout import ChannelsLastHead, find_heads
from edgeloop.compress.sensitivity import quantizer_names
from edgeloop.errors import one_of
from edgeloop.targets import Target, detect

CALIBRATIONS = {
    "minmax": CalibrationMethod.MinMax,
    "entropy": CalibrationMethod.Entropy,
    "percentile": CalibrationMethod.Percentile,
}


def _activation_type(target: Target) -> QuantType:
    return QuantType.QUInt8 if target.activation_type == "uint8" else QuantType.QInt8


@dataclass
class Int8Dynamic(Pass):
    """Dynamic int8: int8 weights, activations quantized per batch at run time."""

    per_channel: bool = True
    preprocess: bool = True
    nodes_to_exclude: list[str] = field(default_factory=list)
    target: Target = field(default_factory=detect)
    name: ClassVar[str] = "int8-dynamic"

    def apply(self, model: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto:
        pre = Preprocess() if self.preprocess else None
        if pre is not None:
            model = pre.apply(model, ctx)
        out = ctx.scratch("int8-dynamic.onnx")
        quantize_dynamic(ctx.save(model, "in.onnx"), out, per_channel=self.per_channel,
                         reduce_range=self.target.reduce_range, weight_type=QuantType.QInt8,
                         nodes_to_exclude=quantizer_names(model, self.nodes_to_exclude,
                                                          mode="dynamic"))
        return _with_preparation(onnx.load(out), pre)


@dataclass
class Int8Static(Pass):
    """Static int8 in QDQ format with per-channel weights and calibrated activations."""

    calibration: str = "minmax"
    per_channel: bool = True
    preprocess: bool = True
    channels_last_head: bool = True   # see edgeloop.compress.layout
    equalize: bool = True             # cross-layer equalization, see edgeloop.compress.equalize
    bias_correction: bool = False     # absorb int8 weight rounding's mean shift into biases
    calib_batch: int = 8              # samples per batch for the histogram calibrators
    nodes_to_exclude: list[str] = field(default_factory=list)
    target: Target = field(default_factory=detect)
    name: ClassVar[str] = "int8-static"
    needs_calib: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.calibration not in CALIBRATIONS:
            raise one_of("calibration", list(CALIBRATIONS), self.calibration)

    def apply(self, model: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto:
        calib = ctx.require_calib(self.name)
        pre = Preprocess() if self.preprocess else None
        if pre is not None:
            model = pre.apply(model, ctx)
        if self.equalize:
            model, _ = eq.equalize(eq.fold_batchnorm(model), calib)
        if self.channels_last_head and find_heads(model):
            model = ChannelsLastHead().apply(model, ctx)
        if self.bias_correction:
            model = eq.correct_bias(model, calib, per_channel=self.per_channel,
                                    reduce_range=self.target.reduce_range,
                                    exclude=self.nodes_to_exclude)
        out = ctx.scratch("int8-static.onnx")
        fmt = QuantFormat.QDQ if self.target.quant_format == "QDQ" else QuantFormat.QOperator
        if self.calibration == "minmax":
            reader, options = static_calibration(model, calib)
        else:   # onnxruntime's histogram calibrators, in small batches
            reader, options = NpzReader(calib, self.calib_batch), {}
        quantize_static(
            ctx.save(model, "in.onnx"), out, reader, quant_format=fmt,
            per_channel=self.per_channel, reduce_range=self.target.reduce_range,
            activation_type=_activation_type(self.target), weight_type=QuantType.QInt8,
            calibrate_method=CALIBRATIONS[self.calibration],
            nodes_to_exclude=self.nodes_to_exclude,
            calibration_providers=["CPUExecutionProvider"], extra_options=options,
        )
        return _with_preparation(drop_zero_bias_zero_points(onnx.load(out)), pre)


def _with_preparation(model: onnx.ModelProto, pre: Preprocess | None) -> onnx.ModelProto:
    """``model`` with the record of the preparation ``pre`` did (the quantizer drops the
    input's metadata)."""
    return model if pre is None else record_preparation(model, pre.used_, pre.tried_)


@dataclass
class OrtStatic(Pass):
    """onnxruntime's ``quantize_static`` with its defaults (QDQ, S8S8, per-tensor, MinMax)."""

    name: ClassVar[str] = "ort-static"
    needs_calib: ClassVar[bool] = True

    def apply(self, model: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto:
        out = ctx.scratch("ort-static.onnx")
        quantize_static(ctx.save(model, "in.onnx"), out, NpzReader(ctx.require_calib(self.name)))
        return onnx.load(out)


@dataclass
class OrtDynamic(Pass):
    """onnxruntime's ``quantize_dynamic`` with its defaults."""

    name: ClassVar[str] = "ort-dynamic"

    def apply(self, model: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto:
        out = ctx.scratch("ort-dynamic.onnx")
        quantize_dynamic(ctx.save(model, "in.onnx"), out)
        return onnx.load(out)


__all__ = ["CALIBRATIONS", "Int8Dynamic", "Int8Static", "OrtDynamic", "OrtStatic", "apply_pass"]
