"""Quantization-aware training (QAT) on PyTorch's own flow, torchao PT2E, so the graph that
trains is the graph that ships, for any model ``torch.export`` captures.

1. ``torch.export.export`` (batch axis dynamic) captures the model as aten ops;
   :class:`~edgeloop.compress.qdq_quantizer.QDQQuantizer` annotates it with the Q/DQ
   placement onnxruntime's QDQ format fuses into integer kernels on the target profile
   (weights per channel, ``bits`` wide, 7-bit on ``reduce_range`` profiles; activations
   8-bit, uint8 or int8 as the profile says; int32 biases; residual adds, pools);
   ``prepare_qat_pt2e`` inserts fake-quantize modules there and rewrites Conv+BatchNorm so
   training sees the folded weights that will be quantized.
2. Fine-tuning runs on that graph (``edgeloop.zoo.train`` with the distillation loss of
   :mod:`edgeloop.compress.distill`: by default the quantized model learns to reproduce the
   float model it started from, not only the labels), BatchNorm and dropout switched
   between train and eval by torchao's ``move_exported_model_to_train``/``_eval``;
   activation ranges are moving averages of min/max, observed in training only.
   Sparsity from an earlier unstructured pruning pass (``TrainContext.masks``) is applied
   again after every optimizer step, mapped onto the graph's parameters.
3. ``convert_pt2e`` folds BatchNorm and turns every fake-quantize into
   quantize/dequantize ops (weights stored as integers); ``torch.onnx.export(...,
   dynamo=True)`` maps them through onnxscript's torchlib to ONNX QuantizeLinear /
   DequantizeLinear, which onnxruntime fuses into QLinearConv, QGemm, QLinearAdd. No
   Q/DQ is added or moved after training, and no range is recalibrated.

:func:`quantize_export` on a float module is the matching post-training baseline (PTQ): the
same quantizer through ``prepare_pt2e``, min/max calibration, ``convert_pt2e``. QAT keeps
the fine-tuned graph only if, exported and run by onnxruntime on validation data, it beats
PTQ by more than chance on both counts (one-sided tests at level ``significance``): the
samples it fixes outnumber those it breaks (McNemar's test) and the per-sample cross-
entropy falls (a paired z-test); otherwise it returns the PTQ model. Fine-tuning is skipped
when PTQ is already as accurate as the float model on validation: there is no quantization
loss to recover, and at 8 bits PTQ often loses nothing measurable, where fine-tuning only
moves the model by noise. Both tests matter on small validation sets: on scikit-learn's
digits (180 samples) fine-tuning that fixed two validation samples and broke none, with a
significant loss gain, lost a test sample to PTQ (benchmarks/bench_qat_real.py).

Why PT2E and not NNCF: both insert fake quantization into a captured graph and export QDQ
ONNX. NNCF (OpenVINO's toolkit) has onnxruntime-oriented presets and its own BN and bias
handling, but it is another large dependency whose PyTorch backend traces the model in its
own way and whose ONNX layout follows OpenVINO's conventions; PT2E is PyTorch's own flow
(``torch.export`` graph, quantizer API, ``convert_pt2e``, the dynamo ONNX exporter), and a
quantizer of ~150 lines expresses exactly onnxruntime's placement and each profile's grids.
NNCF was not installed or measured here.

4-bit weights are integers in [-7, 7] in int8 containers, so the same int8 kernels run them;
activations stay 8-bit.
"""

from __future__ import annotations

import copy
import statistics
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import onnx
import torch
from torch import nn
from torch.fx import GraphModule
from torch.nn import functional as F

if TYPE_CHECKING:
    from edgeloop.compress.qdq_quantizer import QDQQuantizer

from edgeloop._onnx import session
from edgeloop.compress.distill import Distill
from edgeloop.compress.trainbase import TorchPass, TrainContext, apply_masks, sample_of
from edgeloop.data import Dataset, batches
from edgeloop.errors import DataError, ModelError, UsageError, one_of
from edgeloop.targets import Target, detect
from edgeloop.zoo.train import accuracy

__all__ = ["BITS", "QAT", "ExportedScore", "QATModel", "exported_score", "prepare_ptq",
           "quantize_export"]

BITS = (8, 4)
_CALIB = 256  # training samples that calibrate PTQ when the context has no calib set


class QATModel(nn.Module):
    """What :meth:`QAT.apply` returns. ``float_model`` is the input architecture holding the
    fine-tuned float weights (calling this module runs it; parameters, FLOPs and sparsity
    are counted on it); ``prepared`` is the PT2E graph with its fake-quantize modules or
    observers, which :func:`quantize_export` converts as it is (not a submodule: the two
    share their weights)."""

    def __init__(self, float_model: nn.Module, prepared: GraphModule, *, bits: int,
                 target: Target) -> None:
        super().__init__()
        self.float_model = float_model
        self.__dict__["prepared"] = prepared
        self.bits = bits
        self.target = target
        self.exported: tuple[onnx.ModelProto, float] | None = None  # quantize_export's, kept

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.float_model(x)


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
        """A :class:`QATModel`: the fine-tuned graph (:meth:`fine_tune`) when it wins on
        validation, else the post-training-quantized one (``epochs=0``: always). Export it
        with :func:`quantize_export` at the same ``bits`` and ``target``."""
        calib = _calib(ctx)
        apply_masks(model, ctx.masks)
        ptq = prepare_ptq(copy.deepcopy(model), calib, bits=self.bits, target=self.target)
        if not self.epochs:
            return ptq

        def score(m: QATModel) -> ExportedScore:
            return exported_score(m, calib, ctx.val, bits=self.bits, target=self.target)

        base = score(ptq)
        if base.accuracy >= accuracy(model, ctx.val):
            return ptq          # PTQ lost nothing on validation: no loss to recover
        tuned = self.fine_tune(model, ctx)
        return tuned if score(tuned).beats(base, significance=self.significance) else ptq

    def fine_tune(self, model: nn.Module, ctx: TrainContext) -> QATModel:
        """The fine-tuned :class:`QATModel`, whatever its score (``model`` is trained in
        place: the graph shares its parameters)."""
        from torchao.quantization.pt2e import move_exported_model_to_eval

        from edgeloop.compress.qdq_quantizer import QDQQuantizer

        calib = _calib(ctx)
        apply_masks(model, ctx.masks)
        teacher = copy.deepcopy(model).eval()
        torch.manual_seed(self.seed)
        graph = _capture(model, sample_of(calib), train=True)
        prepared = _prepare(graph, QDQQuantizer(target=self.target, bits=self.bits, qat=True))
        masks = _graph_masks(model, prepared, ctx.masks)
        _switchable(prepared)
        prepared.train()                 # initial activation ranges, BatchNorm as in eval
        move_exported_model_to_eval(prepared)
        _observe(prepared, calib)
        Distill(epochs=self.epochs, temperature=self.temperature, alpha=self.distill,
                lr=self.lr, seed=self.seed,
                description=f"quantization-aware training ({self.bits}-bit weights)").apply(
            prepared, TrainContext(ctx.train, ctx.val, teacher=teacher, masks=masks))
        prepared.eval()
        return QATModel(model.eval(), prepared, bits=self.bits, target=self.target)


def _calib(ctx: TrainContext) -> Dataset:
    return ctx.calib if ctx.calib is not None else ctx.train.take(slice(0, _CALIB))


def _capture(model: nn.Module, sample: torch.Tensor, *, train: bool) -> GraphModule:
    """``model`` as a ``torch.export`` graph (aten ops, batch axis dynamic), in train or
    eval form. Convolutions without a bias get a zero one first (in place): BatchNorm folds
    into it and it is quantized to int32 like every bias, which onnxruntime needs to fuse
    the convolution into an integer kernel."""
    for m in model.modules():
        if isinstance(m, nn.modules.conv._ConvNd) and m.bias is None:
            m.bias = nn.Parameter(torch.zeros(m.out_channels, dtype=m.weight.dtype))
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None:
            with torch.no_grad():   # QAT divides by gamma: a gamma of exactly 0 gives NaN
                m.weight[m.weight == 0] = 1e-8
    model.train(train)
    # BatchNorm with momentum=None (a cumulative average) divides by num_batches_tracked in
    # train form, a data-dependent value torch.export cannot trace; the train-form graph
    # gets PyTorch's default exponential average instead (the module keeps its setting).
    cumulative = [m for m in model.modules()
                  if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.momentum is None]
    for m in cumulative:
        m.momentum = 0.1
    batch = torch.export.Dim("batch", min=1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.export.export(model, (sample,), dynamic_shapes=({0: batch},)).module()
    except Exception as e:
        raise ModelError(f"torch.export could not capture the model: "
                         f"{str(e).splitlines()[0][:300]}") from None
    finally:
        for m in cumulative:
            m.momentum = None


def _pattern_key(pattern: Callable[..., object], example_inputs: tuple[object, ...],
                 is_cuda: bool, kwargs: dict[str, object]) -> tuple[object, ...] | None:
    """What a torchao Conv+BN pattern graph depends on: its function's code, the flags and
    conv function its closure holds, and the shapes and dtypes of its example inputs (None
    when something there is not hashable: then it is not cached)."""
    def part(x: object) -> object:
        return (tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else x

    fn = getattr(pattern, "fn", pattern)   # torchao wraps each pattern in a WrapperModule
    try:
        key = (fn.__code__,
               tuple(c.cell_contents for c in fn.__closure__ or ()),  # type: ignore[attr-defined]
               tuple(part(x) for x in example_inputs), is_cuda,
               tuple(sorted((k, part(v)) for k, v in kwargs.items())))
        hash(key)
    except (AttributeError, TypeError, ValueError):
        return None
    return key


def _trace_patterns_once() -> None:
    """Make torchao trace each Conv+BN pattern graph once per process.

    ``prepare_qat_pt2e`` and ``convert_pt2e`` rebuild their Conv+BN patterns with
    ``torch.export`` on every call (about 100 exports for every conv kind and flag
    combination), which is nearly all of a small model's QAT export: 15 s of a 17 s
    ``convert_pt2e`` on the zoo's MNIST-1D CNN (x86-avx2). The graphs are only read
    (matched and copied from), so one traced graph serves every call; and the conv kinds
    a graph does not hold are not traced at all (:func:`_present_convs_only`)."""
    from torchao.quantization.pt2e import qat_utils

    trace = qat_utils._get_aten_graph_module_for_pattern
    if getattr(trace, "edgeloop_cache", None) is not None:
        return
    cache: dict[tuple[object, ...], GraphModule] = {}

    def traced(pattern: Callable[..., object], example_inputs: tuple[object, ...],
               is_cuda: bool = False, **kwargs: object) -> GraphModule:
        key = _pattern_key(pattern, example_inputs, is_cuda, kwargs)
        if key is None:
            return trace(pattern, example_inputs, is_cuda, **kwargs)
        if key not in cache:
            cache[key] = trace(pattern, example_inputs, is_cuda, **kwargs)
        return cache[key]

    traced.edgeloop_cache = cache  # type: ignore[attr-defined]
    qat_utils._get_aten_graph_module_for_pattern = traced
    for helper in ("_fuse_conv_bn_qat_helper", "_fold_conv_bn_qat_helper"):
        setattr(qat_utils, helper, _present_convs_only(getattr(qat_utils, helper)))


# the aten op each conv function torchao folds BatchNorm into becomes in an exported graph
_CONV_OPS = {F.conv1d: torch.ops.aten.conv1d, F.conv2d: torch.ops.aten.conv2d,
             F.conv_transpose1d: torch.ops.aten.conv_transpose1d,
             F.conv_transpose2d: torch.ops.aten.conv_transpose2d}


def _present_convs_only(helper: Callable[..., GraphModule]) -> Callable[..., GraphModule]:
    """torchao's per-conv-kind Conv+BN fuse or fold step, skipped for a conv kind the graph
    does not hold: it would trace that kind's ~15 patterns to match nothing (3 of the 4
    kinds on a 1-D or a 2-D CNN)."""
    def present_only(m: GraphModule, conv_fn: Callable[..., object],
                     example_inputs: tuple[object, ...], is_cuda: bool) -> GraphModule:
        op = _CONV_OPS.get(conv_fn)
        if op is not None and not any(
                getattr(n.target, "overloadpacket", None) is op for n in m.graph.nodes):
            return m
        return helper(m, conv_fn, example_inputs, is_cuda=is_cuda)

    return present_only


def _prepare(graph: GraphModule, quantizer: QDQQuantizer) -> GraphModule:
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e, prepare_qat_pt2e

    _trace_patterns_once()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return (prepare_qat_pt2e if quantizer.qat else prepare_pt2e)(graph, quantizer)


def prepare_ptq(model: nn.Module, calib: Dataset, *, bits: int = 8,
                target: Target | None = None) -> QATModel:
    """Post-training quantization of ``model`` (changed in place: convolutions gain zero
    biases) with the QAT quantizer: ``prepare_pt2e`` and min/max observers run on
    ``calib``. Its :func:`quantize_export` is the PTQ model."""
    from edgeloop.compress.qdq_quantizer import QDQQuantizer

    if bits not in BITS:
        raise one_of("bits", [str(b) for b in BITS], bits)
    target = target or detect()
    prepared = _prepare(_capture(model, sample_of(calib), train=False),
                        QDQQuantizer(target=target, bits=bits))
    _observe(prepared, calib)
    return QATModel(model.eval(), prepared, bits=bits, target=target)


@torch.no_grad()
def _observe(prepared: GraphModule, calib: Dataset) -> None:
    """Run ``calib`` through ``prepared`` in batches, so its observers see the ranges."""
    for feed in batches(calib, 256):
        prepared(torch.from_numpy(next(iter(feed.values()))))


def _switchable(prepared: GraphModule) -> None:
    """Let ``train()``/``eval()`` switch BatchNorm and dropout (torchao's helpers) and the
    activation range observers: on in training, off in evaluation (validation data sets
    no range). Weight observers stay on: a weight's scale follows its current values."""
    import types

    from torchao.quantization.pt2e import (
        FakeQuantizeBase,
        move_exported_model_to_eval,
        move_exported_model_to_train,
    )

    from edgeloop.compress.qdq_quantizer import is_weight_observer

    def train(self: GraphModule, mode: bool = True) -> GraphModule:
        (move_exported_model_to_train if mode else move_exported_model_to_eval)(self)
        for m in self.modules():
            if isinstance(m, FakeQuantizeBase) and not is_weight_observer(
                    m.activation_post_process):
                (m.enable_observer if mode else m.disable_observer)()
        return self

    prepared.train = types.MethodType(train, prepared)  # type: ignore[method-assign]
    prepared.eval = types.MethodType(lambda self: self.train(False), prepared)  # type: ignore[method-assign]


def _graph_masks(model: nn.Module, graph: GraphModule,
                 masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``masks`` (by ``model``'s parameter names) by the graph's parameter names: the graph
    holds the same parameter objects (``torch.export`` shares them), else the same names."""
    by_object = {id(p): name for name, p in graph.named_parameters()}
    names = {name for name, _ in graph.named_parameters()}
    out: dict[str, torch.Tensor] = {}
    for name, mask in masks.items():
        try:
            param = model.get_parameter(name)
        except AttributeError:
            raise ModelError(f"a sparsity mask names {name!r}, not a parameter of the model") \
                from None
        mapped = by_object.get(id(param), name if name in names else None)
        if mapped is None:
            raise ModelError(f"parameter {name!r} has no counterpart in the exported graph; "
                             "its sparsity mask cannot be kept")
        out[mapped] = mask
    return out


@dataclass(frozen=True)
class ExportedScore:
    """How an exported integer model does on labelled data."""

    correct: np.ndarray  # top-1 right or not, per sample (bool)
    losses: np.ndarray   # cross-entropy of each sample (nats)

    @property
    def accuracy(self) -> float:
        """Top-1 accuracy, in [0, 1]."""
        return float(self.correct.mean()) if len(self.correct) else 0.0

    @property
    def loss(self) -> float:
        """Mean cross-entropy (nats)."""
        return float(self.losses.mean())

    def beats(self, other: ExportedScore, *, significance: float = 0.05) -> bool:
        """More samples right and a lower loss than ``other`` on the same samples, both by
        more than chance (one-sided, at level ``significance``, ``z`` its normal
        quantile): the samples this one fixes minus those it breaks exceed ``z`` times
        the square root of their sum (McNemar's test, normal form), and the mean
        per-sample loss improvement exceeds ``z`` standard errors (a paired z-test)."""
        if len(self.losses) < 2:
            return False
        z = statistics.NormalDist().inv_cdf(1.0 - significance)
        fixes = int((self.correct & ~other.correct).sum())
        breaks = int((other.correct & ~self.correct).sum())
        if fixes - breaks <= z * np.sqrt(fixes + breaks):
            return False
        gain = other.losses.astype(np.float64) - self.losses
        return bool(gain.mean() > z * gain.std(ddof=1) / np.sqrt(len(gain)))


def exported_score(model: nn.Module, calib: Dataset, data: Dataset, *,
                   bits: int, target: Target | None = None) -> ExportedScore:
    """Accuracy and loss on ``data`` of ``model`` exported by :func:`quantize_export`
    (calibrated on ``calib`` unless it is a :class:`QATModel`) and run by onnxruntime."""
    from edgeloop.measure import predict

    if data.labels is None:
        raise DataError("scoring an exported model needs `labels` in the data")
    proto, _ = quantize_export(model, calib, bits=bits, target=target)
    logits = torch.from_numpy(predict(session(proto), data))
    labels = torch.from_numpy(data.labels)
    return ExportedScore((logits.argmax(1) == labels).numpy(),
                         nn.functional.cross_entropy(logits, labels, reduction="none").numpy())


def quantize_export(model: nn.Module, calib: Dataset, *, bits: int = 8,
                    target: Target | None = None) -> tuple[onnx.ModelProto, float]:
    """The QDQ ONNX model (free batch axis) of ``model`` and the max abs difference between
    onnxruntime's integer run of it and PyTorch's run of the converted graph on up to 32
    samples of ``calib``. A :class:`QATModel` is converted as trained (``bits`` and
    ``target`` must be its own); any other module is post-training quantized first
    (:func:`prepare_ptq` on a copy, calibrated on ``calib``). ``target`` defaults to this
    machine's profile."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    if bits not in BITS:
        raise one_of("bits", [str(b) for b in BITS], bits)
    if isinstance(model, QATModel):
        if bits != model.bits or (target is not None and target.name != model.target.name):
            raise UsageError(f"this QAT model was trained for {model.bits}-bit weights on "
                             f"{model.target.name}; got bits={bits}, target="
                             f"{target.name if target else None}")
        if model.exported is not None:   # converting and exporting costs seconds: once
            return copy.deepcopy(model.exported)   # is enough
        prepared = model.prepared
    else:
        prepared = prepare_ptq(copy.deepcopy(model), calib, bits=bits, target=target).prepared
    _trace_patterns_once()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = convert_pt2e(copy.deepcopy(prepared))
    probe = sample_of(calib, min(32, len(calib)))
    proto = _to_onnx(converted, sample_of(calib))
    with torch.no_grad():
        expected = converted(probe).numpy()
    got = session(proto).run(None, {proto.graph.input[0].name: probe.numpy()})[0]
    result = proto, float(np.abs(got - expected).max())
    if isinstance(model, QATModel):
        model.exported = copy.deepcopy(result)
    return result


def _to_onnx(converted: GraphModule, sample: torch.Tensor) -> onnx.ModelProto:
    """The dynamo ONNX exporter: onnxscript's torchlib turns PT2E's quantize/dequantize ops
    into QuantizeLinear/DequantizeLinear."""
    from edgeloop.export import onnx_program

    proto = onnx_program(converted, sample)
    onnx.checker.check_model(proto)
    return proto
