"""Quantization-aware training (QAT), exported as a QDQ ONNX model that onnxruntime runs on
integer kernels (QLinearConv, QGemm).

1. BatchNorm is folded into the convolution before it (the deployed model has no
   BatchNorm, so training sees the weights that will be quantized).
2. Every Conv/Linear is wrapped: its weights are fake-quantized per output channel
   (symmetric, ``bits`` wide: 8 -> [-127, 127], 4 -> [-7, 7]; on a target profile with
   ``reduce_range``, e.g. ``x86-avx2``, 8 -> [-64, 64], the grid whose uint8 x int8 pair
   sums fit AVX2's int16, see :mod:`edgeloop.targets`) and its input activation per tensor
   (8-bit, asymmetric, range = running min/max observed in training). Rounding passes
   gradients straight through. Training and export use the same grid.
3. Fine-tuning runs with the quantization in the loop, keeping the best validation epoch.
   By default it distils from the float model it started from (``distill`` weighs the
   teacher's softened outputs against the hard labels, as in
   :mod:`edgeloop.compress.distill`): the quantized model learns to reproduce the float
   one, not only the labels, which keeps it from drifting where quantization costs little.
   The kept epoch is then compared with post-training quantization (PTQ) through the real
   export: both are exported to QDQ ONNX, calibrated on the same data, and run by
   onnxruntime on the validation set. The fine-tuned weights are kept only if they lower
   the validation loss significantly — a one-sided paired test on the per-sample
   cross-entropy (a proper scoring rule that moves smoothly where accuracy on a few hundred
   samples moves in jumps) at level ``significance`` — and their validation accuracy is no
   lower; otherwise the result is the un-tuned model, whose export is exactly the PTQ
   model. At 8 bits PTQ often loses nothing measurable, and fine-tuning then only moves
   the model by noise; the test keeps such noise from replacing PTQ.
4. Export: the float graph is exported, then every weight is replaced by its integer values
   and a DequantizeLinear (the same grid as in training), every activation feeding or
   leaving a Conv/Gemm/Add gets a QuantizeLinear/DequantizeLinear pair with a range observed
   on the training data, and biases become int32. onnxruntime fuses these into integer ops.
   Activations are uint8 or int8 as the target profile says (the same grid either way:
   the int8 zero point is the uint8 one minus 128).

4-bit weights are stored in int8 containers (values in [-7, 7]) so the same int8 kernels
run them; activations stay 8-bit. :func:`quantize_export` without training is the matching
post-training baseline: same quantizer, same grid, no fine-tuning.
"""

from __future__ import annotations

import copy
import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from edgeloop._onnx import session
from edgeloop.compress.distill import Distill
from edgeloop.compress.trainbase import TorchPass, TrainContext, sample_of
from edgeloop.data import Dataset, batches
from edgeloop.errors import DataError, ModelError, UsageError, one_of
from edgeloop.targets import Target, detect

__all__ = ["BITS", "QAT", "ExportedScore", "QuantizedLayer", "exported_score",
           "fold_batchnorm", "quantize_export"]

BITS = (8, 4)
_COMPUTE = ("Conv", "Gemm", "MatMul")
_SHAPE_OPS = ("Reshape", "Flatten", "Squeeze", "Unsqueeze")
_CALIB = 256  # training samples that calibrate the export when the context has no calib set


def _weight_scale(w: torch.Tensor, qmax: int) -> torch.Tensor:
    return (w.detach().flatten(1).abs().amax(1) / qmax).clamp_min(1e-12)


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every BatchNorm that directly follows a convolution in an
    ``nn.Sequential`` folded into it (the convolution gains a bias)."""
    model = copy.deepcopy(model).eval()
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        for i in range(len(seq) - 1):
            conv, bn = seq[i], seq[i + 1]
            if not (isinstance(conv, nn.modules.conv._ConvNd)
                    and isinstance(bn, nn.modules.batchnorm._BatchNorm)):
                continue
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
            shape = (-1,) + (1,) * (conv.weight.dim() - 1)
            conv.weight = nn.Parameter(conv.weight * scale.reshape(shape))
            conv.bias = nn.Parameter((bias - bn.running_mean) * scale + bn.bias)
            seq[i + 1] = nn.Identity()
    return model


class QuantizedLayer(nn.Module):
    """A Conv/Linear with fake-quantized weights (per channel, integers in
    [-qmax, qmax]) and input (per tensor)."""

    def __init__(self, layer: nn.Module, qmax: int) -> None:
        super().__init__()
        self.layer = layer
        self.qmax = qmax
        self.register_buffer("lo", torch.tensor(float("inf")))
        self.register_buffer("hi", torch.tensor(float("-inf")))

    def quantized_weight(self) -> torch.Tensor:
        w = self.layer.weight
        scale = _weight_scale(w, self.qmax)
        return torch.fake_quantize_per_channel_affine(
            w, scale, torch.zeros_like(scale, dtype=torch.int32), 0, -self.qmax, self.qmax)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                self.lo.copy_(torch.minimum(self.lo, x.min()))
                self.hi.copy_(torch.maximum(self.hi, x.max()))
        scale, zp = _uint8_params(float(self.lo), float(self.hi))
        x = torch.fake_quantize_per_tensor_affine(x, scale, zp, 0, 255)
        w = self.quantized_weight()
        if isinstance(self.layer, nn.Linear):
            return nn.functional.linear(x, w, self.layer.bias)
        return self.layer._conv_forward(x, w, self.layer.bias)


def _uint8_params(lo: float, hi: float) -> tuple[float, int]:
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = max(hi - lo, 1e-8) / 255.0
    return scale, int(np.clip(round(-lo / scale), 0, 255))


def _wrap(model: nn.Module, qmax: int) -> nn.Module:
    for name, child in model.named_children():
        if isinstance(child, nn.modules.conv._ConvNd | nn.Linear):
            setattr(model, name, QuantizedLayer(child, qmax))
        else:
            _wrap(child, qmax)
    return model


@torch.no_grad()
def _observe(sim: nn.Module, data: Dataset) -> None:
    """Record activation ranges before training starts (BatchNorm is folded, so train mode
    only switches the range observers on)."""
    sim.train()
    for feed in batches(data, 512):
        (x,) = feed.values()
        sim(torch.from_numpy(x))
    sim.eval()


@torch.no_grad()
def _unwrap(model: nn.Module) -> nn.Module:
    """Replace each wrapper by its layer holding the quantized weights (exactly on grid)."""
    for name, child in model.named_children():
        if isinstance(child, QuantizedLayer):
            child.layer.weight = nn.Parameter(child.quantized_weight())
            setattr(model, name, child.layer)
        else:
            _unwrap(child)
    return model


@dataclass
class QAT(TorchPass):
    """Quantization-aware fine-tuning; :func:`quantize_export` writes the integer model."""

    bits: int = 8
    epochs: int = 10
    lr: float = 3e-4          # AdamW peak learning rate, one-cycle schedule
    distill: float = 0.9      # weight of the float model's softened outputs (0: labels only)
    temperature: float = 2.0  # softening of both models' outputs in the distillation term
    significance: float = 0.05  # of the paired loss test that must favour fine-tuning
    seed: int = 0
    target: Target = field(default_factory=detect)  # decides the weight grid and layout
    name: ClassVar[str] = "qat"

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise one_of("bits", [str(b) for b in BITS], self.bits)
        if not 0.0 <= self.distill <= 1.0:
            raise UsageError(f"`distill` must lie in [0, 1]; got {self.distill!r}")
        if not 0.0 < self.significance < 0.5:
            raise UsageError("`significance` must lie strictly between 0 and 0.5; got "
                             f"{self.significance!r}")

    def apply(self, model: nn.Module, ctx: TrainContext) -> nn.Module:
        """The fine-tuned model with BatchNorm folded (float module; export it with
        :func:`quantize_export` at the same ``bits`` and ``target``). Its weights sit on the
        target's ``bits`` grid when fine-tuning won on validation; otherwise it is the folded
        input model, whose export is the post-training-quantized model."""
        folded = fold_batchnorm(model)
        if not self.epochs:
            return folded
        sim = _wrap(copy.deepcopy(folded), self.target.weight_max(self.bits))
        _observe(sim, ctx.train)
        Distill(epochs=self.epochs, temperature=self.temperature, alpha=self.distill,
                lr=self.lr, seed=self.seed,
                description=f"quantization-aware training ({self.bits}-bit weights)").apply(
            sim, TrainContext(ctx.train, ctx.val, teacher=folded))
        tuned = _unwrap(sim).eval()
        calib = ctx.calib if ctx.calib is not None else ctx.train.take(slice(0, _CALIB))

        def score(m: nn.Module) -> ExportedScore:
            return exported_score(m, calib, ctx.val, bits=self.bits, target=self.target)

        return tuned if score(tuned).beats(score(folded), significance=self.significance) \
            else folded


@dataclass(frozen=True)
class ExportedScore:
    """How an exported integer model does on labelled data."""

    accuracy: float      # top-1, in [0, 1]
    losses: np.ndarray   # cross-entropy of each sample (nats)

    @property
    def loss(self) -> float:
        """Mean cross-entropy (nats)."""
        return float(self.losses.mean())

    def beats(self, other: ExportedScore, *, significance: float = 0.05) -> bool:
        """No lower accuracy, and a loss lower than ``other``'s on the same samples by more
        than chance: the mean per-sample improvement exceeds its standard error times the
        normal quantile of ``1 - significance`` (a one-sided paired z-test)."""
        if self.accuracy < other.accuracy or len(self.losses) < 2:
            return False
        gain = other.losses.astype(np.float64) - self.losses
        z = statistics.NormalDist().inv_cdf(1.0 - significance)
        return bool(gain.mean() > z * gain.std(ddof=1) / np.sqrt(len(gain)))


def exported_score(model: nn.Module, calib: Dataset, data: Dataset, *,
                   bits: int, target: Target | None = None) -> ExportedScore:
    """Accuracy and loss on ``data`` of ``model`` exported by :func:`quantize_export`
    (calibrated on ``calib``) and run by onnxruntime."""
    from edgeloop.measure import predict

    if data.labels is None:
        raise DataError("scoring an exported model needs `labels` in the data")
    proto, _ = quantize_export(model, calib, bits=bits, target=target)
    logits = torch.from_numpy(predict(session(proto), data))
    labels = torch.from_numpy(data.labels)
    return ExportedScore(float((logits.argmax(1) == labels).double().mean()),
                         nn.functional.cross_entropy(logits, labels, reduction="none").numpy())


def quantize_export(model: nn.Module, calib: Dataset, *, bits: int = 8,
                    target: Target | None = None) -> tuple[onnx.ModelProto, float]:
    """The QDQ ONNX model of ``model`` (BatchNorm folded, weights quantized per channel to
    ``bits`` on ``target``'s grid, activations of ``target``'s type with ranges observed on
    ``calib``), and the max abs difference between the float export and PyTorch.
    ``target`` defaults to this machine's profile."""
    from edgeloop.export import to_onnx

    if bits not in BITS:
        raise one_of("bits", [str(b) for b in BITS], bits)
    model = fold_batchnorm(model)
    with tempfile.TemporaryDirectory(prefix="edgeloop-") as tmp:
        path = Path(tmp) / "float.onnx"
        diff = to_onnx(model, sample_of(calib), path)
        graph = onnx.load(path)
    return _insert_qdq(graph, calib, target or detect(), bits), diff


def _activations(graph: onnx.GraphProto, inits: set[str]) -> list[str]:
    """Tensors that get a Q/DQ pair: inputs and outputs of compute ops and Adds (a ReLU
    right after is folded into the range), and both sides of reshapes between them."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    chosen: list[str] = []

    def add(t: str) -> None:
        if t and t not in inits and t not in chosen:
            chosen.append(t)

    for n in graph.node:
        if n.op_type in _COMPUTE:
            add(n.input[0])
        if n.op_type in (*_COMPUTE, "Add"):
            out = n.output[0]
            after = consumers.get(out, [])
            if len(after) == 1 and after[0].op_type == "Relu":
                out = after[0].output[0]
            add(out)
            if n.op_type == "Add":
                for i in n.input:
                    add(i)
    for n in graph.node:  # reshapes between quantized tensors keep the same range
        if n.op_type in _SHAPE_OPS and n.output[0] in chosen:
            add(n.input[0])
    return chosen


def _ranges(model: onnx.ModelProto, names: list[str],
            calib: Dataset) -> dict[str, tuple[float, float]]:
    probe = copy.deepcopy(model)
    existing = {o.name for o in probe.graph.output}
    for name in names:
        if name not in existing:
            probe.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    sess = session(probe)
    out_names = [o.name for o in sess.get_outputs()]
    lo = dict.fromkeys(names, np.inf)
    hi = dict.fromkeys(names, -np.inf)
    for feed in batches(calib, 256):
        values = dict(zip(out_names, sess.run(None, feed), strict=True))
        for name in names:
            lo[name] = min(lo[name], float(values[name].min()))
            hi[name] = max(hi[name], float(values[name].max()))
    return {n: (lo[n], hi[n]) for n in names}


def _insert_qdq(model: onnx.ModelProto, calib: Dataset, target: Target,
                bits: int) -> onnx.ModelProto:
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    acts = _activations(graph, set(inits))
    ranges = _ranges(model, acts, calib)
    outputs = {o.name for o in graph.output}
    new_inits: list[TensorProto] = []
    act_scale: dict[str, float] = {}
    nodes: list[onnx.NodeProto] = []
    renamed: dict[str, str] = {}
    for name in acts:
        scale, zp = _uint8_params(*ranges[name])
        act_scale[name] = scale
        src = f"{name}__float" if name in outputs else name
        dst = name if name in outputs else f"{name}__dq"
        if name in outputs:
            renamed[name] = src
        else:
            renamed[name] = dst
        zero = (np.array(zp - 128, np.int8) if target.activation_type == "int8"
                else np.array(zp, np.uint8))
        new_inits += [numpy_helper.from_array(np.array(scale, np.float32), f"{name}__scale"),
                      numpy_helper.from_array(zero, f"{name}__zp")]
        nodes += [helper.make_node("QuantizeLinear", [src, f"{name}__scale", f"{name}__zp"],
                                   [f"{name}__q"]),
                  helper.make_node("DequantizeLinear", [f"{name}__q", f"{name}__scale",
                                                        f"{name}__zp"], [dst])]
    rewired: list[onnx.NodeProto] = []
    for n in graph.node:
        for k, i in enumerate(n.input):
            if i in renamed and i not in outputs:
                n.input[k] = renamed[i]
        for k, o in enumerate(n.output):
            if o in outputs and o in renamed:
                n.output[k] = renamed[o]
        if n.op_type in _COMPUTE and len(n.input) > 1 and n.input[1] in inits:
            w_inits, w_nodes = _quantize_weights(n, inits, act_scale,
                                                 target.weight_max(bits))
            new_inits += w_inits
            nodes += w_nodes
        rewired.append(n)
    del graph.node[:]
    graph.node.extend(_toposort(rewired + nodes, [i.name for i in graph.input], set(inits)
                                | {t.name for t in new_inits}))
    used = {i for n in graph.node for i in n.input}
    kept = [t for t in list(graph.initializer) + new_inits if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    onnx.checker.check_model(model)
    return model


def _quantize_weights(node: onnx.NodeProto, inits: dict[str, TensorProto],
                      act_scale: dict[str, float],
                      q: int) -> tuple[list[TensorProto], list[onnx.NodeProto]]:
    x_name = node.input[0].removesuffix("__dq")
    if x_name not in act_scale:
        raise ModelError(f"{node.op_type} {node.name!r}: its input is not quantized")
    w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
    trans_b = any(a.name == "transB" and a.i == 1 for a in node.attribute)
    axis = 0 if node.op_type == "Conv" or (node.op_type == "Gemm" and trans_b) else 1
    moved = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
    scale = np.maximum(np.abs(moved).max(1) / q, 1e-12).astype(np.float32)
    shape = [1] * w.ndim
    shape[axis] = -1
    wq = np.clip(np.round(w / scale.reshape(shape)), -q, q).astype(np.int8)
    base = node.input[1]
    out = [numpy_helper.from_array(wq, f"{base}__int"),
           numpy_helper.from_array(scale, f"{base}__scale"),
           numpy_helper.from_array(np.zeros_like(wq, shape=scale.shape), f"{base}__zp")]
    dq = [helper.make_node("DequantizeLinear", [f"{base}__int", f"{base}__scale",
                                                f"{base}__zp"], [f"{base}__dq"], axis=axis)]
    node.input[1] = f"{base}__dq"
    if len(node.input) > 2 and node.input[2] in inits:
        b = numpy_helper.to_array(inits[node.input[2]]).astype(np.float32)
        bscale = (scale * act_scale[x_name]).astype(np.float32)
        bq = np.round(b / bscale).astype(np.int32)
        bname = node.input[2]
        out += [numpy_helper.from_array(bq, f"{bname}__int"),
                numpy_helper.from_array(bscale, f"{bname}__scale"),
                numpy_helper.from_array(np.zeros_like(bq), f"{bname}__zp")]
        dq.append(helper.make_node("DequantizeLinear", [f"{bname}__int", f"{bname}__scale",
                                                        f"{bname}__zp"], [f"{bname}__dq"], axis=0))
        node.input[2] = f"{bname}__dq"
    return out, dq


def _toposort(nodes: list[onnx.NodeProto], inputs: list[str],
              constants: set[str]) -> list[onnx.NodeProto]:
    ready = set(inputs) | constants | {""}
    order: list[onnx.NodeProto] = []
    pending = list(nodes)
    while pending:
        progress = [n for n in pending if all(i in ready for i in n.input)]
        if not progress:
            raise ModelError("could not order the quantized graph (a cycle or a missing input)")
        for n in progress:
            order.append(n)
            ready.update(n.output)
        pending = [n for n in pending if n not in progress]
    return order
