"""Commands for training-time compression: prune, qat, distill, compress RECIPE.toml."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from edgeloop.cli._app import app, console
from edgeloop.errors import UsageError

if TYPE_CHECKING:
    from edgeloop.compress.trainbase import TorchPass
    from edgeloop.measure import LatencyConfig

Data = Annotated[Path, typer.Option("--data", help="Training .npz with labels")]
Val = Annotated[Path, typer.Option("--val", help="Validation .npz with labels")]
Out = Annotated[Path, typer.Option("--out", help="Folder for model.onnx and report.json")]
Runs = Annotated[int, typer.Option(min=1, help="Timed runs per batch size in the report")]
Model = Annotated[str, typer.Argument(
    help="An edgeloop checkpoint, a torch.save'd module, or a factory package.module:callable "
         "(e.g. torchvision.models:resnet18)")]
Weights = Annotated[Path | None, typer.Option(
    "--weights", help="A factory's state_dict file")]
ModelConfig = Annotated[Path | None, typer.Option(
    "--model-config", help="A factory's keyword arguments as JSON (for a Hugging Face class: "
                           "its config)")]


def _latency(runs: int) -> LatencyConfig:
    from edgeloop.measure import LatencyConfig

    return LatencyConfig(min_runs=runs, max_seconds=2.0, floor_runs=min(runs, 20))


def _render(report: dict[str, Any], out: Path) -> None:
    t = Table(title=f"{out}/report.json")
    for col in ("", "before", "after", "ratio"):
        t.add_column(col)
    b, a, r = report["before"], report["after"], report["ratio"]
    t.add_row("accuracy", f"{b['accuracy']:.2%}", f"{a['accuracy']:.2%}",
              f"{-report['accuracy_drop_points']:+.2f} pts")
    for key in ("parameters", "flops", "size_bytes"):
        t.add_row(key, f"{b[key]:,}", f"{a[key]:,}", f"{r[key]:.3f}x")
    for key in ("latency_b1_ms", "latency_b32_ms"):
        t.add_row(key, f"{b[key]:.3f}", f"{a[key]:.3f}", f"{r[key]:.3f}x")
    if a.get("zip_bytes"):
        t.add_row("zipped bytes", f"{b['zip_bytes']:,}", f"{a['zip_bytes']:,}",
                  f"{a['zip_bytes'] / b['zip_bytes']:.3f}x")
    console.print(t)
    for note in report["notes"]:
        console.print(f"note: {note}")


def _run(model: str, weights: Path | None, config: Path | None, passes: list[TorchPass],
         data: Path, val: Path, out: Path, runs: int) -> None:
    from edgeloop.compress.recipe import compress_torch
    from edgeloop.data import load_npz
    from edgeloop.models import load_model

    report = compress_torch(load_model(model, weights=weights, config=config), passes,
                            train=load_npz(data), val=load_npz(val), out=out,
                            latency_config=_latency(runs))
    _render(report, out)


@app.command("prune")
def prune_cmd(
    model: Model, data: Data, val: Val, out: Out, weights: Weights = None,
    model_config: ModelConfig = None,
    structured: Annotated[float | None, typer.Option(
        help="Fraction of channels to remove, in (0, 1)")] = None,
    unstructured: Annotated[float | None, typer.Option(
        help="Fraction of weights to zero, in (0, 1)")] = None,
    importance: Annotated[str, typer.Option(help="structured: l1, l2 or taylor")] = "l1",
    scope: Annotated[str, typer.Option(help="unstructured: global or layer")] = "global",
    steps: Annotated[int, typer.Option(min=1, help="Pruning rounds")] = 3,
    finetune_epochs: Annotated[int | None, typer.Option(
        min=0, help="Fine-tuning epochs over all rounds (default: the pass's)")] = None,
    runs: Runs = 100,
) -> None:
    """Structured (channels removed) or unstructured (weights zeroed) pruning + fine-tuning."""
    if (structured is None) == (unstructured is None):
        raise UsageError("give exactly one of --structured RATIO or --unstructured RATIO")
    from edgeloop.compress.prune import StructuredPrune, UnstructuredPrune

    p: TorchPass
    chosen = {} if finetune_epochs is None else {"finetune_epochs": finetune_epochs}
    if structured is not None:
        p = StructuredPrune(ratio=structured, importance=importance, steps=steps, **chosen)
    else:
        p = UnstructuredPrune(ratio=float(unstructured or 0), scope=scope, steps=steps, **chosen)
    _run(model, weights, model_config, [p], data, val, out, runs)


@app.command("qat")
def qat_cmd(
    model: Model, data: Data, val: Val, out: Out, weights: Weights = None,
    model_config: ModelConfig = None,
    epochs: Annotated[int | None, typer.Option(
        min=0, help="Fine-tuning epochs (default: the QAT pass's)")] = None,
    bits: Annotated[int, typer.Option(help="Weight bits: 8 or 4")] = 8,
    distill: Annotated[float | None, typer.Option(
        help="Weight of the float model's softened outputs in the loss, in [0, 1]; 0 trains "
             "on the labels alone (default: the QAT pass's)")] = None,
    target: Annotated[str, typer.Option(
        help="Hardware profile whose int8 layout training and export use, or auto")] = "auto",
    runs: Runs = 100,
) -> None:
    """Quantization-aware fine-tuning, exported as an integer QDQ ONNX model. The result is
    the post-training-quantized model unless fine-tuning lowers the exported model's
    validation loss without lowering its accuracy."""
    from edgeloop.compress.qat import QAT
    from edgeloop.targets import get_target

    chosen = {k: v for k, v in (("epochs", epochs), ("distill", distill)) if v is not None}
    _run(model, weights, model_config, [QAT(bits=bits, target=get_target(target), **chosen)],
         data, val, out, runs)


@app.command("distill")
def distill_cmd(
    teacher: Annotated[str, typer.Option(
        help="The teacher: an edgeloop checkpoint, a torch.save'd module, or a factory")],
    student: Annotated[str, typer.Option(
        help="The student: a zoo architecture, or a factory package.module:callable")],
    data: Data, val: Val, out: Out,
    teacher_weights: Annotated[Path | None, typer.Option(
        help="A factory teacher's state_dict file")] = None,
    student_config: Annotated[Path | None, typer.Option(
        help="A factory student's keyword arguments as JSON")] = None,
    width: Annotated[float | None, typer.Option(
        help="Zoo student width (multiplier)")] = None,
    epochs: Annotated[int, typer.Option(min=1)] = 30,
    temperature: float = 4.0,
    alpha: Annotated[float, typer.Option(help="Weight of the teacher's soft targets")] = 0.7,
    seed: int = 0,
    runs: Runs = 100,
) -> None:
    """Train a small student from a teacher (softened KL + hard labels)."""
    from edgeloop.compress.distill import Distill
    from edgeloop.compress.recipe import compress_torch
    from edgeloop.data import load_npz
    from edgeloop.models import LoadedModel, load_model
    from edgeloop.zoo import ARCHS, build

    if student in ARCHS:
        if student_config is not None:
            raise UsageError("--student-config goes with a factory student; a zoo student "
                             "takes --width")
        config: dict[str, Any] = {} if width is None else {"width": _width(student, width)}
        pupil = LoadedModel(build(student, **config).eval(), student, config)
    else:
        if width is not None:
            raise UsageError("--width goes with a zoo student; a factory student takes "
                             "--student-config")
        pupil = load_model(student, config=student_config)
    p = Distill(epochs=epochs, temperature=temperature, alpha=alpha, seed=seed)
    report = compress_torch(load_model(teacher, weights=teacher_weights), [p],
                            train=load_npz(data), val=load_npz(val), out=out, student=pupil,
                            latency_config=_latency(runs))
    _render(report, out)


def _width(arch: str, width: float) -> float | int:
    """The CNNs take an integer channel count, the mobile net a multiplier."""
    if width <= 0:
        raise UsageError(f"`--width` must be > 0; got {width}")
    return width if arch.endswith("mobile") else int(width)


@app.command("compress")
def compress_cmd(
    recipe: Annotated[Path, typer.Argument(help="A TOML recipe of training-time passes")],
    runs: Runs = 100,
) -> None:
    """Run a recipe: a chain of prune / distill / qat passes (see `edgeloop.compress.recipe`)."""
    from edgeloop.compress.recipe import load_recipe, run_recipe

    r = load_recipe(recipe)
    _render(run_recipe(r, latency_config=_latency(runs)), r.out)
