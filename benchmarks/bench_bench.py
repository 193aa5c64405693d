"""`edgeloop bench` adds no overhead of its own (issue 4).

On fixed models (untrained zoo architectures, seed 0, exported to ONNX), each round times
the model twice: once with :func:`edgeloop.bench.bench` and once with a plain Python loop
(``perf_counter`` around ``sess.run``) on a session made with the same options and an
input of the same shape. Rounds alternate which goes first, so slow drifts of the shared
machine hit both alike. The figure is the median over rounds of each side's p50, and the
ratio bench / plain loop; the claim holds when it is within 10%.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("EDGELOOP_QUIET", "1")

from _report import write_section

from edgeloop._onnx import input_specs, session
from edgeloop.bench import BenchConfig, bench
from edgeloop.export import to_onnx
from edgeloop.zoo import build
from edgeloop.zoo._registry import ARCHS


def plain_loop_p50(model: Path, batch: int, seconds: float, threads: int) -> float:
    """The p50 in ms of back-to-back ``sess.run`` calls for ``seconds``, after a warm-up."""
    sess = session(model, threads=threads)
    spec = input_specs(sess)[0]
    x = np.random.default_rng(1).standard_normal((batch, *spec.shape[1:])).astype(np.float32)
    feed = {spec.name: x}
    warm = time.perf_counter() + 1.0
    while time.perf_counter() < warm:
        sess.run(None, feed)
    times = []
    end = time.perf_counter() + seconds
    while True:
        t0 = time.perf_counter()
        sess.run(None, feed)
        t1 = time.perf_counter()
        times.append(t1 - t0)
        if t1 >= end:
            break
    return float(np.percentile(times, 50)) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    cases = [("mnist1d-cnn", 1), ("mnist1d-cnn", 32), ("mnist1d-mlp", 32)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch, batch in cases:
            torch.manual_seed(0)
            path = Path(tmp) / f"{arch}.onnx"
            if not path.exists():
                to_onnx(build(arch), torch.randn(2, *ARCHS[arch].sample_shape), path)
            config = BenchConfig(batches=(batch,), threads=args.threads,
                                 duration=args.seconds, warmup=1.0, profile_runs=1)
            ours, plain = [], []
            for r in range(args.rounds):
                order = ("bench", "plain") if r % 2 == 0 else ("plain", "bench")
                for side in order:
                    if side == "bench":
                        ours.append(bench(path, config=config).results[0].p50_ms)
                    else:
                        plain.append(plain_loop_p50(path, batch, args.seconds, args.threads))
            b, p = statistics.median(ours), statistics.median(plain)
            rows.append((arch, batch, b, p, b / p))
            print(f"{arch} batch {batch}: bench p50 {b:.4f} ms, plain loop {p:.4f} ms, "
                  f"ratio {b / p:.3f}", flush=True)

    lines = ["| model | batch | `edgeloop bench` p50 (ms) | plain loop p50 (ms) | ratio | "
             "within 10% |", "|---|---:|---:|---:|---:|---|"]
    for arch, batch, b, p, ratio in rows:
        lines.append(f"| {arch} (untrained, seed 0) | {batch} | {b:.4f} | {p:.4f} | "
                     f"{ratio:.3f} | {'yes' if abs(ratio - 1) <= 0.10 else 'NO'} |")
    body = (f"Median over {args.rounds} alternating rounds of each side's p50; each side "
            f"runs {args.seconds:g} s per round after a 1 s warm-up, {args.threads} "
            "intra-op thread(s). The plain loop is `perf_counter()` around `sess.run` on a "
            "session with the same options.\n\n" + "\n".join(lines))
    write_section("bench", "edgeloop bench: no overhead of its own", body)


if __name__ == "__main__":
    main()
