"""`edgeloop bench`: the arithmetic against numpy and hand-made series, the benchmark on a
real model, and the command line including its bad-input errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_cli import cli

from edgeloop import _energy
from edgeloop import bench as bench_mod
from edgeloop.bench import (
    BenchConfig,
    BenchReport,
    bench,
    estimate_energy,
    latency_series,
    latency_summary,
    parse_batches,
    plot_latency,
    throttling,
    top_operators,
)
from edgeloop.errors import DataError, ModelError, UsageError

FAST = BenchConfig(batches=(1, 4), duration=0.3, warmup=0.05, min_runs=20, profile_runs=5)


def _steady_then(factor: float, n: int = 1000, ms: float = 2.0) -> tuple[list[float], list[float]]:
    """Back-to-back runs at ``ms`` that become ``factor`` times slower for the last 30%."""
    lats = [ms / 1e3 * (factor if i >= int(n * 0.7) else 1.0) for i in range(n)]
    starts = list(np.cumsum([0.0, *lats[:-1]]))
    return starts, lats


def test_summary_matches_numpy() -> None:
    rng = np.random.default_rng(0)
    lat = rng.lognormal(-6, 0.3, 5000)
    s = latency_summary(lat)
    assert s["p50_ms"] == pytest.approx(np.median(lat) * 1e3)
    assert s["p99_ms"] == pytest.approx(np.percentile(lat, 99) * 1e3)
    assert s["mean_ms"] == pytest.approx(lat.mean() * 1e3)


@pytest.mark.parametrize(("factor", "throttled"), [(1.0, False), (1.05, False), (1.15, True),
                                                   (1.5, True), (0.8, False)])
def test_throttling_verdict(factor: float, throttled: bool) -> None:
    starts, lats = _steady_then(factor)
    t = throttling(starts, lats)
    assert t.throttled is throttled
    assert t.first_ms == pytest.approx(2.0)
    # The last 20% of the wall time lies entirely in the slow part.
    assert t.last_ms == pytest.approx(2.0 * factor)
    assert t.slowdown == pytest.approx(factor - 1.0)


def test_throttling_uses_wall_time_not_run_count() -> None:
    # 900 fast runs then 100 runs that are 20x slower: by count the last 20% is mostly fast,
    # by wall time the last 20% is all slow.
    lats = [0.001] * 900 + [0.02] * 100
    starts = list(np.cumsum([0.0, *lats[:-1]]))
    assert throttling(starts, lats).last_ms == pytest.approx(20.0)


def test_latency_series_bins_by_wall_time() -> None:
    starts, lats = _steady_then(2.0, n=600)
    series = latency_series(starts, lats, points=10)
    assert len(series) == 10
    xs = [p[0] for p in series]
    assert xs == sorted(xs)
    assert series[0][1] == pytest.approx(2.0) and series[-1][1] == pytest.approx(4.0)


def test_top_operators_from_profiler_events() -> None:
    def ev(node: str, op: str, dur: int, ts: int) -> dict[str, object]:
        return {"cat": "Node", "name": f"{node}_kernel_time", "dur": dur, "ts": ts,
                "args": {"op_name": op}}

    def run(ts: int) -> dict[str, object]:
        return {"cat": "Session", "name": "model_run", "ts": ts, "dur": 50}

    first = [run(0), ev("g", "Gemm", 40_000, 10)]  # a slow first run, left out
    second = [run(100), ev("c1", "Conv", 300, 101), ev("c2", "Conv", 100, 102),
              ev("g", "Gemm", 500, 103), ev("r", "Relu", 100, 104),
              {"cat": "Node", "name": "c1_fence_before", "dur": 7, "ts": 105,
               "args": {"op_name": "Conv"}}]
    ops = top_operators(first + second, n=2)
    assert [(o.op_type, o.nodes) for o in ops] == [("Gemm", 1), ("Conv", 2)]
    assert ops[0].total_ms == pytest.approx(0.5) and ops[0].share == pytest.approx(0.5)
    assert ops[1].share == pytest.approx(0.4)
    # With a single run there is nothing else to show, so it is kept.
    assert top_operators(first)[0].total_ms == pytest.approx(40.0)
    assert top_operators(first + second, skip_runs=0)[0].total_ms == pytest.approx(40.5)


def test_energy_estimate() -> None:
    # the RAPL counter itself (wrap-around included): tests/test_device_energy.py
    assert estimate_energy(2.0, watts=10.0, cores=4) == pytest.approx(5.0)


def test_parse_batches() -> None:
    assert parse_batches("1,8,32") == (1, 8, 32)
    for bad in ("", "0", "1,x", "-4"):
        with pytest.raises(UsageError, match="`batch`"):
            parse_batches(bad)


def test_config_rejects_bad_values() -> None:
    with pytest.raises(UsageError, match="duration"):
        BenchConfig(duration=0)
    with pytest.raises(UsageError, match="threads"):
        BenchConfig(threads=-1)


def test_bench_on_a_real_model(cnn_dir: Path, mnist_npz: dict[str, Path]) -> None:
    from edgeloop.data import load_npz

    report = bench(cnn_dir / "model.onnx", config=FAST, data=load_npz(mnist_npz["test"]))
    assert [r.batch for r in report.results] == [1, 4]
    for r in report.results:
        assert r.runs >= FAST.min_runs and r.seconds >= FAST.duration
        assert 0 < r.p50_ms <= r.p90_ms <= r.p99_ms
        # Throughput counts every sample of every run over the wall time of the run.
        assert r.throughput == pytest.approx(r.batch * r.runs / r.seconds)
        assert len(r.series) >= 2
        assert r.energy.joules > 0
        assert r.energy.source == ("rapl" if report.sensors["rapl"] else "estimate")
    assert report.load_ms > 0 and report.peak_rss_mb > 10
    ops = report.operators
    assert 0 < len(ops) <= 10
    assert sum(o.share for o in ops) == pytest.approx(1.0)
    assert any("Conv" in o.op_type for o in ops)  # the CNN's time goes to its convolutions
    again = BenchReport.from_dict(json.loads(json.dumps(report.to_dict())))
    assert again == report


def test_bench_input_errors(cnn_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        bench(tmp_path / "none.onnx", config=FAST)
    from edgeloop.data import Dataset

    wrong = Dataset({"x": np.zeros((4, 7), np.float32)})
    with pytest.raises(DataError):
        bench(cnn_dir / "model.onnx", config=FAST, data=wrong)
    with pytest.raises(DataError, match="not a bench report"):
        BenchReport.from_dict({"model": "m"})


def test_plot_is_a_png(cnn_dir: Path, tmp_path: Path) -> None:
    report = bench(cnn_dir / "model.onnx", config=BenchConfig(duration=0.2, warmup=0,
                                                               profile_runs=2))
    out = plot_latency(report, tmp_path / "lat.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_json_and_png(cnn_dir: Path, tmp_path: Path) -> None:
    png = tmp_path / "lat.png"
    code, stdout, stderr = cli("bench", cnn_dir / "model.onnx", "--batch", "1,2",
                               "--duration", "0.2", "--warmup", "0", "--json", "--plot", png)
    assert code == 0, stderr
    report = json.loads(stdout)
    assert [r["batch"] for r in report["results"]] == [1, 2]
    assert png.read_bytes()[:4] == b"\x89PNG"
    code, stdout, stderr = cli("bench", cnn_dir / "model.onnx", "--duration", "0.2",
                               "--no-plot")
    assert code == 0, stderr
    assert "p50 ms" in stdout and "top operators" in stdout


@pytest.mark.parametrize(("args", "message"), [
    (["--batch", "0"], "`batch`"),
    (["--batch", "1,two"], "`batch`"),
    (["--target", "z80"], "`target` must be one of"),
    (["--duration", "-1"], "`duration`"),
    (["--threads", "-2"], "`threads`"),
])
def test_cli_bad_input_is_one_line_exit_2(args: list[str], message: str, cnn_dir: Path,
                                          tmp_path: Path) -> None:
    png = tmp_path / "p.png"
    code, _stdout, stderr = cli("bench", cnn_dir / "model.onnx", "--plot", png, *args)
    assert code == 2
    assert message in stderr and len(stderr.strip().splitlines()) == 1
    assert not png.exists()


def test_cli_missing_model_is_one_line_exit_2(tmp_path: Path) -> None:
    code, _, stderr = cli("bench", tmp_path / "nothing.onnx")
    assert code == 2 and "does not exist" in stderr
    assert len(stderr.strip().splitlines()) == 1


def test_sys_readers_on_a_fake_sysfs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     cnn_dir: Path) -> None:
    cpu, thermal, rapl = tmp_path / "cpu", tmp_path / "thermal", tmp_path / "powercap"
    for i, khz in enumerate((1_200_000, 1_800_000)):
        (cpu / f"cpu{i}" / "cpufreq").mkdir(parents=True)
        (cpu / f"cpu{i}" / "cpufreq" / "scaling_cur_freq").write_text(f"{khz}\n")
    for i, milli in enumerate((41_000, 57_500)):
        (thermal / f"thermal_zone{i}").mkdir(parents=True)
        (thermal / f"thermal_zone{i}" / "temp").write_text(f"{milli}\n")
    (rapl / "intel-rapl:0" / "intel-rapl:0:0").mkdir(parents=True)
    (rapl / "intel-rapl:0" / "energy_uj").write_text("5000000\n")  # a counter that stands still
    (rapl / "intel-rapl:0:0").mkdir()  # a subzone at top level: must not be counted twice
    (rapl / "intel-rapl:0:0" / "energy_uj").write_text("1\n")
    monkeypatch.setattr(bench_mod, "_CPU_ROOT", cpu)
    monkeypatch.setattr(bench_mod, "_THERMAL_ROOT", thermal)
    monkeypatch.setattr(_energy, "RAPL_ROOT", rapl)
    assert bench_mod._cpu_mhz() == pytest.approx(1500.0)
    assert bench_mod._temperature_c() == pytest.approx(57.5)
    assert [p.name for p in _energy.rapl_domains()] == ["intel-rapl:0"]
    report = bench(cnn_dir / "model.onnx", config=BenchConfig(duration=0.2, warmup=0,
                                                               sample_interval=0.05,
                                                               profile_runs=2))
    r = report.results[0]
    assert report.sensors == {"rapl": True, "cpufreq": True, "thermal": True}
    assert r.energy.source == "rapl" and r.energy.joules == 0.0
    assert len(r.cpu_mhz) >= 2 and set(r.cpu_mhz) == {1500.0}
    assert set(r.temperature_c) == {57.5}
