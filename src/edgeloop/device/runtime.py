"""The device runtime: serves the active verified model or cascade, and reports to the
updater while a new one is on probation.

Serving the device's slot, every inference is reported to the updater's watch
(:meth:`edgeloop.bundle.Device.serve`); the updater decides to keep or roll back, the
runtime only reports, and after a rollback it serves the other slot. Serving a cascade
(a cascade bundle in the slot, or a policy's ``cascade`` from files, which is unsigned and
has no probation), the stages run smallest first and a later stage only runs for
the samples no earlier stage was sure about (:mod:`edgeloop.device.cascade`).

With an ``[offload]`` rule in the policy (:class:`~edgeloop.device.policy.OffloadRule`)
the runtime asks an offload server (:class:`~edgeloop.device.offload.OffloadClient`) for
the inputs the rule picks; on any refusal or failure it answers locally, and the
:class:`Answer` says so (``offloaded=False``) and why (``offload_reason``). Only the model
input leaves the device. ``when-unsure`` sends the inputs no stage before the last was
sure about *instead of* running the last stage, the large model offloading saves; the
last stage runs for them only when the server gives no answer (with ``min_confidence``
the last stage runs first: its confidence picks what goes out). With ``max_batch > 1``
concurrent callers' inputs are stacked into one onnxruntime call
(:mod:`edgeloop._batching`, the offload server's batcher); each caller gets its own rows,
and probation is reported per call as without batching (one inference, whichever stages
ran for it).

Every answer carries the energy of its local inference (:mod:`edgeloop.device.energy`: an
estimate from the inference's busy time, labelled); :class:`RuntimeStats` adds RAPL over
the runtime's life where it is readable. :meth:`Runtime.predict_stream` thins a stream of
windows under the policy's ``[stream]`` rule (:mod:`edgeloop.device.stream`).
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from edgeloop._batching import BatchStats, BatchThread
from edgeloop._energy import Energy, RaplCounter
from edgeloop._io import sha256_file
from edgeloop._onnx import input_specs, load_model, runner, session
from edgeloop._progress import progress
from edgeloop._request import Feed, batchable
from edgeloop.bundle.device import Device, Watch
from edgeloop.data import Dataset, InputSpec, check_against
from edgeloop.device._graph import with_confidence
from edgeloop.device.cascade import CASCADE_FILE, Cascade, needed_stages
from edgeloop.device.energy import EnergyMeter
from edgeloop.device.offload import OffloadClient
from edgeloop.device.policy import Policy, StreamRule
from edgeloop.device.stream import SKIP_BUDGET, SKIP_UNCHANGED, EnergyBudget, relative_change
from edgeloop.errors import ModelError, UsageError, VerificationError
from edgeloop.monitor.alerts import REFERENCE_FILE

if TYPE_CHECKING:
    from edgeloop.monitor import Monitor

_T = TypeVar("_T")

__all__ = ["OFFLOAD_STAGE", "Answer", "RunSummary", "Runtime", "RuntimeStats", "summarize"]

OFFLOAD_STAGE = "offload"     # Answer.stage when the offload server answered

# Which stages one local run covers: all of them; all but the last (when-unsure offload
# runs the last only for what the server does not answer); or the last alone.
_ALL, _HEAD, _TAIL = "all", "head", "tail"


@dataclass(slots=True)     # not frozen: a frozen dataclass costs ~1 us more to build,
class Answer:              # 4% of a small model's whole run; read-only by convention
    """One prediction: the answering stage's output, which stage answered (for a batch,
    the last stage any sample needed; ``"offload"`` when the server answered), its
    calibrated confidence (None for a single model, or when every sample was offloaded),
    the wall time of the whole call, whether the offload server answered, and when an
    input the policy would offload was answered locally, why (``offload_reason``:
    "privacy", "budget", "circuit open", "timeout", "unreachable: ...", ...).

    ``energy_mj`` is the local inference's energy and ``energy_source`` says what the
    figure is (``"estimate"``: busy time x profile watts / cores, see
    :mod:`edgeloop.device.energy`); an offloaded answer carries only the local energy
    spent on it (the radio is not counted). In a stream, a window the runtime skipped
    has ``skipped`` set to why (``"unchanged"``, ``"energy budget"``) and the last
    processed window's output, stage, confidence and offloaded (where that answer came
    from), with its own latency (the change test) and no energy."""

    output: np.ndarray
    stage: str
    latency_ms: float
    confidence: float | None = None
    offloaded: bool = False
    offload_reason: str | None = None
    energy_mj: float = 0.0
    energy_source: str = "estimate"
    skipped: str | None = None


@dataclass
class RunSummary:
    """What :func:`summarize` counts over many answers."""

    samples: int = 0                       # answers, skipped stream windows included
    answered: dict[str, int] = field(default_factory=dict)   # processed, by stage
    offloaded: int = 0
    skipped: dict[str, int] = field(default_factory=dict)    # stream windows, by reason
    mean_latency_ms: float = 0.0           # latencies of the processed answers
    p50_latency_ms: float = 0.0
    p90_latency_ms: float = 0.0
    accuracy: float | None = None          # when labels were given (every answer)
    energy: Energy | None = None           # of the processed answers (None: no answers)
    energy_every_window_j: float | None = None   # estimate had no window been skipped

    @property
    def processed(self) -> int:
        """Answers that ran (were not a skipped window's)."""
        return self.samples - sum(self.skipped.values())


def summarize(answers: Iterable[Answer], labels: np.ndarray | None = None) -> RunSummary:
    """Answers per stage (and skipped stream windows per reason), latency of the
    processed answers, their energy (the answers' own figures, labelled by their source)
    and, with ``labels`` (one per answer), top-1 accuracy of every answer. The energy had
    every window run is the mean per processed answer times all of them."""
    s, times, right, mj, sources = RunSummary(), [], 0, 0.0, set()
    for i, a in enumerate(answers):
        s.samples += 1
        if labels is not None:
            right += int(np.asarray(a.output).reshape(-1).argmax() == labels[i])
        if a.skipped is not None:
            s.skipped[a.skipped] = s.skipped.get(a.skipped, 0) + 1
            continue
        s.answered[a.stage] = s.answered.get(a.stage, 0) + 1
        s.offloaded += a.offloaded
        times.append(a.latency_ms)
        mj += a.energy_mj
        sources.add(a.energy_source)
    if s.samples:
        s.accuracy = None if labels is None else right / s.samples
    if times:
        t = np.asarray(times)
        s.mean_latency_ms = float(t.mean())
        s.p50_latency_ms, s.p90_latency_ms = (float(v) for v in np.percentile(t, [50, 90]))
        per = mj / len(times)
        s.energy = Energy(mj / 1e3, per, " + ".join(sorted(sources)))
        s.energy_every_window_j = per * s.samples / 1e3
    return s


@dataclass(frozen=True)
class _Stage:
    """A stage that runs (skipped ones are left out), its graph computing its confidence."""

    name: str
    run: Callable[[Mapping[str, np.ndarray]], list[np.ndarray]]   # every output
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    threshold: float                # inf: never answers (the last: -inf, always answers)
    chained: bool
    feed_from: tuple[int, ...]      # chained: which previous output feeds each input


class RuntimeStats:
    """What a runtime has answered (``GET /v1/stats`` of the device API); thread-safe.

    Energy: the answers' own figures (``meter`` labels them), or where RAPL is readable
    (``rapl``, default this machine's counters) the packages' energy since the stats were
    made, polled at most once a second so no counter wrap goes unseen."""

    RAPL_POLL_S = 1.0

    def __init__(self, *, meter: EnergyMeter | None = None,
                 rapl: RaplCounter | None = None) -> None:
        self._lock = threading.Lock()
        self.calls = 0
        self.samples = 0
        self.answered: dict[str, int] = {}        # calls by answering stage
        self.offloaded = 0
        self.kept_local: dict[str, int] = {}      # wanted offload, answered locally: why
        self.skipped: dict[str, int] = {}         # stream windows not run, by reason
        self.errors = 0                           # model errors (ModelError)
        self.latency_ms_total = 0.0
        self.energy_mj_total = 0.0                # the answers' energy_mj
        self._meter = meter
        self._rapl = rapl if rapl is not None else RaplCounter()
        self._poll = self._rapl.readable
        self._polled = time.monotonic()

    def add(self, a: Answer, samples: int) -> None:
        """Count one answer of ``samples`` samples (not a skipped window: :meth:`skip`)."""
        with self._lock:
            self.calls += 1
            self.samples += samples
            self.answered[a.stage] = self.answered.get(a.stage, 0) + 1
            self.offloaded += a.offloaded
            if a.offload_reason is not None:
                why = a.offload_reason.split(":")[0]
                self.kept_local[why] = self.kept_local.get(why, 0) + 1
            self.latency_ms_total += a.latency_ms
            self.energy_mj_total += a.energy_mj
            if self._poll and time.monotonic() - self._polled >= self.RAPL_POLL_S:
                self._rapl.joules()
                self._polled = time.monotonic()

    def skip(self, reason: str) -> None:
        """Count one stream window not run, for ``reason``."""
        with self._lock:
            self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def error(self) -> None:
        """Count one model error."""
        with self._lock:
            self.errors += 1

    def energy(self) -> Energy:
        """Energy so far: RAPL where readable (whole packages since the stats were made,
        idle time and other load included), otherwise the answers' estimates."""
        with self._lock:
            n = self.calls
            if self._rapl.readable:
                j = self._rapl.joules()
                self._polled = time.monotonic()
                return Energy(j, j * 1e3 / n if n else 0.0, "rapl",
                              "RAPL package counters since the runtime started; idle time "
                              "and other load included; the answers' own estimate: "
                              f"{self.energy_mj_total / 1e3:.6g} J")
            return Energy(self.energy_mj_total / 1e3, self.energy_mj_total / n if n else 0.0,
                          self._meter.source if self._meter is not None else "estimate",
                          self._meter.describe() if self._meter is not None else "")

    def to_dict(self) -> dict[str, object]:
        """JSON-ready counts, mean latency and :meth:`energy`."""
        energy = self.energy()
        with self._lock:
            return {"answers": self.calls, "samples": self.samples,
                    "answered": dict(self.answered), "offloaded": self.offloaded,
                    "kept_local": dict(self.kept_local), "skipped": dict(self.skipped),
                    "errors": self.errors,
                    "mean_latency_ms": (self.latency_ms_total / self.calls
                                        if self.calls else None),
                    "energy": asdict(energy)}


class _Call:
    """Probation around one call (``with``; a plain class: a generator-based context
    manager costs microseconds a small model does not have). Its local runs add what
    they took (:meth:`add`); on leaving, the call is reported to probation as one
    inference of its ``samples``, failed if a run raised :class:`ModelError`. A call
    answered without running anything here (the server answered) is not reported:
    probation watches the local model."""

    __slots__ = ("busy_s", "rt", "runs", "samples", "wall_s", "watch")

    def __init__(self, rt: Runtime, samples: int) -> None:
        self.rt, self.watch, self.samples = rt, rt._watch, samples
        self.runs, self.wall_s, self.busy_s = 0, 0.0, 0.0

    def add(self, wall_s: float, busy_s: float) -> None:
        """One local run: its wall seconds (probation's latency) and the seconds it kept
        the session busy, this call's rows' share (energy)."""
        self.runs += 1
        self.wall_s += wall_s
        self.busy_s += busy_s

    def __enter__(self) -> _Call:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        if kind is not None and issubclass(kind, ModelError):
            _tell(self.rt, self.watch, False, 0.0, self.samples)
        elif kind is None and self.runs:
            _tell(self.rt, self.watch, True, self.wall_s, self.samples)


def _tell(rt: Runtime, watch: Watch | None, ok: bool, wall_s: float, samples: int) -> None:
    """Report a call of ``samples`` that ran ``wall_s`` seconds up to now to probation,
    failed unless ``ok`` (a model error, also counted in the stats)."""
    if not ok:
        rt.stats.error()
    if watch is not None:
        now = time.perf_counter()
        if watch.report(ok, now - wall_s, now, samples):
            rt._over(watch)


class Runtime:
    """Serves a device's active model (``state``: a device folder or a
    :class:`~edgeloop.bundle.Device`), or the cascade a ``policy`` names (then ``state``
    is None: a cascade from files is not a verified bundle and has no probation).

    ``meter`` puts energy on each local inference (default: the estimate for the
    policy's ``target`` profile, :meth:`EnergyMeter.for_target`).

    Safe to call from many threads. :meth:`close` (or ``with``) stops the micro-batching
    thread and the offload client's connections."""

    def __init__(self, state: str | os.PathLike[str] | Device | None,
                 policy: Policy | None = None, *, meter: EnergyMeter | None = None) -> None:
        self.policy = policy or Policy()
        self.cascade: Cascade | None = None
        self.meter = meter or EnergyMeter.for_target(self.policy.target,
                                                     threads=self.policy.threads)
        self.stats = RuntimeStats(meter=self.meter)
        self._wall_clock = self.meter.clock is time.perf_counter   # one clock times both
        self._lock = threading.Lock()
        self._batchers: dict[str, BatchThread] = {}    # by part (_ALL, _HEAD, _TAIL)
        self._client: OffloadClient | None = None
        self.monitor: Monitor | None = None     # the active bundle's, when it ships a sketch
        self._drifted_calls = 0                 # calls while drifted (while_drifted)
        rule = self.policy.offload
        # when-unsure without min_confidence: the last stage waits for the server's answer
        self._defer = rule is not None and rule.mode == "when-unsure" and \
            rule.min_confidence is None
        if self.policy.cascade is not None:
            if state is not None:
                raise UsageError("the policy names a cascade, served from its files as they "
                                 "are; a device folder serves its verified slot: give one of "
                                 "them")
            self.device = None
            self.path, self.manifest, self._watch = self.policy.cascade, None, None
            self._start_cascade(self.policy.cascade)
            self._batch_of = self._inputs[0].name if self._inputs[0].shape else None
        else:
            if state is None:
                raise UsageError("give a device state folder, or a policy that names a "
                                 "cascade")
            self.device = state if isinstance(state, Device) else Device(state)
            self._start()
        if rule is not None and rule.mode == "when-unsure" and self.cascade is None:
            raise UsageError("offload mode `when-unsure` needs a cascade (a single model has "
                             "no calibrated confidence); use `always` or `never`")
        if self.policy.max_batch > 1 and batchable(self._inputs):
            shared = BatchStats()     # one set of counts whichever part a batch ran
            for part in (_ALL, _HEAD, _TAIL) if self._defer else (_ALL,):
                self._batchers[part] = BatchThread(
                    functools.partial(self._run_rows, part), max_batch=self.policy.max_batch,
                    max_delay_ms=self.policy.max_delay_ms, stats=shared)
        if rule is not None and (rule.mode != "never" or rule.while_drifted):
            self._client = OffloadClient(rule.client)
        self._choose_paths()

    def _choose_paths(self) -> None:
        """Which short paths serve (see :meth:`_plain`): made again whenever the served
        model, micro-batching or the offload client changes."""
        local = not self._batchers and self._client is None
        self._lean = self.cascade is None and not self._batchers
        self._short = self._lean and self._client is None
        self._short_cascade = local and self.cascade is not None and self._batch_of is not None

    def close(self) -> None:
        """Stop micro-batching and close the offload client (probation is saved too)."""
        for batcher in self._batchers.values():
            batcher.close()
        if self._client is not None:
            self._client.close()
        if self._watch is not None:
            self._watch.flush()
        if self.monitor is not None:
            self.monitor.close()

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def inputs(self) -> tuple[InputSpec, ...]:
        """The served model's inputs (a cascade's: its first stage's)."""
        return tuple(self._inputs)

    def health(self) -> dict[str, object]:
        """What serves and how: name and version (or the cascade file), stages, inputs,
        probation (remaining inferences and errors, saved first; None when off), offload
        mode, micro-batch size and the monitor's flags (None: the bundle ships no
        reference sketch)."""
        watch = self._watch
        if watch is not None:
            watch.flush()
        probation = None
        if self.device is not None and (p := self.device.state().probation) is not None:
            probation = {"remaining": p.remaining, "errors": p.errors, "boots": p.boots}
        rule = self.policy.offload
        served = ({"name": self.manifest.name, "version": self.manifest.version}
                  if self.manifest is not None else {"cascade": str(self.path)})
        return {"status": "ok", **served, "stages": list(self.stages()),
                "inputs": [{"name": s.name, "dtype": str(s.dtype),
                            "shape": [d if d is not None else "N" for d in s.shape]}
                           for s in self._inputs],
                "probation": probation,
                "offload": rule.mode if rule is not None else "never",
                "max_batch": self.policy.max_batch if self._batchers else 1,
                "monitor": asdict(self.monitor.flag()) if self.monitor is not None else None}

    def arriving(self) -> contextlib.AbstractContextManager[None]:
        """Around a request that will call :meth:`predict` (a server reading its body):
        micro-batching then waits for it rather than run the others without it."""
        first = self._batchers.get(_HEAD if self._defers() else _ALL)
        return contextlib.nullcontext() if first is None else first.announced()

    def batch_stats(self) -> dict[str, object] | None:
        """Micro-batching counts (batches, mean batch size, ...), None when it is off."""
        first = self._batchers.get(_ALL)
        return None if first is None else first.stats.batch_dict()

    # --- serving the device's slot (probation) --------------------------------------

    def _start(self) -> None:
        """Serve the active slot: its model, or the cascade its bundle ships
        (``cascade.json`` beside the model, see :mod:`edgeloop.device.bundle`)."""
        assert self.device is not None
        self.path, self.manifest, self._watch = self.device.serve()
        if self.monitor is not None:          # the model served before a rollback
            self._monitor_closed.detach()
            self.monitor.close()
        self.monitor = None
        if any(f.name == REFERENCE_FILE for f in self.manifest.files):
            from edgeloop.monitor import Monitor  # river: only for a bundle it watches

            self.monitor = Monitor.for_device(self.device.dir)
            self._monitor_closed = weakref.finalize(self, self.monitor.close)
        if any(f.name == CASCADE_FILE for f in self.manifest.files):
            # device.serve() has just checked every file of the slot against the manifest
            self._start_cascade(self.path.with_name(CASCADE_FILE), verified=True)
        else:
            self.cascade = None
            sess = session(self.path, threads=self.policy.threads)
            self._inputs = input_specs(sess)
            self._run_model = runner(sess)
            self._names = (self.manifest.name,)
        first = self._inputs[0] if self._inputs else None
        self._batch_of = first.name if first is not None and first.shape else None
        self._choose_paths()
        if self._watch is not None:
            weakref.finalize(self, self._watch.flush)     # also runs at interpreter exit

    def infer(self, feed: Mapping[str, np.ndarray]) -> np.ndarray:
        """The model's first output on ``feed`` (arrays named after the model's inputs);
        for a cascade, the answer's output (:meth:`predict`).

        The feed is checked against the model's inputs first (names, rank, fixed axes,
        dtype): a malformed feed raises :class:`DataError`, the caller's mistake, which
        never counts against the model. Values are not checked: NaN or inf in a
        well-formed feed is data the model meets in the field, so if onnxruntime fails on
        it (:class:`ModelError`) that counts as a model error during probation, which
        may roll back (the runtime then serves the other slot's model).
        """
        if self.cascade is not None:
            return self.predict(feed).output
        feed = self._checked(feed)
        if self._lean:
            out = self._plain(feed, self._run_model)[0][0]
        else:
            with self._probation(feed) as spent:
                out = self._local(feed, _ALL, spent)[0]
        if self.monitor is not None:
            self.monitor.observe(feed, out)
        return out

    def _checked(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``feed`` checked against the model's inputs (:class:`DataError` if it does not
        fit), as a dict of exactly them."""
        check_against(feed, self._inputs, source="the feed")
        if type(feed) is dict and len(feed) == len(self._inputs):
            return feed          # every input and nothing else: no copy (a small model's 1%)
        return {i.name: feed[i.name] for i in self._inputs}

    def _plain(self, feed: dict[str, np.ndarray], run: Callable[[dict[str, np.ndarray]], _T]
               ) -> tuple[_T, float, int]:
        """``run(feed)`` here, not micro-batched: one model, or one sample through a
        cascade (the device's common cases, in fewer steps than :class:`_Call` and
        :meth:`_local` take for the others): what it returned, the seconds it kept the
        session busy (the meter's clock) and the samples; probation is told."""
        samples = len(feed[self._batch_of]) if self._batch_of else 1
        watch, clock, wall = self._watch, self.meter.clock, self._wall_clock
        w0 = time.perf_counter()
        c0 = w0 if wall else clock()
        try:
            result = run(feed)
        except ModelError:
            _tell(self, watch, False, 0.0, samples)
            raise
        w1 = time.perf_counter()
        busy = w1 - w0 if wall else clock() - c0
        if watch is not None and watch.report(True, w0, w1, samples):    # _tell, shorter
            self._over(watch)
        return result, busy, samples

    def _over(self, watch: Watch) -> None:
        """Probation is over for this runtime: serve the other slot if it rolled back."""
        with self._lock:
            if self._watch is not watch:      # another thread saw it first
                return
            self._watch = None
            if watch.rolled_back:
                self._start()

    def _probation(self, feed: Mapping[str, np.ndarray]) -> _Call:
        """Probation around one call on ``feed`` (:class:`_Call`)."""
        return _Call(self, len(feed[self._batch_of]) if self._batch_of else 1)

    def _local(self, feed: Mapping[str, np.ndarray], part: str, spent: _Call
               ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, dict[str, np.ndarray]]:
        """Output, calibrated confidences (a cascade), the answering stage's index and the
        carry (:meth:`_cascade_run`) per sample, from the stages ``part`` covers, run here
        (micro-batched with other callers' when that is on); adds what it took to
        ``spent``."""
        batcher = self._batchers.get(part)
        if batcher is None and self._wall_clock:
            busy, outs = self._run_local(part, feed)      # the meter's clock is the wall's
            spent.add(busy, busy)
        else:
            t0 = time.perf_counter()
            if batcher is not None:
                rows = len(next(iter(feed.values())))
                shares, *outs = batcher.submit(
                    Feed(dict(feed), rows, tuple(v.shape[1:] for v in feed.values())))[0]
                busy = float(shares.sum())                # this caller's rows' shares
            else:
                busy, outs = self._run_local(part, feed)
            spent.add(time.perf_counter() - t0, busy)
        if len(outs) == 1:
            n = len(outs[0]) if outs[0].ndim else 1
            return outs[0], None, _FIRST if n == 1 else np.zeros(n, np.intp), {}
        carry = dict(zip(self._stages[-1].inputs, outs[3:], strict=False)) if outs[3:] else {}
        return outs[0], outs[1], outs[2], carry

    def _run_rows(self, part: str, feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """The micro-batcher's run: :meth:`_run_local`, its busy seconds spread over the
        rows first, so that each caller gets its share with its rows."""
        busy, outs = self._run_local(part, feed)
        rows = len(outs[0]) if self._batch_of else 1    # a tail's feed is carried features
        return [np.full(rows, busy / rows), *outs]

    def _run_local(self, part: str, feed: Mapping[str, np.ndarray]
                   ) -> tuple[float, list[np.ndarray]]:
        """One local run: the seconds it kept the session busy (the meter's clock), and
        [output] for a model, [output, confidences, stage indices, *carry] for the stages
        of a cascade ``part`` covers."""
        clock = self.meter.clock
        c0 = clock()
        if self.cascade is None:
            outs = self._run_model(feed)[:1]
        else:
            k = len(self._stages)
            start, stop = {_ALL: (0, k), _HEAD: (0, k - 1), _TAIL: (k - 1, k)}[part]
            out, conf, idx, carry = self._cascade_run(feed, start, stop)
            outs = [out, conf, idx, *carry]
        return clock() - c0, outs

    def _defers(self) -> bool:
        """Whether the last stage waits for the offload server (when-unsure, no
        ``min_confidence``, serving a cascade)."""
        return self._defer and self._client is not None and self.cascade is not None

    def predict(self, feed: Mapping[str, np.ndarray], *,
                privacy_class: str | None = None) -> Answer:
        """Run ``feed`` (one sample, or a batch) and say which stage answered; offload it
        when the policy's ``[offload]`` rule picks it (``privacy_class``: the input's
        class, default the rule's). Never raises for the network or the server: a refused
        or failed offload is answered locally, with ``offload_reason``."""
        t0 = time.perf_counter()
        feed = self._checked(feed)                               # all that may leave
        if self._short:                    # one model, nothing may leave: _done's work
            outs, busy, samples = self._plain(feed, self._run_model)
            out, meter = outs[0], self.meter
            a = Answer(out, self._names[0], (time.perf_counter() - t0) * 1e3, None, False,
                       None, meter.millijoules(busy), meter.source)
            self.stats.add(a, samples)
            if self.monitor is not None:
                self.monitor.observe(feed, out)
            return a
        if self._short_cascade and len(feed[self._batch_of]) == 1:   # type: ignore[index]
            (out, conf, idx, _), busy, samples = self._plain(feed, self._one_sample)
            meter = self.meter
            a = Answer(out, self._names[int(idx[0])], (time.perf_counter() - t0) * 1e3,
                       float(conf[0]), False, None, meter.millijoules(busy), meter.source)
            self.stats.add(a, samples)
            if self.monitor is not None:
                self.monitor.observe(feed, out)
            return a
        if self._client is None:           # nothing may leave
            with self._probation(feed) as spent:
                out, conf, idx, _ = self._local(feed, _ALL, spent)
            return self._done(feed, t0, out, conf, self._stage(idx), False, None, spent.busy_s,
                              spent.samples)
        rule, reason = self.policy.offload, None
        cls = privacy_class if privacy_class is not None else \
            rule.privacy_class if rule is not None else ""
        defer = self._defers()
        # offload before running anything: always, or when no stage before the last runs
        first = rule is not None and (rule.mode == "always"
                                      or (defer and len(self._stages) == 1)
                                      or (rule.while_drifted and self._drift_offload()))
        with self._probation(feed) as spent:
            if self._client is not None and first:
                outs, reason = self._offload(feed, cls)
                if outs is not None:
                    return self._done(feed, t0, outs, None, OFFLOAD_STAGE, True, None, 0.0,
                                      spent.samples)
            out, conf, idx, carry = self._local(feed, _HEAD if defer and not first else _ALL,
                                                spent)
            stage, offloaded = self._stage(idx), False
            if (rule is not None and rule.mode == "when-unsure" and not first
                    and conf is not None):
                unsure = idx == len(self._names) - 1
                if rule.min_confidence is not None:
                    unsure &= conf < rule.min_confidence
                if unsure.any():
                    part = feed if unsure.all() else {k: v[unsure] for k, v in feed.items()}
                    outs, reason = self._offload(part, cls, like=out[unsure])
                    out, conf = out.copy(), conf.copy()
                    if outs is not None:
                        out[unsure] = outs
                        offloaded, stage = True, OFFLOAD_STAGE
                        conf = conf[~unsure]
                    elif defer:       # no answer from the server: the last stage after all
                        rest = {k: v[unsure] for k, v in carry.items()} if carry else part
                        last_out, last_conf, _, _ = self._local(rest, _TAIL, spent)
                        out[unsure], conf[unsure] = last_out, last_conf
        return self._done(feed, t0, out, conf, stage, offloaded, reason, spent.busy_s,
                          spent.samples)

    def _drift_offload(self) -> bool:
        """Whether ``while_drifted`` sends this call to the server first: while the
        monitor flags drift, all but one call in :data:`DRIFT_PROBE_EVERY`; that one runs
        here so the monitor sees when the drift is over (its alerts clear only on
        samples it watches)."""
        if self.monitor is None or not self.monitor.drifted:
            return False
        self._drifted_calls += 1          # not atomic across threads: a probe may move
        return self._drifted_calls % DRIFT_PROBE_EVERY != 0

    def _stage(self, idx: np.ndarray) -> str:
        """The answering stage's name: for a batch, the last stage any sample needed."""
        # one sample (the device case): no numpy reductions, each costs 2 us
        return self._names[int(idx[0]) if len(idx) == 1 else int(idx.max()) if len(idx)
                           else -1]

    def _done(self, feed: dict[str, np.ndarray], t0: float, out: np.ndarray,
              conf: np.ndarray | None, stage: str, offloaded: bool, reason: str | None,
              busy_s: float, samples: int) -> Answer:
        """The answer to ``feed`` (``samples``), a call that started at ``t0``
        (``perf_counter``) and kept a local session busy ``busy_s`` seconds: counted, and
        shown to the monitor when every row was answered here."""
        shown = None if conf is None or not len(conf) else \
            float(conf[0]) if len(conf) == 1 else float(conf.min())
        meter = self.meter
        a = Answer(out, stage, (time.perf_counter() - t0) * 1e3, shown, offloaded, reason,
                   meter.millijoules(busy_s), meter.source)
        self.stats.add(a, samples)
        if self.monitor is not None and not offloaded:
            self.monitor.observe(feed, out)
        return a

    def _offload(self, feed: Mapping[str, np.ndarray], privacy_class: str, *,
                 like: np.ndarray | None = None) -> tuple[np.ndarray | None, str | None]:
        """The server's first output for ``feed``, or None and why not. Only the model
        input is sent; an answer of another shape or type than the local one is refused."""
        assert self._client is not None
        try:
            r = self._client.predict(feed, privacy_class)
        except Exception as e:     # the client already turns network errors into reasons
            return None, f"offload failed: {(str(e).splitlines() or [type(e).__name__])[0]}"
        if r.outputs is None:
            return None, r.reason
        out = r.outputs[0]
        rows = len(feed[self._batch_of]) if self._batch_of else None
        if like is not None and (out.shape != like.shape or out.dtype != like.dtype):
            return None, (f"server answer is {out.dtype} {out.shape}; the local model's "
                          f"is {like.dtype} {like.shape}")
        if rows is not None and (out.ndim == 0 or out.shape[0] != rows):
            return None, f"server answer has shape {out.shape} for {rows} sample(s)"
        return out, None

    def stages(self) -> tuple[str, ...]:
        """The names of the stages that may answer, in order."""
        return self._names

    def predict_each(self, data: Dataset, *, stream: bool = False) -> Iterator[Answer]:
        """:meth:`predict` on each sample of ``data`` in turn (as a device meets them),
        with a progress bar; with ``stream``, the samples are consecutive windows of one
        stream (:meth:`predict_stream`)."""
        check_against(data, self._inputs, source="the data")
        rows = ({k: v[i:i + 1] for k, v in data.inputs.items()}
                for i in progress(range(len(data)), "predicting", total=len(data)))
        yield from self.predict_stream(rows) if stream else map(self.predict, rows)

    def predict_stream(self, windows: Iterable[Mapping[str, np.ndarray] | np.ndarray], *,
                       clock: Callable[[], float] = time.monotonic) -> Iterator[Answer]:
        """:meth:`predict` on a stream of consecutive windows (one sample each: a feed,
        or for a one-input model its array, with or without the batch axis), thinned by
        the policy's ``[stream]`` rule (:class:`~edgeloop.device.policy.StreamRule`; none:
        every window runs). Yields one answer per window, as each arrives; a skipped
        window's answer is the last processed one's, with ``skipped`` saying why.

        Stream time is ``period_ms`` per window, or ``clock()`` (seconds) at each arrival.
        Windows are read one at a time, never gathered.
        """
        rule = self.policy.stream or StreamRule()
        budget = (EnergyBudget(rule.energy_budget_mw, burst_s=rule.burst_s)
                  if rule.energy_budget_mw is not None else None)
        last_feed: dict[str, np.ndarray] | None = None
        last: Answer | None = None
        for i, window in enumerate(windows):
            t0 = time.perf_counter()
            feed = self._window(window)
            now = i * rule.period_ms / 1e3 if rule.period_ms is not None else clock()
            allowed = budget is None or budget.allows(now)   # accrues credit every window
            if last is not None and last_feed is not None:
                reason = (SKIP_UNCHANGED if relative_change(feed, last_feed) < rule.min_change
                          else None if allowed else SKIP_BUDGET)
                if reason is not None:
                    a = Answer(last.output, last.stage, _ms(t0), last.confidence,
                               last.offloaded, energy_source=last.energy_source,
                               skipped=reason)
                    self.stats.skip(reason)
                    yield a
                    continue
            last = self.predict(feed)
            last_feed = {k: v.copy() for k, v in feed.items()}   # callers may reuse buffers
            if budget is not None:
                budget.spend(last.energy_mj)
            yield last

    def _window(self, window: Mapping[str, np.ndarray] | np.ndarray) -> dict[str, np.ndarray]:
        """One stream window as a checked feed of the model's inputs."""
        if isinstance(window, Mapping):
            feed = dict(window)
        else:
            if len(self._inputs) != 1:
                raise UsageError(f"a window as one array needs a model of one input; this "
                                 f"one takes {[s.name for s in self._inputs]}: give a "
                                 "mapping of arrays")
            spec, arr = self._inputs[0], np.asarray(window)
            if spec.shape and arr.ndim == len(spec.shape) - 1:
                arr = arr[None]
            feed = {spec.name: arr}
        check_against(feed, self._inputs, source="the window")
        return {s.name: feed[s.name] for s in self._inputs}

    # --- serving a cascade ----------------------------------------------------------

    def _start_cascade(self, path: Path, *, verified: bool = False) -> None:
        c = Cascade.load(path)
        if self.policy.thresholds is not None:
            c = c.with_thresholds(self.policy.thresholds)
        self.cascade = c
        finite = np.array([s.threshold is not None for s in c.stages[:-1]])
        runs = needed_stages(finite, [s.chained for s in c.stages])
        stages: list[_Stage] = []
        first: list[InputSpec] = []
        for s, r in zip(c.stages, runs, strict=True):
            model = path.parent / s.model
            if not model.is_file():
                raise UsageError(f"cascade {str(path)!r} names {s.model!r}, which does not exist")
            if not verified and s.sha256 and sha256_file(model) != s.sha256:
                raise VerificationError(f"{str(model)!r} is not the model cascade "
                                        f"{str(path)!r} was built with (sha256 differs)")
            if not r:
                continue
            sess = session(with_confidence(load_model(model), temperature=s.temperature,
                                           measure=c.measure), threads=self.policy.threads)
            inputs = tuple(i.name for i in sess.get_inputs())
            first = first or input_specs(sess)
            feed_from: tuple[int, ...] = ()
            if s.chained:
                prev = stages[-1].outputs
                missing = [i for i in inputs if i not in prev]
                if missing:
                    raise UsageError(f"cascade {str(path)!r}: stage {s.name!r} takes {missing}, "
                                     f"which stage {stages[-1].name!r} does not output")
                feed_from = tuple(prev.index(i) for i in inputs)
            stages.append(_Stage(
                s.name, runner(sess, f"stage {s.name!r}"), inputs,
                tuple(o.name for o in sess.get_outputs()),
                -np.inf if s is c.stages[-1] else np.inf if s.threshold is None else s.threshold,
                s.chained, feed_from))
        self._stages = tuple(stages)
        self._names = tuple(st.name for st in stages)
        # the answering stage's index for one sample, made once (read-only: shared)
        self._index = tuple(np.full(1, i, np.intp) for i in range(len(stages)))
        for a in self._index:
            a.flags.writeable = False
        self._inputs = first

    def _cascade_run(self, feed: Mapping[str, np.ndarray], start: int, stop: int
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[np.ndarray]]:
        """Outputs, confidences and the answering stage's index, per sample of ``feed``,
        from stages ``start`` to ``stop - 1`` (``feed`` holds the inputs of stage
        ``start``). Each stage's graph computes its calibrated confidence
        (``_graph.with_confidence``).

        When ``stop`` is before the last stage (the head of a when-unsure offload), a
        sample no stage answered gets index ``stop``, a zero output and its last unsure
        confidence, and when stage ``stop`` is chained the carry holds its inputs (the
        features it takes, zero on the rows already answered) so it can run later."""
        n = len(next(iter(feed.values())))
        if n == 1:
            return self._one(feed, start, stop)
        last = len(self._stages) - 1
        st = self._stages[start]          # on every row: its arrays, fresh from onnxruntime,
        outs = st.run({k: feed[k] for k in st.inputs})      # become the result's
        out, conf_all = outs[0], outs[-1]
        ok = conf_all >= st.threshold if start < last else np.ones(n, bool)
        idx = np.where(ok, start, stop)
        rows = np.flatnonzero(~ok)
        outs = [v[rows] for v in outs]       # copies: the next stage's, before out changes
        out[~ok] = 0
        for i in range(start + 1, stop):
            if not len(rows):
                break
            st = self._stages[i]
            f = {k: outs[j] for k, j in zip(st.inputs, st.feed_from, strict=True)} \
                if st.chained else {k: feed[k][rows] for k in st.inputs}
            outs = st.run(f)
            logits, conf = outs[0], outs[-1]
            ok = np.ones(len(rows), bool) if i == last else conf >= st.threshold
            out[rows[ok]] = logits[ok]
            conf_all[rows] = conf
            idx[rows[ok]] = i
            rows, outs = rows[~ok], [v[~ok] for v in outs]
        carry: list[np.ndarray] = []
        if stop <= last and self._stages[stop].chained:
            for j in self._stages[stop].feed_from:
                carry.append(np.zeros((n, *outs[j].shape[1:]), outs[j].dtype))
                carry[-1][rows] = outs[j]
        return out, conf_all, idx, carry

    def _one_sample(self, feed: Mapping[str, np.ndarray]
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[np.ndarray]]:
        """:meth:`_one` through every stage."""
        return self._one(feed, 0, len(self._stages))

    def _one(self, feed: Mapping[str, np.ndarray], start: int, stop: int
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[np.ndarray]]:
        """:meth:`_cascade_run` for one sample, with as little Python as possible."""
        outs: list[np.ndarray] = []
        for i in range(start, stop):
            st = self._stages[i]
            f = feed if i == start else \
                {k: outs[j] for k, j in zip(st.inputs, st.feed_from, strict=True)} \
                if st.chained else {k: feed[k] for k in st.inputs}     # feed: stage start's
            outs = st.run(f)
            if outs[-1][0] >= st.threshold:
                return outs[0], outs[-1], self._index[i], []
        nxt = self._stages[stop]        # no stage answered: stop is before the last
        carry = [outs[j] for j in nxt.feed_from] if nxt.chained else []
        return np.zeros_like(outs[0]), outs[-1], self._index[stop], carry


DRIFT_PROBE_EVERY = 8    # while_drifted: one call in this many still runs (and is watched)
_FIRST = np.zeros(1, np.intp)     # one sample answered by the first (only) stage
_FIRST.flags.writeable = False


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1e3
