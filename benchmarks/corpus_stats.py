"""What the full-size model corpus is like, and how onnxruntime's stock quantizers fare on it.

For each corpus model: ONNX file size, parameters, build time, the statistics that make it
realistic (:func:`edgeloop.zoo.corpus.stats`: outlier channels at LayerNorm outputs,
spread of the folded depthwise weights, how decisive the classifier is), and the fidelity
to fp32 of stock ``quantize_dynamic`` and ``quantize_static`` (defaults, no pre-processing)
on the held-out split: top-1 agreement for classifiers, mean output cosine otherwise, and
for sentence embeddings the top-10 nearest-neighbour overlap.

    python benchmarks/corpus_stats.py [--out DIR] [NAME ...]

``--out`` holds the built models (default: ``edgeloop-corpus`` in the temp folder); a later
run reuses them. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import onnx

from edgeloop._onnx import session
from edgeloop._progress import quiet_libraries
from edgeloop.compress import OrtDynamic, OrtStatic, apply_pass
from edgeloop.data import load_npz
from edgeloop.errors import EdgeloopError
from edgeloop.measure import fidelity, predict
from edgeloop.zoo.corpus import CORPUS, CorpusModel, build, stats


def neighbour_overlap(embeddings: np.ndarray, reference: np.ndarray, k: int = 10) -> float:
    """Mean fraction of each sample's ``k`` nearest neighbours (cosine, itself excluded)
    under ``reference`` that are also among its ``k`` nearest under ``embeddings``."""

    def neighbours(e: np.ndarray) -> np.ndarray:
        e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-30)
        sim = e @ e.T
        np.fill_diagonal(sim, -np.inf)
        return np.argsort(-sim, axis=1)[:, :k]

    a, b = neighbours(embeddings), neighbours(reference)
    return float(np.mean([len(set(x) & set(y)) / k for x, y in zip(a, b, strict=True)]))


def stock_fidelity(entry: CorpusModel) -> dict[str, str]:
    """Stock quantize_dynamic / quantize_static fidelity on ``entry``'s val split."""
    model = onnx.load(entry.model)
    calib, val = load_npz(entry.calib), load_npz(entry.val)
    reference = predict(session(model), val, 32)
    cells = {}
    for p in (OrtDynamic(), OrtStatic()):
        try:
            got = predict(session(apply_pass(p, model, calib)), val, 32)
        except EdgeloopError as e:
            cells[p.name] = f"fails: {str(e)[:60]}"
            continue
        f = fidelity(got, reference)
        if entry.metric == "agreement":
            cells[p.name] = f"agree {f.top1_agreement:.3f}, cos {f.mean_cosine:.3f}"
        else:
            cells[p.name] = f"cos {f.mean_cosine:.4f}"
        if entry.kind == "embedder":
            cells[p.name] += f", top-10 {neighbour_overlap(got, reference):.3f}"
    return cells


def _realism(s: dict[str, float]) -> str:
    if "layernorm_channel_ratio" in s:
        text = (f"LN ratio {s['layernorm_channel_ratio']:.1f} (max "
                f"{s['layernorm_channel_ratio_max']:.1f}), finite {s['output_finite']:.0f}")
        if "mean_pairwise_cosine" in s:
            text += f", pairwise cos {s['mean_pairwise_cosine']:.3f}"
        return text
    text = f"median top-1 p {s['median_top1_prob']:.2f}"
    if "weight_rounding_agreement" in s:
        text += f", top-1 kept under int8 weight rounding {s['weight_rounding_agreement']:.3f}"
    if "depthwise_range_ratio" in s:
        text += (f", dw range ratio {s['depthwise_range_ratio']:.0f} (max "
                 f"{s['depthwise_range_ratio_max']:.0f})")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"corpus models to measure (default: all of {', '.join(CORPUS)})")
    parser.add_argument("--out", type=Path,
                        default=Path(tempfile.gettempdir()) / "edgeloop-corpus")
    args = parser.parse_args()
    quiet_libraries()
    print("| model | size MB | params M | build s | realism | stock dynamic | stock static |")
    print("|---|---|---|---|---|---|---|")
    for name in args.names or CORPUS:
        entry = build(name, args.out / name)
        s = stats(entry, samples=128)
        q = stock_fidelity(entry)
        print(f"| {name} | {s['size_mb']:.1f} | {s['params'] / 1e6:.2f} | "
              f"{s.get('build_seconds', float('nan')):.0f} | {_realism(s)} | "
              f"{q['ort-dynamic']} | {q['ort-static']} |", flush=True)


if __name__ == "__main__":
    main()
