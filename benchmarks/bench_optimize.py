"""`edgeloop optimize` end to end, through the real CLI.

For each case: train or build the model, run `edgeloop optimize` in a subprocess with a
time budget, then in this process re-measure the chosen model against the float model and
onnxruntime's stock ``quantize_static`` (edgeloop.compress.OrtStatic) on the held-out test
split: latency as the median of interleaved repeated runs, accuracy on the test labels.
A second run is interrupted with SIGINT mid-search and must still leave best.onnx and a
valid report.json.

Add a model by appending a :class:`Case` to ``CASES``.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from _report import ROOT, claims_table, result_path, write_section

from edgeloop._onnx import load_model, session
from edgeloop.compress import OrtStatic, run_pass
from edgeloop.data import Dataset, load_builtin, load_npz, save_npz
from edgeloop.measure import LatencyConfig, fidelity, latency, predict
from edgeloop.zoo import train_zoo_model

ROUNDS = 7          # interleaved rounds; each model is timed once per round
TIMING = LatencyConfig(warmup=20, min_runs=300, max_seconds=1.5, floor_runs=50)
CLI = [sys.executable, "-c", "from edgeloop.cli import main; main()"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "EDGELOOP_QUIET": "1"}


@dataclass(frozen=True)
class Case:
    """One model to optimize: how to prepare it, and what the claim is."""

    name: str
    prepare: Callable[[Path], tuple[Path, Path, Path, Path]]   # -> model, calib, val, test
    metric: str
    max_drop: float
    batch: int                  # batch size the claim is about (the search ranks at it)
    time_budget: str = "5m"
    time_budget_s: float = 300.0
    tight_budget: str = "5s"    # a second run that must run out of time and still finish
    tight_budget_s: float = 5.0
    faster_than: str = "ort-static"   # the claim: chosen is min_speedup x faster than this
    min_speedup: float = 1.0
    one_thread: bool = False    # also time every model with one intra-op thread


def _mnist1d_cnn(work: Path) -> tuple[Path, Path, Path, Path]:
    train_zoo_model("mnist1d-cnn", work)
    paths = []
    for split in ("calib", "val", "test"):
        save_npz(work / f"{split}.npz", load_builtin("mnist1d", split))
        paths.append(work / f"{split}.npz")
    return (work / "model.onnx", *paths)  # type: ignore[return-value]


CASES = [Case("mnist1d-cnn", _mnist1d_cnn, metric="accuracy", max_drop=0.5, batch=32,
              tight_budget="1s", tight_budget_s=1.0)]   # the full search takes ~2 s


def _score(metric: str, out: np.ndarray, ref: np.ndarray, data: Dataset) -> float:
    if metric == "accuracy":
        return 100.0 * float((out.argmax(-1) == data.labels).mean())
    f = fidelity(out, ref)
    return 100.0 * f.top1_agreement if metric == "agreement" else f.mean_cosine


def _interleaved_p50(models: dict[str, Path], data: Dataset, batch: int,
                     threads: int = 0) -> dict[str, float]:
    sessions = {k: session(load_model(p), threads=threads) for k, p in models.items()}
    runs: dict[str, list[float]] = {k: [] for k in models}
    names = list(sessions)
    for r in range(ROUNDS):   # each round starts one model later: no fixed predecessor
        for k in names[r % len(names):] + names[:r % len(names)]:
            runs[k].append(latency(sessions[k], data, batch, TIMING).p50_ms)
    return {k: float(np.median(v)) for k, v in runs.items()}


def _optimize_args(case: Case, model: Path, calib: Path, val: Path, out: Path,
                   budget: str | None = None) -> list[str]:
    return [*CLI, "optimize", str(model), "--data", str(calib), "--val", str(val),
            "--metric", case.metric, "--max-drop", str(case.max_drop), "--target", "auto",
            "--time-budget", budget or case.time_budget, "--batch", str(case.batch),
            "--out", str(out)]


def _tight_run(case: Case, model: Path, calib: Path, val: Path, out: Path) -> dict[str, object]:
    """A run whose budget is too short for every candidate: it must stop in time."""
    t0 = time.monotonic()
    proc = subprocess.run(_optimize_args(case, model, calib, val, out, case.tight_budget),
                          env=ENV, text=True, capture_output=True)
    wall_s = time.monotonic() - t0
    report = json.loads((out / "report.json").read_text())
    session(load_model(out / "best.onnx"))
    return {"exit_code": proc.returncode, "wall_s": wall_s, "elapsed_s": report["elapsed_s"],
            "stopped": report["stopped"], "measured": len(report["candidates"]),
            "chosen": report["chosen"]}


def _sigint_run(case: Case, model: Path, calib: Path, val: Path, out: Path) -> dict[str, object]:
    """Interrupt a real `edgeloop optimize` after the float model and one candidate."""
    proc = subprocess.Popen(_optimize_args(case, model, calib, val, out), env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    seen = 0
    deadline = time.monotonic() + 300
    while seen < 2 and time.monotonic() < deadline:
        if select.select([proc.stderr], [], [], 1.0)[0]:
            if not proc.stderr.readline():
                break
            seen += 1
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    exit_s = time.monotonic() - t0
    try:
        report = json.loads((out / "report.json").read_text())
        session(load_model(out / "best.onnx"))
        valid = report["stopped"] == "interrupted"
        measured = len(report["candidates"])
    except Exception as e:
        valid, measured = False, 0
        stderr += f"\n{e}"
    return {"exit_code": proc.returncode, "exit_s": exit_s, "valid": valid,
            "measured": measured, "traceback": "Traceback" in stderr}


def run_case(case: Case, work: Path) -> str:
    model, calib, val, test = case.prepare(work)
    out = work / "optimize"
    t0 = time.monotonic()
    proc = subprocess.run(_optimize_args(case, model, calib, val, out), env=ENV, text=True,
                          capture_output=True)
    wall_s = time.monotonic() - t0
    if proc.returncode != 0:
        raise SystemExit(f"edgeloop optimize failed:\n{proc.stderr}")
    report = json.loads((out / "report.json").read_text())
    calib_data, test_data = load_npz(calib), load_npz(test)
    ort_static = work / "ort-static.onnx"
    run_pass(OrtStatic(), model, ort_static, calib_data)
    models = {"float": model, "chosen": out / "best.onnx", "ort-static": ort_static}
    p50 = _interleaved_p50(models, test_data, case.batch)
    p50_b1 = _interleaved_p50(models, test_data, 1) if case.batch != 1 else p50
    p50_t1 = _interleaved_p50(models, test_data, case.batch, threads=1) if case.one_thread else {}
    ref = predict(session(load_model(model)), test_data)
    score = {k: _score(case.metric, predict(session(load_model(p)), test_data), ref, test_data)
             for k, p in models.items()}
    size = {k: p.stat().st_size for k, p in models.items()}
    drop = score["float"] - score["chosen"]
    sig = _sigint_run(case, model, calib, val, work / "optimize-sigint")
    tight = _tight_run(case, model, calib, val, work / "optimize-tight")
    png = result_path(f"optimize-{case.name}-pareto", "png")
    shutil.copyfile(out / "pareto.png", png)

    unit = " pp" if case.metric in ("accuracy", "agreement") else ""
    speedup = p50[case.faster_than] / p50["chosen"]
    verdict = {
        f"chosen at least {case.min_speedup:g}x as fast as {case.faster_than} at batch "
        f"{case.batch} ({speedup:.2f}x)": speedup >= case.min_speedup,
        f"chosen within budget on the test split ({drop:.2f}{unit} <= {case.max_drop:g})":
            drop <= case.max_drop,
        f"optimize finished within its time budget ({wall_s:.1f} s <= {case.time_budget})":
            wall_s <= case.time_budget_s,
        f"with --time-budget {case.tight_budget} the search stops in time "
        f"({tight['elapsed_s']:.2f} s <= {case.tight_budget_s:g} s) and writes a valid report":
            tight["exit_code"] == 0 and tight["stopped"] == "time budget"
            and float(tight["elapsed_s"]) <= case.tight_budget_s,
        "SIGINT mid-search: exit 0, best.onnx loads, report.json valid":
            sig["exit_code"] == 0 and bool(sig["valid"]) and not sig["traceback"],
    }
    counts: dict[str, int] = {}
    for c in report["candidates"]:
        counts[c["status"]] = counts.get(c["status"], 0) + 1
    lines = [
        f"### {case.name}: `--metric {case.metric} --max-drop {case.max_drop:g} "
        f"--batch {case.batch} --time-budget {case.time_budget}`", "",
        f"optimize chose **{report['chosen'] or 'the float model'}** after measuring "
        f"{len(report['candidates'])} candidates ("
        + ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
        + f") in {report['elapsed_s']:.1f} s of search, {wall_s:.1f} s wall for the whole "
        f"command (target `{report['target']}`).", "",
        f"Re-measured here on the test split ({len(test_data)} samples); latency is the median "
        f"over {ROUNDS} interleaved rounds of the per-round p50.", "",
        f"| model | {case.metric} (test) | p50 ms @{case.batch} | "
        + ("p50 ms @1 | " if case.batch != 1 else "")
        + (f"p50 ms @{case.batch}, 1 thread | " if p50_t1 else "") + "size (bytes) |",
        "|---|---|---|" + ("---|" if case.batch != 1 else "") + ("---|" if p50_t1 else "")
        + "---|",
    ]
    for k in models:
        s = f"{score[k]:.2f}%" if unit else f"{score[k]:.5f}"
        b1 = f" {p50_b1[k]:.4f} |" if case.batch != 1 else ""
        t1 = f" {p50_t1[k]:.4f} |" if p50_t1 else ""
        lines.append(f"| {k} | {s} | {p50[k]:.4f} |{b1}{t1} {size[k]:,} |")
    lines += ["",
              f"- chosen vs ort-static at batch {case.batch}: "
              f"{p50['ort-static'] / p50['chosen']:.2f}x the speed; vs float: "
              f"{p50['float'] / p50['chosen']:.2f}x"
              + (f"; with one intra-op thread for every model: "
                 f"{p50_t1[case.faster_than] / p50_t1['chosen']:.2f}x {case.faster_than}"
                 if p50_t1 else ""),
              f"- SIGINT after {sig['measured']} measured candidates: exit code "
              f"{sig['exit_code']}, exited {sig['exit_s']:.1f} s after the signal, "
              f"report valid: {sig['valid']}",
              f"- `--time-budget {case.tight_budget}`: stopped ({tight['stopped']}) after "
              f"{tight['measured']} candidates, search {tight['elapsed_s']:.2f} s, whole "
              f"command {tight['wall_s']:.1f} s wall (Python start-up and imports come before "
              f"the budget starts), chose {tight['chosen'] or 'the float model'}", "",
              *claims_table(verdict)]
    lines += ["", f"![pareto](benchmarks/results/{png.name})", ""]
    return "\n".join(lines)


def main() -> None:
    sections = []
    for case in CASES:
        with tempfile.TemporaryDirectory(prefix="bench-optimize-") as tmp:
            sections.append(run_case(case, Path(tmp)))
            print(sections[-1], flush=True)
    write_section("optimize", "edgeloop optimize: accuracy-budgeted search",
                  "\n".join(sections))


if __name__ == "__main__":
    main()
