"""Sustained on-target benchmarking, the way mobile benchmark suites do it.

For each batch size: warm-up runs, then back-to-back timed runs for at least
``duration`` seconds. From the timings come percentiles, throughput, a latency-over-time
series and a throttling verdict (the last fifth of the run at least 10% slower than the
first fifth). Around the run it reads what ``/sys`` exposes: CPU frequency, temperature
and RAPL energy counters; where RAPL cannot be read, energy is estimated from CPU time
and the target profile's power figure and labelled as an estimate. A separate short run
under onnxruntime's profiler gives the operators that take the time, so profiling never
slows the timed run.

The timed loop does nothing but ``perf_counter``, ``sess.run`` and an append; sensors are
read between runs at most every ``sample_interval`` seconds, outside the timed region.
The arithmetic on the collected figures is pure (:func:`latency_summary`,
:func:`throttling`, :func:`latency_series`, :func:`top_operators`); the I/O stays in
:func:`bench` and the small readers beside it.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from edgeloop._energy import Energy, RaplCounter, estimate_energy, rapl_domains, read_number
from edgeloop._io import atomic_path, scratch_dir
from edgeloop._onnx import input_specs, load_model, session
from edgeloop._progress import status
from edgeloop.data import Dataset, InputSpec, check_against
from edgeloop.errors import DataError, ModelError, UsageError
from edgeloop.measure import peak_rss_mb
from edgeloop.targets import Target, get_target

__all__ = [
    "BatchResult",
    "BenchConfig",
    "BenchReport",
    "Energy",
    "OperatorTime",
    "Throttling",
    "bench",
    "estimate_energy",
    "latency_series",
    "latency_summary",
    "parse_batches",
    "plot_latency",
    "profile_operators",
    "throttling",
    "top_operators",
]

_CPU_ROOT = Path("/sys/devices/system/cpu")
_THERMAL_ROOT = Path("/sys/class/thermal")


@dataclass(frozen=True)
class BenchConfig:
    """How a model is benchmarked."""

    batches: tuple[int, ...] = (1,)  # batch sizes, each gets its own sustained run
    threads: int = 0                 # onnxruntime intra-op threads; 0 = every core
    duration: float = 60.0           # seconds of timed runs per batch size (at least)
    warmup: float = 1.0              # seconds of untimed runs before each timed run
    min_runs: int = 20               # timed runs per batch size even past ``duration``
    profile_runs: int = 20           # runs under onnxruntime's profiler for the op table
    sample_interval: float = 0.5     # seconds between CPU frequency / temperature reads
    series_points: int = 60          # points in the latency-over-time series
    throttle_window: float = 0.2     # fraction of the run compared at each end
    throttle_threshold: float = 0.10  # slowdown (last vs first window) that counts
    target: str = "auto"             # profile whose ``watts`` feed the energy estimate
    seed: int = 0                    # seed of the random inputs

    def __post_init__(self) -> None:
        if not self.batches or any(b < 1 for b in self.batches):
            raise UsageError(f"`batch` must be positive integers; got {list(self.batches)}")
        if self.threads < 0:
            raise UsageError(f"`threads` must be >= 0; got {self.threads}")
        if self.duration <= 0 or self.warmup < 0:
            raise UsageError(f"`duration` must be > 0 and `warmup` >= 0 seconds; got "
                             f"{self.duration} and {self.warmup}")
        if not 0 < self.throttle_window <= 0.5:
            raise UsageError(f"`throttle_window` must be in (0, 0.5]; got {self.throttle_window}")


@dataclass(frozen=True)
class Throttling:
    """Median latency of the first and last ``window`` of a run, and the verdict."""

    first_ms: float
    last_ms: float
    slowdown: float    # last / first - 1
    throttled: bool    # slowdown >= the threshold


@dataclass(frozen=True)
class OperatorTime:
    """Time onnxruntime's profiler attributed to one operator type."""

    op_type: str
    nodes: int          # how many nodes of this type the session runs
    total_ms: float     # summed over the profiled runs (the first one left out)
    share: float        # fraction of all operator time


@dataclass
class BatchResult:
    """The sustained run at one batch size."""

    batch: int
    runs: int
    seconds: float                 # wall time of the timed runs
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    throughput: float              # samples per second (batch x runs / wall seconds)
    throttling: Throttling
    energy: Energy
    series: list[tuple[float, float]] = field(default_factory=list)  # (s since start, ms)
    cpu_mhz: list[float] = field(default_factory=list)      # mean core frequency per sample
    temperature_c: list[float] = field(default_factory=list)  # hottest zone per sample


@dataclass
class BenchReport:
    """Everything :func:`bench` measured on one host."""

    model: str
    host: str
    machine: str
    target: str
    threads: int
    onnxruntime: str
    load_ms: float                 # file to ready session, graph optimizations included
    peak_rss_mb: float             # the process's peak resident memory
    results: list[BatchResult]
    operators: list[OperatorTime]
    profiled_batch: int
    sensors: dict[str, bool] = field(default_factory=dict)  # which /sys sources were readable

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready dictionary (what ``edgeloop bench --json`` prints)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> BenchReport:
        """The inverse of :meth:`to_dict`; raises :class:`DataError` on a malformed dict."""
        try:
            data = dict(d)
            data["results"] = [BatchResult(**{
                **r, "throttling": Throttling(**r["throttling"]), "energy": Energy(**r["energy"]),
                "series": [tuple(p) for p in r["series"]]}) for r in data["results"]]
            data["operators"] = [OperatorTime(**o) for o in data["operators"]]
            known = {f.name for f in fields(cls)}
            return cls(**{k: v for k, v in data.items() if k in known})
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"not a bench report: {type(e).__name__} {e}") from None


# ---- pure arithmetic on collected figures ------------------------------------------------

def parse_batches(text: str) -> tuple[int, ...]:
    """``"1,8,32"`` -> ``(1, 8, 32)``."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if not values or any(v < 1 for v in values):
        raise UsageError(f"`batch` must be positive integers separated by commas; got {text!r}")
    return values


def latency_summary(latencies_s: Sequence[float]) -> dict[str, float]:
    """p50 / p90 / p99 / mean of ``latencies_s`` in milliseconds."""
    ms = np.asarray(latencies_s, dtype=np.float64) * 1e3
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {"p50_ms": float(p50), "p90_ms": float(p90), "p99_ms": float(p99),
            "mean_ms": float(ms.mean())}


def throttling(starts_s: Sequence[float], latencies_s: Sequence[float], *,
               window: float = 0.2, threshold: float = 0.10) -> Throttling:
    """Compare the median latency of the runs that started in the first ``window`` of the
    run's wall time with those in the last ``window``."""
    t = np.asarray(starts_s, dtype=np.float64)
    lat = np.asarray(latencies_s, dtype=np.float64)
    end = float(t[-1] + lat[-1])
    span = end - float(t[0])
    first = lat[t < t[0] + window * span]
    last = lat[t >= end - window * span]
    # Very short runs can leave a window empty; fall back to the first/last fifth by count.
    k = max(1, int(len(lat) * window))
    first = first if len(first) else lat[:k]
    last = last if len(last) else lat[-k:]
    a, b = float(np.median(first)) * 1e3, float(np.median(last)) * 1e3
    slowdown = b / a - 1.0
    return Throttling(first_ms=a, last_ms=b, slowdown=slowdown, throttled=slowdown >= threshold)


def latency_series(starts_s: Sequence[float], latencies_s: Sequence[float], *,
                   points: int = 60) -> list[tuple[float, float]]:
    """The run cut into ``points`` equal spans of wall time: (span middle in seconds from
    the start, median latency in ms of the runs that started in it); empty spans omitted."""
    t = np.asarray(starts_s, dtype=np.float64) - starts_s[0]
    lat = np.asarray(latencies_s, dtype=np.float64)
    edges = np.linspace(0.0, float(t[-1]) + 1e-12, points + 1)
    which = np.clip(np.searchsorted(edges, t, side="right") - 1, 0, points - 1)
    out = []
    for i in range(points):
        sel = lat[which == i]
        if len(sel):
            out.append((float((edges[i] + edges[i + 1]) / 2), float(np.median(sel)) * 1e3))
    return out


def top_operators(events: Iterable[Mapping[str, object]], *, n: int | None = 10,
                  skip_runs: int = 1) -> list[OperatorTime]:
    """The ``n`` operator types (``None``: all) with the most kernel time in onnxruntime
    profiler events, leaving out the first ``skip_runs`` runs (first runs pay one-off
    allocation and weight pre-packing, which a sustained run does not)."""
    events = list(events)
    runs = sorted((float(e.get("ts", 0)), float(e.get("dur", 0))) for e in events
                  if e.get("cat") == "Session" and e.get("name") == "model_run")
    start = sum(runs[skip_runs - 1]) if 0 < skip_runs <= len(runs) - 1 else float("-inf")
    total: dict[str, float] = {}
    nodes: dict[str, set[str]] = {}
    for e in events:
        args = e.get("args")
        name = str(e.get("name", ""))
        if e.get("cat") != "Node" or not name.endswith("_kernel_time") or not isinstance(
                args, Mapping) or "op_name" not in args or float(e.get("ts", 0)) < start:
            continue
        op = str(args["op_name"])
        total[op] = total.get(op, 0.0) + float(e.get("dur", 0)) / 1e3  # µs -> ms
        nodes.setdefault(op, set()).add(name.removesuffix("_kernel_time"))
    grand = sum(total.values()) or 1.0
    ranked = sorted(total.items(), key=lambda kv: -kv[1])[:n]
    return [OperatorTime(op_type=op, nodes=len(nodes[op]), total_ms=ms, share=ms / grand)
            for op, ms in ranked]


# ---- /sys readers (RAPL: edgeloop._energy, shared with the device runtime) ---------------

def _cpu_mhz() -> float | None:
    values = [v for p in _CPU_ROOT.glob("cpu[0-9]*/cpufreq/scaling_cur_freq")
              if (v := read_number(p)) is not None]
    return sum(values) / len(values) / 1e3 if values else None  # kHz -> MHz


def _temperature_c() -> float | None:
    values = [v for p in _THERMAL_ROOT.glob("thermal_zone*/temp")
              if (v := read_number(p)) is not None]
    return max(values) / 1e3 if values else None  # millidegrees -> °C


# ---- the benchmark -------------------------------------------------------------------------

def _random_feed(specs: Sequence[InputSpec], batch: int, data: Dataset | None,
                 rng: np.random.Generator) -> dict[str, np.ndarray]:
    if data is not None:
        feed = data.cycle(batch)
        return {s.name: feed[s.name] for s in specs}
    feed = {}
    for s in specs:
        free = [i for i, d in enumerate(s.shape) if d is None and i > 0]
        if free:
            raise DataError(f"input {s.name!r} has free axes beyond the batch axis "
                            f"{list(s.shape)}; pass --data with sample inputs")
        shape = (batch, *s.shape[1:])
        if np.issubdtype(s.dtype, np.floating):
            feed[s.name] = rng.standard_normal(shape).astype(s.dtype)
        else:  # token ids, masks, indices: zeros are valid for every such input
            feed[s.name] = np.zeros(shape, dtype=s.dtype)
    return feed


def _check_batch(specs: Sequence[InputSpec], batch: int) -> None:
    for s in specs:
        if s.shape and s.shape[0] is not None and s.shape[0] != batch:
            raise UsageError(f"input {s.name!r} has a fixed batch axis of {s.shape[0]}; "
                             f"`batch` must be {s.shape[0]}; got {batch}")


def _timed_run(sess: ort.InferenceSession, feed: dict[str, np.ndarray], batch: int,
               config: BenchConfig, target: Target) -> BatchResult:
    run = sess.run
    warm_end = time.perf_counter() + config.warmup
    run(None, feed)
    while time.perf_counter() < warm_end:
        run(None, feed)

    rapl = RaplCounter()
    cpu_before = time.process_time()
    starts: list[float] = []
    lats: list[float] = []
    mhz: list[float] = []
    temps: list[float] = []
    perf = time.perf_counter
    begin = perf()
    deadline = begin + config.duration
    next_sample = begin
    while True:
        t0 = perf()
        run(None, feed)
        t1 = perf()
        starts.append(t0)
        lats.append(t1 - t0)
        if t1 >= next_sample:  # between runs, outside the timed region
            next_sample = t1 + config.sample_interval
            if (f := _cpu_mhz()) is not None:
                mhz.append(f)
            if (c := _temperature_c()) is not None:
                temps.append(c)
        if t1 >= deadline and len(lats) >= config.min_runs:
            break
    wall = perf() - begin
    cpu = time.process_time() - cpu_before

    if rapl.readable:
        joules = rapl.joules()
        energy = Energy(joules=joules, per_inference_mj=joules / len(lats) * 1e3, source="rapl",
                        note="RAPL package counters; whole-package energy, other load included")
    else:
        cores = os.cpu_count() or 1
        joules = estimate_energy(cpu, watts=target.watts, cores=cores)
        energy = Energy(joules=joules, per_inference_mj=joules / len(lats) * 1e3,
                        source="estimate",
                        note=f"estimate: {cpu:.2f} s CPU time x {target.watts:g} W "
                             f"({target.name}) / {cores} cores; RAPL not readable")
    return BatchResult(
        batch=batch, runs=len(lats), seconds=wall, **latency_summary(lats),
        throughput=batch * len(lats) / wall,
        throttling=throttling(starts, lats, window=config.throttle_window,
                              threshold=config.throttle_threshold),
        energy=energy, series=latency_series(starts, lats, points=config.series_points),
        cpu_mhz=mhz, temperature_c=temps)


def profile_operators(model: onnx.ModelProto | str | os.PathLike[str],
                      feed: Mapping[str, np.ndarray], *, threads: int = 0, runs: int = 20,
                      n: int | None = 10) -> list[OperatorTime]:
    """The ``n`` operator types (``None``: all) with the most kernel time over ``runs``
    runs of ``feed`` under onnxruntime's profiler (:func:`top_operators`; the first run
    left out). The trace goes to a temporary folder, removed afterwards."""
    source = model if isinstance(model, onnx.ModelProto) else os.path.abspath(model)
    with scratch_dir("edgeloop-prof-") as tmp:
        sess = session(source, threads=threads, profile=str(tmp / "ort"))
        feed = {i.name: feed[i.name] for i in sess.get_inputs()}
        try:
            for _ in range(runs):
                sess.run(None, feed)
            trace = sess.end_profiling()
        except Exception as e:  # onnxruntime's Fail / InvalidArgument ...
            raise ModelError(f"profiling failed: {str(e).strip().splitlines()[0][:300]}") from None
        return top_operators(json.loads(Path(trace).read_text()), n=n)


def bench(model_path: str | os.PathLike[str], *, config: BenchConfig | None = None,
          data: Dataset | None = None) -> BenchReport:
    """Benchmark the ONNX model at ``model_path`` on this machine (see module docstring).

    Inputs are ``data``'s samples tiled to each batch size, or seeded random values.
    """
    config = config or BenchConfig()
    target = get_target(config.target)
    load_model(model_path)  # a one-line error for a file that is not a valid model
    t0 = time.perf_counter()  # load time as a device sees it: file to ready session
    sess = session(model_path, threads=config.threads)
    load_ms = (time.perf_counter() - t0) * 1e3
    specs = input_specs(sess)
    if data is not None:
        check_against(data, specs, source="bench data")
    for b in config.batches:
        _check_batch(specs, b)
    rng = np.random.default_rng(config.seed)
    results = []
    for b in config.batches:
        status(f"batch {b}: {config.warmup:g} s warm-up, {config.duration:g} s timed")
        feed = _random_feed(specs, b, data, rng)
        try:
            results.append(_timed_run(sess, feed, b, config, target))
        except Exception as e:
            if isinstance(e, (UsageError, DataError)):
                raise
            raise ModelError(f"inference failed at batch {b}: "
                             f"{str(e).strip().splitlines()[0][:300]}") from None
    peak = peak_rss_mb()
    profiled = config.batches[0]
    operators = profile_operators(model_path, _random_feed(specs, profiled, data, rng),
                                  threads=config.threads, runs=config.profile_runs)
    return BenchReport(
        model=str(model_path), host=platform.node(),
        machine=f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}",
        target=target.name, threads=config.threads, onnxruntime=ort.__version__,
        load_ms=load_ms, peak_rss_mb=peak, results=results, operators=operators,
        profiled_batch=profiled,
        sensors={"rapl": bool(rapl_domains()), "cpufreq": _cpu_mhz() is not None,
                 "thermal": _temperature_c() is not None})


def plot_latency(report: BenchReport, out: str | os.PathLike[str]) -> Path:
    """Draw latency over time (one line per batch size) as a PNG at ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    try:
        for r in report.results:
            xs = [p[0] for p in r.series]
            ys = [p[1] for p in r.series]
            verdict = "throttled" if r.throttling.throttled else "steady"
            ax.plot(xs, ys, marker=".", label=f"batch {r.batch} (p50 {r.p50_ms:.3f} ms, "
                                              f"{verdict} {r.throttling.slowdown:+.1%})")
        ax.set_xlabel("time since start of timed run (s)")
        ax.set_ylabel("median latency (ms)")
        ax.set_title(f"{Path(report.model).name} on {report.host} ({report.target})")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        out = Path(out)
        with atomic_path(out) as tmp:
            fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    finally:
        plt.close(fig)
    return out
