"""Commands for data, reference models, post-training quantization and evaluation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from edgeloop._trainconfig import TrainConfig
from edgeloop.cli._app import app, console, zoo_app

if TYPE_CHECKING:
    from edgeloop.measure import EvalReport


@app.command("data")
def data_cmd(
    name: Annotated[str, typer.Argument(help="mnist1d, digits or digits-rgb")],
    out: Annotated[Path, typer.Option(help="Where to write the .npz")],
    split: Annotated[str, typer.Option(help="train, val, calib or test")] = "test",
) -> None:
    """Write a built-in data set split as an .npz (input `x` plus `labels`)."""
    from edgeloop.data import load_builtin, save_npz

    data = load_builtin(name, split)
    save_npz(out, data)
    console.print(f"wrote {out}: {len(data)} samples of {name}/{split}")


@zoo_app.command("train")
def zoo_train(
    arch: Annotated[str, typer.Argument(
        help="mnist1d-cnn, mnist1d-cnn-exits, mnist1d-mlp, mnist1d-mobile or digits-cnn")],
    out: Annotated[Path, typer.Option(help="Folder for model.onnx and model.pt")],
    epochs: Annotated[int, typer.Option(min=1)] = TrainConfig.epochs,
    seed: int = 0,
    width: Annotated[float | None, typer.Option(
        help="Width: channels for the CNNs, a multiplier for mnist1d-mobile")] = None,
) -> None:
    """Train a reference model on its built-in data set (CPU, under two minutes)."""
    from edgeloop.zoo import train_zoo_model

    arch_config = {} if width is None else {"width": width if arch == "mnist1d-mobile"
                                            else int(width)}
    result = train_zoo_model(arch, out, config=TrainConfig(epochs=epochs, seed=seed),
                             **arch_config)
    console.print(f"wrote {out}/model.onnx and {out}/model.pt: "
                  f"val accuracy {result['val_accuracy']:.2%}, "
                  f"test accuracy {result['test_accuracy']:.2%}")


@app.command("quantize")
def quantize_cmd(
    model: Annotated[Path, typer.Argument(help="The float ONNX model")],
    out: Annotated[Path, typer.Option(help="Where to write the quantized ONNX model")],
    scheme: Annotated[str, typer.Option(
        help="int8, int8-dynamic, int8-static, int4-weight, binary, ort-static, ort-dynamic")],
    data: Annotated[Path | None, typer.Option(help="Calibration .npz")] = None,
    calibration: Annotated[str | None, typer.Option(
        help="int8-static: minmax, entropy or percentile [default: minmax]")] = None,
    block_size: Annotated[int | None, typer.Option(
        help="int4-weight: weights per scale [default: 32]")] = None,
    max_error: Annotated[float | None, typer.Option(
        help="int8: tolerated error to the float model on the calibration data: share of "
             "changed top-1 decisions for classifiers [default: 0.02], else 1 - mean output "
             "cosine [default: 0.005]")] = None,
    compare: Annotated[str | None, typer.Option(
        help="int8: what the error measures: top1, outputs, or auto (top1 when the output "
             "is classifier logits) [default: auto]")] = None,
    allow_slower: Annotated[bool, typer.Option(
        help="int8: accept an int8 model no faster than float (when only size matters)")
    ] = False,
    threads: Annotated[int | None, typer.Option(
        min=0, help="int8: intra-op threads the model will run with on the device; speed "
                    "against float is judged at this count [default: 0, every core]")] = None,
    target: Annotated[str, typer.Option(help="Hardware profile, or auto")] = "auto",
) -> None:
    """Post-training quantization of an ONNX model (onnxruntime is the engine)."""
    from edgeloop.compress import make_scheme, run_pass
    from edgeloop.data import load_npz
    from edgeloop.targets import get_target

    options: dict[str, object] = {"calibration": calibration, "block_size": block_size,
                                  "max_error": max_error, "compare": compare,
                                  "faster_than_float": False if allow_slower else None,
                                  "threads": threads}
    if scheme in ("int8", "int8-static", "int8-dynamic"):
        options["target"] = get_target(target)
    p = make_scheme(scheme, **options)
    calib = load_npz(data) if data is not None else None
    run_pass(p, model, out, calib)
    console.print(f"wrote {out} ({out.stat().st_size:,} bytes, scheme {scheme})")


def _render(report: EvalReport) -> Table:
    from edgeloop.measure import thread_count

    t = Table(title=report.model, show_header=False)
    t.add_row("file size", f"{report.size_bytes:,} bytes")
    if report.accuracy is not None:
        t.add_row("accuracy", f"{report.accuracy:.2%} on {report.samples} samples")
    threads = thread_count(report.threads)
    for lat in report.latency:
        t.add_row(f"latency batch {lat.batch}",
                  f"p50 {lat.p50_ms:.3f} ms  p90 {lat.p90_ms:.3f}  p99 {lat.p99_ms:.3f}  "
                  f"({lat.runs} runs, {threads})")
    if report.fidelity is not None:
        f = report.fidelity
        t.add_row("vs reference", report.reference or "")
        if report.reference_accuracy is not None:
            t.add_row("reference accuracy", f"{report.reference_accuracy:.2%}")
        t.add_row("top-1 agreement", f"{f.top1_agreement:.2%}")
        t.add_row("cosine mean / min", f"{f.mean_cosine:.5f} / {f.min_cosine:.5f}")
        t.add_row("SQNR", f"{f.sqnr_db:.1f} dB")
    t.add_row("float compute ops", ", ".join(f"{k} x{v}" for k, v in
                                             sorted(report.float_compute_ops.items())) or "none")
    t.add_row("integer ops", ", ".join(f"{k} x{v}" for k, v in
                                       sorted(report.integer_ops.items())) or "none")
    t.add_row("Q/DQ nodes left", str(report.qdq_nodes))
    t.add_row("peak memory", f"{report.peak_rss_mb:,.0f} MB (this process, measuring included)")
    return t


@app.command("evaluate")
def evaluate_cmd(
    model: Annotated[Path, typer.Argument(help="The ONNX model to measure")],
    data: Annotated[Path, typer.Option(help=".npz of inputs, optionally with labels")],
    reference: Annotated[Path | None, typer.Option(help="Reference ONNX model")] = None,
    runs: Annotated[int, typer.Option(min=1, help="Timed runs per batch size")] = 200,
    seconds: Annotated[float, typer.Option(min=0.0, help="Time cap per batch size")] = 5.0,
    threads: Annotated[int, typer.Option(
        min=0, help="Intra-op threads the model will run with on the device; 0 = every "
                    "core")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
) -> None:
    """Accuracy, fidelity to a reference, size, latency, and what still runs in float."""
    from edgeloop.data import load_npz
    from edgeloop.measure import LatencyConfig, evaluate

    report = evaluate(model, load_npz(data), reference=reference,
                      latency_config=LatencyConfig(min_runs=runs, max_seconds=seconds,
                                                   threads=threads))
    if as_json:
        console.print_json(json.dumps(report.to_dict()))
    else:
        console.print(_render(report))
