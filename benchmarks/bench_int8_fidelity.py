"""Where int8 fidelity goes on the corpus CNNs: weight rounding (nearest vs GPTQ) against
activation rounding, and ``--scheme int8`` as a user runs it, GPTQ included.

    python benchmarks/bench_int8_fidelity.py [--small] [--models NAME ...] [--cache DIR]

For each CNN of :mod:`edgeloop.zoo.corpus` (built into ``--cache`` and reused), the graph
``int8`` quantizes statically (pre-processed, BatchNorm folded, cross-layer equalized) is
quantized by onnxruntime (QDQ, per-channel int8 weights, MinMax activations, the target
profile of this machine), and five models are compared with fp32 on the validation split:

- **weights only**: the float graph computing with the int8 model's weights (integers
  times scale), rounded to nearest (onnxruntime) or by GPTQ
  (:class:`edgeloop.compress.gptq.WeightRounder`, 32 calibration samples);
- **activations only**: the int8 model with its float weights put back;
- **all int8**: onnxruntime's int8 model, with nearest or GPTQ weights.

Decision margins: fp32's top-1/top-2 logit gap against the change int8 makes to it
(:func:`gap_noise`), which bounds the agreement any int8 with that noise can keep.

Then ``edgeloop quantize --scheme int8`` runs through the CLI as in
``bench_real_models.py`` (wall time, peak memory, result), judging speed on every core
and on one thread (``--threads``); each model it returns is timed here against fp32 at
the same thread count, interleaved.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from _report import claims_table, write_section
from bench_real_models import CliRun, run_int8_cli
from onnx import numpy_helper

from edgeloop._onnx import session
from edgeloop._progress import quiet_libraries
from edgeloop.compress import Int8Static, apply_pass
from edgeloop.compress.equalize import equalize, fold_batchnorm
from edgeloop.compress.fuse import Preprocess
from edgeloop.compress.gptq import WeightRounder, weight_dequantizers
from edgeloop.compress.mixed import read_plan, runs_per_round
from edgeloop.data import Dataset, load_npz
from edgeloop.measure import fidelity, interleaved_latency, predict
from edgeloop.targets import detect
from edgeloop.zoo.corpus import CLASSIFIERS, CorpusModel, build

VARIANTS = ("weights only, nearest", "weights only, GPTQ", "activations only",
            "all int8, nearest", "all int8, GPTQ")
GPTQ_SAMPLES = 32   # as the int8 scheme's default
MARGIN_VARIANTS = ("activations only", "all int8, GPTQ")
CLI_THREADS = (0, 1)   # every core, and one thread (a phone or board's usual setting)
TIMING_ROUNDS = 9


def gap_noise(reference: np.ndarray, predicted: np.ndarray) -> tuple[float, float, float]:
    """How int8 noise compares with fp32's decision margins: the median gap between fp32's
    top-1 and top-2 logits, the RMS change ``predicted`` makes to that same difference,
    and the share of samples whose gap is smaller than that change (the decisions noise
    of that size puts at stake)."""
    rows = np.arange(len(reference))
    order = np.argsort(reference, axis=1)
    first, second = order[:, -1], order[:, -2]
    gap = reference[rows, first] - reference[rows, second]
    change = predicted[rows, first] - predicted[rows, second] - gap
    rms = float(np.sqrt(np.mean(change ** 2)))
    return float(np.median(gap)), rms, float(np.mean(gap < rms))


def weights_only(prepared: onnx.ModelProto, quantized: onnx.ModelProto) -> onnx.ModelProto:
    """``prepared`` computing with ``quantized``'s weights (integers times scale)."""
    layers = weight_dequantizers(quantized)
    inits = {i.name: numpy_helper.to_array(i) for i in quantized.graph.initializer}
    out = onnx.ModelProto()
    out.CopyFrom(prepared)
    names = {i.name: i for i in out.graph.initializer}
    for n in out.graph.node:
        if n.name not in layers:
            continue
        dq = layers[n.name]
        ints = inits[dq.input[0]].astype(np.float32)
        scale = inits[dq.input[1]]
        axis = int(next((a.i for a in dq.attribute if a.name == "axis"), 1))
        shape = [1] * ints.ndim
        if scale.size > 1:
            shape[axis] = -1
        w = ints * scale.reshape(shape)
        names[n.input[1]].CopyFrom(numpy_helper.from_array(w, n.input[1]))
    return out


def activations_only(prepared: onnx.ModelProto, quantized: onnx.ModelProto
                     ) -> onnx.ModelProto:
    """``quantized`` with each int8 weight replaced by ``prepared``'s float one."""
    floats = {i.name: i for i in prepared.graph.initializer}
    by_name = {n.name: n for n in prepared.graph.node}
    out = onnx.ModelProto()
    out.CopyFrom(quantized)
    layers = weight_dequantizers(out)
    for n in out.graph.node:
        if n.name in layers:
            w = floats[by_name[n.name].input[1]]
            name = f"{w.name}_float"
            out.graph.initializer.append(numpy_helper.from_array(
                numpy_helper.to_array(w), name))
            n.input[1] = name
    return out


def bench_model(name: str, cache: Path, *, small: bool) -> dict[str, object]:
    print(f"== {name}", flush=True)
    entry = build(name, cache / ("small" if small else "") / name, small=small)
    fp32 = onnx.load(entry.model)
    calib, val = load_npz(entry.calib), load_npz(entry.val)
    prepared = equalize(fold_batchnorm(apply_pass(Preprocess(), fp32, calib)), calib)[0]
    quantized = apply_pass(Int8Static(preprocess=False, equalize=False,
                                      channels_last_head=False, target=detect()),
                           prepared, calib)
    rounded, report = WeightRounder(prepared, calib.take(slice(0, GPTQ_SAMPLES)))(quantized)
    models = dict(zip(VARIANTS, (
        weights_only(prepared, quantized), weights_only(prepared, rounded),
        activations_only(prepared, quantized), quantized, rounded), strict=True))
    row: dict[str, object] = {"name": name, "layers": len(report), "samples": len(val),
                              "changed": sum(r.gptq < r.nearest for r in report),
                              "error_ratio": sum(r.gptq for r in report)
                              / max(sum(r.nearest for r in report), 1e-30)}
    reference = predict(session(fp32), val)
    for label, model in models.items():
        predicted = predict(session(model), val)
        f = fidelity(predicted, reference)
        row[label] = (f.top1_agreement, f.mean_cosine)
        if label in MARGIN_VARIANTS:
            row[f"{label} gap"] = gap_noise(reference, predicted)
    for threads in CLI_THREADS:
        print(f"  {name}: edgeloop quantize --scheme int8 --threads {threads}", flush=True)
        row[f"cli {threads}"] = cli_run(entry, fp32, val, reference, threads)
    return row


def cli_run(entry: CorpusModel, fp32: onnx.ModelProto, val: Dataset, reference: np.ndarray,
            threads: int) -> tuple[CliRun, str, float | None]:
    """``--scheme int8 --threads N`` through the CLI: the run, what it gave (or its one-line
    error), and the result's batch-1 speed-up over fp32 timed here, interleaved, with the
    same thread count (``None`` when it gave no model)."""
    with tempfile.TemporaryDirectory(prefix="bench-int8-fidelity-") as tmp:
        workdir = Path(tmp) / "cwd"
        workdir.mkdir()
        out = Path(tmp) / "int8.onnx"
        run = run_int8_cli(entry, out, workdir, "--threads", str(threads))
        if run.exit_code:
            return run, f"exit {run.exit_code}: {run.message}", None
        model = onnx.load(out)
        plan = read_plan(model) or {}
        f = fidelity(predict(session(model), val), reference)
        fp32_ms, int8_ms = interleaved_latency(
            [fp32, model], val, rounds=TIMING_ROUNDS, threads=threads,
            runs=runs_per_round(fp32, val, threads=threads))
        result = (f"{plan.get('preparation')}, {plan.get('mode')}, "
                  f"{len(plan.get('float_nodes', []))} layers float; "  # type: ignore[arg-type]
                  f"agreement {f.top1_agreement:.3f}, cosine {f.mean_cosine:.5f}")
        return run, result, fp32_ms / int8_ms


def report(rows: list[dict[str, object]], *, small: bool, seconds: float) -> str:
    target = detect()
    head = ["model", "GPTQ layers", "GPTQ / nearest layer error",
            *(f"{v}: agreement / cosine" for v in VARIANTS)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r["name"]), f"{r['changed']} of {r['layers']}", f"{r['error_ratio']:.2f}"]
        cells += [f"{r[v][0]:.3f} / {r[v][1]:.5f}" for v in VARIANTS]  # type: ignore[index]
        lines.append("| " + " | ".join(cells) + " |")
    margins = ["| model | fp32 top-1/top-2 logit gap, median | "
               + " | ".join(f"{v}: RMS change of that gap / crops with a smaller gap / "
                            "disagreement" for v in MARGIN_VARIANTS) + " |",
               "|---|---|---|---|"]
    for r in rows:
        median = r[f"{MARGIN_VARIANTS[0]} gap"][0]  # type: ignore[index]
        margins.append(f"| {r['name']} | {median:.3f} | " + " | ".join(
            f"{r[f'{v} gap'][1]:.3f} / {r[f'{v} gap'][2]:.3f} / "  # type: ignore[index]
            f"{1 - r[v][0]:.3f}" for v in MARGIN_VARIANTS) + " |")  # type: ignore[index]
    cli = ["| model | threads | wall time (s) | peak memory (MB) | result | batch-1 speed-up "
           "vs fp32, same threads |", "|---|---|---|---|---|---|"]
    for r in rows:
        for threads in CLI_THREADS:
            run, result, speedup = r[f"cli {threads}"]  # type: ignore[misc]
            cli.append(f"| {r['name']} | {threads or 'every core'} | {run.seconds:.1f} | "
                       f"{run.peak_mb:.0f} | {result.replace('|', '/')} | "
                       + (f"{speedup:.2f}x |" if speedup is not None else "- |"))
    claims = {}
    for r in rows:
        w_near, w_gptq = r["weights only, nearest"][0], r["weights only, GPTQ"][0]  # type: ignore[index]
        a_near, a_gptq = r["all int8, nearest"][0], r["all int8, GPTQ"][0]  # type: ignore[index]
        one = 1 / r["samples"]  # type: ignore[operator]
        given = [(t, r[f"cli {t}"][2]) for t in CLI_THREADS  # type: ignore[index]
                 if r[f"cli {t}"][2] is not None]  # type: ignore[index]
        claims[f"{r['name']}: every int8 model `--scheme int8` returned is faster than fp32 "
               f"at the thread count it was given ("
               + (", ".join(f"{t or 'every core'}: {x:.2f}x" for t, x in given)
                  or "none returned") + ")"] = all(x > 1.0 for _, x in given)
        claims[f"{r['name']}: with GPTQ's weights the model agrees with fp32 at least as "
               f"often as with nearest rounding's, weights alone ({w_gptq:.3f} vs "
               f"{w_near:.3f}) and in the int8 model within one validation sample "
               f"({a_gptq:.3f} vs {a_near:.3f})"] = (w_gptq >= w_near
                                                     and a_gptq >= a_near - one - 1e-9)
    intro = (f"Target profile: `{target.name}` ({target.kind}). "
             + ("Corpus at its small sizes (a quick check; figures say nothing). "
                if small else "Corpus at its full size. ")
             + f"Whole run {seconds / 60:.1f} min. Validation split; agreement is top-1 "
             "agreement with fp32, cosine the mean logit cosine. The int8 graph is the one "
             "`int8` quantizes statically (pre-processed, BatchNorm folded, cross-layer "
             "equalized), per-channel weights, MinMax activations; GPTQ's layer statistics "
             f"come from {GPTQ_SAMPLES} calibration samples.\n")
    why = ("Decision margins against int8 noise: the gap between fp32's top-1 and "
           "top-2 logits on each validation crop, the RMS change the int8 model makes to "
           "that same difference (activations alone: float weights; all int8: GPTQ "
           "weights), and the share of crops whose gap is smaller than that change, the "
           "decisions noise of that size puts at stake; 0.98 agreement allows 0.02 to "
           "flip.")
    return "\n".join([intro, *lines, "", why, "", *margins, "",
                      "`edgeloop quantize --scheme int8` (GPTQ on, its default) as a user "
                      "runs it, judging speed on every core and on one thread (`--threads "
                      "1`); the speed-up is re-measured here, fp32 and the result "
                      f"interleaved, median of {TIMING_ROUNDS} rounds:", "", *cli, "",
                      *claims_table(claims)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=CLASSIFIERS,
                        default=list(CLASSIFIERS), metavar="NAME",
                        help="corpus CNNs (default: all)")
    parser.add_argument("--small", action="store_true",
                        help="the corpus's small sizes (a quick check)")
    parser.add_argument("--cache", type=Path,
                        default=Path(tempfile.gettempdir()) / "edgeloop-corpus",
                        help="where corpus models are built and reused")
    args = parser.parse_args()
    quiet_libraries()
    start = time.perf_counter()
    rows = [bench_model(n, args.cache.resolve(), small=args.small) for n in args.models]
    body = report(rows, small=args.small, seconds=time.perf_counter() - start)
    print(body, flush=True)
    write_section("int8_fidelity", "Where int8 fidelity goes on the corpus CNNs", body)


if __name__ == "__main__":
    main()
