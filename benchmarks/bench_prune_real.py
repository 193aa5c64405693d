"""Structured pruning (torch-pruning's dependency graph + distilling fine-tuning) on real
architectures: torchvision MobileNetV2, ResNet-18 and EfficientNet-B0 on digits-rgb, a
BERT-style encoder on a generated token task, and the zoo
mnist1d-cnn. Writes benchmarks/results/prune_real.PROFILE.md.

Latency ratios come from :func:`edgeloop.measure.interleaved_latency` (models take
turns in each round, median of rounds), so every ratio compares models timed together.
``--quick`` runs a reduced version (less data, fewer epochs, one seed) and only prints.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import claims_table, write_section

from edgeloop._onnx import session
from edgeloop.compress import Int8, apply_pass
from edgeloop.compress.prune import StructuredPrune
from edgeloop.compress.trainbase import TrainContext, count_flops, count_params, sample_of
from edgeloop.data import Dataset, load_builtin
from edgeloop.export import to_onnx
from edgeloop.measure import interleaved_latency, predict
from edgeloop.targets import detect
from edgeloop.zoo import TrainConfig, build, train
from edgeloop.zoo.train import accuracy

TMP = Path(tempfile.mkdtemp(prefix="edgeloop-bench-prune-"))
ROUNDS = 7
VISION = "mobilenet_v2,resnet18,efficientnet_b0"


def export(model: torch.nn.Module, data: Dataset, name: str) -> onnx.ModelProto:
    to_onnx(model, sample_of(data), TMP / f"{name}.onnx")
    return onnx.load(TMP / f"{name}.onnx")


def latency_ratios(base: onnx.ModelProto, others: list[onnx.ModelProto], data: Dataset,
                   batch: int) -> tuple[float, list[float]]:
    """Base latency (ms) and each other model's latency as a ratio of it."""
    ms = interleaved_latency([base, *others], data, batch=batch, rounds=ROUNDS)
    return ms[0], [m / ms[0] for m in ms[1:]]


def pruned(model: torch.nn.Module, ctx: TrainContext, **config: object) -> torch.nn.Module:
    return StructuredPrune(**config).apply(copy.deepcopy(model), ctx)  # type: ignore[arg-type]


# --- mnist1d-cnn: the goal of issue 10 ------------------------------------------------------

def mnist1d(seeds: int, epochs: int) -> tuple[list[str], dict[str, bool]]:
    train_d, val, test, calib = (load_builtin("mnist1d", s)
                                 for s in ("train", "val", "test", "calib"))
    ctx = TrainContext(train_d, val)
    rows, drops, int8_drops, flops_r, lat_r = [], [], [], [], []
    for seed in range(seeds):
        torch.manual_seed(seed)
        base = train(build("mnist1d-cnn"), train_d, val, TrainConfig(epochs=epochs, seed=seed))
        variants = {"distilled (defaults)": pruned(base, ctx, ratio=0.5, seed=seed),
                    "labels only (distill_alpha=0)": pruned(base, ctx, ratio=0.5, seed=seed,
                                                            distill_alpha=0.0)}
        protos = [export(m, test, f"mnist1d-{seed}-{i}") for i, m in enumerate(variants.values())]
        _, r32 = latency_ratios(export(base, test, f"mnist1d-{seed}"), protos, test, 32)
        a0 = 100 * accuracy(base, test)
        f0 = count_flops(base, sample_of(test))
        for (label, m), proto, r in zip(variants.items(), protos, r32, strict=True):
            a = 100 * accuracy(m, test)
            int8 = apply_pass(Int8(), proto, calib)
            a8 = 100 * float((predict(session(int8), test).argmax(1) == test.labels).mean())
            fr = count_flops(m, sample_of(test)) / f0
            rows.append(f"| {seed} | {label} | {a0:.1f} | {a:.1f} | {a0 - a:.1f} | {a8:.1f} | "
                        f"{a0 - a8:.1f} | {fr:.3f} | {count_params(m):,} / "
                        f"{count_params(base):,} | {r:.2f} |")
            if label.startswith("distilled"):
                drops.append(a0 - a)
                int8_drops.append(a0 - a8)
                flops_r.append(fr)
                lat_r.append(r)
    out = ["### mnist1d-cnn (zoo default, width 32), 50% of channels", "",
           f"Base trained {epochs} epochs per seed; pruned with the `StructuredPrune` defaults "
           f"({_defaults()}), as `edgeloop prune model.pt --data train.npz --val val.npz "
           "--structured 0.5` does; then `int8` (`edgeloop quantize --scheme int8`, "
           "calibrated on the calib split). Test set: 1000 samples (1 point = 10 samples).",
           "",
           "| seed | fine-tuning | base acc % | pruned acc % | drop pts | pruned + int8 acc % | "
           "drop pts | FLOPs ratio | params | b32 latency ratio |",
           "|---|---|---|---|---|---|---|---|---|---|", *rows, "",
           f"Distilled defaults over {seeds} seeds: mean drop {np.mean(drops):.2f} points "
           f"(worst {max(drops):.1f}), pruned + int8 mean drop {np.mean(int8_drops):.2f} "
           f"(worst {max(int8_drops):.1f}).", ""]
    claims = {
        f"mnist1d-cnn 50%: mean drop over {seeds} seeds <= 1 point ({np.mean(drops):.2f})":
            float(np.mean(drops)) <= 1.0,
        f"mnist1d-cnn 50% + int8: mean drop <= 1.5 points ({np.mean(int8_drops):.2f})":
            float(np.mean(int8_drops)) <= 1.5,
        f"mnist1d-cnn 50%: FLOPs <= 0.35x ({max(flops_r):.3f}x)": max(flops_r) <= 0.35,
        f"mnist1d-cnn 50%: b32 latency <= 0.6x (worst {max(lat_r):.2f}x)": max(lat_r) <= 0.6}
    return out, claims


def _defaults() -> str:
    d = StructuredPrune()
    return (f"importance {d.importance}, {d.steps} steps, {d.finetune_epochs} fine-tuning "
            f"epochs, lr {d.lr}, distillation alpha {d.distill_alpha}, T {d.temperature}")


# --- torchvision CNNs on digits-rgb ---------------------------------------------------------

def vision(archs: list[str], epochs: int, finetune: int, n_train: int) -> tuple[list[str],
                                                                               dict[str, bool]]:
    from edgeloop._torchvision import import_torchvision

    tv = import_torchvision()
    train_d = load_builtin("digits-rgb", "train").take(slice(0, n_train))
    val, test = (load_builtin("digits-rgb", s) for s in ("val", "test"))
    ctx = TrainContext(train_d, val)
    out = ["### torchvision CNNs on digits-rgb (3x32x32, 10 classes)", "",
           f"Trained from scratch for {epochs} epochs (AdamW, one-cycle peak 5e-3, batch 64) "
           f"on {len(train_d.labels)} images, then pruned (L1 group magnitude, 2 steps, "
           "widths kept multiples of 8, "
           f"{finetune} epochs of distilling fine-tuning). Test set: {len(test.labels)} "
           "images.", "",
           "| model | ratio | test acc % | drop pts | FLOPs ratio | params | b1 ms | b1 ratio | "
           "b32 ms | b32 ratio | minutes |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    claims: dict[str, bool] = {}
    for arch in archs:
        t0 = time.time()
        torch.manual_seed(0)
        base = train(getattr(tv.models, arch)(num_classes=10), train_d, val,
                     TrainConfig(epochs=epochs, batch_size=64, lr=5e-3),
                     description=f"training {arch}")
        minutes = (time.time() - t0) / 60
        variants = {}
        for ratio in (0.3, 0.5):
            t0 = time.time()
            variants[ratio] = (pruned(base, ctx, ratio=ratio, steps=2, finetune_epochs=finetune,
                                      batch_size=64),
                               (time.time() - t0) / 60)
        base_p = export(base, test, arch)
        protos = [export(m, test, f"{arch}-{r}") for r, (m, _) in variants.items()]
        b1, r1 = latency_ratios(base_p, protos, test, 1)
        b32, r32 = latency_ratios(base_p, protos, test, 32)
        a0, f0 = 100 * accuracy(base, test), count_flops(base, sample_of(test))
        out.append(f"| {arch} | 0 | {a0:.1f} | | 1 | {count_params(base):,} | {b1:.2f} | 1 | "
                   f"{b32:.2f} | 1 | {minutes:.1f} (training) |")
        for i, (ratio, (m, mins)) in enumerate(variants.items()):
            a, fr = 100 * accuracy(m, test), count_flops(m, sample_of(test)) / f0
            out.append(f"| {arch} | {ratio} | {a:.1f} | {a0 - a:.1f} | {fr:.3f} | "
                       f"{count_params(m):,} | {b1 * r1[i]:.2f} | {r1[i]:.2f} | "
                       f"{b32 * r32[i]:.2f} | {r32[i]:.2f} | {mins:.1f} |")
            claims[f"{arch} {ratio:.0%}: b32 latency below the base ({r32[i]:.2f}x)"] = r32[i] < 1
        print(f"{arch} done", flush=True)
    out.append("")
    return out, claims


# --- a BERT-style encoder -------------------------------------------------------------------

VOCAB, LENGTH, CLASSES = 1000, 32, 4


def token_task(n: int, seed: int) -> Dataset:
    """Each class owns 8 marker tokens; a sequence of random tokens (ids 10..) carries a few
    markers of its class and fewer of one other class, at random places: the label is the
    class whose markers are most frequent. Token 0 is padding (the tail of some sequences)."""
    gen = np.random.default_rng(seed)
    ids = gen.integers(10 + 8 * CLASSES, VOCAB, (n, LENGTH))
    labels = gen.integers(0, CLASSES, n)
    for i, y in enumerate(labels):
        other = (y + gen.integers(1, CLASSES)) % CLASSES
        k = gen.integers(2, 5)
        pos = gen.permutation(LENGTH - 8)[: 2 * k - 1]
        ids[i, pos[:k]] = 10 + 8 * y + gen.integers(0, 8, k)
        ids[i, pos[k:]] = 10 + 8 * other + gen.integers(0, 8, k - 1)
        ids[i, LENGTH - gen.integers(0, 8):] = 0
    return Dataset({"input_ids": ids.astype(np.int64)}, labels.astype(np.int64))


def bert(n_train: int, epochs: int, finetune: int, hidden: int, layers: int) -> tuple[
        list[str], dict[str, bool]]:
    from edgeloop._torchvision import ensure_importable

    ensure_importable()
    from transformers import BertConfig, BertForSequenceClassification

    from edgeloop.models import TextClassifier

    train_d, val, test = token_task(n_train, 0), token_task(400, 1), token_task(1000, 2)
    ctx = TrainContext(train_d, val)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=4, intermediate_size=4 * hidden,
                        num_labels=CLASSES, max_position_embeddings=LENGTH,
                        pad_token_id=0, attn_implementation="eager")
    t0 = time.time()
    base = train(TextClassifier(BertForSequenceClassification(config)), train_d, val,
                 TrainConfig(epochs=epochs, lr=1e-3), description="training the encoder")
    minutes = (time.time() - t0) / 60
    t0 = time.time()
    small = pruned(base, ctx, ratio=0.5, steps=2, finetune_epochs=finetune, lr=5e-4)
    prune_minutes = (time.time() - t0) / 60
    with torch.no_grad():
        x = torch.from_numpy(test.inputs["input_ids"])
        agree = float((base(x).argmax(1) == small(x).argmax(1)).float().mean())
    base_p, small_p = export(base, test, "bert"), export(small, test, "bert-pruned")
    timed = Dataset({"x": test.inputs["input_ids"]}, test.labels)   # the export's input name
    b1, (r1,) = latency_ratios(base_p, [small_p], timed, 1)
    b32, (r32,) = latency_ratios(base_p, [small_p], timed, 32)
    a0, a1 = 100 * accuracy(base, test), 100 * accuracy(small, test)
    f0 = count_flops(base, sample_of(test))
    heads = [layer.attention.self.num_attention_heads for layer in small.model.bert.encoder.layer]
    ffn = [layer.intermediate.dense.out_features for layer in small.model.bert.encoder.layer]
    out = ["### BERT-style encoder (Hugging Face BertForSequenceClassification)", "",
           f"hidden {hidden}, {layers} layers, 4 heads, FFN {4 * hidden}, vocabulary {VOCAB}, "
           f"{LENGTH} tokens; task: which of {CLASSES} marker-token sets occurs most often "
           f"(generated, {n_train} training sequences, {epochs} epochs, {minutes:.1f} min). "
           f"Pruned: half the heads (whole heads, size {hidden // 4} kept) and half the FFN "
           f"width in 2 steps with {finetune} epochs of distilling fine-tuning "
           f"({prune_minutes:.1f} min); heads per layer now {heads}, FFN {ffn}.", "",
           "| model | test acc % | agreement with base % | FLOPs ratio | params | b1 ms | "
           "b1 ratio | b32 ms | b32 ratio |", "|---|---|---|---|---|---|---|---|---|",
           f"| base | {a0:.1f} | 100 | 1 | {count_params(base):,} | {b1:.2f} | 1 | {b32:.2f} | 1 |",
           f"| 50% heads + FFN | {a1:.1f} | {100 * agree:.1f} | "
           f"{count_flops(small, sample_of(test)) / f0:.3f} | {count_params(small):,} | "
           f"{b1 * r1:.2f} | {r1:.2f} | {b32 * r32:.2f} | {r32:.2f} |", ""]
    claims = {f"encoder: heads halved in every layer ({heads})": all(h == 2 for h in heads),
              f"encoder: b32 latency below the base ({r32:.2f}x)": r32 < 1}
    return out, claims


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="reduced run; print only")
    parser.add_argument("--parts", default="mnist1d,vision,bert",
                        help="comma-separated subset; anything but all three only prints")
    parser.add_argument("--archs", default=VISION,
                        help="torchvision models for the vision part")
    args = parser.parse_args()
    quick, chosen = args.quick, args.parts.split(",")
    torch.set_num_threads(2)
    t0 = time.time()
    sections, claims = [f"CPU kind (edgeloop target profile): **{detect().name}**.", ""], {}
    parts = {
        "mnist1d": lambda: mnist1d(seeds=1 if quick else 5, epochs=20),
        "vision": lambda: vision(args.archs.split(","), epochs=2 if quick else 12,
                                 finetune=1 if quick else 4,
                                 n_train=256 if quick else 5032),
        "bert": lambda: bert(n_train=256 if quick else 2000, epochs=1 if quick else 8,
                             finetune=1 if quick else 4, hidden=64 if quick else 256,
                             layers=2 if quick else 4)}
    for name in chosen:
        text, c = parts[name]()
        sections += text
        claims.update(c)
        print("\n".join(text), flush=True)
    sections += [*claims_table(claims), "",
                 f"Whole run: {(time.time() - t0) / 60:.0f} minutes on this machine."]
    body = "\n".join(sections)
    print(body)
    if not quick and sorted(chosen) == sorted(parts) and args.archs == VISION:
        write_section("prune_real", "Structured pruning of real architectures", body)


if __name__ == "__main__":
    main()
