"""On-device monitoring: drift detection delay and false alarms, memory, cost per
inference, and the label-free accuracy estimate, on MNIST-1D with injected shifts.

A small MNIST-1D CNN is trained (zoo trainer, 4 epochs); its reference sketch and CBPE
calibration come from the built-in test split (the golden set a publisher holds). The
device's stream is drawn from a fresh pool of MNIST-1D samples (``mnist1d`` generator,
another seed) and shifted from a change point on:

- additive noise (Gaussian, 0.5 x the data's standard deviation), amplitude scaling
  (x 1.5), time shift (the sequence moved 6 steps, edge values repeated), class-prior
  shift (classes 0-2 make 60% of the stream instead of 30%);
- abrupt (every sample after the change is shifted) and gradual (each sample is shifted
  with a probability rising linearly from 0 to 1 over 2,000 samples).

Per detector and signal, over 20 seeds: detection delay (samples after the change until
the detector's first detection within 5,000 samples; missed otherwise) and false alarms
per 10,000 clean inputs; each detector's memory; the monitor's cost per inference as a
share of the model's own batch-1 latency (timed in turns,
:func:`edgeloop.measure.interleaved_times`); the label-free estimate against the true
accuracy per 500-sample window of shifted streams (mean absolute error), beside the raw
uncalibrated confidence.

Usage: ``python benchmarks/bench_monitor.py [--seeds 20] [--quick]``. ``--quick`` (3
seeds, short streams, fewer timing rounds; under a minute) prints the section and
writes nothing. The fleet side (``_fleet.py``: local-DP fleet estimates against the
truth, the ε ledger, the collector under load on SQLite and PostgreSQL) adds its parts
to the same section.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _fleet import collector_load, fleet_estimates  # noqa: E402
from _report import claims_table, write_section  # noqa: E402

from edgeloop._onnx import runner, session  # noqa: E402
from edgeloop.data import Dataset, load_builtin  # noqa: E402
from edgeloop.measure import interleaved_times, predict  # noqa: E402
from edgeloop.monitor import Monitor, MonitorConfig, Sketch, sketch_bundle  # noqa: E402
from edgeloop.monitor.config import DEFAULT_DETECTORS, DETECTORS  # noqa: E402

Part = Callable[[argparse.Namespace], tuple[list[str], dict[str, bool]]]

SHIFTS = ("noise", "scale", "time-shift", "class-prior")
CHANGE = 2000          # clean samples before the change
HORIZON = 5000         # samples after it in which a detection counts
RAMP = 2000            # a gradual shift's length
CLEAN = 10000          # clean samples per seed for false alarms
WINDOW = 500          # the label-free estimate is scored per window of this size


@dataclass
class Setup:
    model: Path
    sketch: Sketch
    pool: Dataset        # fresh samples, the device's clean stream
    std: float


def _pool(n: int) -> Dataset:
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples, args.seed, args.train_split = n + 10, 7, 0.999
    d = make_dataset(args)
    return Dataset({"x": d["x"][:n].astype(np.float32)}, d["y"][:n].astype(np.int64))


def setup(work: Path, pool_size: int) -> Setup:
    from edgeloop.zoo import TrainConfig, train_zoo_model

    train_zoo_model("mnist1d-cnn", work, config=TrainConfig(epochs=4))
    golden = load_builtin("mnist1d", "test")
    model = work / "model.onnx"
    pool = _pool(pool_size)
    return Setup(model, sketch_bundle(model, golden), pool, float(pool.inputs["x"].std()))


def shifted(s: Setup, kind: str, rng: np.random.Generator, n: int) -> Dataset:
    """``n`` pool samples with shift ``kind`` applied to every one."""
    x, y = s.pool.inputs["x"], s.pool.labels
    assert y is not None
    if kind == "class-prior":
        w = np.where(y < 3, 0.6 / 3, 0.4 / 7)         # classes 0-2: 60% of the stream
        w = w / np.bincount(y, minlength=10)[y] * (1 / w.sum() * len(y)) / len(y)
        idx = rng.choice(len(y), n, p=w / w.sum())
        return Dataset({"x": x[idx]}, y[idx])
    idx = rng.integers(0, len(y), n)
    xs = x[idx].copy()
    if kind == "noise":
        xs += rng.normal(0, 0.5 * s.std, xs.shape).astype(np.float32)
    elif kind == "scale":
        xs *= 1.5
    elif kind == "time-shift":
        xs = np.concatenate([np.repeat(xs[:, :1], 6, 1), xs[:, :-6]], 1)
    return Dataset({"x": xs}, y[idx])


def stream(s: Setup, kind: str, gradual: bool, seed: int) -> Dataset:
    """CHANGE clean samples, then HORIZON shifted ones (abrupt or gradual)."""
    rng = np.random.default_rng(seed)
    clean = s.pool.take(rng.integers(0, len(s.pool), CHANGE + HORIZON))
    after = shifted(s, kind, rng, HORIZON)
    take = (np.ones(HORIZON, bool) if not gradual
            else rng.random(HORIZON) < np.minimum(1, (np.arange(HORIZON) + 1) / RAMP))
    x, y = clean.inputs["x"].copy(), clean.labels.copy()  # type: ignore[union-attr]
    x[CHANGE:][take], y[CHANGE:][take] = after.inputs["x"][take], after.labels[take]  # type: ignore[index]
    return Dataset({"x": x}, y)


def watch(s: Setup, data: Dataset, outputs: np.ndarray, config: MonitorConfig) -> Monitor:
    """Every sample through a monitor, one observe per sample as the runtime calls it."""
    m = Monitor(s.sketch, config=config)
    x = data.inputs["x"]
    for i in range(len(x)):
        m.observe({"x": x[i:i + 1]}, outputs[i:i + 1])
    m.process()
    return m


def detection_part(args: argparse.Namespace, s: Setup, sess: object
                   ) -> tuple[list[str], dict[str, bool]]:
    config = MonitorConfig(detectors=DETECTORS)
    infer = runner(sess)  # type: ignore[arg-type]
    answer = lambda feed: infer(feed)[0]  # noqa: E731
    false: dict[str, list[int]] = {d: [] for d in DETECTORS}
    memory: dict[str, int] = {d: 0 for d in DETECTORS}
    for seed in range(args.seeds):
        data = s.pool.take(np.random.default_rng(1000 + seed).integers(0, len(s.pool),
                                                                         args.clean))
        m = watch(s, data, predict(answer, data), config)
        for d in DETECTORS:
            false[d].append(sum(e["detector"] == d for e in m.detections_))
        for d, b in m.memory().items():
            memory[d] = max(memory[d], b)
    delays: dict[tuple[str, str, bool], list[float]] = {}
    maes: dict[str, list[float]] = {"cbpe": [], "raw": []}
    mae_by_shift: dict[str, list[float]] = {}
    for kind in SHIFTS:
        for gradual in (False, True):
            for seed in range(args.seeds):
                data = stream(s, kind, gradual, seed)
                out = predict(answer, data)
                m = watch(s, data, out, config)
                for d in DETECTORS:
                    # a detection's sample counts watched samples: every k-th input
                    hits = [at for e in m.detections_ if e["detector"] == d
                            and (at := e["sample"] * config.sample_every) > CHANGE]
                    delays.setdefault((d, kind, gradual), []).append(
                        hits[0] - CHANGE if hits else np.inf)
                if not gradual:
                    err = _estimate_errors(s, data, out)
                    maes["cbpe"].extend(err[0])
                    maes["raw"].extend(err[1])
                    mae_by_shift.setdefault(kind, []).extend(err[0])
    lines = ["### Drift detection (MNIST-1D CNN, injected shifts)", "",
             f"{args.seeds} seeds. Delay: median samples after the change until the "
             f"detector's first detection (detected: share of streams with one within "
             f"{HORIZON:,} samples). The monitor (default settings) watches one "
             f"input in {config.sample_every}, processes blocks of {config.block} watched "
             f"inputs and closes a window at the first block end after {config.window} "
             "watched inputs, so a delay is at least the rest of the block (river's "
             "detectors) or of the window (windowed tests), in inputs. False alarms: "
             "detections per 10,000 clean inputs (mean). Default detectors in bold; all in "
             "one monitor per stream.", "",
             "| detector | " + " | ".join(f"{k} {'gradual' if g else 'abrupt'}"
                                         for k in SHIFTS for g in (False, True))
             + " | false alarms / 10k | memory (bytes) |",
             "|---|" + "---|" * (2 * len(SHIFTS) + 2)]
    for d in DETECTORS:
        cells = []
        for kind in SHIFTS:
            for g in (False, True):
                v = np.array(delays[(d, kind, g)])
                hit = np.isfinite(v)
                cells.append(f"{np.median(v[hit]):.0f} ({hit.mean():.0%})" if hit.any()
                             else "- (0%)")
        fa = 1e4 * np.mean(false[d]) / args.clean
        name = f"**{d}**" if d in DEFAULT_DETECTORS else d
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {fa:.2f} | {memory[d]:,} |")
    default_fa = {d: 1e4 * np.mean(false[d]) / args.clean for d in DEFAULT_DETECTORS}
    detected_any = {
        (kind, g): np.mean([any(np.isfinite(delays[(d, kind, g)][i]) for d in DEFAULT_DETECTORS)
                            for i in range(args.seeds)])
        for kind in SHIFTS for g in (False, True)}
    lines += ["", "Label-free accuracy estimate (CBPE, calibrated on the golden set) against "
              "the true accuracy, per 500-sample window after an abrupt change, mean absolute "
              "error: " + ", ".join(f"{k} {np.mean(v):.3f}" for k, v in mae_by_shift.items())
              + f"; all shifts {np.mean(maes['cbpe']):.3f} (the raw mean confidence: "
              f"{np.mean(maes['raw']):.3f}).", ""]
    claims = {
        f"every abrupt shift is detected by a default detector in >= 90% of seeds "
        f"(worst {min(v for (k, g), v in detected_any.items() if not g):.0%})":
            all(v >= 0.9 for (k, g), v in detected_any.items() if not g),
        f"default detectors raise <= 1 false alarm per 10,000 clean inputs each "
        f"(worst {max(default_fa.values()):.2f})": max(default_fa.values()) <= 1.0,
        f"every detector's state is <= 16 KiB (largest {max(memory.values()):,} bytes)":
            max(memory.values()) <= 16384,
        f"label-free estimate within 0.05 of the true accuracy under the class-prior shift, "
        f"where CBPE's assumptions hold (MAE {np.mean(mae_by_shift['class-prior']):.3f})":
            float(np.mean(mae_by_shift["class-prior"])) <= 0.05,
        "where the label-free estimate is off by more than 0.05 (covariate shifts: "
        + ", ".join(f"{k} {np.mean(v):.3f}" for k, v in mae_by_shift.items()
                    if np.mean(v) > 0.05)
        + "), a default detector flags >= 90% of the streams":
            all(detected_any[(k, False)] >= 0.9 for k, v in mae_by_shift.items()
                if np.mean(v) > 0.05),
    }
    return lines, claims


def _estimate_errors(s: Setup, data: Dataset, out: np.ndarray
                     ) -> tuple[list[float], list[float]]:
    """Per window after the change: |CBPE estimate - accuracy|, |mean confidence -
    accuracy|."""
    from edgeloop.monitor.signals import output_signals

    sig = output_signals(out, probabilities=s.sketch.probabilities)
    correct = sig.classes == data.labels
    cal = s.sketch.calibration
    assert cal is not None
    a, b = [], []
    for start in range(CHANGE, len(data) - WINDOW + 1, WINDOW):
        w = slice(start, start + WINDOW)
        acc = correct[w].mean()
        a.append(abs(cal.estimate(sig.confidence[w]) - acc))
        b.append(abs(sig.confidence[w].mean() - acc))
    return a, b


def cost_part(args: argparse.Namespace, s: Setup, sess: object
              ) -> tuple[list[str], dict[str, bool]]:
    """The monitor's mean cost per inference: each timed call runs a whole block of
    batch-1 inferences (so a monitored call includes the block's processing once), alone
    and with ``Monitor.observe`` after each inference, timed in turns."""
    x = s.pool.inputs["x"]
    config = MonitorConfig()
    block = config.block * config.sample_every      # calls per processed block
    feeds = [{"x": x[j:j + 1]} for j in (i % len(x) for i in range(8 * block))]  # cyclic
    monitors = {"default": Monitor(s.sketch, config=config),
                "all (with KSWIN)": Monitor(s.sketch,
                                            config=MonitorConfig(detectors=DETECTORS))}
    turn = {"i": 0}

    def next_block() -> list[dict[str, np.ndarray]]:
        i = turn["i"] = (turn["i"] + block) % len(feeds)
        return feeds[i:i + block]

    infer = runner(sess)  # type: ignore[arg-type]    # the device runtime's own call

    def model() -> None:
        for feed in next_block():
            infer(feed)

    def watched(m: Monitor) -> Callable[[], None]:
        def call() -> None:
            for feed in next_block():
                m.observe(feed, infer(feed)[0])
        return call

    rounds, runs = (5, 4) if args.quick else (15, 8)
    times = interleaved_times([model, *(watched(m) for m in monitors.values())],
                              rounds=rounds, runs=runs, warmup=2)
    per = [t / block * 1e3 for t in times]        # us per inference
    share = {name: (t - per[0]) / per[0] for name, t in zip(monitors, per[1:], strict=True)}
    lines = ["### Cost per inference", "",
             f"Batch-1 CNN inference alone: {per[0]:.1f} us. Each timed call runs {block} "
             f"inferences (the monitor watches one call in {config.sample_every} and "
             f"processes blocks of {config.block} watched calls, so the block's processing "
             f"is in every monitored call), {rounds} rounds x {runs} calls timed in turns "
             "(`interleaved_times`); per inference:", "",
             "| detectors | us per inference | monitor's share of the model's latency |",
             "|---|---|---|", f"| none (model alone) | {per[0]:.2f} | |"]
    for (name, sh), t in zip(share.items(), per[1:], strict=True):
        lines.append(f"| {name} | {t:.2f} | {sh:+.1%} |")
    lines.append("")
    claims = {f"default detectors cost <= 5% of the model's latency on average "
              f"({share['default']:.1%})": share["default"] <= 0.05}
    return lines, claims


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--quick", action="store_true",
                        help="3 seeds, shorter streams; prints, writes nothing")
    args = parser.parse_args()
    if args.quick:
        args.seeds = min(args.seeds, 3)
    args.clean = 5000 if args.quick else CLEAN
    with tempfile.TemporaryDirectory() as tmp:
        s = setup(Path(tmp), 8000 if args.quick else 30000)
        sess = session(s.model, threads=1)
        parts: list[Part] = [lambda a: detection_part(a, s, sess),
                             lambda a: cost_part(a, s, sess),
                             lambda a: fleet_estimates(a.quick),
                             lambda a: collector_load(a.quick)]
        lines: list[str] = []
        claims: dict[str, bool] = {}
        for part in parts:
            more_lines, more_claims = part(args)
            lines += more_lines
            claims.update(more_claims)
    body = "\n".join([*lines, "", *claims_table(claims)])
    print(body)
    if not args.quick:
        write_section("monitor", "Monitoring: drift on the device, private telemetry, the "
                      "fleet collector", body)


if __name__ == "__main__":
    main()
