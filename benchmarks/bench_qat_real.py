"""QAT vs post-training quantization with the same PT2E quantizer, at 8 and 4 bits, on a
torchvision backbone (mobilenet_v2 on digits-rgb) and the zoo models mnist1d-cnn,
mnist1d-mobile and digits-cnn, for the x86-avx2 and x86-avx512-vnni target profiles. Writes
benchmarks/results/qat_real.PROFILE.md.

Each base model is trained in fp32 with seeds 0..SEEDS-1 (the seed fixes the initial weights
and the data order); PTQ is ``quantize_export`` (``prepare_pt2e``, min/max calibration on
256 training samples, ``convert_pt2e``); QAT is ``QAT(bits, target, seed).apply`` with its
defaults (mobilenet_v2: 2 epochs), which skips fine-tuning when PTQ matches fp32 on validation and
keeps the fine-tuned graph only if it beats PTQ on validation accuracy (McNemar) and loss
by more than chance. Accuracy and top-1
agreement with fp32 are on each data set's test split, run by onnxruntime. The profile
decides the grid (7-bit weights for x86-avx2), not the CPU the models run on, so both
profiles are measured on this machine.

    python benchmarks/bench_qat_real.py            # the full run
    python benchmarks/bench_qat_real.py --models mnist1d-cnn,digits-cnn
    python benchmarks/bench_qat_real.py --quick    # 1 seed, short training: checks it works
"""

from __future__ import annotations

import argparse
import copy
import multiprocessing as mp
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import claims_table, write_section

from edgeloop._onnx import session
from edgeloop._torchvision import import_torchvision
from edgeloop.compress.qat import QAT, QATModel, quantize_export
from edgeloop.compress.trainbase import TrainContext
from edgeloop.data import Dataset, load_builtin
from edgeloop.measure import graph_summary, predict
from edgeloop.targets import TARGETS, detect
from edgeloop.zoo import TrainConfig, build, train

PROFILES = ("x86-avx2", "x86-avx512-vnni")
BITS = (8, 4)


@dataclass(frozen=True)
class Case:
    name: str
    dataset: str
    make: Callable[[], torch.nn.Module]
    epochs: int          # fp32 training
    lr: float            # fp32 training's AdamW peak learning rate
    batch_size: int = 128
    qat_epochs: int = QAT.epochs


def _mobilenet_v2() -> torch.nn.Module:
    return import_torchvision().models.mobilenet_v2(num_classes=10)


CASES = {c.name: c for c in (
    # from scratch at 32x32 (AdamW one-cycle peak 5e-3, batch 64) mobilenet_v2 reaches ~98%
    # test accuracy in 12 epochs (~4 min on one core); two QAT epochs per grid
    Case("mobilenet_v2", "digits-rgb", _mobilenet_v2, 12, 5e-3, batch_size=64, qat_epochs=2),
    Case("mnist1d-cnn", "mnist1d", lambda: build("mnist1d-cnn"), 20, 3e-3),
    Case("mnist1d-mobile", "mnist1d", lambda: build("mnist1d-mobile"), 20, 3e-3),
    Case("digits-cnn", "digits", lambda: build("digits-cnn"), 20, 3e-3),
)}


@dataclass
class Row:
    model: str
    profile: str
    bits: int
    fp32: float = 0.0
    ptq: float = 0.0
    qat: float = 0.0
    ptq_agree: float = 0.0
    qat_agree: float = 0.0
    kept: int = 0          # seeds where QAT kept its fine-tuned graph
    kernels: str = ""


def _top1(proto: onnx.ModelProto, data: Dataset) -> np.ndarray:
    return predict(session(proto), data).argmax(1)


def _kernels(proto: onnx.ModelProto) -> str:
    float_ops, int_ops, _ = graph_summary(proto)
    return ("float " + ",".join(float_ops) if float_ops else "int: "
            + ", ".join(f"{k} x{v}" for k, v in sorted(int_ops.items())))


def _tuned(q: QATModel) -> bool:
    from torchao.quantization.pt2e import FakeQuantizeBase

    return any(isinstance(m, FakeQuantizeBase) for m in q.prepared.modules())


def run(case: Case, seeds: int, *, quick: bool) -> list[Row]:
    train_data, val, test, calib = (load_builtin(case.dataset, s)
                                    for s in ("train", "val", "test", "calib"))
    if quick:
        train_data = train_data.take(slice(0, 1000))
    ctx = TrainContext(train_data, val, calib=calib)
    rows = {(p, b): Row(case.name, p, b) for p in PROFILES for b in BITS}
    # profiles whose integer grid is the same at these bits give the same models: measure
    # once (4-bit weights are [-7, 7] on both x86 profiles)
    grids: dict[tuple[int, str], tuple[str, int]] = {}
    for profile, bits in rows:
        t = TARGETS[profile]
        grids.setdefault((t.weight_max(bits), t.activation_type), (profile, bits))
    for seed in range(seeds):
        torch.manual_seed(seed)
        base = train(case.make(), train_data, val,
                     TrainConfig(epochs=2 if quick else case.epochs, lr=case.lr, seed=seed,
                                 batch_size=case.batch_size),
                     description=f"fp32 {case.name} seed {seed}")
        with torch.no_grad():
            ref = base(torch.from_numpy(test.inputs["x"])).argmax(1).numpy()
        fp32 = float((ref == test.labels).mean())
        for (profile, bits), row in rows.items():
            target = TARGETS[profile]
            first = grids[target.weight_max(bits), target.activation_type]
            if first != (profile, bits):
                continue
            ptq, _ = quantize_export(base, calib, bits=bits, target=target)
            q = QAT(bits=bits, target=target, seed=seed,
                    epochs=1 if quick else case.qat_epochs).apply(copy.deepcopy(base), ctx)
            qat, _ = quantize_export(q, calib, bits=bits, target=target)
            p_top, q_top = _top1(ptq, test), _top1(qat, test)
            row.fp32 += fp32 / seeds
            row.ptq += float((p_top == test.labels).mean()) / seeds
            row.qat += float((q_top == test.labels).mean()) / seeds
            row.ptq_agree += float((p_top == ref).mean()) / seeds
            row.qat_agree += float((q_top == ref).mean()) / seeds
            row.kept += _tuned(q)
            row.kernels = _kernels(qat)
            print(f"{case.name} seed {seed} {profile} {bits}-bit: fp32 {fp32:.3f} "
                  f"ptq {(p_top == test.labels).mean():.3f} qat {(q_top == test.labels).mean():.3f}"
                  f" kept {_tuned(q)}", flush=True)
    for profile, bits in list(rows):
        t = TARGETS[profile]
        first = grids[t.weight_max(bits), t.activation_type]
        if first != (profile, bits):
            rows[profile, bits] = Row(**{**vars(rows[first]), "profile": profile})
            rows[profile, bits].kernels += f" (same grid as {first[0]})"
    return list(rows.values())


def table(rows: list[Row], seeds: int) -> list[str]:
    out = [f"Mean of {seeds} seed(s); accuracy and agreement in %, on the test split.", "",
           "| model | profile | weight bits | fp32 acc | PTQ acc | QAT acc | QAT - PTQ pts | "
           "PTQ agree w/ fp32 | QAT agree w/ fp32 | QAT kept its fine-tuning | QAT kernels |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r.model} | {r.profile} | {r.bits} | {100 * r.fp32:.1f} | "
                   f"{100 * r.ptq:.1f} | {100 * r.qat:.1f} | {100 * (r.qat - r.ptq):+.1f} | "
                   f"{100 * r.ptq_agree:.1f} | {100 * r.qat_agree:.1f} | {r.kept}/{seeds} | "
                   f"{r.kernels} |")
    return out


def _run_named(name: str, seeds: int, quick: bool) -> list[Row]:
    """:func:`run` for the case called ``name`` (what a worker process is given)."""
    torch.set_num_threads(1)   # accuracy only: one thread gives the same numbers on any machine
    return run(CASES[name], seeds, quick=quick)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="1 seed, 2 fp32 epochs, 1 QAT epoch, 1000 training samples")
    parser.add_argument("--models", default=",".join(CASES),
                        help=f"comma-separated, from {', '.join(CASES)}")
    parser.add_argument("--jobs", type=int, default=1,
                        help="models measured at once, each in its own process on one "
                             "thread (the numbers do not change)")
    args = parser.parse_args()
    seeds = 1 if args.quick else 3
    start = time.perf_counter()
    names = args.models.split(",")
    with ProcessPoolExecutor(max(1, args.jobs), mp_context=mp.get_context("spawn")) as pool:
        rows = [r for part in pool.map(_run_named, names, [seeds] * len(names),
                                       [args.quick] * len(names)) for r in part]
    minutes = (time.perf_counter() - start) / 60
    host = detect()
    body = "\n".join([
        f"Measured on {host.name} ({host.kind}); the profile column decides the integer "
        "layout (x86-avx2: 7-bit weights, which AVX2 kernels run without saturating, see "
        "tests/test_saturation.py), whatever CPU runs it. PTQ and QAT use the same PT2E "
        "quantizer (`edgeloop.compress.qdq_quantizer`): Q/DQ where onnxruntime fuses them "
        "into QLinearConv/QGemm/QLinearAdd, weights per channel, 8-bit activations, int32 "
        "biases. QAT fine-tunes the exported graph itself (distilling from fp32) and keeps "
        "the result only if it beats PTQ on validation by more than chance in both the "
        "samples it fixes against those it breaks (McNemar) and the per-sample loss; it does "
        "not fine-tune when PTQ already matches fp32 on validation.",
        "" if not args.quick else "\n**Quick run** (`--quick`): 1 seed, 2 fp32 epochs, 1 QAT "
        "epoch, 1000 training samples — a check that the benchmark runs, not a result.",
        "", *table(rows, seeds), "", *claims_table({
            f"{r.model} {r.profile} {r.bits}-bit: QAT >= PTQ on test accuracy, mean of "
            f"{seeds} seed(s) ({100 * (r.qat - r.ptq):+.1f} pts)": r.qat >= r.ptq - 1e-9
            for r in rows}), "", f"Run time: {minutes:.1f} min."])
    print(body)
    write_section("qat_real", "QAT vs PTQ with one PT2E quantizer (torchvision and zoo models)",
                  body)


if __name__ == "__main__":
    main()
