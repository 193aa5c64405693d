"""A torchao PT2E quantizer that puts Q/DQ where onnxruntime's QDQ format fuses them into
integer kernels, on the grid of an edgeloop target profile.

Annotated patterns (aten ops of a ``torch.export`` graph) and what onnxruntime makes of
them once exported:

- ``conv [-> batch_norm] [-> relu | relu6]`` and ``linear [-> relu]``: input and output
  activations, weights per output channel, bias int32 at ``input scale x weight scale``
  -> QLinearConv / QGemm (onnxruntime drops a ReLU or a [0, 6] clip before a Q whose
  range it covers). BatchNorm is folded by PT2E (in ``convert_pt2e``; during QAT its
  statistics are folded into the fake-quantized weights).
- ``add [-> relu]`` of two activations (residual connections): both inputs and the
  output -> QLinearAdd.
- ``adaptive_avg_pool2d`` / ``mean``: input and output. The exporter writes ReduceMean,
  which onnxruntime has no integer kernel for: it runs in float between a DQ and a Q (one
  small tensor per sample; the Q/DQ keep torch's rounding there).
- ``max_pool``, ``flatten``, ``reshape``/``view``, ``dropout``, ``cat``: the output shares
  the first input's quantization (onnxruntime runs them on the integer tensor).

Grids. Weights: int8, symmetric per output channel, integers in ``[-w, w]`` with
``w = target.weight_max(bits)`` (127; 64 on ``reduce_range`` profiles; 7 at 4 bits, in int8
containers). A channel's scale is floored at :data:`SCALE_FLOOR` times the layer's largest
one: a dead channel (weights ~0, e.g. BatchNorm gamma ~0 folded in) would otherwise get a
scale so small that its bias, stored as int32 at ``input scale x weight scale``, overflows
(its weights still quantize to 0). With the floor a bias overflows only beyond 2^23 times
its input scale times the layer's largest weight scale (about 8000 for scales of 0.05 and
0.02). Activations: 8-bit per tensor, asymmetric, uint8 or
int8 as the profile says (``Target.activation_type``); PTQ observes min/max over the
calibration data, QAT a moving average of them while training.

Why a small subclass of torchao's ``Quantizer`` and not ``X86InductorQuantizer``: that one
targets Inductor's fusions, not onnxruntime's. Its ``reduce_range`` narrows the
*activations* to 7 bits while keeping weights in [-128, 127] (the opposite of what
onnxruntime's AVX2 kernels need, see :mod:`edgeloop.targets`), it has neither int8
activations nor 4-bit weights, and it leaves biases float, which keeps onnxruntime from
fusing a Conv (its QDQ Conv selector wants every input from a DequantizeLinear, the bias
as int32). Here every choice is the profile's, in one place.
"""

from __future__ import annotations

import logging
import operator

import torch
from torch.fx import GraphModule, Node

# importing torchao logs warnings about CUDA kernels a CPU build cannot load and about
# pytree registrations: not the user's concern
_LOGGERS = {name: logging.getLogger(name).level for name in ("torchao", "torch.utils._pytree")}
for _name in _LOGGERS:
    logging.getLogger(_name).setLevel(logging.ERROR)
from torchao.quantization.pt2e import (  # noqa: E402
    FakeQuantize,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
)
from torchao.quantization.pt2e.quantizer import (  # noqa: E402
    DerivedQuantizationSpec,
    QuantizationAnnotation,
    QuantizationSpec,
    Quantizer,
    SharedQuantizationSpec,
)

from edgeloop.targets import Target  # noqa: E402

for _name, _level in _LOGGERS.items():
    logging.getLogger(_name).setLevel(_level)

__all__ = ["SCALE_FLOOR", "QDQQuantizer", "is_weight_observer"]

# Smallest weight scale of a channel, relative to its layer's largest (2^-8): a channel
# 256 times smaller than the largest still gets all its levels at 8 bits only below that.
SCALE_FLOOR = 2.0 ** -8
_INT32 = (-(2 ** 31), 2 ** 31 - 1)

_aten = torch.ops.aten
_CONV = {_aten.conv1d.default, _aten.conv2d.default, _aten.conv1d.padding,
         _aten.conv2d.padding}
_LINEAR = {_aten.linear.default}
_BN = {_aten.batch_norm.default, _aten._native_batch_norm_legit_no_training.default,
       _aten._native_batch_norm_legit.default, _aten.cudnn_batch_norm.default}
_RELU = {_aten.relu.default, _aten.relu_.default}
_HARDTANH = {_aten.hardtanh.default, _aten.hardtanh_.default}
_ADD = {_aten.add.Tensor, _aten.add_.Tensor}
_AVG = {_aten.adaptive_avg_pool2d.default, _aten.adaptive_avg_pool1d.default,
        _aten.mean.dim, _aten.avg_pool2d.default, _aten.avg_pool1d.default}
_SHARED = {_aten.max_pool2d.default, _aten.max_pool1d.default, _aten.flatten.using_ints,
           _aten.reshape.default, _aten.view.default, _aten.dropout.default,
           _aten.squeeze.dim, _aten.unsqueeze.default}
_CAT = {_aten.cat.default, _aten.concat.default}


class _FlooredWeightObserver(MovingAveragePerChannelMinMaxObserver):
    """Per-channel symmetric min/max of the current weights (averaging constant 1), each
    channel's scale at least :data:`SCALE_FLOOR` times the layer's largest."""

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        scale, zero_point = super().calculate_qparams()
        return scale.clamp_min(scale.max() * SCALE_FLOOR), zero_point


def is_weight_observer(observer: torch.nn.Module) -> bool:
    """Whether ``observer`` is the one :class:`QDQQuantizer` puts on weights."""
    return isinstance(observer, _FlooredWeightObserver)


def _bias_qparams(observers: list[torch.nn.Module]) -> tuple[torch.Tensor, torch.Tensor]:
    act, weight = observers
    act_scale, _ = act.calculate_qparams()
    weight_scale, _ = weight.calculate_qparams()
    scale = (act_scale * weight_scale).to(torch.float32)
    return scale, torch.zeros_like(scale, dtype=torch.int32)


def _is_tensor(n: object) -> bool:
    val = n.meta.get("val") if isinstance(n, Node) else None
    return isinstance(val, torch.Tensor) and val.is_floating_point()


def _only_user(n: Node, ops: set[object]) -> Node | None:
    users = [u for u in n.users if u.op == "call_function"
             and u.target is not operator.getitem]
    if len(n.users) == 1 and len(users) == 1 and users[0].target in ops:
        return users[0]
    if n.target in _BN and len(n.users) == 1:   # BN returning a tuple: go through getitem
        (item,) = n.users
        if item.target is operator.getitem:
            return _only_user(item, ops)
    return None


class QDQQuantizer(Quantizer):
    """Annotates a ``torch.export`` graph for onnxruntime's QDQ integer kernels on ``target``
    with ``bits``-wide weights; ``qat`` picks fake-quantize modules over observers."""

    def __init__(self, *, target: Target, bits: int = 8, qat: bool = False) -> None:
        super().__init__()
        self.target = target
        self.bits = bits
        self.qat = qat

    def _act(self) -> QuantizationSpec:
        signed = self.target.activation_type == "int8"
        observer = (FakeQuantize.with_args(observer=MovingAverageMinMaxObserver)
                    if self.qat else MinMaxObserver)
        return QuantizationSpec(
            dtype=torch.int8 if signed else torch.uint8,
            quant_min=-128 if signed else 0, quant_max=127 if signed else 255,
            qscheme=torch.per_tensor_affine, observer_or_fake_quant_ctr=observer)

    def _weight(self) -> QuantizationSpec:
        top = self.target.weight_max(self.bits)
        observer = _FlooredWeightObserver.with_args(averaging_constant=1.0)
        if self.qat:
            observer = FakeQuantize.with_args(observer=_FlooredWeightObserver,
                                              averaging_constant=1.0)
        return QuantizationSpec(dtype=torch.int8, quant_min=-top, quant_max=top,
                                qscheme=torch.per_channel_symmetric, ch_axis=0,
                                observer_or_fake_quant_ctr=observer)

    def annotate(self, model: GraphModule) -> GraphModule:
        act, weight = self._act(), self._weight()
        done: set[Node] = set()

        def mark(anchor: Node, inputs: dict[Node, object], last: Node,
                 chain: list[Node]) -> None:
            if anchor is last:
                anchor.meta["quantization_annotation"] = QuantizationAnnotation(
                    input_qspec_map=inputs, output_qspec=act, _annotated=True)
            else:
                anchor.meta["quantization_annotation"] = QuantizationAnnotation(
                    input_qspec_map=inputs, _annotated=True)
                last.meta["quantization_annotation"] = QuantizationAnnotation(
                    output_qspec=act, _annotated=True)
            for n in chain:
                n.meta.setdefault("quantization_annotation",
                                  QuantizationAnnotation(_annotated=True))
            done.update(chain)

        def tail(n: Node, fused: set[object]) -> list[Node]:
            """``n`` and the ops onnxruntime fuses after it (BN, then ReLU / ReLU6)."""
            chain = [n]
            nxt = _only_user(n, fused & _BN)
            if nxt is not None:
                chain.append(nxt)
                n = nxt
            nxt = _only_user(n, fused & (_RELU | _HARDTANH))
            if nxt is not None and (nxt.target in _RELU or _is_relu6(nxt)):
                # BN may return a tuple: the chain goes through the getitem
                chain += [u for u in n.users if u.target is operator.getitem]
                chain.append(nxt)
            return chain

        for n in model.graph.nodes:
            if n.op != "call_function" or n in done:
                continue
            if n.target in _CONV | _LINEAR:
                x, w = n.args[0], n.args[1]
                b = n.args[2] if len(n.args) > 2 else None
                if not (_is_tensor(x) and isinstance(w, Node)):
                    continue
                inputs: dict[Node, object] = {x: act, w: weight}
                if isinstance(b, Node):
                    inputs[b] = DerivedQuantizationSpec(
                        derived_from=[(x, n), (w, n)], derive_qparams_fn=_bias_qparams,
                        dtype=torch.int32, quant_min=_INT32[0], quant_max=_INT32[1],
                        qscheme=torch.per_channel_symmetric, ch_axis=0)
                chain = tail(n, _BN | _RELU | _HARDTANH)
                mark(n, inputs, chain[-1], chain)
            elif n.target in _ADD and len(n.args) >= 2 and all(_is_tensor(a) for a in n.args[:2]) \
                    and n.args[0].meta["val"].shape == n.args[1].meta["val"].shape:
                chain = tail(n, _RELU)
                mark(n, {n.args[0]: act, n.args[1]: act}, chain[-1], chain)
            elif n.target in _AVG and _is_tensor(n.args[0]):
                mark(n, {n.args[0]: act}, n, [n])
            elif n.target in _SHARED and _is_tensor(n.args[0]):
                x = n.args[0]
                n.meta["quantization_annotation"] = QuantizationAnnotation(
                    input_qspec_map={x: act}, output_qspec=SharedQuantizationSpec((x, n)),
                    _annotated=True)
                done.add(n)
            elif n.target in _CAT and all(_is_tensor(a) for a in n.args[0]):
                first = n.args[0][0]
                shared = SharedQuantizationSpec((first, n))
                n.meta["quantization_annotation"] = QuantizationAnnotation(
                    input_qspec_map={a: act if a is first else shared for a in n.args[0]},
                    output_qspec=shared, _annotated=True)
                done.add(n)
        return model

    def validate(self, model: GraphModule) -> None:
        """Nothing to check beyond what :meth:`annotate` only does on supported patterns."""


def _is_relu6(n: Node) -> bool:
    lo = n.args[1] if len(n.args) > 1 else n.kwargs.get("min_val", -1.0)
    hi = n.args[2] if len(n.args) > 2 else n.kwargs.get("max_val", 1.0)
    return lo == 0.0 and hi == 6.0
