"""Commands for on-target benchmarking (`bench`) and export to other formats (`export`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from edgeloop._ssh import RemoteConfig
from edgeloop.cli._app import app, console

if TYPE_CHECKING:
    from edgeloop.bench import BenchReport


def _render(report: BenchReport) -> list[Table]:
    head = Table(title=f"{report.model} on {report.host}", show_header=False)
    head.add_row("machine", f"{report.machine}, target {report.target}, "
                            f"onnxruntime {report.onnxruntime}, threads {report.threads or 'all'}")
    head.add_row("model load", f"{report.load_ms:.1f} ms")
    head.add_row("peak RSS", f"{report.peak_rss_mb:.1f} MB")
    runs = Table(title="sustained runs")
    for col in ("batch", "runs", "p50 ms", "p90 ms", "p99 ms", "samples/s"):
        runs.add_column(col, justify="right")
    health = Table(title="throttling, energy, sensors")
    for col in ("batch", "first→last 20% ms", "verdict", "energy", "CPU MHz", "temp °C"):
        health.add_column(col, justify="right")
    for r in report.results:
        t = r.throttling
        e = r.energy
        runs.add_row(str(r.batch), str(r.runs), f"{r.p50_ms:.3f}", f"{r.p90_ms:.3f}",
                     f"{r.p99_ms:.3f}", f"{r.throughput:,.0f}")
        health.add_row(
            str(r.batch), f"{t.first_ms:.3f}→{t.last_ms:.3f} ({t.slowdown:+.1%})",
            "[red]throttled[/red]" if t.throttled else "steady",
            f"{e.joules:.2f} J{' (est.)' if e.source == 'estimate' else ''}",
            f"{min(r.cpu_mhz):.0f}-{max(r.cpu_mhz):.0f}" if r.cpu_mhz else "n/a",
            f"{max(r.temperature_c):.1f}" if r.temperature_c else "n/a")
    ops = Table(title=f"top operators (profiled at batch {report.profiled_batch})")
    for col in ("op", "nodes", "total ms", "share"):
        ops.add_column(col, justify="right")
    for o in report.operators:
        ops.add_row(o.op_type, str(o.nodes), f"{o.total_ms:.2f}", f"{o.share:.1%}")
    return [head, runs, health, ops]


@app.command("bench")
def bench_cmd(
    model: Annotated[Path, typer.Argument(help="The ONNX model to benchmark")],
    batch: Annotated[str, typer.Option(help="Batch sizes, comma-separated")] = "1",
    threads: Annotated[int, typer.Option(help="Intra-op threads; 0 = every core")] = 0,
    duration: Annotated[float, typer.Option(help="Seconds of timed runs per batch size")] = 60.0,
    warmup: Annotated[float, typer.Option(help="Seconds of warm-up per batch size")] = 1.0,
    target: Annotated[str, typer.Option(help="Profile for energy estimates, or auto")] = "auto",
    data: Annotated[Path | None, typer.Option(
        help=".npz of sample inputs (random when omitted)")] = None,
    plot: Annotated[Path | None, typer.Option(
        help="PNG of latency over time [MODEL.bench.png]")] = None,
    no_plot: Annotated[bool, typer.Option("--no-plot", help="Do not draw the PNG")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON")] = False,
    remote: Annotated[str | None, typer.Option(
        help="Run on user@host over SSH with the device's own edgeloop")] = None,
    remote_command: Annotated[str, typer.Option(
        help="The edgeloop command on the device")] = RemoteConfig.command,
    ssh_port: Annotated[int | None, typer.Option(help="SSH port")] = None,
    ssh_identity: Annotated[str | None, typer.Option(help="SSH private key file")] = None,
    ssh_option: Annotated[list[str] | None, typer.Option(
        help="Extra ssh -o Key=Value (repeatable)")] = None,
) -> None:
    """Sustained on-target benchmark: latency percentiles, throughput, throttling, energy,
    memory, load time and the operators that take the time."""
    from edgeloop._ssh import remote_bench
    from edgeloop.bench import BenchConfig, bench, parse_batches, plot_latency
    from edgeloop.data import load_npz

    config = BenchConfig(batches=parse_batches(batch), threads=threads, duration=duration,
                         warmup=warmup, target=target)
    if remote is not None:
        report = remote_bench(remote, model, config=config, data_path=data, remote=RemoteConfig(
            command=remote_command, port=ssh_port, identity=ssh_identity,
            options=tuple(ssh_option or ())))
    else:
        report = bench(model, config=config, data=load_npz(data) if data is not None else None)
    png = None if no_plot else plot_latency(report, plot or model.with_suffix(".bench.png"))
    if as_json:
        typer.echo(json.dumps(report.to_dict()))
        return
    for table in _render(report):
        console.print(table)
    for r in report.results:
        console.print(f"batch {r.batch} energy: {r.energy.note}", highlight=False)
    if png is not None:
        console.print(f"wrote {png}")


@app.command("export")
def export_cmd(
    model: Annotated[Path, typer.Argument(help="An edgeloop torch checkpoint (model.pt)")],
    to: Annotated[str, typer.Option(help="onnx, tflite or coreml")],
    out: Annotated[Path, typer.Option(help="Output file (.onnx, .tflite, .mlpackage)")],
    data: Annotated[Path | None, typer.Option(
        help=".npz whose `x` calibrates and checks the export [built-in calib split]")] = None,
    quantize: Annotated[str, typer.Option(help="tflite: none or int8")] = "none",
    batch: Annotated[int, typer.Option(help="tflite/coreml: fixed batch size")] = 1,
) -> None:
    """Export a torch model, checked against PyTorch before it is written."""
    from edgeloop.data import load_npz
    from edgeloop.export import export_checkpoint

    samples = load_npz(data).inputs.get("x") if data is not None else None
    check = export_checkpoint(model, to=to, out=out, samples=samples, quantize=quantize,
                              batch=batch)
    console.print(f"wrote {check.path} ({check.format})", highlight=False)
    if check.fidelity is not None:
        f = check.fidelity
        console.print(f"vs PyTorch on {check.samples} samples: max |diff| {f.max_abs_diff:.2e}, "
                      f"top-1 agreement {f.top1_agreement:.2%}, cosine {f.mean_cosine:.5f}",
                      highlight=False)
    console.print(check.note, highlight=False)
