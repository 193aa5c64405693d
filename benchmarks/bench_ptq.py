"""Post-training quantization against onnxruntime's stock quantizer (issue: PTQ).

MNIST-1D CNN: fp32 vs stock `quantize_static` (QDQ defaults) vs stock `quantize_dynamic`
vs edgeloop `int8-static` (and its calibration methods) and `int8-dynamic`.
Wide MNIST-1D MLP (2 x 1024 hidden): fp32 vs `int4-weight` vs `binary`.

Latency: :func:`edgeloop.measure.interleaved_latency`, every model of a family in one
run (the models alternate call by call, ``--rounds`` rounds of ``--block`` calls each), so
slow drifts of the machine hit every model alike.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("EDGELOOP_QUIET", "1")

from _report import write_section

from edgeloop._onnx import load_model, session
from edgeloop.compress import (
    Binary,
    Int4Weight,
    Int8Dynamic,
    Int8Static,
    OrtDynamic,
    OrtStatic,
    apply_pass,
)
from edgeloop.data import load_builtin
from edgeloop.measure import fidelity, graph_summary, interleaved_latency, predict
from edgeloop.zoo import train_zoo_model


def table(rows: list[dict[str, object]], columns: list[str]) -> str:
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    out += ["| " + " | ".join(str(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(out)


def run_family(name: str, fp32: Path, passes: dict[str, object], work: Path, rounds: int,
               block: int) -> tuple[list[dict[str, object]], dict[str, dict[str, float]]]:
    calib, test = load_builtin("mnist1d", "calib"), load_builtin("mnist1d", "test")
    model = load_model(fp32)
    paths = {"fp32": fp32}
    for label, p in passes.items():
        paths[label] = work / f"{name}-{label}.onnx"
        import onnx

        onnx.save(apply_pass(p, model, calib), paths[label])  # type: ignore[arg-type]
    lat = {b: dict(zip(paths, interleaved_latency(list(paths.values()), test, batch=b,
                                                  rounds=rounds, runs=block, warmup=20),
                       strict=True))
           for b in (1, 32)}
    ref = predict(session(fp32), test)
    fp32_acc = float((ref.argmax(1) == test.labels).mean())
    fp32_size = fp32.stat().st_size
    rows = []
    for label, path in paths.items():
        out = predict(session(path), test)
        f = fidelity(out, ref)
        float_ops, int_ops, qdq = graph_summary(load_model(path))
        acc = float((out.argmax(1) == test.labels).mean())
        rows.append({
            "model": label,
            "accuracy": f"{acc:.2%}",
            "drop (pts)": f"{(fp32_acc - acc) * 100:+.2f}",
            "size (bytes)": f"{path.stat().st_size:,}",
            "size vs fp32": f"{path.stat().st_size / fp32_size:.3f}x",
            "b1 p50 ms": f"{lat[1][label]:.4f}",
            "b32 p50 ms": f"{lat[32][label]:.4f}",
            "b32 vs fp32": f"{lat[32]['fp32'] / lat[32][label]:.2f}x faster",
            "cosine": f"{f.mean_cosine:.5f}",
            "float ops": ",".join(f"{k}:{v}" for k, v in sorted(float_ops.items())) or "-",
            "int ops": ",".join(f"{k}:{v}" for k, v in sorted(int_ops.items())) or "-",
            "Q/DQ": qdq,
        })
    return rows, lat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--block", type=int, default=100)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cnn = train_zoo_model("mnist1d-cnn", work / "cnn")
        mlp = train_zoo_model("mnist1d-mlp", work / "mlp")
        cnn_rows, cnn_lat = run_family("cnn", work / "cnn" / "model.onnx", {
            "ort-static": OrtStatic(), "ort-dynamic": OrtDynamic(),
            "int8-static": Int8Static(), "int8-static entropy": Int8Static(calibration="entropy"),
            "int8-static percentile": Int8Static(calibration="percentile"),
            "int8-static no preprocess": Int8Static(preprocess=False),
            "int8-dynamic": Int8Dynamic(),
        }, work, args.rounds, args.block)
        mlp_rows, _ = run_family("mlp", work / "mlp" / "model.onnx", {
            "int4-weight": Int4Weight(), "binary (scale mean abs W, no data)": Binary(refit=False),
            "binary (refit on calib)": Binary(),
        }, work, args.rounds, args.block)
    cols = ["model", "accuracy", "drop (pts)", "size (bytes)", "size vs fp32", "b1 p50 ms",
            "b32 p50 ms", "b32 vs fp32", "cosine", "float ops", "int ops", "Q/DQ"]
    ratio = cnn_lat[32]["int8-static"] / cnn_lat[32]["ort-static"]
    body = (
        f"MNIST-1D CNN (zoo `mnist1d-cnn`, fp32 test accuracy {cnn['test_accuracy']:.2%}); "
        f"test split (1000 samples); calibration: the 256-sample `calib` split.\n"
        f"Latency: median of {args.rounds} interleaved rounds x {args.block} calls per "
        f"model (the models alternate call by call), onnxruntime CPU, default threads.\n\n"
        + table(cnn_rows, cols)
        + f"\n\n**edgeloop int8-static batch-32 latency / stock quantize_static: {ratio:.3f}** "
        "(<= 1.0 means at least as fast).\n\n"
        f"Wide MNIST-1D MLP (zoo `mnist1d-mlp`, 40-1024-1024-10, fp32 test accuracy "
        f"{mlp['test_accuracy']:.2%}; MLPs are weak on MNIST-1D by design of the data set).\n\n"
        + table(mlp_rows, cols) + "\n"
    )
    write_section("ptq", "Post-training quantization vs onnxruntime's stock quantizer", body)
    print(body)


if __name__ == "__main__":
    main()
