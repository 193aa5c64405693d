"""Calibration, confidence and threshold choice: pure numpy, each against an oracle."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeloop._onnx import session
from edgeloop.device import (
    MEASURES,
    TemperatureScaler,
    choose_thresholds,
    confidence,
    evaluate_thresholds,
    softmax,
)
from edgeloop.device._graph import CONFIDENCE, with_confidence
from edgeloop.device.calibration import nll
from edgeloop.errors import UsageError

RNG = np.random.default_rng(0)


def _overconfident(n: int = 2000, classes: int = 10, scale: float = 4.0
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose labels are drawn from softmax(logits / scale): T = scale is right."""
    z = RNG.normal(size=(n, classes)) * 2.0
    p = softmax(z)
    y = np.array([RNG.choice(classes, p=row) for row in p])
    return z * scale, y


def test_temperature_scaling_finds_the_temperature_and_lowers_nll() -> None:
    z, y = _overconfident()
    t = TemperatureScaler().fit(z, y)
    assert t.temperature_ == pytest.approx(4.0, rel=0.1)
    assert t.nll_after_ < t.nll_before_ - 0.3
    # the optimum: nudging T either way raises the NLL
    for f in (0.9, 1.1):
        assert nll(z, y, t.temperature_ * f) > t.nll_after_
    np.testing.assert_allclose(t.predict_proba(z), softmax(z, t.temperature_))


def test_underconfident_logits_get_a_temperature_below_one() -> None:
    z, y = _overconfident(scale=0.25)
    t = TemperatureScaler().fit(z, y)
    assert t.temperature_ == pytest.approx(0.25, rel=0.1)
    assert t.nll_after_ < t.nll_before_


def test_unfitted_scaler_says_so() -> None:
    with pytest.raises(UsageError, match="not fitted yet"):
        TemperatureScaler().predict_proba(np.zeros((1, 3)))


def test_confidence_measures() -> None:
    p = np.array([[0.7, 0.2, 0.1], [1 / 3, 1 / 3, 1 / 3]])
    np.testing.assert_allclose(confidence(p, "max-softmax"), [0.7, 1 / 3])
    np.testing.assert_allclose(confidence(p, "margin"), [0.5, 0.0], atol=1e-12)
    entropy = -(p * np.log(p)).sum(1)
    np.testing.assert_allclose(confidence(p, "entropy"), -entropy)
    with pytest.raises(UsageError, match="`measure` must be one of max-softmax, margin, "
                                         "entropy; got 'top1'"):
        confidence(p, "top1")


def _linear(path: Path, opset: int) -> Path:
    w = RNG.normal(size=(6, 5)).astype(np.float32) * 3
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["logits"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])],
        [numpy_helper.from_array(w, "w")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    onnx.save(m, path)
    return path


@pytest.mark.parametrize(("measure", "opset"), list(itertools.product(MEASURES, (13, 17, 20))))
def test_confidence_in_the_graph_equals_numpy(measure: str, opset: int, tmp_path: Path) -> None:
    model = onnx.load(_linear(tmp_path / "m.onnx", opset))
    x = RNG.normal(size=(64, 6)).astype(np.float32)
    sess = session(with_confidence(model, temperature=1.7, measure=measure))
    logits, conf = sess.run(None, {"x": x})
    assert sess.get_outputs()[-1].name == CONFIDENCE
    np.testing.assert_allclose(logits, x @ numpy_helper.to_array(model.graph.initializer[0]),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(conf, confidence(softmax(logits, 1.7), measure), atol=2e-6)


def _stages(n: int = 400) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Three synthetic stages: confident answers are mostly right, later stages better."""
    conf = [RNG.uniform(size=n) for _ in range(3)]
    correct = [RNG.uniform(size=n) < 0.3 + 0.6 * c + 0.1 * i for i, c in enumerate(conf)]
    return conf, correct


def test_choice_is_the_fastest_within_budget_by_brute_force() -> None:
    conf, correct = _stages()
    lat = [1.0, 2.5, 6.0]
    choice = choose_thresholds(conf, correct, lat, max_drop=2.0, max_combinations=900)
    ref = evaluate_thresholds(conf, correct, lat, [None, None])
    assert choice.reference_accuracy == ref.accuracy
    assert choice.reference_latency_ms == pytest.approx(6.0)
    assert choice.chosen.accuracy >= ref.accuracy - 0.02
    again = evaluate_thresholds(conf, correct, lat, choice.chosen.thresholds)
    assert again == choice.chosen
    # brute force over a finer grid of the same kind finds nothing faster within budget
    grid = [None, *np.quantile(conf[0], np.linspace(0, 1, 41))]
    grid2 = [None, *np.quantile(conf[1], np.linspace(0, 1, 41))]
    best = min((p for t in itertools.product(grid, grid2)
                if (p := evaluate_thresholds(conf, correct, lat, t)).accuracy
                >= ref.accuracy - 0.02), key=lambda p: p.mean_latency_ms)
    assert choice.chosen.mean_latency_ms <= best.mean_latency_ms * 1.05
    assert choice.chosen.mean_latency_ms < 6.0
    assert sum(choice.chosen.answered) == pytest.approx(1.0)


def test_curve_is_a_pareto_front_and_holds_the_choice() -> None:
    conf, correct = _stages()
    choice = choose_thresholds(conf[:2], correct[:2], [1.0, 5.0], max_drop=1.0)
    lat = [p.mean_latency_ms for p in choice.curve]
    acc = [p.accuracy for p in choice.curve]
    assert lat == sorted(lat) and acc == sorted(acc) and len(set(acc)) == len(acc)
    assert acc[-1] >= choice.reference_accuracy
    assert any(p.mean_latency_ms <= choice.chosen.mean_latency_ms for p in choice.curve)


def test_zero_budget_and_skipped_stages() -> None:
    conf, correct = _stages()
    lat = [1.0, 5.0]
    choice = choose_thresholds(conf[:2], correct[:2], lat, max_drop=0.0)
    assert choice.chosen.accuracy >= choice.reference_accuracy
    # "never" skips an independent stage: the last alone costs only its own latency
    assert evaluate_thresholds(conf[:2], correct[:2], lat, [None]).mean_latency_ms == 5.0
    # a chained stage runs even when it never answers: the next one needs its features
    chained = evaluate_thresholds(conf[:2], correct[:2], lat, [None], chained=[False, True])
    assert chained.mean_latency_ms == 6.0
    # threshold 0 with max-softmax-like confidences in [0, 1]: stage 1 answers everything
    assert evaluate_thresholds(conf[:2], correct[:2], lat, [0.0]).answered == (1.0, 0.0)
    with pytest.raises(UsageError, match="must be >= 0"):
        choose_thresholds(conf[:2], correct[:2], lat, max_drop=-1)


def test_safety_keeps_standard_errors_from_the_budget() -> None:
    conf, correct = _stages(2000)
    lat = [1.0, 5.0]
    plain = choose_thresholds(conf[:2], correct[:2], lat, max_drop=3.0)
    safe = choose_thresholds(conf[:2], correct[:2], lat, max_drop=3.0, safety=2.0)
    assert safe.chosen.mean_latency_ms >= plain.chosen.mean_latency_ms
    assert safe.chosen.accuracy >= plain.chosen.accuracy
    # the chosen point's own paired standard error fits inside the budget
    t = safe.chosen.thresholds[0]
    answered = conf[0] >= (np.inf if t is None else t)
    right = np.where(answered, correct[0], correct[1])
    d = correct[1].astype(float) - right
    assert d.mean() + 2.0 * d.std() / np.sqrt(len(d)) <= 0.03 + 1e-12
    with pytest.raises(UsageError, match="`safety` must be >= 0"):
        choose_thresholds(conf[:2], correct[:2], lat, max_drop=1.0, safety=-1)
