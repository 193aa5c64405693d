"""Training-time compression on MNIST-1D: distillation and unstructured sparsity. Writes
benchmarks/results/training.PROFILE.md. (Structured pruning is bench_prune_real.py, QAT vs PTQ is
bench_qat_real.py.)

Accuracies are on the 1000-sample MNIST-1D test set (1 point = 10 samples). Latencies come
from :func:`edgeloop.measure.interleaved_latency` (models take turns in each round,
median of rounds).
"""

from __future__ import annotations

import copy
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import write_section

from edgeloop._onnx import session
from edgeloop.compress.distill import Distill
from edgeloop.compress.prune import (
    UnstructuredPrune,
    sparsity,
    zipped_size,
)
from edgeloop.compress.trainbase import (
    TrainContext,
    count_params,
    sample_of,
)
from edgeloop.data import load_builtin
from edgeloop.export import to_onnx
from edgeloop.measure import interleaved_latency, predict
from edgeloop.zoo import TrainConfig, build, train

EPOCHS = 20
ROUNDS = 7  # interleaved latency rounds
TRAIN, VAL, TEST, CALIB = (load_builtin("mnist1d", s) for s in ("train", "val", "test", "calib"))
CTX = TrainContext(TRAIN, VAL, calib=CALIB)
TMP = Path(tempfile.mkdtemp(prefix="edgeloop-bench-"))


def trained(arch: str, seed: int = 0, epochs: int = EPOCHS, **config: object) -> torch.nn.Module:
    torch.manual_seed(seed)   # the seed fixes the initial weights too: reruns reproduce
    return train(build(arch, **config), TRAIN, VAL, TrainConfig(epochs=epochs, seed=seed))


def acc(model: onnx.ModelProto) -> float:
    return 100 * float((predict(session(model), TEST).argmax(1) == TEST.labels).mean())


def export(model: torch.nn.Module, name: str) -> tuple[onnx.ModelProto, float]:
    path = TMP / f"{name}.onnx"
    diff = to_onnx(model, sample_of(TEST), path)
    proto = onnx.load(path)
    onnx.checker.check_model(proto)
    return proto, diff


def distillation() -> str:
    teacher = trained("mnist1d-cnn", width=64)
    t_acc = acc(export(teacher, "teacher")[0])
    student_config = {"width": 0.5}
    rows: dict[str, list[float]] = {"distilled": [], "hard labels only": []}
    n_params = count_params(build("mnist1d-mobile", **student_config))
    for seed in range(3):
        for label, alpha in (("distilled", 0.7), ("hard labels only", 0.0)):
            torch.manual_seed(seed)
            student = build("mnist1d-mobile", **student_config)
            Distill(epochs=15, alpha=alpha, seed=seed).apply(
                student, TrainContext(TRAIN, VAL, teacher=teacher))
            rows[label].append(acc(export(student, f"student-{label}-{seed}")[0]))
    out = ["### Distillation", "",
           f"Teacher: mnist1d-cnn width 64, {count_params(teacher):,} parameters, test "
           f"{t_acc:.1f}%. Student: mnist1d-mobile width 0.5, {n_params:,} parameters "
           f"({n_params / count_params(teacher):.3f}x). 15 epochs, T=4, alpha=0.7; the baseline "
           "uses the same optimiser, epochs, seeds and initialisation.", "",
           "| student | seed 0 | seed 1 | seed 2 | mean % |", "|---|---|---|---|---|"]
    for label, accs in rows.items():
        out.append(f"| {label} | " + " | ".join(f"{a:.1f}" for a in accs)
                   + f" | {np.mean(accs):.2f} |")
    return "\n".join(out)


def unstructured() -> str:
    model = trained("mnist1d-cnn", width=32)
    dense, _ = export(model, "dense")
    sparse_model = UnstructuredPrune(ratio=0.8, finetune_epochs=6).apply(copy.deepcopy(model), CTX)
    sparse, d = export(sparse_model, "sparse")
    lat = dict(zip(("dense", "sparse"),
                   interleaved_latency([dense, sparse], TEST, batch=32, rounds=ROUNDS),
                   strict=True))
    db, sb = dense.SerializeToString(), sparse.SerializeToString()
    return "\n".join([
        "### Unstructured sparsity (80%, global magnitude)", "",
        "onnxruntime's CPU kernels do not skip zero weights: the sparse model is as large and "
        "as slow as the dense one. The gain is the compressed download.", "",
        "| model | test acc % | weight sparsity | onnx bytes | zipped bytes | b32 ms |",
        "|---|---|---|---|---|---|",
        f"| dense | {acc(dense):.1f} | {sparsity(model):.2f} | {len(db):,} | "
        f"{zipped_size(db):,} | {lat['dense']:.3f} |",
        f"| 80% sparse, 6 epochs fine-tuning | {acc(sparse):.1f} | "
        f"{sparsity(sparse_model):.2f} | {len(sb):,} | {zipped_size(sb):,} | "
        f"{lat['sparse']:.3f} |", "",
        f"Sparse export max abs diff vs PyTorch: {d:.1e}."])


def main() -> None:
    torch.set_num_threads(2)
    sections = [distillation(), unstructured()]
    body = "\n\n".join(sections)
    print(body)
    write_section("training", "Distillation and unstructured sparsity (MNIST-1D)", body)


if __name__ == "__main__":
    main()
