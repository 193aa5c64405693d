"""The monitor's parts against oracles: isotonic calibration against scikit-learn, the
binned two-sample test against scipy's contingency test, detectors on seeded streams
(quiet when clean, flagging an injected shift), persistence across a killed process,
bounded saves and memory."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import chi2_contingency
from sklearn.isotonic import IsotonicRegression

from edgeloop.errors import UsageError, VerificationError
from edgeloop.monitor import (
    Monitor,
    MonitorConfig,
    Sketch,
    drift_flag,
    fit_calibration,
    monitor_status,
)
from edgeloop.monitor.config import DETECTORS
from edgeloop.monitor.twosample import Binner, chi2_two_sample

SRC = Path(__file__).resolve().parent.parent / "src"
FEATURES, CLASSES = 12, 5
W = np.random.default_rng(0).normal(size=(FEATURES, CLASSES))
EVERY = MonitorConfig(sample_every=1)      # every call watched: sample counts are calls
# every detector, KSWIN on means of 8 samples: its 100-update window fills within 1,000
ALL = MonitorConfig(sample_every=1, detectors=DETECTORS, kswin_every=8)


def _data(n: int, seed: int, *, scale: float = 1.0, prior: np.ndarray | None = None
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inputs, logits of a fixed linear model, and labels drawn from the model's softmax
    (the model is the true posterior: calibrated wherever the inputs go). ``prior``
    resamples the stream by predicted class (a shift of the inputs, P(y | x) unchanged)."""
    rng = np.random.default_rng(seed)
    m = n if prior is None else 4 * n
    x = rng.normal(size=(m, FEATURES)).astype(np.float32) * scale
    logits = (x @ W).astype(np.float32)
    if prior is not None:
        top = logits.argmax(1)
        w = prior[top] / np.bincount(top, minlength=CLASSES)[top]
        keep = rng.choice(m, n, replace=False, p=w / w.sum())
        x, logits = x[keep], logits[keep]
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    y = (rng.random((n, 1)) > p.cumsum(1)).sum(1)
    return x, logits, y


@pytest.fixture(scope="module")
def sketch() -> Sketch:
    x, logits, y = _data(2000, 1)
    return Sketch.from_data({"x": x}, logits, y)


def _feed(m: Monitor, x: np.ndarray, logits: np.ndarray) -> Monitor:
    for i in range(len(x)):
        m.observe({"x": x[i:i + 1]}, logits[i:i + 1])
    m.process()
    return m


def test_isotonic_calibration_matches_scikit_learn() -> None:
    rng = np.random.default_rng(3)
    conf = rng.random(400)
    correct = rng.random(400) < conf ** 2
    ours = fit_calibration(conf, correct, max_knots=1000)
    ref = IsotonicRegression(out_of_bounds="clip").fit(conf, correct.astype(float))
    np.testing.assert_allclose(ours(conf), ref.predict(conf), atol=1e-12)
    few = fit_calibration(conf, correct, max_knots=16)
    assert len(few.x) <= 16 and np.all(np.diff(few.y) >= 0)
    # isotonic regression keeps the mean: the estimate on its own data is the accuracy
    assert few.estimate(conf) == pytest.approx(correct.mean(), abs=0.02)


def test_binned_test_is_the_contingency_chi_square() -> None:
    rng = np.random.default_rng(4)
    edges = np.sort(rng.normal(size=(3, 7)), 1)
    a, b = rng.normal(size=(900, 3)), rng.normal(0.2, 1.1, size=(300, 3))
    binner = Binner(edges)
    ca, cb = binner.counts(a), binner.counts(b)
    assert ca.sum() == 2700 and cb.shape == (3, 8)
    stat, p = chi2_two_sample(ca, cb)
    for j in range(3):
        keep = (ca[j] + cb[j]) > 0
        ref = chi2_contingency(np.stack([ca[j][keep], cb[j][keep]]), correction=False)
        assert stat[j] == pytest.approx(ref.statistic)
        assert p[j] == pytest.approx(ref.pvalue)


def test_binner_follows_the_edges_within_half_a_cell() -> None:
    edges = np.array([[-1.0, 0.0, 1.0]])
    binner = Binner(edges, grid=256)
    x = np.linspace(-3, 3, 6001)[:, None]
    bins = binner.counts(x)
    exact = np.bincount((x[:, 0, None] > edges[0]).sum(1), minlength=4)
    cell = 4.0 / 256               # the range is the edges padded by one bin width
    assert np.abs(bins[0] - exact).max() <= 6001 / 6 * cell


def test_clean_streams_raise_no_alert(sketch: Sketch) -> None:
    for seed in range(3):
        x, logits, _ = _data(10000, 100 + seed)
        config = MonitorConfig(sample_every=1, detectors=DETECTORS)
        m = _feed(Monitor(sketch, config=config), x, logits)
        assert m.samples_ == 10000
        assert not m.detections_, list(m.detections_)
        assert not m.flag().raised


@pytest.mark.parametrize(("shift", "detector"), [
    ({"scale": 1.6}, "chi2:inputs"),
    ({"prior": np.array([0.6, 0.1, 0.1, 0.1, 0.1])}, "chi2:class-mix"),
    ({"scale": 2.0}, "page-hinkley:entropy"),
    ({"scale": 2.0}, "adwin:confidence"),
    ({"scale": 2.0}, "kswin:confidence"),
])
def test_a_shift_is_flagged_soon_after_the_change(sketch: Sketch, shift: dict[str, object],
                                                  detector: str) -> None:
    clean = _data(3000, 7)
    after = _data(3000, 8, **shift)  # type: ignore[arg-type]
    m = _feed(Monitor(sketch, config=ALL), clean[0], clean[1])
    assert not m.flag().raised
    _feed(m, after[0], after[1])
    flag = m.flag()
    assert flag.drifted
    alert = next(a for a in flag.alerts if a.detector == detector)
    assert 3000 < alert.first_sample <= 3000 + 2 * 1024, alert     # within two blocks
    assert alert.evidence


@pytest.mark.parametrize(("shift", "moves"), [
    ({"prior": np.array([0.05, 0.05, 0.05, 0.05, 0.8])}, 0.0),
    ({"scale": 0.5}, 0.1), ({"scale": 1.5}, 0.05)])
def test_label_free_estimate_tracks_accuracy_on_shifted_streams(
        sketch: Sketch, shift: dict[str, object], moves: float) -> None:
    x, logits, y = _data(4000, 9, **shift)  # type: ignore[arg-type]
    m = _feed(Monitor(sketch, config=EVERY), x, logits)
    ends = [int(w["end_sample"]) for w in m.windows_]  # type: ignore[call-overload]
    est = np.array([w["estimated_accuracy"] for w in m.windows_])
    acc = np.array([(logits[e - int(w["samples"]):e].argmax(1)  # type: ignore[call-overload]
                     == y[e - int(w["samples"]):e]).mean()  # type: ignore[call-overload]
                    for e, w in zip(ends, m.windows_, strict=True)])
    golden = sketch.accuracy
    assert golden is not None and abs(acc.mean() - golden) >= moves     # a real change
    assert np.mean(np.abs(est - acc)) < 0.04


def test_an_accuracy_drop_is_flagged_by_the_estimate(sketch: Sketch) -> None:
    # inputs squeezed towards the decision boundaries: confidence, and accuracy, fall
    x, logits, _ = _data(2000, 10, scale=0.3)
    m = _feed(Monitor(sketch, config=EVERY), x, logits)
    assert m.flag().accuracy_drop
    assert any(a.detector == "cbpe:accuracy" for a in m.flag().alerts)


def test_state_survives_a_killed_process(sketch: Sketch, tmp_path: Path) -> None:
    """A process observes 5,000 samples and is SIGKILLed; a new monitor resumes from the
    last save, detector for detector, as an uninterrupted monitor would have been."""
    (tmp_path / "sketch.json").write_bytes(sketch.to_bytes())
    x, logits, _ = _data(8000, 11, scale=1.3)
    np.savez(tmp_path / "stream.npz", x=x, logits=logits)
    config = MonitorConfig(sample_every=1, save_every=2000, save_seconds=1e9)
    script = f"""
import os, signal, numpy as np
from edgeloop.monitor import Monitor, MonitorConfig, Sketch
s = Sketch.from_bytes(open({str(tmp_path / 'sketch.json')!r}, 'rb').read())
d = np.load({str(tmp_path / 'stream.npz')!r})
m = Monitor(s, config=MonitorConfig(sample_every=1, save_every=2000, save_seconds=1e9),
            path={str(tmp_path / 'mon')!r}, model_id="abc")
for i in range(5000):
    m.observe({{"x": d["x"][i:i + 1]}}, d["logits"][i:i + 1])
os.kill(os.getpid(), signal.SIGKILL)
"""
    run = subprocess.run([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": str(SRC)},
                         check=False, capture_output=True)
    assert run.returncode == -signal.SIGKILL, run.stderr.decode()[-2000:]
    saved = pickle.loads((tmp_path / "mon" / "state.pkl").read_bytes())
    resumed_at = saved["samples"]
    assert 2000 <= resumed_at <= 5000
    resumed = Monitor(sketch, config=config, path=tmp_path / "mon", model_id="abc")
    assert resumed._restore(saved) and resumed.samples_ == resumed_at
    # a monitor that never stopped, observed the same samples in the same blocks
    straight = _feed(Monitor(sketch, config=config), x[:resumed_at], logits[:resumed_at])
    for m in (resumed, straight):
        _feed(m, x[resumed_at:], logits[resumed_at:])
    assert resumed.samples_ == straight.samples_ == 8000
    assert list(resumed.detectors_) == list(straight.detectors_)
    for name in straight.detectors_:
        assert pickle.dumps(resumed.detectors_[name]) == pickle.dumps(straight.detectors_[name])
    assert [w["estimated_accuracy"] for w in resumed.windows_] == \
        [w["estimated_accuracy"] for w in straight.windows_]
    assert [d["sample"] for d in resumed.detections_] == \
        [d["sample"] for d in straight.detections_]
    # another model's state is not resumed
    other = Monitor(sketch, config=config, path=tmp_path / "mon", model_id="other")
    assert not other._restore(saved) and other.samples_ == 0


def test_saves_are_bounded_and_readers_see_the_flag(sketch: Sketch, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    saves = []
    m = Monitor(sketch, config=MonitorConfig(sample_every=1, save_every=4000, save_seconds=1e9),
                path=tmp_path / "monitor", model_id="abc")
    real = m._save
    monkeypatch.setattr(m, "_save", lambda: (saves.append(m.samples_), real()))
    x, logits, _ = _data(10000, 12)
    _feed(m, x, logits)
    assert len(saves) == 2                      # at 4096 and 8192 samples, nothing else
    assert monitor_status(tmp_path)["samples"] == saves[-1]
    shifted = _data(2000, 13, scale=1.6)
    _feed(m, shifted[0], shifted[1])
    flag = drift_flag(tmp_path)
    # then one save at each block that raised an alert, and no other
    assert saves[2:] == sorted({a.first_sample for a in flag.alerts})
    assert flag.drifted and flag.alerts[0].detector in DETECTORS
    assert not drift_flag(tmp_path, model_sha256="another model").raised
    m.close()
    status = monitor_status(tmp_path)
    assert status["samples"] == 12000 and status["memory_bytes"]


def test_a_block_that_does_not_fit_is_dropped_never_raised(sketch: Sketch) -> None:
    m = Monitor(sketch, config=MonitorConfig(sample_every=1, block=4, inputs_every=1))
    x, logits, _ = _data(8, 15)
    for i in range(4):
        m.observe({"x": x[i:i + 1, :5]}, logits[i:i + 1])      # 5 features, not 12
    assert m.errors_ == 1 and m.last_error_
    for i in range(4, 8):
        m.observe({"x": x[i:i + 1]}, logits[i:i + 1])
    assert m.samples_ == 4 and m.errors_ == 1 and m.status()["errors"] == 1


def test_memory_is_capped_after_every_block_without_a_folder(sketch: Sketch) -> None:
    """No folder, so no save: the cap holds all the same, block after block (ADWIN's state
    passes 1,500 bytes in its second block of this stream)."""
    cap, blocks = 1500, 20
    x, logits, _ = _data(blocks * 1024, 14)
    m = Monitor(sketch, config=MonitorConfig(sample_every=1, max_detector_bytes=cap))
    assert m.path is None
    largest, resets = [], []
    for i in range(len(x)):
        m.observe({"x": x[i:i + 1]}, logits[i:i + 1])
        if (i + 1) % 1024 == 0:                 # this call processed a block
            largest.append(max(m.memory()[name] for name in m.detectors_))
            resets.append(m.resets_.get("adwin:confidence", 0))
    assert m.samples_ == blocks * 1024 and max(largest) <= cap
    assert resets[1] == 1 and resets[-1] >= blocks // 3     # mid-stream, again and again
    status = m.status()
    assert set(status["memory_bytes"]) == {  # type: ignore[arg-type]
        "adwin:confidence", "page-hinkley:entropy", "chi2:inputs", "chi2:class-mix",
        "cbpe:accuracy"}
    assert status["memory_resets"] == m.resets_


def test_sketch_round_trip_and_malformed_bytes(sketch: Sketch) -> None:
    assert Sketch.from_bytes(sketch.to_bytes()) == sketch
    with pytest.raises(VerificationError, match="malformed"):
        Sketch.from_bytes(b'{"format": 1, "samples": 3}')
    with pytest.raises(VerificationError, match="malformed"):
        Sketch.from_bytes(b"\x00not json")


def test_configuration_errors_are_one_line() -> None:
    with pytest.raises(UsageError, match="`detectors` must be some of"):
        MonitorConfig(detectors=("adwin:loss",))
    with pytest.raises(UsageError, match="`window` must be positive"):
        MonitorConfig(window=0)
    with pytest.raises(UsageError, match="`alpha`"):
        MonitorConfig(alpha=1.5)


def test_public_names_and_no_torch() -> None:
    import edgeloop.monitor as monitor

    assert sorted(monitor.__all__) == sorted(n for n in dir(monitor) if not n.startswith("_"))
    for name in monitor.__all__:
        obj = getattr(monitor, name)
        assert not callable(obj) or obj.__doc__, name
    code = ("import sys, edgeloop.monitor.monitor, edgeloop.monitor.feedback, "
            "edgeloop.monitor.gate; sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], env={"PYTHONPATH": str(SRC)},
                          check=False).returncode == 0
