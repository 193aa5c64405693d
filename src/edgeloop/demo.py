"""``make demo``: the loop end to end on built-in data, in a few minutes on a laptop CPU.

Trains the MNIST-1D reference CNN, quantizes it with every scheme, and compares accuracy,
size and latency with fp32 and with onnxruntime's stock quantizer. Everything it writes
lands in ``demo-out/`` (or the folder given as the first argument).
"""

from __future__ import annotations

import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from edgeloop.compress import SCHEMES, make_scheme, run_pass
from edgeloop.data import load_builtin, save_npz
from edgeloop.measure import LatencyConfig, evaluate
from edgeloop.zoo import train_zoo_model

console = Console()


def main(out_dir: str = "demo-out") -> None:
    """Run the demo, writing into ``out_dir``."""
    out = Path(out_dir)
    console.rule("[bold]edgeloop demo: MNIST-1D CNN")
    console.print("1. train the reference CNN on MNIST-1D (generated offline)")
    result = train_zoo_model("mnist1d-cnn", out / "fp32")
    console.print(f"   test accuracy {result['test_accuracy']:.2%} -> {out}/fp32/model.onnx")
    for split in ("calib", "test"):
        save_npz(out / f"{split}.npz", load_builtin("mnist1d", split))
    fp32 = out / "fp32" / "model.onnx"
    calib = load_builtin("mnist1d", "calib")

    console.print("2. quantize with every scheme (ort-* are onnxruntime's stock quantizer)")
    models = {"fp32": fp32}
    for scheme in SCHEMES:
        models[scheme] = out / f"{scheme}.onnx"
        run_pass(make_scheme(scheme), fp32, models[scheme], calib)
        console.print(f"   {scheme:<13} -> {models[scheme]}")

    console.print("3. measure each on the test split (accuracy, size, latency, fidelity)")
    test = load_builtin("mnist1d", "test")
    timing = LatencyConfig(min_runs=300, max_seconds=1.5)
    reports = {k: evaluate(p, test, reference=fp32, latency_config=timing)
               for k, p in models.items()}
    base = reports["fp32"]
    table = Table(title="MNIST-1D CNN, this machine (onnxruntime CPU)")
    for col in ("model", "accuracy", "size", "vs fp32", "batch 1 p50", "batch 32 p50",
                "speed-up b32", "cosine", "float ops left"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for name, r in reports.items():
        b1, b32 = r.latency
        table.add_row(
            name, f"{r.accuracy:.2%}", f"{r.size_bytes / 1024:.1f} KB",
            f"{r.size_bytes / base.size_bytes:.2f}x", f"{b1.p50_ms:.3f} ms",
            f"{b32.p50_ms:.3f} ms", f"{base.latency[1].p50_ms / b32.p50_ms:.2f}x",
            f"{r.fidelity.mean_cosine:.4f}" if r.fidelity else "",
            str(sum(r.float_compute_ops.values())))
    console.print(table)
    console.print("Next: `edgeloop evaluate MODEL --data demo-out/test.npz --reference "
                  "demo-out/fp32/model.onnx` for the full report of one model.")


if __name__ == "__main__":
    main(*sys.argv[1:2])
