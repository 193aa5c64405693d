"""Writing an optimize result: best.onnx, report.json, report.md and pareto.png.

Every file is written atomically, so an interrupted run never leaves a half-written one.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import onnx

from edgeloop._io import atomic_path, write_text_atomic
from edgeloop.measure import thread_count
from edgeloop.optimize import FITS, CandidateResult, OptimizeResult

__all__ = ["budget_floor", "pareto_front", "render_markdown", "write_report"]

_UNITS = {"accuracy": "%", "agreement": "%", "cosine": ""}


def budget_floor(result: OptimizeResult) -> float | None:
    """The lowest metric value that still fits the budget (None if the float model was
    never measured)."""
    if result.baseline.metric is None:
        return None
    return result.baseline.metric - result.max_drop


def pareto_front(points: list[CandidateResult], batch: int) -> list[CandidateResult]:
    """The measured points no other point beats on both latency and metric, by latency."""
    measured = sorted((p for p in points if p.metric is not None and batch in p.latency_ms),
                      key=lambda p: (p.latency_ms[batch], -(p.metric or 0.0)))
    front: list[CandidateResult] = []
    for p in measured:
        if not front or (p.metric or 0.0) > (front[-1].metric or 0.0):
            front.append(p)
    return front


def _fmt(value: float | None, metric: str) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}%" if _UNITS[metric] == "%" else f"{value:.5f}"


def _summary(result: OptimizeResult) -> str:
    if result.chosen is None:
        counts = Counter(c.status for c in result.candidates)
        seen = ", ".join(f"{n} {status}" for status, n in counts.items()) or "none measured"
        why = {"completed": "no candidate fits the budget and beats the float model",
               "time budget": "the time budget ran out before a candidate fit",
               "interrupted": "the search was interrupted before a candidate fit"}
        return (f"**best.onnx is the float model, unchanged**: {why[result.stopped]} "
                f"(candidates: {seen}; the table says why each was rejected).")
    chosen = next(c for c in result.candidates if c.name == result.chosen)
    base = result.baseline.latency_ms.get(result.batch)
    speed = (f", {base / chosen.latency_ms[result.batch]:.2f}x the float model's speed"
             if base else "")
    return (f"**best.onnx is `{chosen.name}`** ({chosen.description}): {result.metric} "
            f"{_fmt(chosen.metric, result.metric)} (drop {chosen.drop:.4g}, budget "
            f"{result.max_drop:g}), {chosen.latency_ms[result.batch]:.4f} ms at batch "
            f"{result.batch}{speed}, {chosen.size_bytes:,} bytes.")


def render_markdown(result: OptimizeResult) -> str:
    """The human-readable report."""
    batches = sorted({b for c in [result.baseline, *result.candidates] for b in c.latency_ms})
    stop = {"completed": "every candidate was measured",
            "time budget": "stopped when the time budget ran out",
            "interrupted": "stopped by an interrupt (SIGINT)"}[result.stopped]
    lines = [
        f"# edgeloop optimize: {Path(result.model).name}", "",
        _summary(result), "",
        f"- metric: `{result.metric}`, max drop {result.max_drop:g}; target `{result.target}`; "
        f"ranked by p50 latency at batch {result.batch}, "
        f"{thread_count(result.threads)}",
        f"- search: {len(result.candidates)} candidates in {result.elapsed_s:.1f} s of a "
        f"{result.time_budget_s:g} s budget; {stop}", "",
        "| candidate | status | " + result.metric + " | drop | "
        + " | ".join(f"p50 ms @{b}" for b in batches) + " | size (bytes) | flags |",
        "|---|---|---|---|" + "---|" * len(batches) + "---|---|",
    ]
    for c in [result.baseline, *result.candidates]:
        name = f"**{c.name}** (chosen)" if c.name == result.chosen else c.name
        status = c.status if c.error is None else f"{c.status}: {c.error}"
        lat = " | ".join(f"{c.latency_ms[b]:.4f}" if b in c.latency_ms else "-"
                         for b in batches)
        drop = "-" if c.drop is None else f"{c.drop:.4g}"
        size = "-" if c.size_bytes is None else f"{c.size_bytes:,}"
        flags = "; ".join(c.flags) or "-"
        lines.append(f"| {name} | {status.replace('|', '/')} | {_fmt(c.metric, result.metric)} "
                     f"| {drop} | {lat} | {size} | {flags} |")
    lines += ["", "Flags mark a quantized candidate this target cannot run at integer speed: "
              "Q/DQ nodes onnxruntime left unfused (each is a conversion at run time) or "
              "compute ops still in float in the graph onnxruntime actually runs.", "",
              "![metric vs latency](pareto.png)", ""]
    return "\n".join(lines)


def _plot(result: OptimizeResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b = result.batch
    points = [c for c in [result.baseline, *result.candidates]
              if c.metric is not None and b in c.latency_ms]
    fig, ax = plt.subplots(figsize=(12, 5.5), dpi=110)
    colors = {FITS: "tab:green", "over budget": "tab:red", "not faster": "tab:orange"}
    biggest = max((c.size_bytes or 1 for c in points), default=1)
    key = []   # points are numbered on the plot and named beside it: names would overlap
    for i, c in enumerate(points):
        color = "tab:blue" if c is result.baseline else colors.get(c.status, "tab:gray")
        size = 40 + 400 * (c.size_bytes or 0) / biggest
        ax.scatter(c.latency_ms[b], c.metric, s=size, color=color, alpha=0.6,
                   edgecolors="black", linewidths=0.5)
        ax.annotate(str(i), (c.latency_ms[b], c.metric), fontsize=7,
                    xytext=(5, 3 + 7 * (i % 3)), textcoords="offset points")
        key.append(f"{i} {c.name} ({(c.size_bytes or 0) / 1024:,.0f} KiB)")
    fig.text(0.63, 0.95, "\n".join(key), fontsize=7, va="top", family="monospace")
    lat = [c.latency_ms[b] for c in points]
    if lat and max(lat) > 5 * min(lat):
        ax.set_xscale("log")
    front = pareto_front(points, b)
    if len(front) > 1:
        ax.step([p.latency_ms[b] for p in front], [p.metric for p in front], where="post",
                color="gray", linestyle=":", linewidth=1, label="Pareto front")
    floor = budget_floor(result)
    if floor is not None:
        ax.axhline(floor, color="tab:red", linestyle="--", linewidth=1,
                   label=f"budget: {result.metric} >= {_fmt(floor, result.metric)}")
    chosen = next((c for c in points if c.name == result.chosen), None)
    marked = chosen or result.baseline
    if marked in points:
        ax.scatter(marked.latency_ms[b], marked.metric, s=300, marker="*", color="gold",
                   edgecolors="black", zorder=5,
                   label=f"chosen: {marked.name}" if chosen else "kept: float model")
    for status, color in [("float model", "tab:blue"), (FITS, "tab:green"),
                          ("over budget", "tab:red"), ("not faster", "tab:orange")]:
        ax.scatter([], [], color=color, alpha=0.6, label=status)
    ax.set_xlabel(f"p50 latency at batch {b} (ms, this machine)")
    ax.set_ylabel(f"{result.metric}{' (%)' if _UNITS[result.metric] else ''} on validation data")
    ax.set_title(f"{Path(result.model).name} on {result.target}: marker area ~ file size")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout(rect=(0, 0, 0.62, 1))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


@contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Ignore SIGINT while the outputs are written (main thread only), so a second Ctrl-C
    cannot leave the folder with a new report but an old model."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


def write_report(result: OptimizeResult, out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Write best.onnx, report.json, report.md and pareto.png into ``out_dir``."""
    out = Path(out_dir)
    paths = {name: out / name for name in ("best.onnx", "report.json", "report.md",
                                           "pareto.png")}
    with _sigint_deferred():
        out.mkdir(parents=True, exist_ok=True)
        with atomic_path(paths["best.onnx"]) as tmp:
            onnx.save(result.best_model, tmp)
        _plot(result, paths["pareto.png"])
        write_text_atomic(paths["report.md"], render_markdown(result))
        data = result.to_dict()
        data["best_model"] = str(paths["best.onnx"])
        write_text_atomic(paths["report.json"], json.dumps(data, indent=2) + "\n")
    return paths
