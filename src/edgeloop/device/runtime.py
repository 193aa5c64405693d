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
input leaves the device. With ``max_batch > 1`` concurrent callers' inputs are stacked
into one onnxruntime call (:mod:`edgeloop._batching`, the offload server's batcher);
each caller gets its own rows, and probation is reported per caller as without batching.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import weakref
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgeloop._batching import BatchThread
from edgeloop._io import sha256_file
from edgeloop._onnx import input_specs, load_model, session
from edgeloop._progress import progress
from edgeloop._request import Feed, batchable
from edgeloop.bundle.device import Device, Watch
from edgeloop.data import Dataset, InputSpec, check_against
from edgeloop.device._graph import with_confidence
from edgeloop.device.cascade import CASCADE_FILE, Cascade, needed_stages
from edgeloop.device.offload import OffloadClient
from edgeloop.device.policy import Policy
from edgeloop.errors import ModelError, UsageError, VerificationError

__all__ = ["OFFLOAD_STAGE", "Answer", "RunSummary", "Runtime", "RuntimeStats", "summarize"]

OFFLOAD_STAGE = "offload"     # Answer.stage when the offload server answered


@dataclass(frozen=True)
class Answer:
    """One prediction: the answering stage's output, which stage answered (for a batch,
    the last stage any sample needed; ``"offload"`` when the server answered), its
    calibrated confidence (None for a single model, or when every sample was offloaded),
    the wall time of the whole call, whether the offload server answered, and when an
    input the policy would offload was answered locally, why (``offload_reason``:
    "privacy", "budget", "circuit open", "timeout", "unreachable: ...", ...)."""

    output: np.ndarray
    stage: str
    latency_ms: float
    confidence: float | None = None
    offloaded: bool = False
    offload_reason: str | None = None


@dataclass
class RunSummary:
    """What :func:`summarize` counts over many answers."""

    samples: int = 0
    answered: dict[str, int] = field(default_factory=dict)   # by stage, in serving order
    offloaded: int = 0
    mean_latency_ms: float = 0.0
    p50_latency_ms: float = 0.0
    p90_latency_ms: float = 0.0
    accuracy: float | None = None          # when labels were given


def summarize(answers: Iterable[Answer], labels: np.ndarray | None = None) -> RunSummary:
    """Answers per stage, latency and (with ``labels``, one per answer) top-1 accuracy."""
    s, times, right = RunSummary(), [], 0
    for i, a in enumerate(answers):
        s.samples += 1
        s.answered[a.stage] = s.answered.get(a.stage, 0) + 1
        s.offloaded += a.offloaded
        times.append(a.latency_ms)
        if labels is not None:
            right += int(np.asarray(a.output).reshape(-1).argmax() == labels[i])
    if times:
        t = np.asarray(times)
        s.mean_latency_ms = float(t.mean())
        s.p50_latency_ms, s.p90_latency_ms = (float(v) for v in np.percentile(t, [50, 90]))
        s.accuracy = None if labels is None else right / s.samples
    return s


@dataclass(frozen=True)
class _Stage:
    """A stage that runs (skipped ones are left out), its graph computing its confidence."""

    name: str
    session: object                 # onnxruntime.InferenceSession
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    threshold: float                # inf: never answers (the last: -inf, always answers)
    chained: bool
    feed_from: tuple[int, ...]      # chained: which previous output feeds each input


class RuntimeStats:
    """What a runtime has answered (``GET /v1/stats`` of the device API); thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.calls = 0
        self.samples = 0
        self.answered: dict[str, int] = {}        # calls by answering stage
        self.offloaded = 0
        self.kept_local: dict[str, int] = {}      # wanted offload, answered locally: why
        self.errors = 0                           # model errors (ModelError)
        self.latency_ms_total = 0.0

    def add(self, a: Answer, samples: int) -> None:
        with self._lock:
            self.calls += 1
            self.samples += samples
            self.answered[a.stage] = self.answered.get(a.stage, 0) + 1
            self.offloaded += a.offloaded
            if a.offload_reason is not None:
                why = a.offload_reason.split(":")[0]
                self.kept_local[why] = self.kept_local.get(why, 0) + 1
            self.latency_ms_total += a.latency_ms

    def error(self) -> None:
        with self._lock:
            self.errors += 1

    def to_dict(self) -> dict[str, object]:
        with self._lock:
            return {"answers": self.calls, "samples": self.samples,
                    "answered": dict(self.answered), "offloaded": self.offloaded,
                    "kept_local": dict(self.kept_local), "errors": self.errors,
                    "mean_latency_ms": (self.latency_ms_total / self.calls
                                        if self.calls else None)}


class Runtime:
    """Serves a device's active model (``state``: a device folder or a
    :class:`~edgeloop.bundle.Device`), or the cascade a ``policy`` names (then ``state``
    is None: a cascade from files is not a verified bundle and has no probation).

    Safe to call from many threads. :meth:`close` (or ``with``) stops the micro-batching
    thread and the offload client's connections."""

    def __init__(self, state: str | os.PathLike[str] | Device | None,
                 policy: Policy | None = None) -> None:
        self.policy = policy or Policy()
        self.cascade: Cascade | None = None
        self.stats = RuntimeStats()
        self._lock = threading.Lock()
        self._batcher: BatchThread | None = None
        self._client: OffloadClient | None = None
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
        rule = self.policy.offload
        if rule is not None and rule.mode == "when-unsure" and self.cascade is None:
            raise UsageError("offload mode `when-unsure` needs a cascade (a single model has "
                             "no calibrated confidence); use `always` or `never`")
        if self.policy.max_batch > 1 and batchable(self._inputs):
            self._batcher = BatchThread(self._run_local, max_batch=self.policy.max_batch,
                                        max_delay_ms=self.policy.max_delay_ms)
        if rule is not None and rule.mode != "never":
            self._client = OffloadClient(rule.client)

    def close(self) -> None:
        """Stop micro-batching and close the offload client (probation is saved too)."""
        if self._batcher is not None:
            self._batcher.close()
        if self._client is not None:
            self._client.close()
        if self._watch is not None:
            self._watch.flush()

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
        mode and micro-batch size."""
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
                "max_batch": self.policy.max_batch if self._batcher is not None else 1}

    def arriving(self) -> contextlib.AbstractContextManager[None]:
        """Around a request that will call :meth:`predict` (a server reading its body):
        micro-batching then waits for it rather than run the others without it."""
        return contextlib.nullcontext() if self._batcher is None else self._batcher.announced()

    def batch_stats(self) -> dict[str, object] | None:
        """Micro-batching counts (batches, mean batch size, ...), None when it is off."""
        return None if self._batcher is None else self._batcher.stats.batch_dict()

    # --- serving the device's slot (probation) --------------------------------------

    def _start(self) -> None:
        """Serve the active slot: its model, or the cascade its bundle ships
        (``cascade.json`` beside the model, see :mod:`edgeloop.device.bundle`)."""
        assert self.device is not None
        self.path, self.manifest, self._watch = self.device.serve()
        if any(f.name == CASCADE_FILE for f in self.manifest.files):
            # device.serve() has just checked every file of the slot against the manifest
            self._start_cascade(self.path.with_name(CASCADE_FILE), verified=True)
        else:
            self.cascade = None
            self.session = session(self.path, threads=self.policy.threads)
            self._inputs = input_specs(self.session)
            self._names = (self.manifest.name,)
        first = self._inputs[0] if self._inputs else None
        self._batch_of = first.name if first is not None and first.shape else None
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
        check_against(feed, self._inputs, source="the feed")
        return self._local(feed)[0]

    def _over(self, watch: Watch) -> None:
        """Probation is over for this runtime: serve the other slot if it rolled back."""
        with self._lock:
            if self._watch is not watch:      # another thread saw it first
                return
            self._watch = None
            if watch.rolled_back:
                self._start()

    def _local(self, feed: Mapping[str, np.ndarray]
               ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """Output, calibrated confidences (a cascade) and the answering stage's index per
        sample, computed here (micro-batched with other callers' when that is on), and
        reported to probation as this caller's own inference."""
        watch = self._watch
        t0 = time.perf_counter()
        try:
            if self._batcher is not None:
                arrays = {i.name: feed[i.name] for i in self._inputs}
                rows = len(feed[self._batch_of]) if self._batch_of else 1
                outs, _ = self._batcher.submit(Feed(
                    arrays, rows, tuple(v.shape[1:] for v in arrays.values())))
            else:
                outs = self._run_local(feed)
        except ModelError:
            self.stats.error()
            if watch is not None:
                n = len(feed[self._batch_of]) if self._batch_of else 1
                if watch.report(False, t0, t0, n):
                    self._over(watch)
            raise
        if watch is not None:
            n = len(feed[self._batch_of]) if self._batch_of else 1
            if watch.report(True, t0, time.perf_counter(), n):
                self._over(watch)
        if len(outs) == 1:
            n = len(outs[0]) if outs[0].ndim else 1
            return outs[0], None, _FIRST if n == 1 else np.zeros(n, np.intp)
        return outs[0], outs[1], outs[2]

    def _run_local(self, feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """One local run (also the micro-batcher's): [output] for a model, [output,
        confidences, stage indices] for a cascade."""
        if self.cascade is None:
            try:
                return self.session.run(  # type: ignore[attr-defined,no-any-return]
                    None, {s.name: feed[s.name] for s in self._inputs})[:1]
            except Exception as e:
                raise ModelError(f"inference failed: "
                                 f"{str(e).strip().splitlines()[0][:300]}") from None
        return list(self._cascade_run(feed))

    def predict(self, feed: Mapping[str, np.ndarray], *,
                privacy_class: str | None = None) -> Answer:
        """Run ``feed`` (one sample, or a batch) and say which stage answered; offload it
        when the policy's ``[offload]`` rule picks it (``privacy_class``: the input's
        class, default the rule's). Never raises for the network or the server: a refused
        or failed offload is answered locally, with ``offload_reason``."""
        t0 = time.perf_counter()
        check_against(feed, self._inputs, source="the feed")
        feed = {i.name: feed[i.name] for i in self._inputs}    # all that may leave
        rule, reason = self.policy.offload, None
        cls = privacy_class if privacy_class is not None else \
            rule.privacy_class if rule is not None else ""
        if self._client is not None and rule is not None and rule.mode == "always":
            outs, reason = self._offload(feed, cls)
            if outs is not None:
                return self._answer(Answer(outs, OFFLOAD_STAGE, _ms(t0), None, True), feed)
        out, conf, idx = self._local(feed)
        names = self._names
        # one sample (the device case): no numpy reductions, each costs 2 us
        stage = names[int(idx[0]) if len(idx) == 1 else int(idx.max()) if len(idx) else -1]
        offloaded = False
        if self._client is not None and rule is not None and rule.mode == "when-unsure":
            assert conf is not None
            unsure = idx == len(names) - 1
            if rule.min_confidence is not None:
                unsure &= conf < rule.min_confidence
            if unsure.any():
                part = feed if unsure.all() else {k: v[unsure] for k, v in feed.items()}
                outs, reason = self._offload(part, cls, like=out[unsure])
                if outs is not None:
                    out = out.copy()
                    out[unsure] = outs
                    offloaded, stage = True, OFFLOAD_STAGE
                    conf = conf[~unsure]
        shown = None if conf is None or not len(conf) else \
            float(conf[0]) if len(conf) == 1 else float(conf.min())
        return self._answer(Answer(out, stage, _ms(t0), shown, offloaded, reason), feed)

    def _answer(self, a: Answer, feed: Mapping[str, np.ndarray]) -> Answer:
        self.stats.add(a, len(feed[self._batch_of]) if self._batch_of else 1)
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

    def predict_each(self, data: Dataset) -> Iterator[Answer]:
        """:meth:`predict` on each sample of ``data`` in turn (as a device meets them),
        with a progress bar."""
        check_against(data, self._inputs, source="the data")
        for i in progress(range(len(data)), "predicting", total=len(data)):
            yield self.predict({k: v[i:i + 1] for k, v in data.inputs.items()})

    # --- serving a cascade ----------------------------------------------------------

    def _start_cascade(self, path: Path, *, verified: bool = False) -> None:
        c = Cascade.load(path)
        if self.policy.thresholds is not None:
            c = c.with_thresholds(self.policy.thresholds)
        self.cascade = c
        finite = np.array([s.threshold is not None for s in c.stages[:-1]])
        runs = needed_stages(finite, [s.chained for s in c.stages])
        stages: list[_Stage] = []
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
            feed_from: tuple[int, ...] = ()
            if s.chained:
                prev = stages[-1].outputs
                missing = [i for i in inputs if i not in prev]
                if missing:
                    raise UsageError(f"cascade {str(path)!r}: stage {s.name!r} takes {missing}, "
                                     f"which stage {stages[-1].name!r} does not output")
                feed_from = tuple(prev.index(i) for i in inputs)
            stages.append(_Stage(
                s.name, sess, inputs, tuple(o.name for o in sess.get_outputs()),
                -np.inf if s is c.stages[-1] else np.inf if s.threshold is None else s.threshold,
                s.chained, feed_from))
        self._stages = tuple(stages)
        self._names = tuple(st.name for st in stages)
        # the answering stage's index for one sample, made once (read-only: shared)
        self._index = tuple(np.full(1, i, np.intp) for i in range(len(stages)))
        for a in self._index:
            a.flags.writeable = False
        self._inputs = input_specs(stages[0].session)   # type: ignore[arg-type]

    def _cascade_run(self, feed: Mapping[str, np.ndarray]
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Outputs, confidences and the answering stage's index, per sample of ``feed``.
        Each stage's graph computes its calibrated confidence
        (``_graph.with_confidence``)."""
        n = len(next(iter(feed.values())))
        if n == 1:
            return self._one(feed)
        rows = np.arange(n)
        out: np.ndarray | None = None
        conf_all = np.ones(n, np.float32)
        idx = np.zeros(n, np.intp)
        outs: list[np.ndarray] = []
        last = len(self._stages) - 1
        for i, st in enumerate(self._stages):
            f = {k: outs[j] for k, j in zip(st.inputs, st.feed_from, strict=True)} \
                if st.chained else {k: feed[k][rows] for k in st.inputs}
            outs = self._run(st, f)
            logits, conf = outs[0], outs[-1]
            if out is None:
                out = np.empty((n, *logits.shape[1:]), logits.dtype)
            ok = np.ones(len(rows), bool) if i == last else conf >= st.threshold
            if ok.any():
                out[rows[ok]] = logits[ok]
                conf_all[rows[ok]] = conf[ok]
                idx[rows[ok]] = i
            if ok.all():
                break
            rows = rows[~ok]
            outs = [v[~ok] for v in outs]
        assert out is not None
        return out, conf_all, idx

    def _one(self, feed: Mapping[str, np.ndarray]
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`_cascade_run` for one sample, with as little Python as possible."""
        outs: list[np.ndarray] = []
        for i in range(len(self._stages)):
            st = self._stages[i]
            f = {k: outs[j] for k, j in zip(st.inputs, st.feed_from, strict=True)} \
                if st.chained else {k: feed[k] for k in st.inputs}
            outs = self._run(st, f)
            if outs[-1][0] >= st.threshold:
                break
        return outs[0], outs[-1], self._index[i]

    @staticmethod
    def _run(st: _Stage, feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        try:
            return st.session.run(None, feed)     # type: ignore[attr-defined,no-any-return]
        except Exception as e:
            raise ModelError(f"stage {st.name!r} failed: "
                             f"{str(e).strip().splitlines()[0][:300]}") from None


_FIRST = np.zeros(1, np.intp)     # one sample answered by the first (only) stage
_FIRST.flags.writeable = False


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1e3
