"""Cross-layer equalization and bias correction: int8 that keeps mobile CNNs faithful.

From "Data-Free Quantization Through Weight Equalization and Bias Correction" (Nagel,
van Baalen, Blankevoort, Welling, ICCV 2019), as transforms of a float ONNX graph done
before onnxruntime's quantizer runs:

- :func:`equalize` (DFQ §4.1): for two convolutions in a row, joined by Relu, Clip(0, 6)
  or nothing, the output channel ``i`` of the first is divided by ``s_i`` and the matching
  input channel of the second multiplied by it, with ``s_i = sqrt(r1_i / r2_i)`` so that
  both weight ranges become ``sqrt(r1_i * r2_i)``. Relu commutes with a positive scale, so
  the float function is unchanged. Depthwise convolutions (one input channel per group)
  take part, which matters most: after folding BatchNorm their channels' ranges differ
  by 100x and more, and the activations they produce share one int8 scale per tensor.
  ReLU6 does not commute with a scale; see :data:`RELU6_MODES` for what is done with it.
- :func:`correct_bias` (DFQ §4.2, the empirical form): int8 rounding of the weights
  shifts each output channel's mean by ``E[(W - Q(W)) x]``. That shift is measured on
  calibration data with the float activations and added to the bias, so the quantized
  layer is unbiased. ``Q`` is onnxruntime's own weight quantization (symmetric int8, per
  channel or per tensor, 7-bit with reduce-range), computed with its functions.
- :func:`saturated_biases`: a check for int32 biases clipped at the int32 limits. In QDQ,
  bias is quantized with scale ``activation scale x weight scale``; a near-dead channel
  (its weights almost 0 after folding a BatchNorm with gamma close to 0) has a tiny weight
  scale, and its bias no longer fits. onnxruntime 1.32's QDQ quantizer guards this itself
  (``QDQQuantizer._adjust_weight_scale_for_int32_bias`` raises such a channel's weight
  scale until the bias fits, unless ``QDQDisableWeightAdjustForInt32Bias``), and
  ``Int8Static`` keeps that guard on; a quantizer that casts ``round(b / scale)`` to int32
  without it gets ``-2**31`` on x86 (the cast of an out-of-range float) —
  :func:`bias_safe_weight_scale` is the floor such code must apply.

Only Conv is equalized (Gemm/MatMul pairs are rare in CNNs, and through a Flatten the
channel correspondence is lost). The graph must have BatchNorm folded (edgeloop's
``Preprocess`` or the exporter does it); :func:`fold_batchnorm` folds what is left.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization.quant_utils import compute_data_quant_params, quantize_nparray

from edgeloop._onnx import attr, session
from edgeloop._progress import progress
from edgeloop.data import Dataset, batches
from edgeloop.errors import UsageError, one_of

__all__ = [
    "RELU6_MODES",
    "EqualizedPair",
    "bias_safe_weight_scale",
    "correct_bias",
    "equalize",
    "fold_batchnorm",
    "quantize_weight",
    "saturated_biases",
    "weight_axis",
]

# What :func:`equalize` does with ReLU6 (Clip(0, 6)) between two convolutions:
# - "bounded" (default): keep the Clip and limit the scales so it stays exact on the
#   calibration data: a channel the Clip cuts (its pre-activation exceeds 6 on CALIB)
#   keeps scale 1; any other channel may grow only until its CALIB maximum reaches 3
#   (headroom for held-out data beyond the CALIB maxima).
#   Besides exactness, that keeps every ReLU6 output within [0, 6], so the activation's
#   single int8 scale does not grow — it fills with the small channels scaled up.
# - "relu": replace it by Relu, as DFQ does, and equalize. The float model then differs
#   from the original only where a pre-activation exceeds 6 — and in the int8 model the
#   activation's quantization range clips anyway (onnxruntime removes Relu/Clip before a
#   uint8 QuantizeLinear whose calibrated range starts at 0, so the Clip is never run).
# - "skip": keep ReLU6 and do not equalize through it (exact, but on MobileNets that
#   leaves almost nothing to equalize).
RELU6_MODES = ("bounded", "relu", "skip")

# "bounded": a scaled channel's CALIB maximum stays below 6 / this, so that held-out data
# up to this many times larger than anything seen in CALIB is still not clipped.
_RELU6_HEADROOM = 2.0

_INT32 = np.iinfo(np.int32)


@dataclass(frozen=True)
class EqualizedPair:
    """Two convolutions equalized together and the spread of their per-channel weight
    ranges (max / min over channels, near-dead channels left out) before and after."""

    first: str
    second: str
    activation: str       # Relu, Clip (replaced by Relu) or Identity
    spread_before: float  # range spread of the first conv's output channels
    spread_after: float


class _Graph:
    """Lookups over one graph: initializers, producers, consumers, constant values."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.inits = {i.name: i for i in model.graph.initializer}
        self.producer = {o: n for n in model.graph.node for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in model.graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.outputs = {o.name for o in model.graph.output}

    def const(self, name: str) -> np.ndarray | None:
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            return numpy_helper.to_array(node.attribute[0].t)
        if node is not None and node.op_type == "Identity":  # exporters dedupe this way
            return self.const(node.input[0])
        return None

    def own(self, node: onnx.NodeProto, index: int) -> str:
        """Make input ``index`` of ``node`` (a constant) an initializer that only ``node``
        uses, so that rescaling it cannot change another layer; its name."""
        name = node.input[index]
        users = self.consumers.get(name, [])
        if name in self.inits and users == [node] and name not in self.outputs:
            return name
        new = f"{name}_{node.name or node.output[0]}"
        self.model.graph.initializer.append(numpy_helper.from_array(self.const(name), new))
        self.inits[new] = self.model.graph.initializer[-1]
        node.input[index] = new
        if node in users:
            users.remove(node)
        self.consumers[new] = [node]
        return new

    def only_consumer(self, tensor: str) -> onnx.NodeProto | None:
        users = self.consumers.get(tensor, [])
        return users[0] if len(users) == 1 and tensor not in self.outputs else None

    def array(self, name: str) -> np.ndarray:
        return numpy_helper.to_array(self.inits[name])

    def set_array(self, name: str, value: np.ndarray) -> None:
        self.inits[name].CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _has_const_weight(g: _Graph, node: onnx.NodeProto) -> bool:
    """A Conv whose weight and bias (if any) are constants."""
    return (node.op_type == "Conv" and len(node.input) > 1
            and all(g.const(i) is not None for i in node.input[1:] if i))


def _own_bias(g: _Graph, node: onnx.NodeProto, channels: int) -> str:
    """The name of ``node``'s own bias initializer, adding a zero bias if it has none."""
    if len(node.input) > 2 and node.input[2]:
        return g.own(node, 2)
    name = f"{node.input[1]}_bias"
    g.model.graph.initializer.append(numpy_helper.from_array(np.zeros(channels, np.float32),
                                                             name))
    g.inits[name] = g.model.graph.initializer[-1]
    while len(node.input) < 3:
        node.input.append("")
    node.input[2] = name
    g.consumers[name] = [node]
    return name


def fold_batchnorm(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with every inference BatchNormalization that directly follows a
    Conv (its only consumer, constant weights and statistics) folded into that Conv."""
    out = _copy(model)
    g = _Graph(out)
    drop: list[onnx.NodeProto] = []
    for bn in list(out.graph.node):
        if bn.op_type != "BatchNormalization" or len(bn.output) != 1:
            continue
        conv = g.producer.get(bn.input[0])
        params = [g.const(n) for n in bn.input[1:5]]
        if (conv is None or not _has_const_weight(g, conv) or any(p is None for p in params)
                or g.only_consumer(conv.output[0]) is not bn):
            continue
        gamma, beta, mean, var = (p.astype(np.float64) for p in params)  # type: ignore[union-attr]
        k = gamma / np.sqrt(var + float(attr(bn, "epsilon", 1e-5)))
        w = g.array(g.own(conv, 1)).astype(np.float64)
        bias = _own_bias(g, conv, w.shape[0])
        g.set_array(conv.input[1], w * k.reshape(-1, *[1] * (w.ndim - 1)))
        g.set_array(bias, (g.array(bias) - mean) * k + beta)
        conv.output[0] = bn.output[0]
        drop.append(bn)
    for bn in drop:
        out.graph.node.remove(bn)
    return out


def _relu6(g: _Graph, node: onnx.NodeProto) -> bool:
    if node.op_type != "Clip":
        return False
    if len(node.input) == 1:  # opset < 11: bounds are attributes
        lo, hi = attr(node, "min", None), attr(node, "max", None)
    else:
        lo = g.const(node.input[1]) if len(node.input) > 1 and node.input[1] else None
        hi = g.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    return lo is not None and hi is not None and float(lo) == 0.0 and float(hi) == 6.0


def _depthwise(g: _Graph, conv: onnx.NodeProto) -> bool:
    w = g.const(conv.input[1])
    return w is not None and int(attr(conv, "group", 1)) == w.shape[0] and w.shape[1] == 1


def _equalizable(g: _Graph, conv: onnx.NodeProto | None) -> bool:
    return (conv is not None and _has_const_weight(g, conv)
            and (int(attr(conv, "group", 1)) == 1 or _depthwise(g, conv)))


def _pairs(g: _Graph, relu6: str) -> list[tuple[onnx.NodeProto, onnx.NodeProto | None,
                                                onnx.NodeProto]]:
    """(first conv, activation node or None, second conv) chains that can be equalized."""
    out = []
    for first in g.model.graph.node:
        if not _equalizable(g, first):
            continue
        act = g.only_consumer(first.output[0])
        if act is None:
            continue
        if act.op_type == "Relu" or (act.op_type == "Clip" and relu6 != "skip"
                                     and _relu6(g, act)):
            second = g.only_consumer(act.output[0])
        elif act.op_type == "Conv":
            act, second = None, act
        else:
            continue
        if second is not None and second.op_type == "Conv" and _equalizable(g, second):
            out.append((first, act, second))
    return out


def _ranges(w: np.ndarray, axis: int) -> np.ndarray:
    return np.abs(np.moveaxis(w, axis, 0)).reshape(w.shape[axis], -1).max(1)


def _spread(r: np.ndarray) -> float:
    live = r[r > 1e-3 * np.median(r)]
    return float(live.max() / live.min()) if live.size else 1.0


def _stream(model: onnx.ModelProto, tensors: list[str], data: Dataset, batch_size: int,
            what: str) -> Iterator[dict[str, np.ndarray]]:
    """The float values of ``tensors`` on ``data``, one batch at a time."""
    probe = _copy(model)
    known = {o.name for o in probe.graph.output}
    for name in dict.fromkeys(tensors):
        if name not in known:
            probe.graph.output.append(
                helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    sess = session(probe)
    inputs = [i.name for i in sess.get_inputs()]
    for feed in progress(batches(data, batch_size), what,
                         total=-(-len(data) // batch_size)):
        values = sess.run(tensors, {k: feed[k] for k in inputs})
        yield dict(zip(tensors, values, strict=True))


def _channel_max(model: onnx.ModelProto, tensors: list[str], data: Dataset,
                 batch_size: int) -> dict[str, np.ndarray]:
    """Per-channel (axis 1) maximum of each of ``tensors`` over ``data``."""
    peak: dict[str, np.ndarray] = {}
    for acts in _stream(model, tensors, data, batch_size, "equalization ranges"):
        for name, a in acts.items():
            m = np.moveaxis(a, 1, 0).reshape(a.shape[1], -1).max(1)
            peak[name] = m if name not in peak else np.maximum(peak[name], m)
    return peak


def equalize(model: onnx.ModelProto, calib: Dataset | None = None, *, relu6: str = "bounded",
             iterations: int = 20, max_scale: float = 1e3, batch_size: int = 4,
             ) -> tuple[onnx.ModelProto, list[EqualizedPair]]:
    """Cross-layer equalization of every Conv -> (Relu | ReLU6 | nothing) -> Conv chain.

    Returns the equalized copy and, per pair, the range spread before and after. The
    pairs are swept ``iterations`` times (a depthwise conv is the second of one pair and
    the first of the next, so one sweep does not settle both). Scales are clipped to
    ``[1/max_scale, max_scale]``: a near-dead channel (range ~0) would otherwise get a
    huge scale that blows up its bias and the activation range of its whole tensor.
    ``relu6`` is one of :data:`RELU6_MODES`; ``bounded`` needs ``calib``.
    """
    if relu6 not in RELU6_MODES:
        raise one_of("relu6", list(RELU6_MODES), relu6)
    out = _copy(model)
    g = _Graph(out)
    pairs = _pairs(g, relu6)
    for first, _, second in pairs:
        for node, index in ((first, 1), (first, 2), (second, 1)):
            if len(node.input) > index and node.input[index]:
                g.own(node, index)
    clipped = [f.output[0] for f, act, _ in pairs if act is not None and act.op_type == "Clip"]
    if relu6 == "bounded" and clipped and calib is None:
        raise UsageError("equalize with relu6='bounded' needs calibration data")
    peak = _channel_max(model, clipped, calib, batch_size) if relu6 == "bounded" and clipped \
        else {}
    before = [_spread(_ranges(g.array(f.input[1]), 0)) for f, _, _ in pairs]
    total = [np.ones(g.inits[f.input[1]].dims[0]) for f, _, _ in pairs]
    for _ in range(iterations):
        for (first, _act, second), cum in zip(pairs, total, strict=True):
            lo, hi = np.full_like(cum, 1 / max_scale), np.full_like(cum, max_scale)
            if first.output[0] in peak:
                # The Clip(0, 6) stays: a channel it clips keeps its scale; any other may be
                # scaled as long as its largest value on CALIB stays below 6 / headroom.
                m = peak[first.output[0]]
                saturating = m > 6.0
                lo = np.where(saturating, 1.0 / cum,
                              np.maximum(lo, m * _RELU6_HEADROOM / (6.0 * cum)))
                hi = np.where(saturating, 1.0 / cum, hi)
            cum *= _equalize_pair(g, first, second, lo, hi)
    result = []
    for (first, act, second), spread in zip(pairs, before, strict=True):
        if act is not None and act.op_type == "Clip" and relu6 == "relu":
            act.op_type = "Relu"
            del act.input[1:]
            del act.attribute[:]
        result.append(EqualizedPair(first.name, second.name,
                                    act.op_type if act is not None else "Identity", spread,
                                    _spread(_ranges(g.array(first.input[1]), 0))))
    if relu6 == "relu":
        _drop_unused(out)   # the replaced Clips' bounds
    return out, result


def _drop_unused(model: onnx.ModelProto) -> None:
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    dead = [n for n in model.graph.node if n.op_type == "Constant" and n.output[0] not in used]
    for n in dead:
        model.graph.node.remove(n)
    keep = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


def _equalize_pair(g: _Graph, first: onnx.NodeProto, second: onnx.NodeProto,
                   lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Equalize one pair with per-channel scales bounded to ``[lo, hi]``; the scales."""
    w1 = g.array(first.input[1]).astype(np.float64)
    w2 = g.array(second.input[1]).astype(np.float64)
    in_axis = 0 if _depthwise(g, second) else 1  # a depthwise conv's input i is its filter i
    r1, r2 = _ranges(w1, 0), _ranges(w2, in_axis)
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.sqrt(r1 / r2)
    s = np.clip(np.nan_to_num(s, nan=1.0, posinf=hi.max()), lo, hi)
    g.set_array(first.input[1], w1 / s.reshape((-1,) + (1,) * (w1.ndim - 1)))
    if len(first.input) > 2 and first.input[2]:
        g.set_array(first.input[2], g.array(first.input[2]) / s)
    shape2 = [1] * w2.ndim
    shape2[in_axis] = -1
    g.set_array(second.input[1], w2 * s.reshape(shape2))
    return s


def weight_axis(node: onnx.NodeProto) -> int:
    """The output-channel axis of a Conv, Gemm or MatMul weight, as onnxruntime's
    quantizer takes it for per-channel weights."""
    if node.op_type == "Gemm":
        return 0 if int(attr(node, "transB", 0)) else 1
    return 1 if node.op_type == "MatMul" else 0


def quantize_weight(w: np.ndarray, *, axis: int, per_channel: bool,
                    reduce_range: bool) -> tuple[np.ndarray, np.ndarray]:
    """``(Q(w) dequantized, scale)`` as onnxruntime's quantizer does it for int8 weights:
    symmetric, per channel along ``axis`` or per tensor, 7-bit with ``reduce_range``."""
    w = np.asarray(w, np.float32)
    moved = np.moveaxis(w, axis, 0)
    rows = moved.reshape(moved.shape[0], -1) if per_channel else moved.reshape(1, -1)
    deq = np.empty_like(rows)
    scales = np.empty(len(rows), np.float32)
    for i, row in enumerate(rows):
        zp, scale = compute_data_quant_params(row, TensorProto.INT8, True,
                                              reduce_range=reduce_range)
        q = quantize_nparray(TensorProto.INT8, row, scale, zp)
        deq[i] = (q.astype(np.float32) - zp) * scale
        scales[i] = scale
    return np.moveaxis(deq.reshape(moved.shape), 0, axis), scales


def _window_sums(x: np.ndarray, conv: onnx.NodeProto, kernel: tuple[int, ...]) -> np.ndarray:
    """Sum over samples and output positions of the input each kernel tap sees:
    ``(C_in, *kernel)`` — so that the summed output of a conv with weights ``d`` (and no
    bias) is ``sum(d[o, c_in_group, taps] * result[c_in_of_o, taps])``."""
    nd = len(kernel)
    strides = list(attr(conv, "strides", [1] * nd))
    dil = list(attr(conv, "dilations", [1] * nd))
    pads = list(attr(conv, "pads", [0] * 2 * nd))
    if attr(conv, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise ValueError(f"{conv.name}: auto_pad is not supported by bias correction")
    xp = np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[i + nd]) for i in range(nd)])
    out_len = [(xp.shape[2 + i] - dil[i] * (kernel[i] - 1) - 1) // strides[i] + 1
               for i in range(nd)]
    result = np.empty((x.shape[1], *kernel), np.float64)
    for tap in np.ndindex(*kernel):
        idx = (slice(None), slice(None), *(
            slice(tap[i] * dil[i], tap[i] * dil[i] + strides[i] * (out_len[i] - 1) + 1,
                  strides[i]) for i in range(nd)))
        result[(slice(None), *tap)] = xp[idx].sum(axis=(0, *range(2, 2 + nd)),
                                                  dtype=np.float64)
    return result


def correct_bias(model: onnx.ModelProto, calib: Dataset, *, per_channel: bool = True,
                 reduce_range: bool = False, batch_size: int = 4,
                 exclude: Collection[str] = ()) -> onnx.ModelProto:
    """A copy of ``model`` whose Conv/Gemm biases absorb the mean output shift that int8
    weight rounding will cause, ``E[(W - Q(W)) x]``, measured on ``calib`` with the float
    activations (``Q`` as in :func:`quantize_weight`, with the same ``per_channel`` and
    ``reduce_range`` as the quantizer will use). Layers in ``exclude`` (kept in float by
    the quantizer) are left alone.

    Calibration data is streamed ``batch_size`` samples at a time, and only running sums
    are kept, so memory is one batch of activations.
    """
    out = _copy(model)
    g = _Graph(out)
    layers = [n for n in out.graph.node
              if n.op_type in ("Conv", "Gemm") and len(n.input) > 1
              and all(g.const(i) is not None for i in n.input[1:] if i)
              and n.name not in exclude
              and not (n.op_type == "Gemm" and int(attr(n, "transA", 0)))]
    if not layers:
        return out
    deltas = {}
    for n in layers:
        w = g.const(n.input[1])
        deltas[n.name] = w - quantize_weight(w, axis=weight_axis(n), per_channel=per_channel,
                                             reduce_range=reduce_range)[0]
    sums = {n.name: 0.0 for n in layers}
    count = {n.name: 0 for n in layers}
    for acts in _stream(model, [n.input[0] for n in layers], calib, batch_size,
                        "bias correction"):
        for n in layers:
            shift, positions = _output_shift(n, deltas[n.name], acts[n.input[0]])
            sums[n.name] = sums[n.name] + shift
            count[n.name] += positions
    for n in layers:
        channels = deltas[n.name].shape[weight_axis(n)]
        bias = _own_bias(g, n, channels)
        b = g.array(bias)
        shift = np.asarray(sums[n.name]) / max(count[n.name], 1)
        if n.op_type == "Gemm":
            shift = shift * float(attr(n, "alpha", 1.0)) / float(attr(n, "beta", 1.0))
        if b.shape != shift.shape:   # a broadcast (scalar) bias cannot take per-channel shifts
            continue
        g.set_array(bias, b + shift)
    return out


def _output_shift(node: onnx.NodeProto, delta: np.ndarray,
                  x: np.ndarray) -> tuple[np.ndarray, int]:
    """Sum over samples and positions of the output of ``node`` with weights ``delta`` on
    input ``x``, per output channel, and the number of (sample, position) terms."""
    if node.op_type == "Gemm":
        x2 = x.reshape(len(x), -1).astype(np.float64)
        d = delta.T if int(attr(node, "transB", 0)) else delta  # (K, N)
        return x2.sum(0) @ d.astype(np.float64), len(x2)
    kernel = delta.shape[2:]
    taps = _window_sums(x, node, kernel)
    groups = int(attr(node, "group", 1))
    c_out, c_per_group = delta.shape[0], delta.shape[1]
    per_group_out = c_out // groups
    shift = np.empty(c_out, np.float64)
    for grp in range(groups):
        o = slice(grp * per_group_out, (grp + 1) * per_group_out)
        t = taps[grp * c_per_group:(grp + 1) * c_per_group]
        shift[o] = np.tensordot(delta[o].astype(np.float64), t, axes=delta.ndim - 1)
    nd = len(kernel)
    strides = list(attr(node, "strides", [1] * nd))
    dil = list(attr(node, "dilations", [1] * nd))
    pads = list(attr(node, "pads", [0] * 2 * nd))
    positions = len(x)
    for i in range(nd):
        size = x.shape[2 + i] + pads[i] + pads[i + nd]
        positions *= (size - dil[i] * (kernel[i] - 1) - 1) // strides[i] + 1
    return shift, positions


def bias_safe_weight_scale(weight_scale: np.ndarray, bias: np.ndarray,
                           input_scale: float) -> np.ndarray:
    """The weight scale floored so that ``bias / (input_scale * weight_scale)`` fits in
    int32 (with a small margin), channel by channel; what onnxruntime's QDQ quantizer does
    before it quantizes a bias, for code that quantizes biases itself."""
    floor = np.abs(np.asarray(bias, np.float64)) / (input_scale * (_INT32.max * 0.999))
    return np.maximum(np.asarray(weight_scale, np.float64), floor).astype(np.float32)


def saturated_biases(model: onnx.ModelProto) -> dict[str, int]:
    """Int32 bias initializers of a quantized model that hold the int32 limits (a bias that
    overflowed its scale and was clipped or wrapped), with how many values do."""
    g = _Graph(model)
    out = {}
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in g.inits:
            continue
        init = g.inits[node.input[0]]
        if init.data_type != TensorProto.INT32:
            continue
        q = numpy_helper.to_array(init)
        hits = int(((q == _INT32.min) | (q == _INT32.max)).sum())
        if hits:
            out[init.name] = hits
    return out
