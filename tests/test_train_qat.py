"""QAT and its QDQ export: BatchNorm folding against the unfolded model, the integer graph
onnxruntime really runs, and the weight grid."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from edgeloop._onnx import session
from edgeloop.compress.qat import QAT, exported_score, fold_batchnorm, quantize_export
from edgeloop.compress.trainbase import TrainContext
from edgeloop.data import load_builtin
from edgeloop.errors import UsageError
from edgeloop.measure import graph_summary, predict
from edgeloop.zoo import TrainConfig, build, train

TRAIN = load_builtin("mnist1d", "train").take(slice(0, 1000))
VAL = load_builtin("mnist1d", "val").take(slice(0, 200))


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    return {arch: train(build(arch, width=w), TRAIN, VAL, TrainConfig(epochs=5))
            for arch, w in (("mnist1d-cnn", 8), ("mnist1d-mobile", 0.5))}


def _acc(proto: onnx.ModelProto) -> float:
    return float((predict(session(proto), VAL).argmax(1) == VAL.labels).mean())


@pytest.mark.parametrize("arch", ["mnist1d-cnn", "mnist1d-mobile"])
def test_folding_batchnorm_keeps_the_function(models, arch: str) -> None:
    model = models[arch]
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                   for m in folded.modules())
    x = torch.from_numpy(VAL.inputs["x"])
    with torch.no_grad():
        np.testing.assert_allclose(folded(x).numpy(), model(x).numpy(), atol=1e-4)


@pytest.mark.parametrize("arch", ["mnist1d-cnn", "mnist1d-mobile"])
@pytest.mark.parametrize("bits", [8, 4])
def test_export_runs_on_integer_kernels_only(models, arch: str, bits: int) -> None:
    proto, diff = quantize_export(models[arch], TRAIN.take(slice(0, 256)), bits=bits)
    onnx.checker.check_model(proto)
    assert diff <= 1e-4
    float_ops, int_ops, _ = graph_summary(proto)
    assert float_ops == {}
    assert int_ops.get("QLinearConv", 0) >= 4 and int_ops.get("QGemm", 0) == 1
    if arch == "mnist1d-mobile":
        assert int_ops.get("QLinearAdd", 0) >= 1  # residual adds stay integer
    weights = [numpy_helper.to_array(t) for t in proto.graph.initializer
               if t.name.endswith("weight__int")]
    assert weights and all(w.dtype == np.int8 and np.abs(w).max() <= 2 ** (bits - 1) - 1
                           for w in weights)


def test_int8_export_is_close_to_float(models) -> None:
    proto, _ = quantize_export(models["mnist1d-cnn"], TRAIN.take(slice(0, 256)), bits=8)
    x = torch.from_numpy(VAL.inputs["x"])
    with torch.no_grad():
        ref = models["mnist1d-cnn"](x).numpy()
    agree = (predict(session(proto), VAL).argmax(1) == ref.argmax(1)).mean()
    assert agree >= 0.95


def test_qat_weights_sit_on_the_export_grid_and_beat_4bit_ptq(models) -> None:
    model = models["mnist1d-cnn"]
    calib = TRAIN.take(slice(0, 256))
    ptq, _ = quantize_export(model, calib, bits=4)
    import copy

    trained = QAT(bits=4, epochs=3, lr=3e-3).apply(copy.deepcopy(model), TrainContext(TRAIN, VAL))
    w = trained.features[1][0].weight.detach()
    scale = w.flatten(1).abs().amax(1, keepdim=True).unsqueeze(-1) / 7
    np.testing.assert_allclose((w / scale).numpy(), np.round((w / scale).numpy()), atol=1e-3)
    qat, _ = quantize_export(trained, calib, bits=4)
    assert _acc(qat) >= _acc(ptq)


def _initializers(proto: onnx.ModelProto) -> dict[str, bytes]:
    return {t.name: t.SerializeToString() for t in proto.graph.initializer}


def test_untuned_qat_exports_exactly_the_ptq_model(models) -> None:
    model, calib = models["mnist1d-mobile"], TRAIN.take(slice(0, 256))
    ptq, _ = quantize_export(model, calib, bits=8)
    import copy

    same = QAT(bits=8, epochs=0).apply(copy.deepcopy(model), TrainContext(TRAIN, VAL, calib=calib))
    assert _initializers(quantize_export(same, calib, bits=8)[0]) == _initializers(ptq)


def test_qat_keeps_fine_tuning_only_when_it_wins_on_validation(models) -> None:
    """The oracle: the exported result is the PTQ model itself unless, run by onnxruntime
    on validation, it has lower loss (by more than chance) and no lower accuracy."""
    model, calib = models["mnist1d-cnn"], TRAIN.take(slice(0, 256))
    ptq, _ = quantize_export(model, calib, bits=8)
    import copy

    result = QAT(bits=8, epochs=1, lr=3e-3).apply(copy.deepcopy(model),
                                                  TrainContext(TRAIN, VAL, calib=calib))
    qat, _ = quantize_export(result, calib, bits=8)
    ptq_score = exported_score(model, calib, VAL, bits=8)
    assert ptq_score.accuracy == _acc(ptq)
    if _initializers(qat) != _initializers(ptq):
        qat_score = exported_score(result, calib, VAL, bits=8)
        assert qat_score.loss < ptq_score.loss
        assert qat_score.accuracy >= ptq_score.accuracy


def test_bits_must_be_8_or_4() -> None:
    with pytest.raises(UsageError, match="`bits` must be one of 8, 4; got 3"):
        QAT(bits=3)


def test_distillation_weight_must_lie_in_0_1() -> None:
    with pytest.raises(UsageError, match=r"`distill` must lie in \[0, 1\]; got 1.5"):
        QAT(distill=1.5)


def test_a_loss_gain_must_beat_chance_to_count() -> None:
    from edgeloop.compress.qat import ExportedScore

    base = ExportedScore(0.9, np.full(100, 0.5))
    rng = np.random.default_rng(0)
    noise = rng.normal(0.0, 0.2, 100)
    noisy = ExportedScore(0.9, 0.5 - 0.01 + noise - noise.mean())   # gain 0.01 +- 0.02
    clear = ExportedScore(0.9, np.full(100, 0.4) + rng.normal(0.0, 0.01, 100))
    worse_acc = ExportedScore(0.89, clear.losses)
    assert noisy.loss < base.loss and not noisy.beats(base)
    assert clear.beats(base)
    assert not worse_acc.beats(base)
    assert not base.beats(base)
