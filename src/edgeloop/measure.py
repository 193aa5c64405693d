"""Measuring a model: fidelity, accuracy, size, latency and what onnxruntime really runs.

Everything that reports a figure about a model goes through here, so every command
measures the same way. Data goes through a model in batches of at most
:data:`PREDICT_BATCH` samples, so memory holds one batch's activations (and the outputs),
however many samples there are; :func:`evaluate` reports the process's peak memory.
"""

from __future__ import annotations

import functools
import os
import resource
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from edgeloop._onnx import input_specs, load_model, optimized_graph, run, session
from edgeloop._progress import progress
from edgeloop.data import Dataset, batches, check_against

__all__ = [
    "PREDICT_BATCH",
    "EvalReport",
    "Fidelity",
    "LatencyConfig",
    "LatencyStats",
    "evaluate",
    "fidelity",
    "graph_summary",
    "interleaved_latency",
    "interleaved_times",
    "latency",
    "peak_rss_mb",
    "predict",
    "thread_count",
    "top1_accuracy",
]

# Ops that do the arithmetic; if they remain in float the model is not (fully) quantized.
COMPUTE_OPS = {"Conv", "ConvTranspose", "MatMul", "Gemm", "FusedConv", "FusedGemm",
               "FusedMatMul", "Attention", "MultiHeadAttention", "NchwcConv", "LSTM", "GRU"}
INTEGER_OPS = {"QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger",
               "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QGemm", "QAttention",
               "QLinearAdd", "QLinearMul", "QLinearGlobalAveragePool", "QLinearSigmoid",
               "QLinearLeakyRelu", "QLinearConcat", "QLinearAveragePool"}
WEIGHT_ONLY_OPS = {"MatMulNBits"}
QDQ_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}

# Samples per inference call when a whole data set is run: activations for 32 samples of
# a 224x224 mobile CNN take a few hundred MB; 300 such images in one call took 4.5 GB.
PREDICT_BATCH = 32


@dataclass(frozen=True)
class LatencyConfig:
    """How latency is timed: warm-up runs, then timed runs until ``min_runs`` are done or
    ``max_seconds`` have passed (at least ``floor_runs`` either way)."""

    warmup: int = 10
    min_runs: int = 200
    max_seconds: float = 5.0
    floor_runs: int = 20
    threads: int = 0           # intra-op threads; 0 lets onnxruntime use every core


def thread_count(threads: int) -> str:
    """How many intra-op threads a timing used, in words: "1 thread", "4 threads", or
    "every core" for 0 (onnxruntime's default)."""
    if not threads:
        return "every core"
    return f"{threads} thread{'s' if threads > 1 else ''}"


@dataclass(frozen=True)
class LatencyStats:
    """Latency percentiles in milliseconds over ``runs`` timed runs at ``batch``."""

    batch: int
    runs: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float


@dataclass(frozen=True)
class Fidelity:
    """How closely a model's outputs follow a reference model's on the same inputs."""

    top1_agreement: float
    mean_cosine: float
    min_cosine: float
    sqnr_db: float
    max_abs_diff: float


@dataclass
class EvalReport:
    """Everything :func:`evaluate` measures about one model."""

    model: str
    size_bytes: int
    samples: int
    latency: list[LatencyStats]
    accuracy: float | None = None
    reference: str | None = None
    reference_accuracy: float | None = None
    fidelity: Fidelity | None = None
    float_compute_ops: dict[str, int] = field(default_factory=dict)
    integer_ops: dict[str, int] = field(default_factory=dict)
    qdq_nodes: int = 0
    peak_rss_mb: float = 0.0    # the process's peak resident memory, measuring included
    threads: int = 0            # intra-op threads latency was timed with; 0: every core

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready dictionary."""
        return asdict(self)


def predict(sess: ort.InferenceSession | Callable[[Mapping[str, np.ndarray]], np.ndarray],
            data: Dataset, batch_size: int = PREDICT_BATCH) -> np.ndarray:
    """The first output of ``sess`` (a session, or any function from a batch to its
    first output, such as a served bundle's) on every sample of ``data``, run
    ``batch_size`` samples at a time into one preallocated array."""
    answer = sess if callable(sess) else functools.partial(run, sess)
    out: np.ndarray | None = None
    for start, feed in zip(range(0, len(data), batch_size), batches(data, batch_size),
                           strict=True):
        y = answer(feed)
        if out is None:
            out = np.empty((len(data), *y.shape[1:]), y.dtype)
        out[start:start + len(y)] = y
    assert out is not None   # a Dataset holds at least one sample
    return out


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB so far (VmHWM; ``ru_maxrss`` where
    /proc is absent)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return float(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def fidelity(outputs: np.ndarray, reference: np.ndarray) -> Fidelity:
    """Compare ``outputs`` with ``reference`` sample by sample (first axis = samples)."""
    a = outputs.reshape(len(outputs), -1).astype(np.float64)
    b = reference.reshape(len(reference), -1).astype(np.float64)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    denom = na * nb
    # Two all-zero outputs agree (cosine 1); an all-zero output against a non-zero one
    # does not (cosine 0).
    cos = np.where(denom > 0, (a * b).sum(1) / np.maximum(denom, 1e-300),
                   np.where((na == 0) & (nb == 0), 1.0, 0.0))
    noise = float(((a - b) ** 2).sum())
    signal = float((b**2).sum())
    sqnr = float("inf") if noise == 0 else 10 * np.log10(max(signal, 1e-300) / noise)
    agree = outputs.argmax(-1) == reference.argmax(-1)
    return Fidelity(top1_agreement=float(agree.mean()), mean_cosine=float(cos.mean()),
                    min_cosine=float(cos.min()), sqnr_db=sqnr,
                    max_abs_diff=float(np.abs(a - b).max()))


def top1_accuracy(outputs: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of samples whose arg-max output equals the label (or reference id)."""
    return float((outputs.argmax(-1) == labels).mean())


def latency(sess: ort.InferenceSession, data: Dataset, batch: int,
            config: LatencyConfig | None = None) -> LatencyStats:
    """Time ``sess.run`` on one fixed batch of ``batch`` samples (tiled if data is short)."""
    config = config or LatencyConfig()
    feed = data.cycle(batch)
    feed = {i.name: feed[i.name] for i in sess.get_inputs()}
    for _ in range(config.warmup):
        sess.run(None, feed)
    times: list[float] = []
    deadline = time.perf_counter() + config.max_seconds
    for _ in progress(range(config.min_runs), f"timing batch {batch}", total=config.min_runs):
        t0 = time.perf_counter()
        sess.run(None, feed)
        t1 = time.perf_counter()
        times.append(t1 - t0)
        if t1 > deadline and len(times) >= config.floor_runs:
            break
    ms = np.array(times) * 1e3
    return LatencyStats(batch=batch, runs=len(ms), p50_ms=float(np.percentile(ms, 50)),
                        p90_ms=float(np.percentile(ms, 90)), p99_ms=float(np.percentile(ms, 99)),
                        mean_ms=float(ms.mean()))


def interleaved_times(calls: Sequence[Callable[[], object]], *, rounds: int = 5,
                      runs: int = 20, warmup: int = 5, alternate: bool = False) -> list[float]:
    """Median time (ms) of each of ``calls``, timed in turns.

    Calls take turns, ``runs`` calls each per round, so that load changes on a shared
    machine hit every one alike; each round starts one call later than the one before,
    so no call always runs right after the same other one (whose thread pool may still
    be spinning). The result is the median over rounds of each round's median.

    ``alternate`` makes the turns one call long (each round calls every one ``runs``
    times over, one after the other) and the result each call's median over all its
    runs: the finest interleaving, for calls whose thread pools do not spin-wait (an
    idle pool that spins takes the cores from the next call).
    """
    for call in calls:
        for _ in range(warmup):
            call()
    n = len(calls)
    times: list[list[list[float]]] = [[[] for _ in range(rounds)] for _ in calls]
    for r in range(rounds):
        order = [(r + i) % n for i in range(n)]
        for k in order * runs if alternate else [k for k in order for _ in range(runs)]:
            t0 = time.perf_counter()
            calls[k]()
            times[k][r].append(time.perf_counter() - t0)
    return [float(np.median(np.concatenate(t) if alternate else np.median(t, axis=1))) * 1e3
            for t in times]


def interleaved_latency(
    models: Sequence[onnx.ModelProto | str | os.PathLike[str] | ort.InferenceSession],
    data: Dataset, *, batch: int = 1, rounds: int = 5, runs: int = 20, warmup: int = 5,
    threads: int = 0,
) -> list[float]:
    """Median latency (ms) of each model on the first ``batch`` samples of ``data``, the
    models timed in turns by :func:`interleaved_times`. A model is an ONNX model, a file,
    or an open session (used as it is; ``threads`` applies to the others).

    The sessions opened here do not spin-wait, and the models then alternate call by
    call (``alternate``): on a shared 2-vCPU VM at 2 threads, the ratio of two
    transformers' latencies then moves by about 3% from one set of sessions to the next,
    where spinning pools timed ``runs`` calls at a time moved it by 15%
    (x86-avx512-vnni). Without spinning, each parallel section pays a thread wake-up,
    alike for every model. Open sessions passed in may spin, so they are timed in
    blocks of ``runs`` calls."""
    sessions = [m if isinstance(m, ort.InferenceSession)
                else session(m, threads=threads, spin=False) for m in models]
    feed = {k: np.ascontiguousarray(v[:batch]) for k, v in data.inputs.items()}
    calls = [functools.partial(s.run, None, {i.name: feed[i.name] for i in s.get_inputs()})
             for s in sessions]
    return interleaved_times(calls, rounds=rounds, runs=runs, warmup=warmup,
                             alternate=not any(isinstance(m, ort.InferenceSession)
                                               for m in models))


def graph_summary(model: onnx.ModelProto) -> tuple[dict[str, int], dict[str, int], int]:
    """In the graph onnxruntime runs after optimization: compute ops left in float, integer
    ops, and the number of Q/DQ nodes left over (each one is a conversion at run time)."""
    ops = Counter(n.op_type for n in optimized_graph(model).graph.node)
    return ({k: v for k, v in ops.items() if k in COMPUTE_OPS},
            {k: v for k, v in ops.items() if k in INTEGER_OPS | WEIGHT_ONLY_OPS},
            sum(v for k, v in ops.items() if k in QDQ_OPS))


def evaluate(model_path: str | os.PathLike[str], data: Dataset, *,
             reference: str | os.PathLike[str] | None = None,
             batches_to_time: tuple[int, ...] = (1, 32),
             latency_config: LatencyConfig | None = None) -> EvalReport:
    """Measure the model at ``model_path`` on ``data`` (see :class:`EvalReport`).

    Samples go through in batches of :data:`PREDICT_BATCH`; one session is alive at a
    time, so the reference's does not add to the model's memory."""
    model = load_model(model_path)
    config = latency_config or LatencyConfig()
    sess = session(model, threads=config.threads)
    check_against(data, input_specs(sess), source="evaluation data")
    outputs = predict(sess, data)
    timed = [latency(sess, data, b, config) for b in batches_to_time]
    del sess
    float_ops, int_ops, qdq = graph_summary(model)
    report = EvalReport(model=str(model_path), size_bytes=Path(model_path).stat().st_size,
                        samples=len(data), latency=timed, float_compute_ops=float_ops,
                        integer_ops=int_ops, qdq_nodes=qdq, threads=config.threads)
    del model
    if data.labels is not None:
        report.accuracy = top1_accuracy(outputs, data.labels)
    if reference is not None:
        ref_sess = session(load_model(reference), threads=config.threads)
        check_against(data, input_specs(ref_sess), source="evaluation data")
        ref_out = predict(ref_sess, data)
        del ref_sess
        report.reference = str(reference)
        report.fidelity = fidelity(outputs, ref_out)
        if data.labels is not None:
            report.reference_accuracy = top1_accuracy(ref_out, data.labels)
    report.peak_rss_mb = peak_rss_mb()
    return report
