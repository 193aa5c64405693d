"""QAT and PTQ on torchao PT2E, exported as QDQ ONNX: the torch fake-quantized graph against
onnxruntime's integer kernels (the oracle: the two must compute the same thing), the graph
onnxruntime really runs, the profiles' grids, a dead channel, and sparsity kept."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from _tiers import tiered
from onnx import TensorProto, numpy_helper
from torch import nn
from torch.nn import functional as F

from edgeloop._onnx import session
from edgeloop._torchvision import import_torchvision
from edgeloop.compress.qat import QAT, QATModel, prepare_ptq, quantize_export
from edgeloop.compress.trainbase import TrainContext
from edgeloop.data import Dataset, load_builtin
from edgeloop.errors import UsageError
from edgeloop.measure import graph_summary, predict
from edgeloop.targets import TARGETS, detect
from edgeloop.zoo import load_checkpoint

TRAIN = load_builtin("mnist1d", "train").take(slice(0, 1000))
VAL = load_builtin("mnist1d", "val").take(slice(0, 200))
CALIB = TRAIN.take(slice(0, 256))
RGB = load_builtin("digits-rgb", "train").take(slice(0, 256))
RGB_VAL = load_builtin("digits-rgb", "val")
VNNI, AVX2 = TARGETS["x86-avx512-vnni"], TARGETS["x86-avx2"]
# Models that onnxruntime runs here are laid out for this CPU: a VNNI layout's full-range
# U8S8 products saturate on AVX2 (tests/test_saturation.py), which is not under test there.
HERE = detect()


@pytest.fixture(scope="module")
def cnn(cnn_dir: Path) -> nn.Module:
    return load_checkpoint(cnn_dir / "model.pt")[0]


def _vision(name: str) -> nn.Module:
    """An untrained torchvision model whose BatchNorm statistics are those of the data, so
    its activations and logits have realistic ranges."""
    torch.manual_seed(0)
    model = getattr(import_torchvision().models, name)(num_classes=10)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = None   # a cumulative average over the batches below
    model.train()
    with torch.no_grad():
        for start in range(0, len(RGB), 64):
            model(torch.from_numpy(RGB.inputs["x"][start:start + 64]))
    return model.eval()


def _output_step(proto: onnx.ModelProto) -> float:
    """The quantization step of the model's output (the scale of its last DequantizeLinear)."""
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    out = proto.graph.output[0].name
    node = next(n for n in proto.graph.node if out in n.output)
    assert node.op_type == "DequantizeLinear"
    return float(inits[node.input[1]])


def _check_agreement(torch_logits: np.ndarray, proto: onnx.ModelProto, data: Dataset, *,
                     trained: bool = True, mean_steps: float = 1.0,
                     min_agree: float = 0.95) -> None:
    """Logits within two output steps, the same top-1. An untrained deep network (the
    torchvision models here) amplifies the odd rounding tie that float accumulation order
    flips (onnxruntime's unfused QDQ reference differs from torch the same way): there the
    mean difference is within ``mean_steps`` steps and ``min_agree`` of the top-1 agree
    (its logits are close to ties: a flip moves the argmax)."""
    ort_logits = predict(session(proto), data)
    diff = np.abs(ort_logits - torch_logits)
    agree = (ort_logits.argmax(1) == torch_logits.argmax(1)).mean()
    if trained:
        assert diff.max() <= 2 * _output_step(proto) and agree >= 0.99
    else:
        assert diff.mean() <= mean_steps * _output_step(proto) and agree >= min_agree


def _converted_logits(q: QATModel, data: Dataset) -> np.ndarray:
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    converted = convert_pt2e(copy.deepcopy(q.prepared))
    with torch.no_grad():
        return converted(torch.from_numpy(data.inputs["x"])).numpy()


@pytest.mark.parametrize("arch", tiered(["mnist1d-cnn", "mobilenet_v2", "resnet18"],
                                        {"mobilenet_v2"}))
def test_ptq_torch_graph_and_onnxruntime_integer_model_agree(cnn, arch: str) -> None:
    model, calib, val = ((cnn, CALIB, VAL) if arch == "mnist1d-cnn"
                         else (_vision(arch), RGB, RGB_VAL))
    q = prepare_ptq(copy.deepcopy(model), calib, target=HERE)
    proto, _ = quantize_export(q, calib, target=HERE)
    # An untrained mobilenet_v2 is chaotic (depthwise 3x3 filters, BatchNorm rescaling):
    # measured on digits-rgb, a mean gap of 4.8 output steps (logits spread over 34) and
    # 0.83 top-1 agreement, where the same check on resnet18 gives 100%.
    bounds = {"mobilenet_v2": {"mean_steps": 6.0, "min_agree": 0.75}}.get(arch, {})
    _check_agreement(_converted_logits(q, val), proto, val, trained=arch == "mnist1d-cnn",
                     **bounds)
    one = predict(session(proto), val.take(slice(0, 1)))    # the batch axis is free
    np.testing.assert_allclose(one, predict(session(proto), val.take(slice(0, 3)))[:1])
    float_ops, int_ops, _ = graph_summary(proto)
    convs = sum(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())
    assert float_ops == {}
    assert int_ops.get("QLinearConv") == convs and int_ops.get("QGemm") == 1
    if arch != "mnist1d-cnn":
        assert int_ops.get("QLinearAdd", 0) == {"mobilenet_v2": 10, "resnet18": 8}[arch]
    if arch == "mnist1d-cnn":
        with torch.no_grad():
            ref = model(torch.from_numpy(val.inputs["x"])).numpy()
        assert (predict(session(proto), val).argmax(1) == ref.argmax(1)).mean() >= 0.95


def _int8_weights(proto: onnx.ModelProto) -> list[np.ndarray]:
    return [numpy_helper.to_array(t) for t in proto.graph.initializer
            if t.data_type == TensorProto.INT8 and len(t.dims) >= 2]


def _activation_types(proto: onnx.ModelProto) -> set[int]:
    inits = {t.name: t for t in proto.graph.initializer}
    return {inits[n.input[2]].data_type for n in proto.graph.node
            if n.op_type == "QuantizeLinear"}


@pytest.mark.parametrize(("target", "bits", "top", "act"), [
    ("x86-avx2", 8, 64, TensorProto.UINT8), ("x86-avx512-vnni", 8, 127, TensorProto.UINT8),
    ("arm64-dotprod", 8, 127, TensorProto.INT8), ("x86-avx2", 4, 7, TensorProto.UINT8)])
def test_the_profile_decides_the_grids(cnn, target: str, bits: int, top: int, act: int) -> None:
    """On any CPU: x86-avx2 gets 7-bit weights (|q| <= 64, onnxruntime's AVX2 kernels do
    not saturate), VNNI full range, arm64 int8 activations, 4 bits [-7, 7]."""
    proto, _ = quantize_export(cnn, CALIB, bits=bits, target=TARGETS[target])
    weights = _int8_weights(proto)
    assert len(weights) == 5 and max(int(np.abs(w).max()) for w in weights) == top
    assert _activation_types(proto) == {act}


def _dead_channel_cnn() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Unflatten(1, (1, 40)), nn.Conv1d(1, 8, 5, bias=False),
                          nn.BatchNorm1d(8), nn.ReLU(), nn.Conv1d(8, 8, 5),
                          nn.BatchNorm1d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 32, 10))
    model.train()
    with torch.no_grad():
        model(torch.from_numpy(TRAIN.inputs["x"]))
        for bn in (model[2], model[5]):
            bn.weight[0] = 0.0   # a dead channel: BatchNorm gamma 0 leaves only its bias
            bn.bias[0] = 3.0
    return model.eval()


def _int32_biases(proto: onnx.ModelProto) -> list[np.ndarray]:
    dequantized = {n.input[0] for n in proto.graph.node if n.op_type == "DequantizeLinear"}
    return [numpy_helper.to_array(t) for t in proto.graph.initializer
            if t.data_type == TensorProto.INT32 and t.name in dequantized]


def test_a_dead_channel_keeps_its_bias_in_int32_range() -> None:
    """Folded, the dead channel's weights are all 0 and its bias 3: with its own weight
    scale (~1e-7 and below) the int32 bias overflows; the floored scale keeps it exact and
    the integer model agrees with the torch graph."""
    model = _dead_channel_cnn()
    q = prepare_ptq(copy.deepcopy(model), CALIB, target=HERE)
    proto, _ = quantize_export(q, CALIB, target=HERE)
    biases = _int32_biases(proto)
    assert len(biases) == 3 and all(np.abs(b.astype(np.int64)).max() < 2 ** 30 for b in biases)
    _check_agreement(_converted_logits(q, VAL), proto, VAL)
    with torch.no_grad():
        ref = model(torch.from_numpy(VAL.inputs["x"])).numpy()
    assert np.abs(predict(session(proto), VAL) - ref).max() <= 4 * _output_step(proto)


def _masks(model: nn.Module, density: float) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {name: (torch.rand(p.shape, generator=gen) < density).float()
            for name, p in model.named_parameters()
            if name.endswith("weight") and p.dim() >= 2}


@pytest.fixture(scope="module")
def qat_run() -> tuple[QATModel, onnx.ModelProto, dict[str, torch.Tensor]]:
    """One epoch of QAT on the dead-channel model with 80% of its weights masked to zero."""
    model = _dead_channel_cnn()
    masks = _masks(model, 0.2)
    ctx = TrainContext(TRAIN, VAL, calib=CALIB, masks=masks)
    q = QAT(bits=8, epochs=1, lr=3e-3, target=AVX2).fine_tune(model, ctx)
    return q, quantize_export(q, CALIB, bits=8, target=AVX2)[0], masks


def test_torchao_conv_bn_patterns_are_traced_once_per_process(qat_run) -> None:
    """convert_pt2e's Conv+BN pattern exports are made once (the fixture's export made
    them), for the conv kinds a graph holds only (no model here has a transposed 1-D
    conv); converting the trained graph again reuses them and gives the same integer
    model."""
    from torchao.quantization.pt2e import qat_utils

    q, exported, _ = qat_run
    cache = qat_utils._get_aten_graph_module_for_pattern.edgeloop_cache
    flags = {key[1] for key in cache}
    assert len(cache) >= 24 and len(flags) >= 12    # every flag combination, apart
    assert not any(F.conv_transpose1d in key[1] for key in cache)
    size = len(cache)
    fresh = copy.deepcopy(q)
    fresh.exported = None
    again, _ = quantize_export(fresh, CALIB, bits=8, target=AVX2)
    assert len(cache) == size
    assert [(t.name, t.SerializeToString()) for t in again.graph.initializer] == \
        [(t.name, t.SerializeToString()) for t in exported.graph.initializer]


def test_qat_fake_quantized_graph_and_integer_model_agree(qat_run) -> None:
    """The graph QAT trained (fake quantization, eval mode) is the model onnxruntime runs:
    the same logits within two output steps, the same top-1."""
    q, proto, _ = qat_run
    with torch.no_grad():
        fake_quant = q.prepared(torch.from_numpy(VAL.inputs["x"])).numpy()
    _check_agreement(fake_quant, proto, VAL)
    float_ops, int_ops, _ = graph_summary(proto)
    assert float_ops == {} and int_ops == {"QLinearConv": 2, "QGemm": 1}
    assert max(int(np.abs(w).max()) for w in _int8_weights(proto)) <= 64
    assert all(np.abs(b.astype(np.int64)).max() < 2 ** 30 for b in _int32_biases(proto))


def test_qat_keeps_the_zeros_of_sparse_weights(qat_run) -> None:
    q, proto, masks = qat_run
    for name, mask in masks.items():
        w = q.float_model.get_parameter(name)
        assert torch.all(w[mask == 0] == 0), name
    weights = _int8_weights(proto)
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.size for w in weights)
    assert zeros >= 0.8


def test_untuned_qat_exports_exactly_the_ptq_model(cnn) -> None:
    ptq, _ = quantize_export(cnn, CALIB, bits=8, target=HERE)
    same = QAT(bits=8, epochs=0, target=HERE).apply(copy.deepcopy(cnn),
                                                   TrainContext(TRAIN, VAL, calib=CALIB))
    exported, _ = quantize_export(same, CALIB, bits=8, target=HERE)
    assert {t.name: t.SerializeToString() for t in exported.graph.initializer} == \
        {t.name: t.SerializeToString() for t in ptq.graph.initializer}


def test_no_fine_tuning_when_ptq_loses_nothing_on_validation(cnn, monkeypatch) -> None:
    """8-bit PTQ of the trained CNN is as accurate as the float model on validation (checked
    here): QAT returns the PTQ model without training; with a float accuracy PTQ does not
    reach, it fine-tunes."""
    from edgeloop.compress import qat as qat_module
    from edgeloop.compress.qat import exported_score
    from edgeloop.zoo.train import accuracy

    ctx = TrainContext(TRAIN, VAL, calib=CALIB)
    ptq = exported_score(cnn, CALIB, VAL, bits=8, target=HERE).accuracy
    assert ptq >= accuracy(cnn, VAL)
    tuned: list[int] = []
    monkeypatch.setattr(QAT, "fine_tune", lambda self, m, c: tuned.append(1) or
                        prepare_ptq(copy.deepcopy(m), CALIB, bits=8, target=HERE))
    QAT(bits=8, epochs=3, target=HERE).apply(copy.deepcopy(cnn), ctx)
    assert tuned == []
    monkeypatch.setattr(qat_module, "accuracy", lambda m, d: 1.0)
    QAT(bits=8, epochs=3, target=HERE).apply(copy.deepcopy(cnn), ctx)
    assert tuned == [1]


def test_a_qat_model_exports_only_at_its_own_grid(cnn) -> None:
    q = prepare_ptq(copy.deepcopy(cnn), CALIB, bits=8, target=VNNI)
    with pytest.raises(UsageError, match="trained for 8-bit weights on x86-avx512-vnni"):
        quantize_export(q, CALIB, bits=4, target=VNNI)
    with pytest.raises(UsageError, match="got bits=8, target=x86-avx2"):
        quantize_export(q, CALIB, bits=8, target=AVX2)


def test_bits_must_be_8_or_4(cnn) -> None:
    with pytest.raises(UsageError, match="`bits` must be one of 8, 4; got 3"):
        QAT(bits=3)
    with pytest.raises(UsageError, match="`bits` must be one of 8, 4; got 3"):
        quantize_export(cnn, CALIB, bits=3)


def test_distillation_weight_must_lie_in_0_1() -> None:
    with pytest.raises(UsageError, match=r"`distill` must lie in \[0, 1\]; got 1.5"):
        QAT(distill=1.5)


def test_fine_tuning_must_beat_chance_on_accuracy_and_on_loss() -> None:
    """Both conditions one-sided at 5%: fixes - breaks > 1.645 sqrt(fixes + breaks) (two
    fixes and no break, what digits' 180 validation samples showed, is not enough; six
    are), and a mean loss gain beyond 1.645 standard errors."""
    from edgeloop.compress.qat import ExportedScore

    right = np.arange(100) < 90

    def fixing(n: int, breaking: int = 0) -> np.ndarray:
        c = right.copy()
        c[90:90 + n] = True
        c[:breaking] = False
        return c

    base = ExportedScore(right, np.full(100, 0.5))
    rng = np.random.default_rng(0)
    noise = rng.normal(0.0, 0.2, 100)
    clear_loss = np.full(100, 0.4) + rng.normal(0.0, 0.01, 100)
    noisy = ExportedScore(fixing(6), 0.5 - 0.01 + noise - noise.mean())   # gain 0.01 +- 0.02
    clear = ExportedScore(fixing(6), clear_loss)
    two_fixes = ExportedScore(fixing(2), clear_loss)
    mixed = ExportedScore(fixing(6, breaking=3), clear_loss)
    tie = ExportedScore(right, clear_loss)   # a clear loss gain at equal accuracy
    assert noisy.loss < base.loss and not noisy.beats(base)
    assert clear.beats(base) and clear.accuracy == pytest.approx(0.96)
    assert not two_fixes.beats(base)
    assert not mixed.beats(base)
    assert not tie.beats(base)
    assert not base.beats(base)


def test_qat_fine_tunes_a_model_whose_batchnorm_keeps_a_cumulative_average() -> None:
    """BatchNorm(momentum=None) (PyTorch's cumulative moving average, what re-estimating
    statistics over a data set leaves behind) used to stop torch.export in train form."""
    model = _dead_channel_cnn()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = None
    ctx = TrainContext(TRAIN.take(slice(0, 64)), VAL, calib=CALIB)
    q = QAT(bits=8, epochs=1, target=HERE).fine_tune(model, ctx)
    proto, _ = quantize_export(q, CALIB, bits=8, target=HERE)
    with torch.no_grad():
        fake_quant = q.prepared(torch.from_numpy(VAL.inputs["x"])).numpy()
    _check_agreement(fake_quant, proto, VAL)
    assert all(m.momentum is None for m in model.modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm))
