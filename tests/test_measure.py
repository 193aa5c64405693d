from pathlib import Path

import numpy as np
import pytest

from edgeloop._onnx import session
from edgeloop.data import load_builtin
from edgeloop.measure import (
    LatencyConfig,
    evaluate,
    fidelity,
    graph_summary,
    interleaved_times,
    latency,
)


def test_fidelity_identical_and_known_noise() -> None:
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(100, 10))
    same = fidelity(ref, ref)
    assert same.top1_agreement == 1.0 and same.mean_cosine == pytest.approx(1.0)
    assert same.sqnr_db == float("inf") and same.max_abs_diff == 0.0
    noisy = fidelity(ref + 0.1 * rng.normal(size=ref.shape), ref)
    assert noisy.sqnr_db == pytest.approx(20.0, abs=0.5)   # signal var 1, noise var 0.01
    flipped = fidelity(-ref, ref)
    assert flipped.mean_cosine == pytest.approx(-1.0) and flipped.top1_agreement < 0.2


def test_latency_respects_run_count(cnn_dir: Path) -> None:
    sess = session(cnn_dir / "model.onnx")
    data = load_builtin("mnist1d", "calib")
    stats = latency(sess, data, 32, LatencyConfig(warmup=2, min_runs=25, max_seconds=10))
    assert stats.runs == 25 and stats.batch == 32
    assert 0 < stats.p50_ms <= stats.p90_ms <= stats.p99_ms


def test_evaluate_reports_accuracy_and_float_ops(cnn_dir: Path) -> None:
    data = load_builtin("mnist1d", "test")
    report = evaluate(cnn_dir / "model.onnx", data, reference=cnn_dir / "model.onnx",
                      latency_config=LatencyConfig(warmup=1, min_runs=5))
    assert report.accuracy == report.reference_accuracy and report.accuracy > 0.5
    assert report.fidelity is not None and report.fidelity.top1_agreement == 1.0
    assert report.float_compute_ops and not report.integer_ops and report.qdq_nodes == 0
    assert [lat.batch for lat in report.latency] == [1, 32]
    assert report.size_bytes == (cnn_dir / "model.onnx").stat().st_size


def test_graph_summary_sees_float_model(cnn_dir: Path) -> None:
    import onnx

    float_ops, int_ops, qdq = graph_summary(onnx.load(cnn_dir / "model.onnx"))
    assert sum(float_ops.values()) >= 5 and not int_ops and qdq == 0


def test_a_model_newer_than_onnxruntime_is_named_as_such() -> None:
    """onnx can write an IR version the installed onnxruntime does not read yet (onnx 1.23
    writes 14, onnxruntime 1.31 reads up to 13): the error says so and what to do."""
    from onnx import TensorProto, helper

    from edgeloop.errors import ModelError

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 99
    with pytest.raises(ModelError, match=r"the model is ONNX IR version 99 and onnxruntime "
                                         r"\S+ reads up to \d+: upgrade onnxruntime"):
        session(model)


@pytest.mark.parametrize(("alternate", "expected"), [
    (False, "aabb" "bbaa"),   # blocks of `runs` calls, each round starting one later
    (True, "abab" "baba"),    # one call per turn
])
def test_interleaved_turns(alternate: bool, expected: str) -> None:
    order: list[str] = []
    calls = [lambda: order.append("a"), lambda: order.append("b")]
    ms = interleaved_times(calls, rounds=2, runs=2, warmup=1, alternate=alternate)
    assert "".join(order) == "ab" + expected      # warm-up first, then the timed turns
    assert len(ms) == 2 and all(t >= 0 for t in ms)
