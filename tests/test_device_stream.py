"""Adaptive rate and energy in the device runtime: a synthetic sensor stream through a real
onnxruntime cascade (its first stage switched off, so the answers are the second model's
alone and a bare onnxruntime session is the oracle), the energy budget under a fake CPU
clock and stream clock, the RAPL counter on a fake powercap tree, policy errors and
`edgeloop device run --stream` end to end."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from test_bundle_fixtures import CLASSES, FEATURES, X, matmul_model, new_device, repo
from test_cli import cli

from edgeloop._energy import RaplCounter
from edgeloop.data import Dataset, save_npz
from edgeloop.device import (
    Cascade,
    EnergyMeter,
    Policy,
    Runtime,
    RuntimeStats,
    Stage,
    StreamRule,
    summarize,
)
from edgeloop.device.http import running
from edgeloop.device.stream import EnergyBudget, relative_change
from edgeloop.errors import UsageError
from edgeloop.targets import get_target

__all__ = ["repo"]

_RNG = np.random.default_rng(11)
W = {name: _RNG.normal(size=(FEATURES, CLASSES)).astype(np.float32) for name in ("a", "b")}
MIN_CHANGE = 0.05


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A two-stage cascade whose first stage the policy switches off (threshold inf): every
    answer is model b's."""
    root = tmp_path_factory.mktemp("stream")
    paths = {name: matmul_model(root / f"{name}.onnx", w) for name, w in W.items()}
    paths["cascade"] = root / "cascade.json"
    paths["cascade"].write_text(Cascade(stages=(
        Stage(name="a", model="a.onnx", threshold=0.5), Stage(name="b", model="b.onnx"))
    ).to_json())
    return paths


def _policy(models: dict[str, Path], **stream: object) -> Policy:
    return Policy(cascade=models["cascade"], thresholds=(math.inf,),
                  stream=StreamRule(**stream) if stream else None)  # type: ignore[arg-type]


def _bare(models: dict[str, Path], x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(models["b"]), providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0]


def sensor_stream() -> np.ndarray:
    """Segments of a repeated window with 0.1% noise, abrupt changes between them, and a
    slow drift whose steps (1.5% each) are all below MIN_CHANGE but add up past it."""
    rng = np.random.default_rng(3)
    rows = []
    for base in X[:4]:
        rows += [base + 0.001 * np.linalg.norm(base) / math.sqrt(FEATURES)
                 * rng.standard_normal(FEATURES) for _ in range(12)]
    step = rng.standard_normal(FEATURES)
    step *= 0.015 * np.linalg.norm(X[4]) / np.linalg.norm(step)
    rows += [X[4] + k * step for k in range(20)]
    rows += [X[5]] * 5
    return np.asarray(rows, np.float32)


def expected_processed(windows: np.ndarray, min_change: float) -> list[int]:
    """The oracle: a window runs when ||x - x_p|| / ||x_p|| >= min_change, x_p the last
    window that ran (float64 norms of the flattened window)."""
    done: list[int] = []
    for i, w in enumerate(windows.astype(np.float64)):
        p = windows[done[-1]].astype(np.float64) if done else None
        if p is None or np.linalg.norm(w - p) / np.linalg.norm(p) >= min_change:
            done.append(i)
    return done


def test_relative_change_is_the_relative_l2_norm() -> None:
    a = {"x": X[:1], "y": X[1:3]}
    b = {"x": X[3:4], "y": X[4:6]}
    x = X.astype(np.float64)
    want = (np.linalg.norm(np.concatenate([(x[3:4] - x[:1]).ravel(), (x[4:6] - x[1:3]).ravel()]))
            / np.linalg.norm(np.concatenate([x[:1].ravel(), x[1:3].ravel()])))
    assert relative_change(b, a) == pytest.approx(want, rel=1e-12)
    assert relative_change(a, a) == 0.0
    zero = {"x": np.zeros((1, FEATURES), np.float32)}
    assert relative_change(zero, zero) == 0.0
    assert relative_change({"x": X[:1]}, zero) == math.inf
    assert relative_change({"x": X[:2]}, {"x": X[:1]}) == math.inf   # another shape


def test_unchanged_windows_are_skipped_and_answers_match_onnxruntime(models) -> None:
    windows = sensor_stream()
    processed = expected_processed(windows, MIN_CHANGE)
    # the stream is what it claims: each segment's first window and some drift steps run
    assert {0, 12, 24, 36, 48, 68} <= set(processed)
    drift = [i for i in processed if 48 <= i < 68]
    assert 1 < len(drift) < 20
    rt = Runtime(None, _policy(models, min_change=MIN_CHANGE))

    def arrivals() -> Iterator[np.ndarray]:   # a generator: nothing is gathered up front
        yield from windows

    answers = list(rt.predict_stream(arrivals()))
    assert [i for i, a in enumerate(answers) if a.skipped is None] == processed
    want = _bare(models, windows)
    last = None
    for i, a in enumerate(answers):
        if a.skipped is None:
            np.testing.assert_allclose(a.output[0], want[i], rtol=1e-5, atol=1e-5)
            assert a.stage == "b" and a.energy_source == "estimate" and a.energy_mj >= 0
            last = a
        else:
            assert last is not None and a.skipped == "unchanged"
            assert a.output is last.output and a.stage == last.stage and a.energy_mj == 0.0
    s = summarize(answers)
    skipped = len(windows) - len(processed)
    assert s.samples == len(windows) and s.processed == len(processed)
    assert s.skipped == {"unchanged": skipped} and s.answered == {"b": len(processed)}
    assert s.energy is not None and s.energy_every_window_j is not None
    assert s.energy_every_window_j == pytest.approx(
        s.energy.joules * len(windows) / len(processed))
    stats = rt.stats.to_dict()
    assert stats["answers"] == len(processed) and stats["skipped"] == {"unchanged": skipped}


class FakeCpu:
    """A CPU clock that moves ``cost_s`` between the reads around each inference."""

    def __init__(self, cost_s: float) -> None:
        self.cost_s, self.t, self.reads = cost_s, 0.0, 0

    def __call__(self) -> float:
        self.reads += 1
        if self.reads % 2 == 0:   # the read after an inference
            self.t += self.cost_s
        return self.t


def test_energy_per_answer_is_busy_seconds_times_watts_over_cores(models) -> None:
    meter = EnergyMeter(watts=10.0, cores=4, clock=FakeCpu(0.004), profile="fake")
    rt = Runtime(None, _policy(models), meter=meter)
    answers = [rt.predict({"x": X[i:i + 1]}) for i in range(5)]
    assert [a.energy_mj for a in answers] == pytest.approx([0.004 * 10 / 4 * 1e3] * 5)
    # a run's busy time is spread over its rows, so micro-batched callers get their share
    assert rt._run_rows("all", {"x": X[:4]})[0] == pytest.approx([0.001] * 4)
    e = RuntimeStats(meter=meter, rapl=RaplCounter(Path("/nonexistent")))
    for a in answers:
        e.add(a, 1)
    assert e.energy().joules == pytest.approx(0.05)
    assert e.energy().per_inference_mj == pytest.approx(10.0)
    assert e.energy().source == "estimate" and "10 W (fake) / 4 cores" in e.energy().note
    # the default meter: this machine's profile, wall time x one busy core per thread
    default = Runtime(None, _policy(models)).meter
    assert (default.watts, default.cores) == (get_target("auto").watts, os.cpu_count())
    assert default.clock is time.perf_counter and default.threads == 1
    two = Runtime(None, Policy(cascade=models["cascade"], threads=2)).meter
    assert two.threads == 2
    assert two.millijoules(0.5) == pytest.approx(2 * default.millijoules(0.5))
    real = [Runtime(None, _policy(models)).predict({"x": X[:64]}) for _ in range(3)]
    assert all(a.energy_mj > 0 for a in real)


@pytest.mark.parametrize("timing", ["clock", "period_ms"])
def test_energy_budget_lowers_the_rate_and_raises_it_again(models, timing: str) -> None:
    """Windows every 10 ms that all change; an inference costs 2 mJ (200 mW if every
    window ran) under a 50 mW budget; then inference gets 8x cheaper."""
    n, period = 400, 0.01
    cpu = FakeCpu(0.002)     # x 1 W / 1 core = 2 mJ
    meter = EnergyMeter(watts=1.0, cores=1, clock=cpu)
    windows = np.random.default_rng(5).standard_normal((2 * n, FEATURES)).astype(np.float32)
    t = [0.0]

    def clock() -> float:
        return t[0]

    rule = {"energy_budget_mw": 50.0, "burst_s": 0.2}
    if timing == "period_ms":
        rule["period_ms"] = period * 1e3
    rt = Runtime(None, _policy(models, **rule), meter=meter)
    answers = []
    for i, a in enumerate(rt.predict_stream(iter(windows), clock=clock)):
        answers.append(a)
        t[0] = (i + 1) * period
        if i + 1 == n:
            cpu.cost_s = 0.00025         # 0.25 mJ: 25 mW if every window ran
    spent = np.cumsum([a.energy_mj for a in answers])
    ran = np.array([a.skipped is None for a in answers])
    assert {a.skipped for a in answers} == {None, "energy budget"}
    # the first phase: the rate falls to about budget / power (1 in 4), and the energy
    # spent by each window's time stays within the budget plus the first window's 2 mJ
    first = ran[:n].mean()
    assert 0.2 <= first <= 0.26
    times = np.arange(2 * n) * period
    assert np.all(spent[:n] <= 2.0 + 50.0 * times[:n] + 1e-9)
    warm = 40
    assert (spent[n - 1] - spent[warm - 1]) / (times[n - 1] - times[warm - 1]) <= 50.0 * 1.01
    # the second phase: cheaper windows fit the budget, so the rate rises to every window
    assert ran[n + warm:].all()
    unbudgeted = Runtime(None, _policy(models), meter=EnergyMeter(
        watts=1.0, cores=1, clock=FakeCpu(0.002)))
    assert all(a.skipped is None for a in unbudgeted.predict_stream(iter(windows[:n])))


def test_energy_budget_saves_credit_while_idle_up_to_the_burst() -> None:
    b = EnergyBudget(8.0, burst_s=0.5)       # 8 mW; at most 4 mJ saved
    assert b.allows(0.0)                     # the first window always runs
    b.spend(1.0)
    assert not b.allows(0.0625)              # 0.5 mJ accrued: 0.5 mJ still owed
    assert not b.allows(0.125)               # the debt is paid; the next 1 mJ is not there
    assert b.allows(0.25) and b.credit_mj == 1.0
    b.spend(1.0)
    assert b.allows(100.0) and b.credit_mj == 4.0   # saved while idle: at most 0.5 s x 8 mW


def _powercap(root: Path, energies: dict[str, int]) -> None:
    for zone, uj in energies.items():
        (root / zone).mkdir(parents=True, exist_ok=True)
        (root / zone / "energy_uj").write_text(f"{uj}\n")
        (root / zone / "max_energy_range_uj").write_text("1000000\n")


def test_rapl_counter_on_a_fake_powercap_tree_with_wraparound(models, tmp_path: Path) -> None:
    root = tmp_path / "powercap"
    _powercap(root, {"intel-rapl:0": 900_000, "intel-rapl:1": 10_000,
                     "intel-rapl:0:0": 5})     # a subzone: its package counts it already
    c = RaplCounter(root)
    assert c.readable and [d.name for d in c.domains] == ["intel-rapl:0", "intel-rapl:1"]
    _powercap(root, {"intel-rapl:0": 100_000, "intel-rapl:1": 60_000, "intel-rapl:0:0": 9})
    assert c.joules() == pytest.approx(0.2 + 0.05)          # package 0 wrapped around
    _powercap(root, {"intel-rapl:0": 600_000, "intel-rapl:1": 60_000})
    assert c.joules() == pytest.approx(0.25 + 0.5)
    assert not RaplCounter(tmp_path / "none").readable
    assert RaplCounter(tmp_path / "none").joules() == 0.0
    # the runtime's stats report RAPL, labelled, where it is readable
    _powercap(root, {"intel-rapl:0": 0, "intel-rapl:1": 0})
    stats = RuntimeStats(rapl=RaplCounter(root))
    rt = Runtime(None, _policy(models))
    for i in range(4):
        stats.add(rt.predict({"x": X[i:i + 1]}), 1)
    _powercap(root, {"intel-rapl:0": 300_000, "intel-rapl:1": 100_000})
    e = stats.to_dict()["energy"]
    assert e["source"] == "rapl" and e["joules"] == pytest.approx(0.4)
    assert e["per_inference_mj"] == pytest.approx(100.0) and "idle time" in e["note"]


def test_bad_stream_policy_values_are_one_line(models, tmp_path: Path) -> None:
    p = tmp_path / "policy.toml"
    p.write_text('target = "arm64-neon"\n[stream]\nmin_change = 0.1\nenergy_budget_mw = 20\n'
                 'period_ms = 16\nburst_s = 2\n')
    assert Policy.load(p).target == "arm64-neon"
    assert Policy.load(p).stream == StreamRule(min_change=0.1, energy_budget_mw=20.0,
                                               period_ms=16.0, burst_s=2.0)
    for text, words in [
        ("[stream]\nmin_change = -0.1\n", "`stream.min_change` must be a number >= 0 "
                                          "(relative L2 change, 0 = skip none); got -0.1"),
        ('[stream]\nmin_change = "small"\n', "`stream.min_change` must be a number >= 0"),
        ("[stream]\nenergy_budget_mw = 0\n", "`stream.energy_budget_mw` must be a number > 0 "
                                             "(milliwatts); got 0"),
        ("[stream]\nperiod_ms = nan\n", "`stream.period_ms` must be a number > 0"),
        ("[stream]\nburst_s = true\n", "`stream.burst_s` must be a number >= 0 (seconds)"),
        ("[stream]\nbudget_mw = 5\n", "[stream] has no key 'budget_mw'; keys: min_change, "
                                      "energy_budget_mw, period_ms, burst_s"),
        ("stream = 3\n", "`stream` must be a table of keys; got int"),
        ('target = "z80"\n', "`target` must be one of auto, x86-avx512-vnni"),
    ]:
        p.write_text(text)
        with pytest.raises(UsageError) as e:
            Policy.load(p)
        assert words in str(e.value) and str(p) in str(e.value), str(e.value)
        assert "\n" not in str(e.value)
    # exit code 2 and one line in the CLI
    save_npz(tmp_path / "x.npz", Dataset({"x": X[:4]}))
    p.write_text(f'cascade = "{models["cascade"]}"\n[stream]\nmin_change = -1\n')
    code, _, stderr = cli("device", "run", "--data", tmp_path / "x.npz", "--policy", p)
    assert code == 2 and len(stderr.strip().splitlines()) == 1
    assert "`stream.min_change` must be a number >= 0" in stderr


def test_device_run_stream_json_end_to_end(models, tmp_path: Path) -> None:
    windows = sensor_stream()
    processed = expected_processed(windows, MIN_CHANGE)
    labels = _bare(models, windows).argmax(1)
    data = tmp_path / "stream.npz"
    save_npz(data, Dataset({"x": windows}, labels.astype(np.int64)))
    policy = tmp_path / "policy.toml"
    policy.write_text(f'cascade = "{models["cascade"]}"\nthresholds = [inf]\n'
                      f"[stream]\nmin_change = {MIN_CHANGE}\n")
    code, stdout, stderr = cli("device", "run", "--data", data, "--policy", policy,
                               "--stream", "--json")
    assert code == 0, stderr
    rows = [json.loads(line) for line in stdout.splitlines()]
    assert len(rows) == len(windows)
    assert set(rows[0]) == {"answer", "stage", "latency_ms", "confidence", "offloaded",
                            "offload_reason", "energy_mj", "energy_source", "skipped"}
    assert [i for i, r in enumerate(rows) if r["skipped"] is None] == processed
    assert all(r["skipped"] in (None, "unchanged") and r["energy_source"] == "estimate"
               for r in rows)
    assert all(r["energy_mj"] == 0.0 for r in rows if r["skipped"])
    last = None
    for i, r in enumerate(rows):
        last = labels[i] if r["skipped"] is None else last
        assert r["answer"] == last
    # the table: the policy's [stream] turns streaming on by itself
    code, stdout, stderr = cli("device", "run", "--data", data, "--policy", policy)
    assert code == 0, stderr
    skipped = len(windows) - len(processed)
    assert f"{len(windows)} windows" in stdout
    assert f"skipped: unchanged │ {skipped} " in stdout, stdout
    assert f"stream: {len(processed)} of {len(windows)} windows processed;" in stdout
    assert "mJ per inference (estimate: inference time x" in stdout and "saved)" in stdout
    # --stream without a [stream] table: every window runs
    policy.write_text(f'cascade = "{models["cascade"]}"\nthresholds = [inf]\n')
    code, stdout, stderr = cli("device", "run", "--data", data, "--policy", policy, "--stream")
    assert code == 0, stderr
    assert f"stream: {len(windows)} of {len(windows)} windows processed" in stdout
    assert "accuracy 100.00%" in stdout


def test_stream_over_the_device_slot_and_its_stats_api(repo) -> None:
    dev = new_device(repo)
    dev.update(repo.url, "kws")
    rt = Runtime(dev, Policy(stream=StreamRule(min_change=MIN_CHANGE)))
    windows = [X[0], X[0], X[1], X[1] * 1.001, X[2]]   # one sample each, no batch axis
    answers = list(rt.predict_stream(windows))
    assert [a.skipped for a in answers] == [None, "unchanged", None, "unchanged", None]
    assert all(a.output.shape == (1, CLASSES) and a.stage == "kws" for a in answers)
    with running(rt) as url:
        stats = httpx.get(f"{url}/v1/stats").json()
    assert stats["answers"] == 3 and stats["skipped"] == {"unchanged": 2}
    assert stats["energy"]["source"] in ("estimate", "rapl")
    assert stats["energy"]["joules"] >= 0 and stats["energy"]["per_inference_mj"] >= 0
