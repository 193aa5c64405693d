"""Commands `optimize` (accuracy-budgeted search) and `targets` (hardware profiles)."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from edgeloop.cli._app import app, console, err_console

if TYPE_CHECKING:
    from edgeloop.optimize import CandidateResult


@app.command("targets")
def targets_cmd(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
) -> None:
    """This machine's CPU kind and the int8 layout it gets, then every hardware profile;
    * marks the one `--target auto` picks here."""
    from edgeloop.targets import TARGETS, this_machine

    machine = this_machine()
    if as_json:
        typer.echo(json.dumps({"machine": machine.to_dict(),
                               "profiles": [t.to_dict() for t in TARGETS.values()]}))
        return
    auto = machine.target
    console.print(f"this machine: {machine.cpu or 'unknown CPU'} ({machine.arch}; "
                  f"{', '.join(machine.isa) or 'no int8 extensions found'})")
    console.print(f"CPU kind: {auto.kind} -> profile {auto.name}: {auto.layout}")
    t = Table(title="hardware profiles")
    for col in ("", "name", "CPU kind", "int8 layout", "int16 pairs saturate"):
        t.add_column(col)
    for target in TARGETS.values():
        t.add_row("*" if target.name == auto.name else "", target.name, target.kind,
                  target.layout, "yes" if target.saturates else "no")
    console.print(t)
    console.print(f"* auto-detected on this machine: {auto.name}")


class _LiveTable:
    """The candidates measured so far, redrawn as each one finishes."""

    def __init__(self, metric: str, batches: tuple[int, ...]) -> None:
        self.metric = metric
        self.batches = batches
        self.rows: list[CandidateResult] = []
        self.current = ""

    def render(self) -> Group:
        t = Table(title="optimize: candidates")
        for col in ("candidate", "status", self.metric, "drop",
                    *[f"p50 ms @{b}" for b in self.batches], "bytes", "flags"):
            t.add_column(col)
        for r in self.rows:
            t.add_row(r.name, r.status if r.error is None else f"{r.status}: {r.error[:60]}",
                      "-" if r.metric is None else f"{r.metric:.4g}",
                      "-" if r.drop is None else f"{r.drop:.3g}",
                      *[f"{r.latency_ms[b]:.4f}" if b in r.latency_ms else "-"
                        for b in self.batches],
                      "-" if r.size_bytes is None else f"{r.size_bytes:,}",
                      "; ".join(r.flags))
        return Group(t, Text(self.current, style="dim"))


def _line(r: CandidateResult) -> str:
    if r.error is not None:
        return f"{r.name}: {r.status}: {r.error}"
    lat = ", ".join(f"{v:.4f} ms @{b}" for b, v in r.latency_ms.items())
    flags = f" [{'; '.join(r.flags)}]" if r.flags else ""
    return (f"{r.name}: {r.status}, metric {r.metric:.5g} (drop {r.drop:.3g}), {lat}, "
            f"{r.size_bytes:,} bytes{flags}")


@app.command("optimize")
def optimize_cmd(
    model: Annotated[Path, typer.Argument(
        help="Float model: .onnx, or a torch .pt (edgeloop checkpoint or torch.save'd module)")],
    data: Annotated[Path, typer.Option(help="Calibration .npz")],
    val: Annotated[Path, typer.Option(help="Validation .npz (labels for --metric accuracy)")],
    out: Annotated[Path, typer.Option(help="Folder for best.onnx, report.json/.md, pareto.png")],
    metric: Annotated[str, typer.Option(help="accuracy, agreement or cosine")] = "accuracy",
    max_drop: Annotated[float, typer.Option(
        help="Largest allowed drop: percentage points (accuracy, agreement) or 1 - cosine")
    ] = 0.5,
    target: Annotated[str, typer.Option(help="Hardware profile, or auto")] = "auto",
    time_budget: Annotated[str, typer.Option(help="Whole search, e.g. 90s, 10m, 1h")] = "10m",
    batch: Annotated[int, typer.Option(help="Batch size latency is ranked at")] = 1,
    threads: Annotated[int, typer.Option(
        min=0, help="Intra-op threads the model will run with on the device; every "
                    "candidate is timed with this many (0: every core)")] = 0,
    train: Annotated[Path | None, typer.Option(
        help="Training .npz with labels: with a torch .pt model, also tries structured "
             "pruning and quantization-aware training")] = None,
) -> None:
    """Find the fastest model on this machine whose metric drops at most --max-drop.

    The time budget covers the whole command from here: loading, search and the report.
    Ctrl-C stops the search and still writes the best model found so far (exit code 0).
    """
    from edgeloop.data import load_npz
    from edgeloop.optimize import OptimizeConfig, optimize, parse_duration
    from edgeloop.report import write_report
    from edgeloop.targets import get_target

    config = OptimizeConfig(metric=metric, max_drop=max_drop, batch=batch,
                            time_budget_s=parse_duration(time_budget),
                            started_at=time.monotonic())
    config = dataclasses.replace(config, latency=dataclasses.replace(config.latency,
                                                                     threads=threads))
    profile = get_target(target)
    calib, val_data = load_npz(data), load_npz(val)
    train_data = load_npz(train) if train is not None else None
    if err_console.is_terminal:
        live = _LiveTable(metric, config.batches)
        with Live(live.render(), console=err_console, refresh_per_second=4) as screen:
            def on_start(name: str, index: int, total: int) -> None:
                live.current = f"measuring {name} ({index}/{total}) ..."
                screen.update(live.render())

            def on_result(r: CandidateResult) -> None:
                live.rows.append(r)
                live.current = ""
                screen.update(live.render())

            result = optimize(model, calib=calib, val=val_data, target=profile, config=config,
                              train=train_data, on_start=on_start, on_result=on_result)
            live.current = ""
            screen.update(live.render())
    else:  # a log or a pipe: one line per candidate, as it is measured
        result = optimize(model, calib=calib, val=val_data, target=profile, config=config,
                          train=train_data, on_result=lambda r: err_console.print(
                              _line(r), markup=False, highlight=False, soft_wrap=True))
    paths = write_report(result, out)
    if result.stopped != "completed":
        console.print(f"stopped early ({result.stopped}) after {result.elapsed_s:.1f} s; "
                      "the report covers the candidates measured so far")
    if result.chosen is None:
        console.print("no candidate fits the budget and beats the float model: "
                      f"{paths['best.onnx']} is the float model, unchanged")
    else:
        console.print(f"chose {result.chosen}: wrote {paths['best.onnx']}")
    console.print(f"report: {paths['report.md']}, {paths['report.json']}, "
                  f"{paths['pareto.png']}")
