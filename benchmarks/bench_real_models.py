"""Compression on the models users bring (issue 9): every corpus model, in one run, as
fp32, onnxruntime's stock quantizers, edgeloop's ``int8`` scheme and ``edgeloop optimize``.

    python benchmarks/bench_real_models.py [--small] [--models NAME ...] [--cache DIR]
                                           [--optimize-budget 10m]

For each model of :mod:`edgeloop.zoo.corpus` (built into ``--cache``, default
``edgeloop-corpus`` in the system temp folder, and reused from there):

- **stock dynamic / stock static**: onnxruntime's ``quantize_dynamic`` and
  ``quantize_static`` with their defaults (edgeloop's ``OrtDynamic`` / ``OrtStatic``);
- **edgeloop int8**: ``edgeloop quantize --scheme int8`` with its defaults, run through
  the CLI in a subprocess as a user runs it, with its wall time and peak memory (the
  child's own high-water mark, what ``/usr/bin/time`` shows when run from a shell); an
  exit code 2 is recorded with its one-line reason;
- **optimize**: :func:`edgeloop.optimize.optimize` aiming at the claims' own bounds,
  ``--metric cosine --max-drop 0.005`` for transformers and ``--metric agreement
  --max-drop 2`` (percentage points) for classifiers, within ``--optimize-budget``.

Every method sees only the calibration split: the stock static quantizer and ``int8``
calibrate on it, and ``optimize`` ranks its candidates on it. Everything reported is
measured on the validation split, which none of them has seen: mean output cosine to fp32
(first output, whole sample), top-1 agreement for classifiers, top-10 nearest-neighbour
overlap with fp32 for sentence embedders; batch-1 and batch-32 speed-up over fp32, each
batch size timed in one interleaved run of all the entry's models; file size. The
claims "edgeloop int8 / optimize's choice at <= 1.05x stock dynamic's latency" time
those models again without the others, at batch 1: five independent interleaved runs
(fresh sessions) at every core and five at one thread, the claim judged on each thread
count's median ratio and the range shown (one run's ratio moves by about 3% on a shared
2-vCPU VM at 2 threads, sometimes more; on one thread, runs agree within ~1%).
``--small`` uses the corpus's small sizes (a quick check that every path runs; its
figures say nothing about full-size models).

Nothing is written outside ``--cache``, the system temp folder, ``benchmarks/results``
and BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from _report import ROOT, claims_table, write_section
from corpus_stats import neighbour_overlap

from edgeloop._onnx import model_bytes, session
from edgeloop._progress import quiet_libraries
from edgeloop.compress import OrtDynamic, OrtStatic, apply_pass
from edgeloop.compress.mixed import read_plan, runs_per_round
from edgeloop.data import Dataset, load_npz
from edgeloop.errors import EdgeloopError
from edgeloop.measure import fidelity, interleaved_latency, predict, thread_count
from edgeloop.optimize import OptimizeConfig, optimize, parse_duration
from edgeloop.targets import detect
from edgeloop.zoo.corpus import CORPUS, CorpusModel, build

ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "EDGELOOP_QUIET": "1"}
PEAK_FILE = "EDGELOOP_BENCH_PEAK_FILE"   # where the CLI child writes its peak memory (MB)
# The edgeloop CLI, writing its own peak memory to $EDGELOOP_BENCH_PEAK_FILE when it exits
# (sys.exit included; the CLI exits 2 on an EdgeloopError).
CLI_MEASURED = [sys.executable, "-c", (
    "import atexit, os\n"
    "from edgeloop.measure import peak_rss_mb\n"
    f"atexit.register(lambda: open(os.environ['{PEAK_FILE}'], 'w').write(str(peak_rss_mb())))\n"
    "from edgeloop.cli import main\n"
    "main()")]

FP32, STOCK_DYN, STOCK_STATIC, INT8, OPT = (
    "fp32", "stock dynamic", "stock static", "edgeloop int8", "optimize")
BATCHES = (1, 32)
ROUNDS = {1: 11, 32: 5}         # interleaved rounds per batch size
ROUND_SECONDS = {1: 0.1, 32: 0.3}   # fp32 time per model and round, to size the runs
# edgeloop's models against the stock latency reference at batch 1, alone: the claims'
# ratios, free of the cache traffic of the other models in the table's rotation. On a
# shared VM one interleaved run's ratio moves by up to ~10%, so each ratio is the median
# of several independent runs (fresh sessions), at every core and at one thread
HEAD_TO_HEAD_ROUNDS, HEAD_TO_HEAD_ROUND_SECONDS, HEAD_TO_HEAD_REPEATS = 11, 0.2, 5
HEAD_TO_HEAD_THREADS = (0, 1)     # onnxruntime intra-op threads (0: every core)
MOBILE_CNNS = ("mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0")  # the ~5 M ones
MIN_COSINE, MIN_AGREEMENT, MIN_CNN_COSINE = 0.995, 0.98, 0.99
# optimize's goal per metric, (metric, max drop in that metric's unit: percentage points
# for agreement): the claims' own bounds
OPTIMIZE_GOAL = {"cosine": ("cosine", round(1 - MIN_COSINE, 6)),
                 "agreement": ("agreement", round(100 * (1 - MIN_AGREEMENT), 6))}
STOCK_LATENCY_SLACK = 1.05
INT8_MAX_SECONDS, INT8_MAX_MB = 120.0, 2048.0
KINDS = {"encoder": "Transformer encoders (output: last hidden state)",
         "embedder": "Sentence embedders (output: mean-pooled embedding)",
         "classifier": "Classifiers (CNNs; output: logits)"}


@dataclass
class Measured:
    """One model of a corpus entry on the validation split (``None``: it failed)."""

    size_bytes: int
    cosine: float
    min_cosine: float
    agreement: float
    overlap: float | None               # top-10 neighbour overlap (embedders only)
    latency_ms: dict[int, float] = field(default_factory=dict)   # batch -> median ms


@dataclass
class CliRun:
    """``edgeloop quantize --scheme int8`` as a user sees it."""

    seconds: float
    peak_mb: float
    exit_code: int
    message: str          # the one-line reason when it failed
    leftovers: list[str]  # files it left in its (empty) working directory


@dataclass
class Result:
    """Everything measured for one corpus entry."""

    name: str
    kind: str
    params: int = 0
    models: dict[str, Measured] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)   # variant -> what / why it failed
    int8: CliRun | None = None
    optimize: dict[str, object] = field(default_factory=dict)
    # batch-1 ms of edgeloop int8, optimize's choice and their stock latency reference,
    # timed together without the other models (transformers only): threads -> one
    # {label: ms} per independent run
    head_to_head_ms: dict[int, list[dict[str, float]]] = field(default_factory=dict)

    @property
    def transformer(self) -> bool:
        return self.kind != "classifier"


# ------------------------------------------------------------------ producing models

def run_int8_cli(entry: CorpusModel, out: Path, workdir: Path, *options: str) -> CliRun:
    """``edgeloop quantize MODEL --scheme int8 [options]`` in a subprocess started in the empty
    ``workdir``: its wall time, and its peak resident memory as the child measures it at
    exit (:func:`edgeloop.measure.peak_rss_mb`, its own VmHWM). The kernel's ``ru_maxrss``
    for a child (``wait4``, ``RUSAGE_CHILDREN``) would include this process's memory at
    the fork, which is gigabytes here; ``/usr/bin/time`` escapes that only by being small."""
    peak_file = workdir.parent / "int8-peak-mb.txt"
    start = time.perf_counter()
    proc = subprocess.run(
        [*CLI_MEASURED, "quantize", str(entry.model), "--out", str(out), "--scheme", "int8",
         "--data", str(entry.calib), *options], cwd=workdir, env={**ENV, PEAK_FILE: str(peak_file)},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, errors="replace")
    seconds = time.perf_counter() - start
    lines = [s.strip() for s in proc.stderr.splitlines() if s.strip()]
    message = lines[-1].removeprefix("error: ") if proc.returncode and lines else ""
    peak = float(peak_file.read_text()) if peak_file.exists() else float("nan")
    return CliRun(seconds, peak, proc.returncode, message, sorted(os.listdir(workdir)))


def run_optimize(entry: CorpusModel, calib: Dataset, budget_s: float
                 ) -> tuple[onnx.ModelProto | None, dict[str, object]]:
    """``optimize`` with issue 9's goal for this kind of model, ranking on the calibration
    split; the chosen model (``None`` when it keeps fp32) and a summary of the search."""
    metric, max_drop = OPTIMIZE_GOAL[entry.metric]
    config = OptimizeConfig(metric=metric, max_drop=max_drop, batch=1,
                            time_budget_s=budget_s)
    result = optimize(entry.model, calib=calib, val=calib, target=detect(), config=config)
    summary: dict[str, object] = {
        "chosen": result.chosen, "stopped": result.stopped, "seconds": result.elapsed_s,
        "statuses": Counter(c.status for c in result.candidates),
        "failed": [(c.name, c.error or "") for c in result.candidates if c.status == "failed"],
        "goal": f"--metric {metric} --max-drop {max_drop:g}",
    }
    return (result.best_model if result.chosen else None), summary


def produce(entry: CorpusModel, fp32: onnx.ModelProto, calib: Dataset, budget_s: float,
            result: Result) -> dict[str, onnx.ModelProto]:
    """Every model of the comparison that could be made; why the others could not is
    noted in ``result``."""
    models = {FP32: fp32}
    for label, p in ((STOCK_DYN, OrtDynamic()), (STOCK_STATIC, OrtStatic())):
        try:
            models[label] = apply_pass(p, fp32, calib)
        except EdgeloopError as e:
            result.notes[label] = f"fails: {e}"
    print(f"  {entry.name}: edgeloop quantize --scheme int8", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-real-int8-") as tmp:
        workdir = Path(tmp) / "cwd"
        workdir.mkdir()
        out = Path(tmp) / "int8.onnx"
        result.int8 = run_int8_cli(entry, out, workdir)
        if result.int8.exit_code == 0:
            models[INT8] = onnx.load(out)
            result.notes[INT8] = _plan_note(models[INT8])
        else:
            result.notes[INT8] = f"exit {result.int8.exit_code}: {result.int8.message}"
    print(f"  {entry.name}: optimize", flush=True)
    try:
        chosen, result.optimize = run_optimize(entry, calib, budget_s)
    except EdgeloopError as e:
        result.notes[OPT] = f"fails: {e}"
        return models
    if chosen is None:
        result.notes[OPT] = (f"kept fp32: no candidate fit ({result.optimize['stopped']})")
    else:
        models[OPT] = chosen
        result.notes[OPT] = f"chose {result.optimize['chosen']}"
    return models


def _plan_note(model: onnx.ModelProto) -> str:
    plan = read_plan(model)
    if plan is None:
        return ""
    weights = "per-channel" if plan["per_channel"] else "per-tensor"
    floats = len(plan["float_nodes"])  # type: ignore[arg-type]
    scope = plan.get("scope", "all")
    return (f"{plan['preparation']}, {plan['mode']}, {weights}"
            + ("" if scope == "all" else f", {scope}")
            + (f", {floats} layers float" if floats else ""))


# ---------------------------------------------------------------------- measuring

def measure(models: dict[str, onnx.ModelProto], val: Dataset, kind: str
            ) -> dict[str, Measured]:
    """Fidelity to fp32 and size of every model, then each batch size's latencies in one
    interleaved run."""
    reference = predict(session(models[FP32]), val)
    out = {}
    for label, model in models.items():
        got = predict(session(model), val)
        f = fidelity(got, reference)
        out[label] = Measured(model_bytes(model), f.mean_cosine, f.min_cosine,
                              f.top1_agreement,
                              neighbour_overlap(got, reference) if kind == "embedder" else None)
    for batch in BATCHES:
        runs = runs_per_round(models[FP32], val, batch=batch, seconds=ROUND_SECONDS[batch])
        times = interleaved_latency(list(models.values()), val, batch=batch,
                                    rounds=ROUNDS[batch], runs=runs, warmup=3)
        for label, ms in zip(models, times, strict=True):
            out[label].latency_ms[batch] = ms
    return out


def bench_model(name: str, cache: Path, *, small: bool, budget_s: float) -> Result:
    """Build one corpus entry, make every model of the comparison, measure them."""
    print(f"== {name}", flush=True)
    result = Result(name, "classifier")
    try:
        entry = build(name, cache / ("small" if small else "") / name, small=small)
    except EdgeloopError as e:
        result.notes[FP32] = f"corpus build fails: {e}"
        return result
    result.kind = entry.kind
    fp32 = onnx.load(entry.model)
    result.params = sum(int(np.prod(i.dims)) for i in fp32.graph.initializer)
    calib, val = load_npz(entry.calib), load_npz(entry.val)
    models = produce(entry, fp32, calib, budget_s, result)
    print(f"  {name}: measuring {len(models)} models on {len(val)} validation samples",
          flush=True)
    result.models = measure(models, val, entry.kind)
    ref = _stock_reference(result)
    labels = [label for label in (INT8, OPT, ref) if label in models]
    if entry.kind != "classifier" and ref != FP32 and len(labels) > 1:
        for threads in HEAD_TO_HEAD_THREADS:
            runs = runs_per_round(models[ref], val, seconds=HEAD_TO_HEAD_ROUND_SECONDS,
                                  threads=threads)
            result.head_to_head_ms[threads] = [dict(zip(labels, interleaved_latency(
                [models[label] for label in labels], val, rounds=HEAD_TO_HEAD_ROUNDS,
                runs=runs, warmup=3, threads=threads), strict=True))
                for _ in range(HEAD_TO_HEAD_REPEATS)]
    return result


# ------------------------------------------------------------------------ report

def _speedup(r: Result, label: str, batch: int) -> float:
    return r.models[FP32].latency_ms[batch] / r.models[label].latency_ms[batch]


def kind_table(results: list[Result], kind: str) -> str:
    head = ["model", "variant", "size MB", "size vs fp32", "mean cosine", "min cosine"]
    if kind == "classifier":
        head.append("top-1 agreement")
    if kind == "embedder":
        head.append("top-10 NN overlap")
    head += ["batch-1 speed-up", "batch-32 speed-up", "notes"]
    lines = [f"### {KINDS[kind]}", "", "| " + " | ".join(head) + " |",
             "|" + "---|" * len(head)]
    for r in results:
        if r.kind != kind:
            continue
        for label in (FP32, STOCK_DYN, STOCK_STATIC, INT8, OPT):
            m = r.models.get(label)
            if m is None:
                cells = [r.name, label, *["-"] * (len(head) - 3), r.notes.get(label, "")]
            else:
                base = r.models[FP32]
                cells = [r.name, label, f"{m.size_bytes / 1e6:.2f}",
                         f"{m.size_bytes / base.size_bytes:.2f}x", f"{m.cosine:.5f}",
                         f"{m.min_cosine:.5f}"]
                if kind == "classifier":
                    cells.append(f"{m.agreement:.3f}")
                if kind == "embedder":
                    cells.append(f"{m.overlap:.3f}")
                for b in BATCHES:
                    cells.append(f"{m.latency_ms[b]:.3g} ms" if label == FP32
                                 else f"{_speedup(r, label, b):.2f}x")
                cells.append(r.notes.get(label, ""))
            lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def int8_table(results: list[Result]) -> str:
    lines = ["### `edgeloop quantize --scheme int8` as a user runs it", "",
             "| model | parameters (M) | wall time (s) | peak memory (MB) | exit code | "
             "result | files left in the working directory |", "|---|---|---|---|---|---|---|"]
    for r in results:
        if r.int8 is None:
            continue
        c = r.int8
        lines.append(f"| {r.name} | {r.params / 1e6:.2f} | {c.seconds:.1f} | {c.peak_mb:.0f} "
                     f"| {c.exit_code} | {r.notes[INT8].replace('|', '/')} | "
                     f"{', '.join(c.leftovers) or 'none'} |")
    return "\n".join(lines) + "\n"


def optimize_table(results: list[Result]) -> str:
    lines = ["### `optimize` searches", "",
             "| model | goal | chosen | fits / over budget / not faster / failed | stopped "
             "| time (s) |", "|---|---|---|---|---|---|"]
    failures = []
    for r in results:
        o = r.optimize
        if not o:
            continue
        n = o["statuses"]
        assert isinstance(n, Counter)
        lines.append(f"| {r.name} | `{o['goal']}` | {o['chosen'] or 'fp32 kept'} | "
                     f"{n['fits']} / {n['over budget']} / {n['not faster']} / {n['failed']} "
                     f"| {o['stopped']} | {o['seconds']:.0f} |")
        failures += [f"- {r.name}, {cand}: {error}"
                     for cand, error in o["failed"]]  # type: ignore[attr-defined]
    if failures:
        lines += ["", "Candidates that failed (one line each, as `optimize` reports them):",
                  "", *failures]
    return "\n".join(lines) + "\n"


def _every(results: list[Result], check: Callable[[Result], tuple[bool, str]]
           ) -> tuple[bool, str]:
    """Whether ``check`` holds on every result, and each result's figure."""
    outcomes = [(r.name, *check(r)) for r in results]
    figures = "; ".join(f"{name} {text}" + ("" if ok else " **(no)**")
                        for name, ok, text in outcomes)
    return all(ok for _, ok, _ in outcomes), figures


def _stock_reference(r: Result) -> str:
    """The latency reference of the stock claim: stock dynamic, or where it fails the
    fastest stock quantizer that works, or fp32 when neither does."""
    stock = [label for label in (STOCK_DYN, STOCK_STATIC) if label in r.models]
    return STOCK_DYN if STOCK_DYN in r.models else min(
        stock, key=lambda s: r.models[s].latency_ms[1], default=FP32)


def _beats_stock(label: str) -> Callable[[Result], tuple[bool, str]]:
    """Whether ``label``'s model is at least as faithful as the best stock quantizer at
    no more than STOCK_LATENCY_SLACK times the stock reference's batch-1 latency."""
    def check(r: Result) -> tuple[bool, str]:
        if label not in r.models:
            return False, r.notes.get(label, "not measured")
        best = max((r.models[s].cosine for s in (STOCK_DYN, STOCK_STATIC) if s in r.models),
                   default=-1.0)
        ref = _stock_reference(r)
        in_table = r.models[label].latency_ms[1] / r.models[ref].latency_ms[1]
        ratios = {threads: [run[label] / run[ref] for run in runs]
                  for threads, runs in r.head_to_head_ms.items() if label in runs[0]}
        ours = r.models[label].cosine
        if not ratios:
            return (ours >= best and in_table <= STOCK_LATENCY_SLACK,
                    f"cos {ours:.4f} vs {best:.4f}, {in_table:.2f}x {ref}'s batch-1 latency")
        timed = ", ".join(
            f"{float(np.median(v)):.2f}x ({min(v):.2f}-{max(v):.2f}) at "
            f"{thread_count(threads)}" for threads, v in ratios.items())
        return (ours >= best and all(float(np.median(v)) <= STOCK_LATENCY_SLACK
                                     for v in ratios.values()),
                f"cos {ours:.4f} vs {best:.4f}; batch-1 latency over {ref}'s: {timed} "
                f"(median and range of {HEAD_TO_HEAD_REPEATS} runs without the other "
                f"models); {in_table:.2f}x in the table's rotation")
    return check


def _fidelity_at_least(label: str, attr: str, bound: float) -> Callable[[Result], tuple[
        bool, str]]:
    def check(r: Result) -> tuple[bool, str]:
        if label not in r.models:
            return False, r.notes.get(label, "not measured")
        value = getattr(r.models[label], attr)
        return value >= bound, f"{value:.4f}"
    return check


def _chosen_not_slower(r: Result) -> tuple[bool, str]:
    chosen = [label for label in (INT8, OPT) if label in r.models]
    if not chosen:
        return True, "nothing chosen"
    speed = {label: _speedup(r, label, 1) for label in chosen}
    return (min(speed.values()) >= 1.0,
            ", ".join(f"{label} {s:.2f}x" for label, s in speed.items()))


def _some_candidate(r: Result) -> tuple[bool, str]:
    made = [label for label in (INT8, OPT) if label in r.models]
    return bool(made), " and ".join(made) if made else "int8 and optimize both fail"


def _int8_cost(r: Result) -> tuple[bool, str]:
    c = r.int8
    if c is None:
        return False, "not run"
    return (c.seconds <= INT8_MAX_SECONDS and c.peak_mb <= INT8_MAX_MB,
            f"{c.seconds:.0f} s, {c.peak_mb:.0f} MB ({r.params / 1e6:.1f} M parameters"
            + (f", exit {c.exit_code}" if c.exit_code else "") + ")")


def claims(results: list[Result]) -> dict[str, bool]:
    """Issue 9's claims, each computed from the figures above."""
    built = [r for r in results if FP32 in r.models]
    text = [r for r in built if r.transformer]
    cnns = [r for r in built if not r.transformer]
    mobile = [r for r in cnns if r.name in MOBILE_CNNS]
    rows = [
        (text, _beats_stock(INT8),
         "edgeloop int8's mean cosine >= the best stock quantizer's at <= "
         f"{STOCK_LATENCY_SLACK:g}x stock dynamic's batch-1 latency, on every transformer"),
        (text, _beats_stock(OPT),
         "optimize's choice: mean cosine >= the best stock quantizer's at <= "
         f"{STOCK_LATENCY_SLACK:g}x stock dynamic's batch-1 latency, on every transformer"),
        (text, _fidelity_at_least(INT8, "cosine", MIN_COSINE),
         f"edgeloop int8's mean cosine >= {MIN_COSINE} on every transformer"),
        (text, _fidelity_at_least(OPT, "cosine", MIN_COSINE),
         f"optimize chooses a compressed model with mean cosine >= {MIN_COSINE} on every "
         "transformer"),
        (cnns, _fidelity_at_least(INT8, "agreement", MIN_AGREEMENT),
         f"edgeloop int8's top-1 agreement >= {MIN_AGREEMENT} on every CNN"),
        (cnns, _fidelity_at_least(INT8, "cosine", MIN_CNN_COSINE),
         f"edgeloop int8's logit cosine >= {MIN_CNN_COSINE} on every CNN"),
        (cnns, _fidelity_at_least(OPT, "agreement", MIN_AGREEMENT),
         f"optimize chooses a compressed model with top-1 agreement >= {MIN_AGREEMENT} on "
         "every CNN"),
        (built, _chosen_not_slower,
         "no chosen model (edgeloop int8, optimize's choice) is slower than fp32 at batch 1"),
        (results, _some_candidate,
         "no corpus model where every candidate fails (int8 or optimize gives a model)"),
        (mobile, _int8_cost,
         f"`--scheme int8` takes <= {INT8_MAX_SECONDS / 60:.0f} min and <= "
         f"{INT8_MAX_MB / 1024:.0f} GB on the mobile CNNs ({', '.join(MOBILE_CNNS)})"),
    ]
    verdict = {}
    for subset, check, claim in rows:
        if subset:   # a claim about a kind of model this run did not include is left out
            holds, figures = _every(subset, check)
            verdict[f"{claim}: {figures}"] = holds
    return verdict


def report(results: list[Result], *, small: bool, budget: str, seconds: float) -> str:
    target = detect()
    intro = (f"Target profile: `{target.name}` ({target.description}). Corpus at its "
             f"{'small (`--small`: a quick check, not representative)' if small else 'full'}"
             f" size; optimize budget {budget} per model; whole run {seconds / 60:.1f} min. "
             "Every method sees only the calibration split; every figure is measured on the "
             "validation split. Speed-ups are fp32's median latency over the model's, each "
             "batch size timed in one interleaved run of all the models of that entry "
             "(default onnxruntime threads); the fp32 rows give its latency in ms. The "
             "claims comparing edgeloop's latency with stock dynamic's time edgeloop int8, "
             "optimize's choice and stock dynamic again, without the other models, in "
             f"{HEAD_TO_HEAD_REPEATS} independent interleaved runs (fresh sessions) at every "
             "core and at one thread; a claim holds when the median ratio at both thread "
             "counts is within the bound.\n")
    kinds = [k for k in KINDS if any(r.kind == k for r in results)]
    return "\n".join([intro, *(kind_table(results, k) for k in kinds), int8_table(results),
                      optimize_table(results), "### Claims", "",
                      "\n".join(claims_table(claims(results)))])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=CORPUS, default=list(CORPUS),
                        metavar="NAME", help="corpus models (default: all)")
    parser.add_argument("--small", action="store_true",
                        help="the corpus's small sizes (a quick check)")
    parser.add_argument("--cache", type=Path,
                        default=Path(tempfile.gettempdir()) / "edgeloop-corpus",
                        help="where corpus models are built and reused")
    parser.add_argument("--optimize-budget", default="10m",
                        help="time budget of each optimize search (e.g. 90s, 10m)")
    args = parser.parse_args()
    budget_s = parse_duration(args.optimize_budget)
    quiet_libraries()
    start = time.perf_counter()
    results = [bench_model(name, args.cache.resolve(), small=args.small, budget_s=budget_s)
               for name in args.models]
    body = report(results, small=args.small, budget=args.optimize_budget,
                  seconds=time.perf_counter() - start)
    print(body, flush=True)
    write_section("real_models", "Compression on the model corpus: fp32, stock onnxruntime, "
                  "edgeloop int8, optimize", body)


if __name__ == "__main__":
    main()
