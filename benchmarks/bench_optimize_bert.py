"""`edgeloop optimize` on a BERT-style encoder, through the real CLI (see bench_optimize).

The claim (issue 4): with ``--metric cosine --max-drop 0.005`` the chosen model is at
least 1.8x faster than fp32 at batch 1, sequence length 128, within the budget on
held-out inputs (MNIST-1D test tokens; calibration uses the calib split, the search
ranks on the val split).

    python benchmarks/bench_optimize_bert.py [--model DIR/model.onnx]

The encoder has BERT-base's layer width (hidden 768, 12 heads, FFN 3072) and 4 layers.
Without ``--model`` its weights are random (seed 0); ``--model`` takes an encoder written
by ``edgeloop.zoo.bert.train_bert``. The levers table measures each way to speed it up at
that width and at edgeloop's small default width (hidden 256), where the float work
outside the matrix products is a larger share of the time.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import onnx
import torch
from _report import write_section
from bench_optimize import Case, run_case

from edgeloop._onnx import session
from edgeloop.compress import Int4Weight, Int8Dynamic, apply_pass
from edgeloop.compress.mixed import TransformerFusion
from edgeloop.data import load_npz, save_npz
from edgeloop.measure import fidelity, interleaved_latency, predict
from edgeloop.optimize import parse_duration
from edgeloop.zoo.bert import BertClassifier, BertSpec, export_bert, mnist1d_tokens

SPEC = BertSpec(hidden=768, heads=12, intermediate=3072)   # BERT-base width, 4 layers
SMALL = BertSpec()                                         # edgeloop's default: hidden 256
SPLITS = {"calib": 64, "val": 128, "test": 256}   # samples per split


def _prepare(trained: Path | None, spec: BertSpec = SPEC):
    def prepare(work: Path) -> tuple[Path, Path, Path, Path]:
        work.mkdir(parents=True, exist_ok=True)
        model = work / "model.onnx"
        if trained is None:
            torch.manual_seed(0)
            export_bert(BertClassifier(spec), mnist1d_tokens("calib").take(slice(0, 2)),
                        model)
        else:
            shutil.copyfile(trained, model)
        paths = []
        for split, n in SPLITS.items():
            save_npz(work / f"{split}.npz", mnist1d_tokens(
                split, seq_len=spec.seq_len, bins=spec.bins).take(slice(0, n)))
            paths.append(work / f"{split}.npz")
        return (model, *paths)  # type: ignore[return-value]
    return prepare


def levers(work: Path, spec: BertSpec) -> str:
    """Each way to speed the encoder up, alone and combined, against fp32 in one
    interleaved run, with default threads and with one intra-op thread for every model."""
    model, calib, _, test = _prepare(None, spec)(work)
    fp32 = onnx.load(model)
    cal, held = load_npz(calib), load_npz(test).take(slice(0, 64))
    fused = apply_pass(TransformerFusion(), fp32, cal)
    dyn = Int8Dynamic(per_channel=True, preprocess=False)
    models = {"fp32": fp32, "transformer-fused fp32": fused,
              "int8 dynamic (per-channel)": apply_pass(dyn, fp32, cal),
              "transformer-fused + int8 dynamic": apply_pass(dyn, fused, cal),
              "int4-weight (MatMulNBits, accuracy_level 4)": apply_pass(Int4Weight(), fp32, cal),
              "transformer-fused + int4-weight": apply_pass(Int4Weight(), fused, cal)}
    ref = predict(session(fp32), held)
    cos = {k: fidelity(predict(session(m), held), ref).mean_cosine for k, m in models.items()}
    lat = {t: interleaved_latency(list(models.values()), held, batch=1, rounds=9, runs=20,
                                  threads=t) for t in (0, 1)}
    lines = [f"### Levers at hidden {spec.hidden}, FFN {spec.intermediate}, measured one by "
             "one (random weights, batch 1, 64 test samples)", "",
             "| model | mean cosine | p50 ms | vs fp32 | p50 ms, 1 thread | vs fp32, 1 thread |",
             "|---|---|---|---|---|---|"]
    for i, k in enumerate(models):
        lines.append(f"| {k} | {cos[k]:.6f} | {lat[0][i]:.3f} | {lat[0][0] / lat[0][i]:.2f}x | "
                     f"{lat[1][i]:.3f} | {lat[1][0] / lat[1][i]:.2f}x |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a train_bert model.onnx")
    parser.add_argument("--time-budget", default="8m")
    args = parser.parse_args()
    budget_s = parse_duration(args.time_budget)
    case = Case("bert-encoder", _prepare(args.model), metric="cosine", max_drop=0.005,
                batch=1, time_budget=args.time_budget, time_budget_s=budget_s,
                faster_than="float", min_speedup=1.8, one_thread=True)
    s = SPEC
    weights = f"trained (`{args.model}`)" if args.model else "random (seed 0)"
    intro = (f"BERT-style encoder from a transformers BertConfig: {s.layers} layers, hidden "
             f"{s.hidden}, {s.heads} heads, FFN {s.intermediate}, sequence length {s.seq_len} "
             f"(41 MNIST-1D tokens + padding, masked), weights {weights}. Splits: calib "
             f"{SPLITS['calib']}, val {SPLITS['val']} (ranking), test {SPLITS['test']} "
             "(held out, re-measured below). Every model is timed with the same session "
             "settings (onnxruntime's default intra-op threads); the extra one-thread "
             "column uses one intra-op thread for every model.\n")
    with tempfile.TemporaryDirectory(prefix="bench-optimize-bert-") as tmp:
        lever_table = "\n".join(levers(Path(tmp) / f"levers-{spec.hidden}", spec)
                                for spec in (SPEC, SMALL))
        print(lever_table, flush=True)
        body = run_case(case, Path(tmp))
    print(body, flush=True)
    write_section("optimize_bert", "edgeloop optimize: BERT-style encoder, cosine budget",
                  intro + "\n" + body + "\n" + lever_table)


if __name__ == "__main__":
    main()
