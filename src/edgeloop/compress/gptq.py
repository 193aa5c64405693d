"""Error-compensating rounding of int8 weights (GPTQ), for the layers of a quantized graph.

Rounding every weight to its nearest int8 level is what onnxruntime's quantizer does.
On a network that amplifies small perturbations (mobile CNNs, whose folded depthwise
weights spread over orders of magnitude) that rounding alone changes top-1 decisions.
GPTQ ("GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", Frantar, Ashkboos, Hoefler, Alistarh, ICLR 2023, after Optimal Brain
Quantization) rounds a layer's input columns one at a time and moves the rounding error
of each onto the columns not yet rounded, weighted by the inverse of ``H = E[x x^T]``
over the layer's calibration inputs ``x``; the layer's output error ``(W - Q(W)) x`` is
then far smaller than with nearest rounding, at the same scales.

A :class:`WeightRounder` applies it to a QDQ model produced by onnxruntime's quantizer: the
integer weights behind each Conv/Gemm's ``DequantizeLinear`` are recomputed from the
float weights of the graph that was quantized, with onnxruntime's own scales and zero
points, so the graph, kernels and speed are unchanged. ``H`` is gathered in one streamed
pass over the calibration data with float activations.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from numpy.lib.stride_tricks import sliding_window_view
from onnx import numpy_helper

from edgeloop._onnx import attr
from edgeloop.compress.equalize import _Graph, _stream
from edgeloop.data import Dataset

__all__ = ["RoundedLayer", "WeightRounder", "weight_dequantizers"]

_DAMP = 0.01   # share of H's mean diagonal added to it, as in the paper
# A layer whose calibration inputs give fewer positions than this many per input column
# keeps nearest rounding: its H is too poorly known (a classifier's Gemm sees one position
# per sample), and GPTQ would fit the calibration set rather than the layer.
_MIN_POSITIONS_PER_COLUMN = 4


@dataclass(frozen=True)
class RoundedLayer:
    """One layer's output error on the calibration inputs, ``tr(D H D^T)`` with ``D`` the
    weight error, for nearest rounding and for GPTQ's (same units, lower is better)."""

    node: str
    nearest: float
    gptq: float


@dataclass(frozen=True)
class _Layer:
    node: onnx.NodeProto     # the Conv/Gemm of the float graph
    weight: np.ndarray       # float weight, as (groups, out per group, inputs per group)
    groups: int
    kernel: tuple[int, ...]  # a Conv's kernel shape; () for Gemm


def _patches(x: np.ndarray, layer: _Layer) -> np.ndarray:
    """The inputs one output position of ``layer`` sees, as (groups, positions, inputs
    per group) with the inputs ordered as the weight's flattened (C_in/g, *kernel)."""
    node, groups, kernel = layer.node, layer.groups, layer.kernel
    if node.op_type == "Gemm":
        return x.reshape(1, x.shape[0], -1)
    nd = x.ndim - 2
    strides = list(attr(node, "strides", [1] * nd))
    dil = list(attr(node, "dilations", [1] * nd))
    pads = list(attr(node, "pads", [0] * 2 * nd))
    xp = np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[i + nd]) for i in range(nd)])
    span = tuple(dil[i] * (kernel[i] - 1) + 1 for i in range(nd))
    win = sliding_window_view(xp, span, axis=tuple(range(2, 2 + nd)))
    win = win[(slice(None), slice(None),
               *(slice(None, None, strides[i]) for i in range(nd)),
               *(slice(None, None, dil[i]) for i in range(nd)))]
    # (N, C, *out, *kernel) -> (groups, N * out positions, C/g * prod(kernel))
    n, c = win.shape[:2]
    per = c // groups
    win = win.reshape(n, groups, per, -1, int(np.prod(kernel)))
    return np.ascontiguousarray(win.transpose(1, 0, 3, 2, 4)).reshape(
        groups, -1, per * int(np.prod(kernel)))


def _layers(g: _Graph, names: Sequence[str]) -> list[_Layer]:
    out = []
    for n in g.model.graph.node:
        if n.name not in names or n.op_type not in ("Conv", "Gemm") or len(n.input) < 2:
            continue
        w = g.const(n.input[1])
        if w is None or (n.op_type == "Gemm" and int(attr(n, "transA", 0))):
            continue
        if n.op_type == "Gemm":
            w = w if int(attr(n, "transB", 0)) else w.T
            out.append(_Layer(n, w[None].astype(np.float64), 1, ()))
        elif attr(n, "auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET"):
            groups = int(attr(n, "group", 1))
            out.append(_Layer(n, w.reshape(groups, w.shape[0] // groups, -1)
                              .astype(np.float64), groups, tuple(w.shape[2:])))
    return out


def _hessians(model: onnx.ModelProto, layers: list[_Layer], calib: Dataset,
              batch_size: int) -> dict[str, np.ndarray]:
    """``E[x x^T]`` of each layer's inputs, per group, streamed over ``calib``; only for
    layers whose inputs give enough positions (``_MIN_POSITIONS_PER_COLUMN``), which is
    known from the first batch, so no memory goes to the others' (largest) matrices."""
    sums: dict[str, np.ndarray] = {}
    count: dict[str, int] = {}
    live = list(layers)
    if not live:   # no Conv/Gemm with constant weights (e.g. MatMul-only graphs)
        return sums
    for k, acts in enumerate(_stream(model, [ly.node.input[0] for ly in layers], calib,
                                     batch_size,
                                     "int8: gathering layer statistics for GPTQ rounding")):
        first = k == 0
        for ly in list(live):
            x = acts[ly.node.input[0]]
            p = _patches(x, ly)
            name, cols = ly.node.name, p.shape[2]
            if first:
                per_sample = p.shape[1] // max(len(x), 1)
                if per_sample * len(calib) < _MIN_POSITIONS_PER_COLUMN * cols:
                    live.remove(ly)
                    continue
                sums[name] = np.zeros((ly.groups, cols, cols), np.float32)
                count[name] = 0
            sums[name] += np.matmul(p.transpose(0, 2, 1), p)
            count[name] += p.shape[1]
    return {k: v / count[k] for k, v in sums.items()}


def _quant(w: np.ndarray, scale: np.ndarray, zero: np.ndarray, qmin: int,
           qmax: int) -> np.ndarray:
    return np.clip(np.round(w / scale) + zero, qmin, qmax)


def _gptq(w: np.ndarray, h: np.ndarray, scale: np.ndarray, zero: np.ndarray, qmin: int,
          qmax: int) -> np.ndarray:
    """Integer weights for ``w`` (groups, rows, columns) with per-row ``scale``/``zero``
    (broadcast to (groups, rows, 1)) and input second moments ``h`` (groups, cols, cols)."""
    w = w.copy()
    h = h.copy()
    cols = w.shape[2]
    dead = np.diagonal(h, axis1=1, axis2=2) <= 0
    idx = np.arange(cols)
    h[:, idx, idx] += np.where(dead, 1.0, 0.0)
    w[np.broadcast_to(dead[:, None, :], w.shape)] = 0.0
    h[:, idx, idx] += _DAMP * np.mean(np.diagonal(h, axis1=1, axis2=2), axis=1,
                                      keepdims=True)
    # upper Cholesky factor of H^-1: row i holds how column i's error spreads to later ones
    hinv = np.linalg.cholesky(np.linalg.inv(h)).transpose(0, 2, 1)
    q = np.empty_like(w)
    for i in range(cols):
        q[:, :, i] = _quant(w[:, :, i], scale[:, :, 0], zero[:, :, 0], qmin, qmax)
        err = (w[:, :, i] - (q[:, :, i] - zero[:, :, 0]) * scale[:, :, 0]) / hinv[:, None, i, i]
        w[:, :, i + 1:] -= err[:, :, None] * hinv[:, None, i, i + 1:]
    return q


def _output_error(w: np.ndarray, deq: np.ndarray, h: np.ndarray) -> float:
    d = w - deq
    return float(np.sum(np.matmul(d, h) * d))


def weight_dequantizers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    """The Conv/Gemm layers of a QDQ model whose weight is a constant integer tensor
    behind a ``DequantizeLinear``: layer name -> that ``DequantizeLinear``."""
    producer = {o: n for n in model.graph.node for o in n.output}
    constants = {i.name for i in model.graph.initializer}
    out = {}
    for n in model.graph.node:
        if n.op_type not in ("Conv", "Gemm") or len(n.input) < 2:
            continue
        dq = producer.get(n.input[1])
        if dq is not None and dq.op_type == "DequantizeLinear" and dq.input[0] in constants:
            out[n.name] = dq
    return out


class WeightRounder:
    """GPTQ rounding for the QDQ models onnxruntime makes from one float graph,
    ``prepared``: its layers' input statistics are gathered once, on the first call, from
    ``calib`` (streamed ``batch_size`` samples at a time), and each layer's rounding is
    reused while the quantizer gives it the same scales."""

    def __init__(self, prepared: onnx.ModelProto, calib: Dataset, *,
                 batch_size: int = 1) -> None:
        self.prepared = prepared
        self.calib = calib
        self.batch_size = batch_size
        self._hessians: dict[str, np.ndarray] | None = None
        self._done: dict[tuple[str, bytes], tuple[np.ndarray | None, RoundedLayer]] = {}

    def __call__(self, quantized: onnx.ModelProto,
                 ) -> tuple[onnx.ModelProto, list[RoundedLayer]]:
        """``quantized`` with the int8 weights of its Conv/Gemm layers re-rounded by GPTQ
        from the float weights, with the quantizer's scales and zero points; and per layer
        the output error before and after. Layers kept in float, or whose weights are not
        behind a DequantizeLinear of a constant, are left alone; a layer is only changed
        where GPTQ lowers its error."""
        out = onnx.ModelProto()
        out.CopyFrom(quantized)
        q = _Graph(out)
        targets = weight_dequantizers(out)
        layers = _layers(_Graph(self.prepared), list(targets))
        if self._hessians is None:
            everything = [n.name for n in self.prepared.graph.node]
            self._hessians = _hessians(self.prepared, _layers(_Graph(self.prepared),
                                                              everything),
                                       self.calib, self.batch_size)
        report = []
        for ly in layers:
            dq = targets[ly.node.name]
            stored = q.array(dq.input[0])
            params = [q.const(i) for i in dq.input[1:3] if i]
            key = (ly.node.name, b"".join(p.tobytes() for p in params))
            if key not in self._done:
                if ly.node.name not in self._hessians:   # too few positions, or already
                    continue                             # rounded at other scales
                # its statistics are not kept once used: the quantizer gives a layer the
                # same scales in every model it makes from one graph and calibration
                self._done[key] = self._round(ly, stored, params,
                                              self._hessians.pop(ly.node.name))
            ints, rounded = self._done[key]
            report.append(rounded)
            if ints is not None:
                q.inits[dq.input[0]].CopyFrom(numpy_helper.from_array(
                    _stored_layout(ints, ly, stored.shape).astype(stored.dtype), dq.input[0]))
        return out, report

    @staticmethod
    def _round(ly: _Layer, stored: np.ndarray, params: list[np.ndarray], h: np.ndarray,
               ) -> tuple[np.ndarray | None, RoundedLayer]:
        # the quantizer's integer range, read off its own weights: symmetric, never -128,
        # and 7-bit (+-64) where the target needs reduce-range to avoid AVX2 saturation
        limit = int(np.abs(stored.astype(np.int64)).max())
        scale = params[0].astype(np.float64)
        zero = params[1].astype(np.float64) if len(params) > 1 else np.zeros_like(scale)
        rows = ly.weight.shape[0] * ly.weight.shape[1]
        scale, zero = (np.broadcast_to(v.reshape(-1), (rows,)).reshape(
            ly.weight.shape[0], ly.weight.shape[1], 1) for v in (scale, zero))
        nearest = _quant(ly.weight, scale, zero, -limit, limit)
        h = h.astype(np.float64)
        ints = _gptq(ly.weight, h, scale, zero, -limit, limit)
        before = _output_error(ly.weight, (nearest - zero) * scale, h)
        after = _output_error(ly.weight, (ints - zero) * scale, h)
        if after >= before:
            return None, RoundedLayer(ly.node.name, before, before)
        return ints.astype(stored.dtype), RoundedLayer(ly.node.name, before, after)


def _stored_layout(ints: np.ndarray, layer: _Layer, shape: tuple[int, ...]) -> np.ndarray:
    """(groups, rows, columns) integers back in the initializer's own layout."""
    if layer.node.op_type == "Gemm":
        w = ints[0]
        return w if int(attr(layer.node, "transB", 0)) else w.T
    return ints.reshape(shape)

