"""`edgeloop optimize` on a BERT-style encoder, through the real CLI (see bench_optimize).

The claim (issue 4): with ``--metric cosine --max-drop 0.005`` the chosen model is at
least 1.8x faster than fp32 at batch 1, sequence length 128, within the budget on
held-out inputs (MNIST-1D test tokens; calibration uses the calib split, the search
ranks on the val split).

    python benchmarks/bench_optimize_bert.py [--model DIR/model.onnx]

Without ``--model`` the encoder has random weights (seed 0); ``--model`` takes an encoder
written by ``edgeloop.zoo.bert.train_bert``.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import torch
from _report import write_section
from bench_optimize import Case, run_case

from edgeloop.data import save_npz
from edgeloop.optimize import parse_duration
from edgeloop.zoo.bert import BertClassifier, BertSpec, export_bert, mnist1d_tokens

SPEC = BertSpec()
SPLITS = {"calib": 64, "val": 128, "test": 256}   # samples per split


def _prepare(trained: Path | None):
    def prepare(work: Path) -> tuple[Path, Path, Path, Path]:
        model = work / "model.onnx"
        if trained is None:
            torch.manual_seed(0)
            export_bert(BertClassifier(SPEC), mnist1d_tokens("calib").take(slice(0, 2)),
                        model)
        else:
            shutil.copyfile(trained, model)
        paths = []
        for split, n in SPLITS.items():
            save_npz(work / f"{split}.npz", mnist1d_tokens(
                split, seq_len=SPEC.seq_len, bins=SPEC.bins).take(slice(0, n)))
            paths.append(work / f"{split}.npz")
        return (model, *paths)  # type: ignore[return-value]
    return prepare


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
        body = run_case(case, Path(tmp))
    print(body, flush=True)
    write_section("optimize_bert", "edgeloop optimize: BERT-style encoder, cosine budget",
                  intro + "\n" + body)


if __name__ == "__main__":
    main()
