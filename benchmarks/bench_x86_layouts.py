"""Integer layouts on this x86 CPU: which ones compute the right answer, and which is fastest.

    python benchmarks/bench_x86_layouts.py [--rounds N]

:mod:`edgeloop.targets` picks, per CPU kind, how int8 is laid out: on x86 without VNNI
(``x86-avx2``) U8S8 in QDQ with 7-bit weights, because onnxruntime's AVX2 U8S8 kernels add
pairs of products into saturating int16s; on VNNI CPUs the same with full 8-bit weights.
That choice was derived from onnxruntime's source and checked under emulation
(tests/test_saturation.py). This script measures it on the CPU it runs on, natively:

1. **Layouts of one layer stack.** A 512-wide two-layer MLP (PyTorch's default init, so
   per-channel weight ranges are used in full) quantized by onnxruntime's own
   ``quantize_static`` / ``quantize_dynamic`` in every layout a user can ask for: U8S8,
   S8S8 and U8U8, QDQ and QOperator, 8-bit and 7-bit (``reduce_range``) weights, and
   dynamic quantization (the transformer path). For each: error against the float model,
   error of onnxruntime's fused integer kernels against the model's own reference (the
   same QDQ graph with graph optimizations off, computed in float: it shows kernel
   arithmetic going wrong, not quantization noise), and speed-up over float at batch 1
   and 64.
2. **edgeloop's own outputs for both x86 profiles.** The zoo MNIST-1D CNN through
   ``int8`` (kept whatever its speed), ``int8-static``, ``int8-dynamic`` and the QAT/PT2E
   export, once per profile, run here: top-1 agreement with fp32, error against the reference, what
   :func:`edgeloop.targets.saturation_risks` says, and speed-up over float at batch 32.

Timing: :func:`edgeloop.measure.interleaved_latency` (all models of a table in one
interleaved run, default onnxruntime threads).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from _report import claims_table, write_section
from onnxruntime.quantization import (
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)

from edgeloop._onnx import session
from edgeloop._progress import quiet_libraries
from edgeloop.compress import SCHEMES, apply_pass
from edgeloop.compress.calibrate import NpzReader
from edgeloop.compress.qat import quantize_export
from edgeloop.data import Dataset, load_builtin
from edgeloop.measure import interleaved_latency, predict
from edgeloop.targets import TARGETS, Target, detect, saturation_risks
from edgeloop.zoo import load_checkpoint
from edgeloop.zoo.train import train_zoo_model

WIDTH = 512
CORRECT = 0.01   # relative error against the reference below which the kernels are right

# (format, activation type, weight type, reduce_range); format None = dynamic quantization
LAYOUTS: tuple[tuple[QuantFormat | None, QuantType, QuantType, bool], ...] = (
    (QuantFormat.QDQ, QuantType.QUInt8, QuantType.QInt8, True),
    (QuantFormat.QDQ, QuantType.QUInt8, QuantType.QInt8, False),
    (QuantFormat.QDQ, QuantType.QInt8, QuantType.QInt8, False),
    (QuantFormat.QDQ, QuantType.QUInt8, QuantType.QUInt8, False),
    (QuantFormat.QOperator, QuantType.QUInt8, QuantType.QInt8, True),
    (QuantFormat.QOperator, QuantType.QUInt8, QuantType.QInt8, False),
    (QuantFormat.QOperator, QuantType.QInt8, QuantType.QInt8, False),
    (None, QuantType.QUInt8, QuantType.QInt8, True),
    (None, QuantType.QUInt8, QuantType.QInt8, False),
)


def label(fmt: QuantFormat | None, act: QuantType, weight: QuantType, reduce: bool) -> str:
    """A layout in the words of :attr:`edgeloop.targets.Target.layout`."""
    types = ("U8" if act == QuantType.QUInt8 else "S8") + (
        "U8" if weight == QuantType.QUInt8 else "S8")
    return (f"{types}, {7 if reduce else 8}-bit weights, "
            f"{'dynamic' if fmt is None else fmt.name}")


def rel_err(out: np.ndarray, ref: np.ndarray) -> float:
    """||out - ref|| / ||ref||."""
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def kernel_error(model: onnx.ModelProto, feed: dict[str, np.ndarray], fused: np.ndarray
                 ) -> float | None:
    """How far ``fused``, onnxruntime's output for ``feed`` with its fused integer kernels,
    is from the model's reference: the same
    model with graph optimizations off, where Q/DQ pairs stay unfused and the model is
    computed in float from its integer values, the same on every CPU. None for a model with
    integer operators of its own (QOperator's QLinear*/QGemm, dynamic's *Integer*): those run
    integer kernels either way, so there is no such reference."""
    ops = {n.op_type for n in model.graph.node}
    if any((op.startswith("Q") and op != "QuantizeLinear") or "Integer" in op for op in ops):
        return None
    unfused = session(model, level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    return rel_err(fused, unfused.run(None, feed)[0])


def mlp_model(work: Path) -> Path:
    """The float MLP, exported as users export (TorchScript exporter, dynamic batch)."""
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(WIDTH, WIDTH), torch.nn.ReLU(),
                              torch.nn.Linear(WIDTH, WIDTH)).eval()
    path = work / "mlp.onnx"
    torch.onnx.export(mlp, (torch.zeros(1, WIDTH),), str(path), input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "batch"}}, dynamo=False,
                      opset_version=17)
    return path


def layouts(work: Path, rounds: int) -> dict[str, dict[str, Any]]:
    """Part 1: every layout of the MLP, measured, by layout."""
    rng = np.random.default_rng(0)
    calib = Dataset({"x": rng.standard_normal((256, WIDTH)).astype(np.float32)})
    test = Dataset({"x": rng.standard_normal((64, WIDTH)).astype(np.float32)})
    fp32 = mlp_model(work)
    paths = {"float": fp32}
    for fmt, act, weight, reduce in LAYOUTS:
        out = work / f"{len(paths)}.onnx"
        if fmt is None:
            quantize_dynamic(fp32, out, weight_type=weight, per_channel=True,
                             reduce_range=reduce)
        else:
            quantize_static(fp32, out, NpzReader(calib), quant_format=fmt, activation_type=act,
                            weight_type=weight, per_channel=True, reduce_range=reduce)
        paths[label(fmt, act, weight, reduce)] = out
    feed = {"x": test.inputs["x"]}
    ref_float = session(fp32).run(None, feed)[0]
    speed = {batch: dict(zip(paths, interleaved_latency(list(paths.values()), test, batch=batch,
                                                        rounds=rounds), strict=True))
             for batch in (1, 64)}
    rows = {}
    for name, path in list(paths.items())[1:]:
        model = onnx.load(path)
        fused = session(model).run(None, feed)[0]
        rows[name] = {"layout": name,
                      "error vs float": rel_err(fused, ref_float),
                      "kernels vs reference": kernel_error(model, feed, fused),
                      "b1": speed[1]["float"] / speed[1][name],
                      "b64": speed[64]["float"] / speed[64][name],
                      "flagged": bool(saturation_risks(model, TARGETS["x86-avx2"]))}
    return rows


def profiles(work: Path, rounds: int) -> list[dict[str, Any]]:
    """Part 2: edgeloop's int8 outputs for each x86 profile, run on this CPU."""
    calib = load_builtin("mnist1d", "calib").take(slice(0, 256))
    val = load_builtin("mnist1d", "val")
    train_zoo_model("mnist1d-cnn", work / "cnn")
    float_model = onnx.load(work / "cnn" / "model.onnx")
    module = load_checkpoint(work / "cnn" / "model.pt")[0]
    feed = {"x": val.inputs["x"]}
    ref_labels = predict(session(float_model), val).argmax(1)
    models: dict[tuple[str, str], onnx.ModelProto] = {}
    for name in ("x86-avx2", "x86-avx512-vnni"):
        target = TARGETS[name]
        for scheme in ("int8", "int8-static", "int8-dynamic"):
            options: dict[str, Any] = {"target": target}
            if scheme == "int8":   # the layout is measured here: kept at any speed
                options["faster_than_float"] = False
            models[(name, scheme)] = apply_pass(SCHEMES[scheme](**options), float_model, calib)
        models[(name, "QAT/PT2E export")] = quantize_export(module, calib, target=target)[0]
    speed = dict(zip([("", "float"), *models], interleaved_latency(
        [float_model, *models.values()], val, batch=32, rounds=rounds), strict=True))
    rows = []
    for (name, scheme), model in models.items():
        out = session(model).run(None, feed)[0]
        rows.append({"profile": name, "scheme": scheme,
                     "agreement": float((out.argmax(1) == ref_labels).mean()),
                     "kernels vs reference": kernel_error(model, feed, out),
                     "flagged": bool(saturation_risks(model, TARGETS["x86-avx2"])),
                     "b32": speed[("", "float")] / speed[(name, scheme)]})
    return rows


def _flag(flagged: bool) -> str:
    return "flagged" if flagged else "-"


def _kernels(row: dict[str, Any]) -> str:
    error = row["kernels vs reference"]
    return "-" if error is None else f"{error:.4f}"


def report(mlp: dict[str, dict[str, Any]], cnn: list[dict[str, Any]], here: Target,
           rounds: int) -> str:
    lines = [
        f"This CPU: `{here.name}` ({here.description}). Errors are relative L2 norms; "
        f"\"kernels vs reference\" compares onnxruntime's fused integer kernels with the same "
        f"QDQ model computed in float (graph optimizations off), so anything above "
        f"{CORRECT:.0%} is arithmetic going wrong, not rounding. \"x86-avx2 check\" is "
        f"`saturation_risks(model, x86-avx2)`. Speed-ups over float: "
        f"`interleaved_latency`, {rounds} rounds, default threads.", "",
        "### 512-wide two-layer MLP, onnxruntime's quantizer, per-channel weights "
        "(64 random-normal inputs)", "",
        "| layout | error vs float | kernels vs reference | x86-avx2 check | b1 speed-up "
        "| b64 speed-up |", "|---|---|---|---|---|---|"]
    for r in mlp.values():
        lines.append(f"| {r['layout']} | {r['error vs float']:.4f} | {_kernels(r)} | "
                     f"{_flag(r['flagged'])} | {r['b1']:.2f}x | {r['b64']:.2f}x |")
    lines += ["", "### edgeloop's int8 for each x86 profile, zoo MNIST-1D CNN "
              "(validation split, 1000 samples)", "",
              "| profile | scheme | top-1 agreement | kernels vs reference | x86-avx2 check "
              "| b32 speed-up |", "|---|---|---|---|---|---|"]
    for r in cnn:
        lines.append(f"| {r['profile']} | {r['scheme']} | {r['agreement']:.3f} | "
                     f"{_kernels(r)} | {_flag(r['flagged'])} | {r['b32']:.2f}x |")
    return "\n".join(lines)


def claims(mlp: dict[str, dict[str, Any]], cnn: list[dict[str, Any]], here: Target
           ) -> dict[str, bool]:
    chosen = mlp[here.layout]
    right = {k: r for k, r in mlp.items() if r["kernels vs reference"] is not None
             and r["kernels vs reference"] < CORRECT}
    fastest = max(right, key=lambda k: right[k]["b64"])
    ours = [r for r in cnn if r["profile"] == here.name]
    verdict = {
        f"this CPU's profile ({here.name}) picks a layout whose kernels match the reference: "
        f"{chosen['layout']} {chosen['kernels vs reference']:.4f}":
            chosen["kernels vs reference"] < CORRECT,
        f"this CPU's profile picks a layout within 5% of the fastest correct QDQ layout at "
        f"batch 64: {chosen['layout']} {chosen['b64']:.2f}x, fastest {fastest} "
        f"{right[fastest]['b64']:.2f}x": chosen["b64"] >= 0.95 * right[fastest]["b64"],
        "every layout the x86-avx2 check passes has kernels matching the reference: "
        + "; ".join(f"{k} {r['kernels vs reference']:.4f}" for k, r in mlp.items()
                    if not r["flagged"] and r["kernels vs reference"] is not None):
            all(r["kernels vs reference"] < CORRECT for r in mlp.values()
                if not r["flagged"] and r["kernels vs reference"] is not None),
        "every edgeloop output for this CPU's profile keeps >= 0.97 agreement and, where it "
        "has a reference, matches it: " + "; ".join(
            f"{r['scheme']} {_kernels(r)}, {r['agreement']:.3f}" for r in ours):
            all(r["agreement"] >= 0.97 and (r["kernels vs reference"] or 0.0) < CORRECT
                for r in ours),
    }
    if here.saturates:
        wrong = [r for r in mlp.values() if r["flagged"] and r["kernels vs reference"]
                 is not None]
        verdict["on this CPU every QDQ layout the x86-avx2 check flags goes wrong "
                "(the check is not over-cautious): " + "; ".join(
                    f"{r['layout']} {r['kernels vs reference']:.4f}" for r in wrong)] = all(
            r["kernels vs reference"] >= CORRECT for r in wrong)
    return verdict


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    quiet_libraries()
    here = detect()
    with tempfile.TemporaryDirectory() as tmp:
        mlp = layouts(Path(tmp), args.rounds)
        cnn = profiles(Path(tmp), args.rounds)
    body = "\n".join([report(mlp, cnn, here, args.rounds), "", "### Claims", "",
                      *claims_table(claims(mlp, cnn, here))])
    print(body, flush=True)
    write_section("x86_layouts", "Integer layouts on this x86 CPU", body)


if __name__ == "__main__":
    main()
