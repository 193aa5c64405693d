"""The device runtime: serves the active verified model or cascade, and reports to the
updater while a new one is on probation.

Serving the device's slot, every inference is reported to the updater's watch
(:meth:`edgeloop.bundle.Device.serve`); the updater decides to keep or roll back, the
runtime only reports, and after a rollback it serves the other slot. Serving a cascade
(a cascade bundle in the slot, or a policy's ``cascade`` from files, which is unsigned and
has no probation), the stages run smallest first and a later stage only runs for
the samples no earlier stage was sure about (:mod:`edgeloop.device.cascade`).
"""

from __future__ import annotations

import os
import time
import weakref
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgeloop._onnx import input_specs, load_model, run, session
from edgeloop._progress import progress
from edgeloop.bundle.device import Device, Watch
from edgeloop.data import Dataset, check_against
from edgeloop.device._graph import with_confidence
from edgeloop.device.cascade import CASCADE_FILE, Cascade, _sha256, needed_stages
from edgeloop.device.policy import Policy
from edgeloop.errors import ModelError, UsageError, VerificationError

__all__ = ["Answer", "RunSummary", "Runtime", "summarize"]


@dataclass(frozen=True)
class Answer:
    """One prediction: the answering stage's output, which stage answered (for a batch,
    the last stage any sample needed), its calibrated confidence (None for a single
    model), and the wall time of the whole call."""

    output: np.ndarray
    stage: str
    latency_ms: float
    confidence: float | None = None
    offloaded: bool = False


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


class Runtime:
    """Serves a device's active model (``state``: a device folder or a
    :class:`~edgeloop.bundle.Device`), or the cascade a ``policy`` names (then ``state``
    is None: a cascade from files is not a verified bundle and has no probation)."""

    def __init__(self, state: str | os.PathLike[str] | Device | None,
                 policy: Policy | None = None) -> None:
        self.policy = policy or Policy()
        self.cascade: Cascade | None = None
        if self.policy.cascade is not None:
            if state is not None:
                raise UsageError("the policy names a cascade, served from its files as they "
                                 "are; a device folder serves its verified slot: give one of "
                                 "them")
            self.device = None
            self.path, self.manifest, self._watch = self.policy.cascade, None, None
            self._start_cascade(self.policy.cascade)
            self._batch_of = self._inputs[0].name if self._inputs[0].shape else None
            return
        if state is None:
            raise UsageError("give a device state folder, or a policy that names a cascade")
        self.device = state if isinstance(state, Device) else Device(state)
        self._start()

    # --- serving the device's slot (probation) --------------------------------------

    def _start(self) -> None:
        """Serve the active slot: its model, or the cascade its bundle ships
        (``cascade.json`` beside the model, see :mod:`edgeloop.device.bundle`)."""
        assert self.device is not None
        self.path, self.manifest, self._watch = self.device.serve()
        if any(f.name == CASCADE_FILE for f in self.manifest.files):
            self._start_cascade(self.path.with_name(CASCADE_FILE))
        else:
            self.cascade = None
            self.session = session(self.path, threads=self.policy.threads)
            self._inputs = input_specs(self.session)
        first = self._inputs[0] if self._inputs else None
        self._batch_of = first.name if first is not None and first.shape else None
        if self._watch is not None:
            weakref.finalize(self, self._watch.flush)     # also runs at interpreter exit

    def infer(self, feed: Mapping[str, np.ndarray]) -> np.ndarray:
        """The model's first output on ``feed`` (arrays named after the model's inputs);
        for a cascade, the answering stages' outputs.

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
        watch = self._watch
        if watch is None:
            return run(self.session, feed)
        n = len(feed[self._batch_of]) if self._batch_of else 1
        t0 = time.perf_counter()
        try:
            out = run(self.session, feed)
        except ModelError:
            if watch.report(False, t0, t0, n):
                self._over(watch)
            raise
        if watch.report(True, t0, time.perf_counter(), n):
            self._over(watch)
        return out

    def _over(self, watch: Watch) -> None:
        """Probation is over for this runtime: serve the other slot if it rolled back."""
        self._watch = None
        if watch.rolled_back:
            self._start()

    def predict(self, feed: Mapping[str, np.ndarray]) -> Answer:
        """Run ``feed`` (one sample, or a batch) and say which stage answered."""
        t0 = time.perf_counter()
        if self.cascade is None:
            out = self.infer(feed)
            assert self.manifest is not None
            return Answer(out, self.manifest.name, (time.perf_counter() - t0) * 1e3)
        check_against(feed, self._inputs, source="the feed")
        watch = self._watch
        if watch is None:
            out, conf, stage = self._cascade_run(feed)
        else:                       # a cascade bundle on probation: report, as infer does
            n = len(feed[self._batch_of]) if self._batch_of else 1
            try:
                out, conf, stage = self._cascade_run(feed)
            except ModelError:
                if watch.report(False, t0, t0, n):
                    self._over(watch)
                raise
            if watch.report(True, t0, time.perf_counter(), n):
                self._over(watch)
        return Answer(out, stage, (time.perf_counter() - t0) * 1e3,
                      confidence=float(conf.min()))

    def stages(self) -> tuple[str, ...]:
        """The names of the stages that may answer, in order."""
        if self.cascade is None:
            assert self.manifest is not None
            return (self.manifest.name,)
        return tuple(st.name for st in self._stages)

    def predict_each(self, data: Dataset) -> Iterator[Answer]:
        """:meth:`predict` on each sample of ``data`` in turn (as a device meets them),
        with a progress bar."""
        check_against(data, self._inputs, source="the data")
        for i in progress(range(len(data)), "predicting", total=len(data)):
            yield self.predict({k: v[i:i + 1] for k, v in data.inputs.items()})

    # --- serving a cascade ----------------------------------------------------------

    def _start_cascade(self, path: Path) -> None:
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
            if s.sha256 and _sha256(model) != s.sha256:
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
        self._inputs = input_specs(stages[0].session)   # type: ignore[arg-type]

    def _cascade_run(self, feed: Mapping[str, np.ndarray]
                     ) -> tuple[np.ndarray, np.ndarray, str]:
        """Outputs, confidences and the last answering stage's name for ``feed``. Each
        stage's graph computes its calibrated confidence (``_graph.with_confidence``)."""
        n = len(next(iter(feed.values())))
        if n == 1:
            return self._one(feed)
        rows = np.arange(n)
        out: np.ndarray | None = None
        conf_all = np.ones(n, np.float32)
        outs: list[np.ndarray] = []
        name = self._stages[-1].name
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
                name = st.name
            if ok.all():
                break
            rows = rows[~ok]
            outs = [v[~ok] for v in outs]
        assert out is not None
        return out, conf_all, name

    def _one(self, feed: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, str]:
        """:meth:`_cascade_run` for one sample, with as little Python as possible."""
        outs: list[np.ndarray] = []
        for st in self._stages:
            f = {k: outs[j] for k, j in zip(st.inputs, st.feed_from, strict=True)} \
                if st.chained else {k: feed[k] for k in st.inputs}
            outs = self._run(st, f)
            if outs[-1][0] >= st.threshold:
                break
        return outs[0], outs[-1], st.name

    @staticmethod
    def _run(st: _Stage, feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        try:
            return st.session.run(None, feed)     # type: ignore[attr-defined,no-any-return]
        except Exception as e:
            raise ModelError(f"stage {st.name!r} failed: "
                             f"{str(e).strip().splitlines()[0][:300]}") from None
