"""`edgeloop optimize` on a real, briefly trained MNIST-1D CNN: the search, its choice
checked against an independent re-evaluation, the time box, SIGINT on a real process,
and bad input."""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import onnx
import pytest
import torch

from edgeloop import compress
from edgeloop._onnx import load_model, session
from edgeloop.cli import main
from edgeloop.data import Dataset, load_builtin, save_npz
from edgeloop.errors import DataError, UsageError
from edgeloop.measure import LatencyConfig, predict
from edgeloop.optimize import (
    CandidateResult,
    OptimizeConfig,
    PassCandidate,
    TorchCandidate,
    _choose,
    default_candidates,
    optimize,
    parse_duration,
)
from edgeloop.report import pareto_front, write_report
from edgeloop.targets import TARGETS, Target, detect

SRC = Path(__file__).resolve().parent.parent / "src"
FAST = LatencyConfig(warmup=3, min_runs=50, max_seconds=0.3, floor_runs=10)


@pytest.fixture(scope="module")
def trained(cnn_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's briefly trained CNN, with calib/val .npz (and val without labels)."""
    d = tmp_path_factory.mktemp("optimize")
    for name in ("model.onnx", "model.pt"):
        shutil.copyfile(cnn_dir / name, d / name)
    for split in ("calib", "val"):
        save_npz(d / f"{split}.npz", load_builtin("mnist1d", split))
    val = load_builtin("mnist1d", "val")
    save_npz(d / "val-nolabels.npz", Dataset(val.inputs))
    return d


def _accuracy(model_path: Path, data: Dataset) -> float:
    return 100.0 * float((predict(session(load_model(model_path)), data).argmax(-1)
                          == data.labels).mean())


@pytest.mark.slow
def test_search_choice_is_fastest_fitting_and_reevaluates_within_budget(
        trained: Path, tmp_path: Path) -> None:
    val = load_builtin("mnist1d", "val")
    config = OptimizeConfig(metric="accuracy", max_drop=0.5, batch=32, extra_batches=(1,),
                            time_budget_s=120, latency=FAST)
    seen: list[str] = []
    result = optimize(trained / "model.onnx", calib=load_builtin("mnist1d", "calib"), val=val,
                      target=detect(), config=config, on_result=lambda r: seen.append(r.name))
    assert result.stopped == "completed"
    model = load_model(trained / "model.onnx")
    names = [c.name for c in default_candidates()   # ONNX ones that fit a CNN's graph
             if not isinstance(c, TorchCandidate)
             and (getattr(c, "applies_to", None) is None or c.applies_to(model))]
    assert seen == ["float", *names]                 # every candidate reported as measured
    assert [c.name for c in result.candidates] == names
    paths = write_report(result, tmp_path / "out")

    # the oracle: the written model, re-evaluated independently, fits the budget
    base_acc = _accuracy(trained / "model.onnx", val)
    assert result.baseline.metric == pytest.approx(base_acc)
    fits = [c for c in result.candidates if c.status == "fits"]
    for c in fits:
        assert c.drop <= 0.5
        assert c.latency_ms[32] * config.min_speedup <= result.baseline.latency_ms[32]
    for c in result.candidates:
        if c.status == "over budget":
            assert c.drop > 0.5
    if result.chosen is None:
        assert not fits
        assert load_model(paths["best.onnx"]).SerializeToString() == \
            load_model(trained / "model.onnx").SerializeToString()
    else:
        chosen = next(c for c in result.candidates if c.name == result.chosen)
        assert base_acc - _accuracy(paths["best.onnx"], val) <= 0.5 + 1e-9
        assert _accuracy(paths["best.onnx"], val) == pytest.approx(chosen.metric)
        fastest = min(c.latency_ms[32] for c in fits)
        assert chosen.latency_ms[32] <= fastest * (1 + config.tie_tolerance)
        assert os.path.getsize(paths["best.onnx"]) < os.path.getsize(trained / "model.onnx")

    report = json.loads(paths["report.json"].read_text())
    assert report["chosen"] == result.chosen and report["stopped"] == "completed"
    assert len(report["candidates"]) == len(names)
    md = paths["report.md"].read_text()
    assert all(n in md for n in names)
    assert paths["pareto.png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a flagged candidate is one whose optimized graph still has float compute or Q/DQ
    for c in result.candidates:
        if c.flags:
            assert c.float_compute_ops or c.qdq_nodes > 0


def test_choose_prefers_smaller_file_among_latency_ties() -> None:
    def r(name: str, ms: float, size: int, status: str = "fits") -> CandidateResult:
        return CandidateResult(name, "", status, metric=1.0, drop=0.0, size_bytes=size,
                               latency_ms={1: ms})

    results = [r("a", 1.00, 900), r("b", 1.02, 500), r("c", 1.20, 100),
               r("d", 0.50, 10, status="over budget")]
    assert _choose(results, 0.03, 1).name == "b"
    assert _choose(results, 0.0, 1).name == "a"
    assert _choose([results[3]], 0.03, 1) is None
    front = pareto_front([r("x", 1.0, 1), r("y", 2.0, 1), r("z", 0.5, 1)], 1)
    assert [p.name for p in front] == ["z"]          # equal metric: only the fastest


@pytest.mark.slow
def test_time_budget_stops_the_search_and_keeps_a_valid_result(
        trained: Path, tmp_path: Path) -> None:
    budget = 4.0
    config = OptimizeConfig(time_budget_s=budget, reserve_s=0.5, latency=LatencyConfig(
        warmup=3, min_runs=10_000, max_seconds=0.6, floor_runs=10))
    t0 = time.monotonic()
    result = optimize(trained / "model.onnx", calib=load_builtin("mnist1d", "calib"),
                      val=load_builtin("mnist1d", "val"), target=detect(), config=config)
    paths = write_report(result, tmp_path / "out")
    assert time.monotonic() - t0 <= budget + 1.0
    assert result.stopped == "time budget"
    assert len(result.candidates) < len(default_candidates())
    onnx.checker.check_model(onnx.load(paths["best.onnx"]))
    report = json.loads(paths["report.json"].read_text())
    assert report["stopped"] == "time budget"
    assert "time budget ran out" in paths["report.md"].read_text() or result.chosen


@pytest.mark.slow
def test_sigint_mid_search_writes_best_and_a_valid_report(trained: Path,
                                                         tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(SRC), "EDGELOOP_QUIET": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", "from edgeloop.cli import main; main()", "optimize",
         str(trained / "model.onnx"), "--data", str(trained / "calib.npz"),
         "--val", str(trained / "val.npz"), "--out", str(out), "--time-budget", "5m"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    assert proc.stderr is not None
    lines: list[str] = []
    deadline = time.monotonic() + 90
    # wait until the float baseline and one candidate are done: the search is under way
    while len(lines) < 2 and time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stderr], [], [], 1.0)
        if ready:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
    assert len(lines) >= 2, lines
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr
    assert "stopped early (interrupted)" in " ".join(stdout.split())
    report = json.loads((out / "report.json").read_text())
    assert report["stopped"] == "interrupted"
    assert 1 <= len(report["candidates"]) < len(default_candidates())
    best = load_model(out / "best.onnx")
    session(best)
    assert (out / "report.md").is_file() and (out / "pareto.png").is_file()


@pytest.mark.slow
def test_torch_checkpoint_and_torch_candidate_extension_point(trained: Path) -> None:
    """A torch checkpoint is exported first; a TorchCandidate's module is exported and
    measured like the rest (zeroing the classifier must blow the budget)."""

    def zero_head(module: torch.nn.Module, train: Dataset, calib: Dataset,
                  target: Target) -> torch.nn.Module:
        last = [m for m in module.modules() if isinstance(m, torch.nn.Linear)][-1]
        with torch.no_grad():
            last.weight.zero_()
        return module

    cand = TorchCandidate("zero-head", "classifier zeroed", zero_head)
    fused = next(c for c in default_candidates() if c.name == "fused")
    config = OptimizeConfig(time_budget_s=120, latency=FAST, extra_batches=())
    kwargs = dict(calib=load_builtin("mnist1d", "calib"), val=load_builtin("mnist1d", "val"),
                  target=detect(), config=config, candidates=[fused, cand])
    without_train = optimize(trained / "model.pt", **kwargs)
    assert [c.name for c in without_train.candidates] == ["fused"]
    result = optimize(trained / "model.pt", train=load_builtin("mnist1d", "calib"), **kwargs)
    assert [c.name for c in result.candidates] == ["fused", "zero-head"]
    zeroed = result.candidates[1]
    assert zeroed.status == "over budget" and zeroed.drop > 50


def test_int8_scheme_joins_the_candidates_when_registered(monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    monkeypatch.delitem(compress.SCHEMES, "int8", raising=False)
    assert "int8-mixed" not in [c.name for c in default_candidates()]
    monkeypatch.setitem(compress.SCHEMES, "int8", compress.Int8Dynamic)
    cands = {c.name: c for c in default_candidates()}
    assert isinstance(cands["int8-mixed"], PassCandidate)
    made = cands["int8-mixed"].make(TARGETS["arm64-neon"])
    assert isinstance(made, compress.Int8Dynamic) and made.target.name == "arm64-neon"


def test_accuracy_needs_labels(trained: Path) -> None:
    with pytest.raises(DataError, match="labels"):
        optimize(trained / "model.onnx", calib=load_builtin("mnist1d", "calib"),
                 val=Dataset(load_builtin("mnist1d", "val").inputs), target=detect())


@pytest.mark.parametrize(("text", "seconds"), [("90", 90), ("90s", 90), ("10m", 600),
                                               ("1.5h", 5400)])
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "0", "-1m", "10x", "m"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(UsageError, match="time-budget"):
        parse_duration(text)


@pytest.mark.parametrize(("extra", "message"), [
    (["--max-drop", "-0.1"], "max-drop"),
    (["--target", "riscv"], "`target` must be one of"),
    (["--metric", "f1"], "`metric` must be one of"),
    (["--time-budget", "soon"], "time-budget"),
    (["--val", "VAL_NOLABELS"], "needs labels"),
    (["--threads", "-1"], "threads"),
])
def test_bad_input_one_line_exit_2(trained: Path, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str], extra: list[str],
                                   message: str) -> None:
    out = tmp_path / "out"
    extra = [str(trained / "val-nolabels.npz") if e == "VAL_NOLABELS" else e for e in extra]
    argv = ["optimize", str(trained / "model.onnx"), "--data", str(trained / "calib.npz"),
            "--val", str(trained / "val.npz"), "--out", str(out), *extra]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.parametrize(("metric", "float_score"), [("agreement", 100.0), ("cosine", 1.0)])
def test_reference_metrics_score_the_float_model_perfectly(trained: Path, metric: str,
                                                           float_score: float) -> None:
    int8 = next(c for c in default_candidates() if c.name == "int8-static/minmax/per-channel")
    val = Dataset(load_builtin("mnist1d", "val").inputs)      # no labels needed
    result = optimize(trained / "model.onnx", calib=load_builtin("mnist1d", "calib"), val=val,
                      target=detect(), candidates=[int8], config=OptimizeConfig(
                          metric=metric, max_drop=0.0, latency=FAST, extra_batches=()))
    assert result.baseline.metric == pytest.approx(float_score)
    (c,) = result.candidates
    assert c.drop == pytest.approx(float_score - c.metric) and c.drop > 0
    assert c.status == "over budget" and result.chosen is None


def test_torch_candidates_prune_and_qat_on_a_checkpoint(cnn_dir: Path) -> None:
    """Given a torch checkpoint and training data, structured pruning and QAT become
    candidates: the pruned model really has fewer channels, QAT runs integer kernels.
    (Speed is not judged here — ``min_speedup=0`` — a 29 µs model's timing is noise.)"""
    from edgeloop.optimize import torch_candidates

    cands = {c.name: c for c in torch_candidates(finetune_epochs=2, qat_epochs=1)}
    chosen = [cands["prune-50%"], cands["qat-int8"]]
    result = optimize(cnn_dir / "model.pt", calib=load_builtin("mnist1d", "calib"),
                      val=load_builtin("mnist1d", "val"),
                      config=OptimizeConfig(metric="accuracy", max_drop=100.0,
                                            time_budget_s=300, min_speedup=0.0),
                      candidates=chosen, train=load_builtin("mnist1d", "train"),
                      target=detect())
    measured = {c.name: c for c in result.candidates}
    assert set(measured) == {"prune-50%", "qat-int8"}
    assert all(c.error is None for c in measured.values()), measured
    assert measured["prune-50%"].size_bytes < 0.4 * result.baseline.size_bytes
    assert measured["qat-int8"].float_compute_ops == {}
    assert measured["qat-int8"].integer_ops
    assert measured["qat-int8"].metric > result.baseline.metric - 2.0


def test_train_data_needs_a_torch_model(cnn_dir: Path) -> None:
    with pytest.raises(UsageError, match=r"torch \.pt model only"):
        optimize(cnn_dir / "model.onnx", calib=load_builtin("mnist1d", "calib"),
                 val=load_builtin("mnist1d", "val"), target=detect(),
                 train=load_builtin("mnist1d", "train"))


def test_threads_reach_every_timing_and_the_int8_candidate(
        trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--threads` is the device's thread count: every model optimize times gets it, the
    int8 candidate judges speed with it, and the report says so."""
    import edgeloop.optimize as search
    seen: list[int | None] = []   # threads of each session; None: an input check
    real_session = search.session

    def spy(model: object, **kwargs: object) -> object:
        seen.append(kwargs.get("threads"))  # type: ignore[arg-type]
        return real_session(model, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(search, "session", spy)
    out = tmp_path / "out"
    main(["optimize", str(trained / "model.onnx"), "--data", str(trained / "calib.npz"),
          "--val", str(trained / "val.npz"), "--out", str(out), "--metric", "agreement",
          "--max-drop", "1", "--time-budget", "8s", "--threads", "1"])
    timed = [t for t in seen if t is not None]
    assert timed and set(timed) == {1}
    assert json.loads((out / "report.json").read_text())["threads"] == 1
    assert "batch 1, 1 thread" in (out / "report.md").read_text()
    config = OptimizeConfig(metric="agreement", max_drop=1.0,
                            latency=LatencyConfig(threads=1))
    int8 = {c.name: c for c in default_candidates(config)}["int8-mixed"]
    assert int8.make(detect()).threads == 1   # type: ignore[attr-defined]


def test_only_the_ranked_batch_gets_the_full_timing(
        trained: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The extra batch sizes are reported, never ranked: a few runs each, so that a large
    model's batch 32 does not eat the budget (DistilBERT on x86-avx2: 78 s a candidate)."""
    import edgeloop.optimize as search
    timed: list[tuple[int, LatencyConfig]] = []
    real_latency = search.latency

    def spy(sess: object, data: Dataset, batch: int, config: LatencyConfig) -> object:
        timed.append((batch, config))
        return real_latency(sess, data, batch, config)  # type: ignore[arg-type]

    monkeypatch.setattr(search, "latency", spy)
    config = OptimizeConfig(metric="agreement", max_drop=1.0, time_budget_s=60,
                            extra_batches=(32,))
    result = optimize(trained / "model.onnx", calib=load_builtin("mnist1d", "calib"),
                      val=load_builtin("mnist1d", "val"), config=config, target=detect(),
                      candidates=[c for c in default_candidates(config) if c.name == "fused"])
    assert set(result.baseline.latency_ms) == {1, 32}
    assert {b for b, _ in timed} == {1, 32} and len(timed) == 4   # float and the candidate
    for batch, used in timed:
        full = config.latency
        assert used == (full if batch == 1 else LatencyConfig(
            warmup=1, min_runs=full.min_runs, max_seconds=full.max_seconds, floor_runs=3,
            threads=full.threads))

