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
to the same section, and :func:`bad_input_part` sends each kind of bad input once to a
real collector and the real CLI and shows what comes back and that nothing is stored or
spent.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import httpx  # noqa: E402
from _fleet import collector_load, fleet_estimates  # noqa: E402
from _report import claims_table, write_section  # noqa: E402

from edgeloop._onnx import runner, session  # noqa: E402
from edgeloop.data import Dataset, load_builtin  # noqa: E402
from edgeloop.measure import interleaved_times, predict  # noqa: E402
from edgeloop.monitor import Monitor, MonitorConfig, Sketch, sketch_bundle  # noqa: E402
from edgeloop.monitor.config import DEFAULT_DETECTORS, DETECTORS  # noqa: E402
from edgeloop.monitor.telemetry import Budget, Observation, Reporter, read_key  # noqa: E402
from edgeloop.monitor.telemetry.client import (  # noqa: E402
    DEVICE_HEADER,
    KEY_FILE,
    LEDGER_FILE,
    OUTBOX,
    REPORTS_PATH,
    SIGNATURE_HEADER,
)
from edgeloop.monitor.telemetry.report import sign  # noqa: E402
from edgeloop.serve.loadgen import ServerProcess  # noqa: E402
from edgeloop.serve.telemetry_store import TelemetryStore  # noqa: E402

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


def _snapshot(*paths: Path) -> dict[Path, bytes]:
    """Every file at or under ``paths`` (missing ones: nothing), with its bytes."""
    files = [f for p in paths for f in ([p] if p.is_file() else sorted(p.rglob("*")))]
    return {f: f.read_bytes() for f in files if f.is_file()}


def _outbox_entry(dev: Path) -> tuple[bytes, str]:
    """The one report waiting in a device's outbox: its body and signature."""
    [path] = Reporter(dev).pending()
    entry = json.loads(path.read_bytes())
    return entry["body"].encode(), entry["signature"]


def bad_input_part() -> tuple[list[str], dict[str, bool]]:
    """Each kind of bad input once: over HTTP to ``edgeloop telemetry serve`` (its own
    process, SQLite) and through ``edgeloop device report`` (a subprocess from a scratch
    folder) on a real device (``Device.init``, enrolled, the owner's budget ε 1.5 a day,
    one valid report of ε 1 stored). Per case: the answer, its message, the rows stored
    before and after, and whether the device's ledger and outbox (and, for the folder
    that is not a device, that folder) are byte-identical after."""
    from edgeloop.bundle import Device, init_repo

    with tempfile.TemporaryDirectory(prefix="edgeloop-bad-") as tmp:
        work = Path(tmp)
        dev, stranger, plain, cwd = (work / n for n in ("dev", "stranger", "plain", "cwd"))
        root = init_repo(work / "repo", keys=work / "keys")
        for d in (dev, stranger):
            Device.init(d, trusted_root=root)
            Reporter(d).set_budget(Budget(1.5, 86400))
        plain.mkdir()
        (plain / "notes.txt").write_text("a folder, not a device\n")
        cwd.mkdir()
        db = str(work / "t.db")
        store = TelemetryStore(db)
        key = read_key(dev / KEY_FILE)
        store.enroll(key)
        obs = Observation(class_counts=[5, 1, 0], drift=True, mean_confidence=0.9)
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "EDGELOOP_QUIET": "1"}
        with ServerProcess.collector(db) as collector:
            url = collector.url
            Reporter(dev).prepare(obs, epsilon=1.0)
            body, signature = _outbox_entry(dev)          # the valid report, as sent
            assert Reporter(dev).flush(url) == 1
            Reporter(stranger).prepare(obs, epsilon=1.0)  # never enrolled
            alien, alien_sig = _outbox_entry(stranger)
            next_body = body.replace(b'"seq":1', b'"seq":2')

            def post(content: bytes, device: str, sig: str) -> tuple[int, str]:
                r = httpx.post(url + REPORTS_PATH, content=content, timeout=10,
                               headers={DEVICE_HEADER: device, SIGNATURE_HEADER: sig})
                return r.status_code, str(r.json().get("error", ""))

            def cli(state: Path, *extra: str) -> tuple[int, str]:
                p = subprocess.run([sys.executable, "-m", "edgeloop", "device", "report",
                                    str(state), "--to", url, *extra], cwd=cwd, env=env,
                                   capture_output=True, text=True, timeout=60, check=False)
                return p.returncode, p.stderr

            report = "`device report STATE --to URL --epsilon {} --drift`"
            cases: list[tuple[str, str, Callable[[], tuple[int, str]], list[Path]]] = [
                ("HTTP: not JSON", "`{not json`, signed with the device's key",
                 lambda: post(b"{not json", key.device, sign(b"{not json", key.key)), []),
                ("HTTP: wrong key", "report 2 of the device, signed with another 32-byte key",
                 lambda: post(next_body, key.device, sign(next_body, secrets.token_bytes(32))),
                 []),
                ("HTTP: replay", "report 1 again, body and signature as the device sent them",
                 lambda: post(body, key.device, signature), []),
                ("HTTP: unknown device", "a report signed by a device never enrolled",
                 lambda: post(alien, read_key(stranger / KEY_FILE).device, alien_sig), []),
                ("CLI: ε = 0", report.format(0),
                 lambda: cli(dev, "--epsilon", "0", "--drift"), []),
                ("CLI: ε = -1", report.format(-1),
                 lambda: cli(dev, "--epsilon", "-1", "--drift"), []),
                ("CLI: not a device", report.format(0.1) + " on a folder with one text file",
                 lambda: cli(plain, "--epsilon", "0.1", "--drift"), [plain]),
                ("CLI: budget spent", report.format(1) + " (ε 1 of 1.5 spent today)",
                 lambda: cli(dev, "--epsilon", "1", "--drift"), []),
            ]
            rows, kept, answered = [], [], []
            for name, sent, send, more in cases:
                watched = [dev / LEDGER_FILE, dev / OUTBOX, *more]
                before, count = _snapshot(*watched), store.count()
                code, message = send()
                after, count_after = _snapshot(*watched), store.count()
                lines = message.strip().splitlines()
                http = name.startswith("HTTP")
                answered.append((400 <= code < 500 if http else code == 2) and len(lines) == 1)
                kept.append(before == after and (dev / LEDGER_FILE) in before)
                shown = (lines[0] if lines else "(none)").replace(tmp, "$TMP")
                rows.append(f"| {name} | {sent} | {'HTTP ' if http else 'exit '}{code} | "
                            f"{shown} | {count} → {count_after} | "
                            f"{'yes' if kept[-1] else '**no**'} |")
            stored = store.seqs()
        store.close()
        outbox = len(Reporter(dev).pending())
    lines = ["### Bad input", "",
             "One device made with `Device.init`, enrolled, its owner's budget ε 1.5 per day, "
             "one valid report (ε 1) stored by `edgeloop telemetry serve` (its own process, "
             "SQLite); then each bad input once, over HTTP or through `edgeloop device "
             "report` run as a subprocess. Rows: reports in the collector's database before "
             "and after. Device state: the ε ledger (`privacy.json`) and the outbox (empty "
             "throughout: the valid report was delivered, and a bad input must add none) "
             "byte-identical after the case; for the folder that is not a device, that "
             "folder too.", "",
             "| case | sent | answer | message (first line) | rows stored | device state "
             "unchanged |", "|---|---|---|---|---|---|", *rows, ""]
    claims = {
        f"every bad input ({len(cases)} cases) is answered with an HTTP 4xx or CLI exit 2 "
        "and a one-line message": all(answered),
        f"nothing stored: the collector holds the one valid report only "
        f"({len(stored)} row)": stored == {(key.device, 1)},
        "the device's ledger and outbox are byte-identical after every bad input (and the "
        f"folder that is not a device is left as it was; {outbox} report(s) waiting)":
            all(kept) and outbox == 0,
    }
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
                             lambda a: collector_load(a.quick),
                             lambda a: bad_input_part()]
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
