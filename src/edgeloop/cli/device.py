"""Commands for the device runtime: `cascade` (build one), `device run` and `device serve`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from edgeloop.cli._app import app, console
from edgeloop.cli.bundle import device_app


@app.command("cascade")
def cascade_cmd(
    models: Annotated[list[Path], typer.Argument(
        help="Stage ONNX models, smallest first (or an early-exit model's segments)")],
    val: Annotated[Path, typer.Option("--val", help="Validation .npz with labels")],
    out: Annotated[Path, typer.Option("--out", help="Where to write cascade.json")],
    max_drop: Annotated[float, typer.Option(
        help="Accuracy points the cascade may lose against the last stage alone")] = 0.5,
    measure: Annotated[str, typer.Option(
        help="Confidence: max-softmax, margin or entropy")] = "max-softmax",
    safety: Annotated[float, typer.Option(
        help="Standard errors of the accuracy difference kept from the budget (0 trusts "
             "the validation set; 1.64: about 95% confidence on new data)")] = 0.0,
    baseline: Annotated[Path | None, typer.Option(
        help="A model to compare with, measured alike (e.g. an early-exit model in one "
             "piece, model.onnx)")] = None,
    latency_batch: Annotated[int, typer.Option(
        help="Samples per call the stages are timed at: the batch size the device runs "
             "(latencies are then per sample)")] = 1,
) -> None:
    """Calibrate each stage, time it, and choose thresholds: the lowest expected latency
    within --max-drop of the last stage's accuracy."""
    from edgeloop.data import load_npz
    from edgeloop.device import build_cascade

    c = build_cascade(models, load_npz(val), max_drop=max_drop, measure=measure,
                      safety=safety, out=out, baseline=baseline,
                      latency_batch=latency_batch)
    e = c.expected
    t = Table(title=f"{out} ({measure}, max drop {max_drop} points)")
    for col in ("stage", "input", "temperature", "threshold", "answers", "accuracy alone",
                "latency ms" if latency_batch == 1 else f"ms/sample at batch {latency_batch}"):
        t.add_column(col)
    for s, share in zip(c.stages, e["answered"], strict=True):  # type: ignore[call-overload]
        t.add_row(s.name, "features" if s.chained else "data", f"{s.temperature:.3f}",
                  "never" if s.threshold is None and s is not c.stages[-1]
                  else "-" if s.threshold is None else f"{s.threshold:.4f}",
                  f"{share:.1%}", f"{s.accuracy:.2%}", f"{s.latency_ms:.4f}")
    console.print(t)
    ratio = e["mean_latency_ms"] / e["reference_latency_ms"]  # type: ignore[operator]
    console.print(f"expected on {e['samples']} validation samples: accuracy "
                  f"{e['accuracy']:.2%}, mean latency {e['mean_latency_ms']:.4f} ms; the last "
                  f"stage answering everything: {e['reference_accuracy']:.2%}, "
                  f"{e['reference_latency_ms']:.4f} ms (latency ratio {ratio:.2f})")
    if "baseline" in e:
        b = e["baseline"]
        console.print(f"baseline {b['model']}: accuracy {b['accuracy']:.2%}, "  # type: ignore[index]
                      f"{b['latency_ms']:.4f} ms (latency ratio "  # type: ignore[index]
                      f"{e['mean_latency_ms'] / b['latency_ms']:.2f})")  # type: ignore[index,operator]


@device_app.command("run")
def device_run(
    data: Annotated[Path, typer.Option("--data", help=".npz of inputs (labels optional)")],
    state_dir: Annotated[Path | None, typer.Argument(
        help="Device state folder (omit when the policy names a cascade)")] = None,
    policy: Annotated[Path | None, typer.Option(help="Runtime policy TOML")] = None,
    stream: Annotated[bool, typer.Option(
        "--stream", help="The rows are consecutive windows of one stream, thinned by the "
                         "policy's \\[stream] table (on whenever the policy has one)")] = False,
    as_json: Annotated[bool, typer.Option(
        "--json", help="One JSON line per sample: answer, stage, latency, offloaded, "
                       "offload_reason, energy_mj, energy_source, skipped")] = False,
) -> None:
    """Run the device runtime on each sample of --data, one at a time."""
    from edgeloop.data import load_npz
    from edgeloop.device import Policy, Runtime, summarize

    rt = Runtime(state_dir, Policy.load(policy) if policy is not None else None)
    ds = load_npz(data)
    streaming = stream or rt.policy.stream is not None
    answers = rt.predict_each(ds, stream=streaming)
    if as_json:
        for a in answers:
            console.print_json(json.dumps({
                "answer": int(a.output.reshape(-1).argmax()), "stage": a.stage,
                "latency_ms": round(a.latency_ms, 6), "confidence": a.confidence,
                "offloaded": a.offloaded, "offload_reason": a.offload_reason,
                "energy_mj": a.energy_mj, "energy_source": a.energy_source,
                "skipped": a.skipped}), indent=None)
        return
    s = summarize(answers, ds.labels)
    t = Table(title=f"{s.samples} {'windows' if streaming else 'samples'}")
    t.add_column("stage")
    t.add_column("answers")
    offload = rt.policy.offload
    rows = [(name, s.answered.get(name, 0)) for name in
            ((*rt.stages(), "offload") if offload is not None else rt.stages())]
    rows += [(f"skipped: {why}", n) for why, n in sorted(s.skipped.items())]
    for name, n in rows:
        t.add_row(name, f"{n} ({n / s.samples:.1%})")
    console.print(t)
    if offload is not None and (kept := rt.stats.kept_local):
        console.print("offload wanted, answered locally: " + ", ".join(
            f"{why} {n}" for why, n in sorted(kept.items())), highlight=False)
    acc = "" if s.accuracy is None else f", accuracy {s.accuracy:.2%}"
    console.print(f"latency per {'processed window' if streaming else 'sample'}: mean "
                  f"{s.mean_latency_ms:.4f} ms, p50 {s.p50_latency_ms:.4f} ms, p90 "
                  f"{s.p90_latency_ms:.4f} ms{acc}", highlight=False)
    e, every = s.energy, s.energy_every_window_j
    if e is not None:
        console.print(f"energy: {e.joules:.4g} J, {e.per_inference_mj:.4g} mJ per inference "
                      f"({rt.meter.describe()})", highlight=False)
    if streaming:
        saved = (f"; {e.joules:.4g} J against {every:.4g} J had every window run "
                 f"({1 - e.joules / every:.0%} saved)") if e is not None and every else ""
        console.print(f"stream: {s.processed} of {s.samples} windows processed{saved}",
                      highlight=False)
    measured = rt.stats.energy()
    if measured.source == "rapl":
        console.print(f"measured: {measured.joules:.4g} J ({measured.note})", highlight=False)


@device_app.command("serve")
def device_serve(
    port: Annotated[int, typer.Option(min=0, max=65535, help="TCP port; 0 = any free one")],
    state_dir: Annotated[Path | None, typer.Argument(
        help="Device state folder (omit when the policy names a cascade)")] = None,
    policy: Annotated[Path | None, typer.Option(help="Runtime policy TOML")] = None,
    host: Annotated[str, typer.Option(help="Address to listen on")] = "127.0.0.1",
) -> None:
    """Serve the runtime over HTTP to apps on the device: /v1/predict, /v1/health, /v1/stats."""
    import sys

    from edgeloop.device import Policy, Runtime
    from edgeloop.device.http import listen, serve

    rt = Runtime(state_dir, Policy.load(policy) if policy is not None else None)
    with rt:
        sock = listen(host, port)
        shown = f"[{host}]" if ":" in host else host
        h = rt.health()
        what = h.get("cascade") or f"{h['name']} {h['version']}"
        console.print(f"serving {what} on http://{shown}:{sock.getsockname()[1]} (offload "
                      f"{h['offload']}, max batch {h['max_batch']})", highlight=False,
                      soft_wrap=True)
        sys.stdout.flush()
        serve(rt, sock)
