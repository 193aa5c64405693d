"""The on-device monitor: streaming drift detection and a label-free accuracy estimate
per window, in bounded memory, persisted across restarts.

The runtime hands every answer to :meth:`Monitor.observe`, which watches every
``sample_every``-th call (an append or two, ~0.3 us); each ``block`` of watched calls is
then processed at once with numpy and river (~1.5 us per watched sample on a 2-core x86
server between inferences of a 27 us model, cold caches included; with the default
``sample_every=3`` about 1 us per call, the 5% budget: see
``benchmarks/bench_monitor.py``; every 2nd call measured 5.7%):

- **output**: ADWIN on the confidence (per sample by default),
  Page-Hinkley on the normalised entropy (averaged over ``ph_every`` samples and
  standardised by the golden set's mean and spread), optionally KSWIN on the confidence
  (off by default: each update runs a scipy KS test, ~0.2 ms); a two-sample chi-square
  test of each window's predicted-class mix against the golden set's;
- **inputs** of every ``inputs_every``-th call (a sample: the input path costs as much
  as all the rest): per feature, a two-sample chi-square test of each window's counts
  in the reference quantile bins against the golden set's (Bonferroni over the
  features);
- **label-free accuracy** (CBPE, :mod:`~edgeloop.monitor.cbpe`): each window's mean
  calibrated confidence; an alert when it is below the golden set's accuracy by more
  than ``accuracy_drop`` and 3 standard errors.

River's detectors compare the stream with its own past (a change), the windowed tests
compare it with the golden set (a difference). A detection raises an :class:`Alert`
that stays raised for ``hold`` samples after the detector's last detection.

State is saved atomically into ``STATE/monitor/`` every ``save_every`` samples or
``save_seconds``, whichever comes first, when an alert is first raised, and on
:meth:`Monitor.close`: ``state.pkl`` (the detectors, pickled; river's ADWIN state is tied
to river's version, pinned by edgeloop, and a state from another river version or
another model starts afresh), ``drift.json`` (what readers see,
:func:`~edgeloop.monitor.monitor_status`) and ``recent.npz`` (the latest ``recent``
sampled inputs: what the updater checks a candidate on while the device is drifted). A
killed process loses at most the samples since the last save.
"""

from __future__ import annotations

import collections
import json
import os
import pickle
import threading
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from importlib.metadata import version
from pathlib import Path

import numpy as np
from river import drift

from edgeloop._io import utc_now, write_bytes_atomic
from edgeloop.data import Dataset, save_npz
from edgeloop.errors import UsageError
from edgeloop.monitor.alerts import (
    ACCURACY_DETECTORS,
    DRIFT_FILE,
    FOLDER,
    RECENT_FILE,
    STATE_FILE,
    Alert,
    Flag,
)
from edgeloop.monitor.config import MonitorConfig
from edgeloop.monitor.reference import REFERENCE_FILE, Sketch
from edgeloop.monitor.signals import features, output_signals
from edgeloop.monitor.twosample import Binner, chi2_two_sample

__all__ = ["Monitor"]

_FORMAT = 1


@dataclass
class _Averager:
    """Means of consecutive runs of ``every`` values, carried across blocks."""

    every: int
    carry: list[float] = field(default_factory=list)

    def means(self, values: np.ndarray) -> np.ndarray:
        if self.carry:
            values = np.concatenate([self.carry, values])
        full = len(values) // self.every * self.every
        self.carry = values[full:].tolist()
        return values[:full].reshape(-1, self.every).mean(1)


class Monitor:
    """Watches one model's answers against its reference :class:`Sketch`.

    ``path``: the folder state is saved in (None: nothing is saved); ``model_id``: what
    the state belongs to (the model's sha256), so that a state saved for another model
    is not resumed. :meth:`for_device` opens the monitor of a device's active bundle.
    Safe to call from many threads."""

    def __init__(self, sketch: Sketch, *, config: MonitorConfig | None = None,
                 path: str | os.PathLike[str] | None = None, model_id: str = "") -> None:
        self.sketch = sketch
        self.config = config or MonitorConfig()
        self.path = None if path is None else Path(path)
        self.model_id = model_id
        self._outputs: collections.deque[np.ndarray] = collections.deque()
        self._feeds: collections.deque[Mapping[str, np.ndarray]] = collections.deque()
        self._lock = threading.Lock()
        self._block = self.config.block
        self._sample_every = self.config.sample_every
        self._calls = 0
        self._inputs_every = self.config.inputs_every
        s = sketch
        self._binner = Binner(np.asarray(s.edges, np.float64).reshape(len(s.starts), -1))
        self._ref_counts = np.asarray(s.counts, np.int64)
        self._starts = np.asarray(s.starts, np.int64)
        self._fresh()

    # --- state ----------------------------------------------------------------------

    def _fresh(self) -> None:
        c, s = self.config, self.sketch
        self.samples_ = 0
        self.detectors_: dict[str, drift.ADWIN | drift.PageHinkley | drift.KSWIN] = {}
        self.averagers_: dict[str, _Averager] = {}
        if "adwin:confidence" in c.detectors:
            self.detectors_["adwin:confidence"] = drift.ADWIN(delta=c.adwin_delta)
            self.averagers_["adwin:confidence"] = _Averager(c.adwin_every)
        if "page-hinkley:entropy" in c.detectors:
            self.detectors_["page-hinkley:entropy"] = drift.PageHinkley(
                min_instances=30, delta=c.ph_delta, threshold=c.ph_threshold)
            self.averagers_["page-hinkley:entropy"] = _Averager(c.ph_every)
        if "kswin:confidence" in c.detectors:
            self.detectors_["kswin:confidence"] = drift.KSWIN(alpha=c.kswin_alpha,
                                                             seed=c.seed)
            self.averagers_["kswin:confidence"] = _Averager(c.kswin_every)
        self.window_counts_ = np.zeros_like(self._ref_counts)
        self.window_classes_ = np.zeros(len(s.class_counts), np.int64)
        self.window_sums_ = np.zeros(3)        # calibrated confidence, confidence, entropy
        self.window_samples_ = 0
        self.windows_: collections.deque[dict[str, object]] = collections.deque(
            maxlen=c.history)
        self.alerts_: dict[str, Alert] = {}
        self.detections_: collections.deque[dict[str, object]] = collections.deque(
            maxlen=c.history)                  # every detection, newest last
        self.resets_: dict[str, int] = {}      # detectors reset at the memory cap
        self.recent_: dict[str, np.ndarray] = {}   # the latest sampled inputs, by name
        self.errors_ = 0                       # blocks dropped: they could not be processed
        self.last_error_: str | None = None
        self._saved_at = (0, time.monotonic())

    def _state(self) -> dict[str, object]:
        return {"format": _FORMAT, "river": version("river"), "model_id": self.model_id,
                "config": asdict(self.config), "samples": self.samples_,
                "detectors": self.detectors_, "averagers": self.averagers_,
                "window": (self.window_counts_, self.window_classes_, self.window_sums_,
                           self.window_samples_),
                "windows": list(self.windows_), "alerts": self.alerts_,
                "detections": list(self.detections_),
                "resets": self.resets_, "recent": self.recent_,
                "errors": (self.errors_, self.last_error_)}

    def _restore(self, d: Mapping[str, object]) -> bool:
        """Resume from a saved state; False (and nothing changed) if it is another
        format, river version, model or configuration."""
        if (d.get("format"), d.get("river"), d.get("model_id"), d.get("config")) != (
                _FORMAT, version("river"), self.model_id, asdict(self.config)):
            return False
        self.samples_ = d["samples"]  # type: ignore[assignment]
        self.detectors_ = d["detectors"]  # type: ignore[assignment]
        self.averagers_ = d["averagers"]  # type: ignore[assignment]
        (self.window_counts_, self.window_classes_, self.window_sums_,
         self.window_samples_) = d["window"]  # type: ignore[misc]
        self.windows_.extend(d["windows"])  # type: ignore[arg-type]
        self.alerts_ = d["alerts"]  # type: ignore[assignment]
        self.detections_.extend(d["detections"])  # type: ignore[arg-type]
        self.resets_ = d["resets"]  # type: ignore[assignment]
        self.recent_ = d["recent"]  # type: ignore[assignment]
        self.errors_, self.last_error_ = d["errors"]  # type: ignore[misc]
        self._saved_at = (self.samples_, time.monotonic())
        return True

    @classmethod
    def for_device(cls, state_dir: str | os.PathLike[str], *,
                   config: MonitorConfig | None = None) -> Monitor:
        """The monitor of the device's active bundle: its sketch (``monitor.json``, which
        the bundle must ship; verified with the slot) and the state saved in
        ``STATE/monitor/`` if it was saved for the same model, river version and
        configuration (otherwise it starts afresh)."""
        from edgeloop.bundle import Device

        active = Device(state_dir).active()
        if active is None:
            raise UsageError(f"device {str(state_dir)!r} has no model installed yet")
        path, manifest = active
        if not any(f.name == REFERENCE_FILE for f in manifest.files):
            raise UsageError(f"{manifest.name} {manifest.version} ships no {REFERENCE_FILE}; "
                             "publish it with a golden set to monitor it")
        sketch = Sketch.from_bytes(path.with_name(REFERENCE_FILE).read_bytes())
        mon = cls(sketch, config=config, path=Path(state_dir) / FOLDER,
                  model_id=manifest.sha256)
        state = mon.path / STATE_FILE  # type: ignore[operator]
        if state.is_file():
            try:
                saved = pickle.loads(state.read_bytes())
            except Exception:     # unreadable (another river, a foreign file): start afresh
                saved = {}
            if isinstance(saved, dict):
                mon._restore(saved)
        return mon

    # --- the per-answer call ----------------------------------------------------------

    def observe(self, feed: Mapping[str, np.ndarray], output: np.ndarray) -> None:
        """Account one answer: the model's input ``feed`` (arrays named after its inputs,
        samples first) and its first output for it (samples first). Watches every
        ``sample_every``-th call: the others cost a counter, a watched one an append
        (two when its input is sampled too); every ``block``-th watched call processes
        the block (see the module docstring). Never raises for what it is given: a block
        that cannot be processed (inputs or outputs that do not fit the sketch) is
        dropped and counted (``errors`` in :meth:`status`)."""
        self._calls += 1            # not atomic across threads: at worst a sample moves
        if self._calls % self._sample_every:
            return
        outputs = self._outputs
        outputs.append(output)
        n = len(outputs)
        if not n % self._inputs_every:    # a copy: callers may reuse their buffers
            self._feeds.append({k: np.array(v) for k, v in feed.items()})
        if n >= self._block and self._lock.acquire(blocking=False):
            try:        # a thread finding another one processing goes on serving
                self._process_pending()
            finally:
                self._lock.release()

    def process(self) -> None:
        """Process every answer observed so far (also done every ``block`` calls)."""
        with self._lock:
            self._process_pending()

    def _process_pending(self) -> None:
        """:meth:`process` under the lock. Outputs and sampled inputs are taken apart (a
        call's input may land in the next block when threads race: it is a sample)."""
        n = len(self._outputs)
        if not n:
            return
        pop = self._outputs.popleft
        outputs = [pop() for _ in range(n)]
        pop = self._feeds.popleft
        feeds = [pop() for _ in range(len(self._feeds))]
        try:
            raised = self._process_block(
                {k: np.concatenate([f[k] for f in feeds]) for k in self.sketch.inputs}
                if feeds else None,
                np.concatenate(outputs))
        except Exception as e:    # watching must never fail the answer it watches
            self.errors_ += 1
            self.last_error_ = f"{type(e).__name__}: {str(e)[:200]}"
            return
        self._cap_memory()
        c = self.config
        since, at = self._saved_at
        if self.path is not None and (raised or self.samples_ - since >= c.save_every
                                      or time.monotonic() - at >= c.save_seconds):
            try:
                self._save()
            except OSError as e:         # a full or read-only disk: serving goes on
                self.errors_ += 1
                self.last_error_ = f"saving: {type(e).__name__}: {str(e)[:200]}"

    def _process_block(self, feed: Mapping[str, np.ndarray] | None, output: np.ndarray
                       ) -> bool:
        """Update every detector with a block of outputs and the inputs sampled from it
        (``feed``, None when none was); True if an alert was newly raised."""
        s, c = self.sketch, self.config
        # everything that may fail on a malformed block first, before any state changes
        sig = output_signals(output, probabilities=s.probabilities)
        classes = np.bincount(sig.classes, minlength=len(self.window_classes_))
        if len(classes) != len(self.window_classes_):
            raise ValueError(f"the model answers {len(classes)} classes or more; the sketch "
                             f"knows {len(self.window_classes_)}")
        counts = None if feed is None else self._binner.counts(
            features(feed, s.inputs, self._starts))
        rows = len(output)
        start = self.samples_
        self.samples_ += rows
        raised = False
        signals = {"confidence": sig.confidence,
                   "entropy": sig.entropy}
        for name, det in self.detectors_.items():
            signal = signals[name.split(":", 1)[1]]
            values = self.averagers_[name].means(signal)
            if name.startswith("page-hinkley"):
                mean, std = s.entropy
                values = (values - mean) * (np.sqrt(c.ph_every) / max(std, 1e-6))
            for v in values.tolist():
                det.update(v)
                if det.drift_detected:
                    raised |= self._detect(name, start + rows, self._evidence(name, det, v))
        if feed is not None:
            self.window_counts_ += counts
            keep = c.recent
            self.recent_ = {k: np.concatenate([self.recent_[k], v[-keep:]])[-keep:]
                            if k in self.recent_ else v[-keep:].copy() for k, v in feed.items()}
        self.window_classes_ += classes
        cal = s.calibration(sig.confidence).sum() if s.calibration is not None else 0.0
        self.window_sums_ += (cal, sig.confidence.sum(), sig.entropy.sum())
        self.window_samples_ += rows
        if self.window_samples_ >= c.window:
            raised |= self._close_window()
        for name, a in list(self.alerts_.items()):
            if a.active and self.samples_ - a.last_sample > c.hold:
                self.alerts_[name] = replace(a, active=False)
        return raised

    @staticmethod
    def _evidence(name: str, det: object, value: float) -> str:
        if isinstance(det, drift.ADWIN):
            return (f"window cut to {det.width} updates, mean confidence now "
                    f"{det.estimation:.3f}")
        if isinstance(det, drift.KSWIN):
            return f"KS p-value {det.p_value:.2g} between old and recent confidence"
        return f"cumulative entropy deviation crossed {value:+.1f} standard errors"

    def _detect(self, name: str, at: int, evidence: str) -> bool:
        """Record a detection; True if it raises the detector's alert anew."""
        old, now = self.alerts_.get(name), utc_now()
        self.detections_.append({"detector": name, "sample": at, "time": now,
                                 "evidence": evidence})
        if old is None or not old.active:
            self.alerts_[name] = Alert(name, now, now, at, at, 1, evidence)
            return True
        self.alerts_[name] = replace(old, last=now, last_sample=at,
                                     detections=old.detections + 1, evidence=evidence)
        return False

    def _close_window(self) -> bool:
        s, c = self.sketch, self.config
        n = self.window_samples_
        raised = False
        record: dict[str, object] = {"end_sample": self.samples_, "time": utc_now(), "samples": n,
                                     "confidence": float(self.window_sums_[1] / n),
                                     "entropy": float(self.window_sums_[2] / n),
                                     "classes": self.window_classes_.tolist()}
        if "chi2:inputs" in c.detectors:
            stat, p = chi2_two_sample(self._ref_counts, self.window_counts_)
            worst = int(p.argmin())
            adjusted = min(1.0, float(p[worst]) * len(p))           # Bonferroni
            record["inputs_p"] = adjusted
            if adjusted < c.alpha:
                raised |= self._detect("chi2:inputs", self.samples_, (
                    f"feature {worst}: chi2 {stat[worst]:.1f}, p {adjusted:.2g} over "
                    f"{len(p)} features; {int((p * len(p) < c.alpha).sum())} features "
                    "differ from the golden set"))
        if "chi2:class-mix" in c.detectors:
            stat, p = chi2_two_sample(np.asarray(s.class_counts), self.window_classes_)
            record["class_mix_p"] = float(p[0])
            if p[0] < c.alpha:
                ref = np.asarray(s.class_counts) / s.samples
                now = self.window_classes_ / n
                k = int(np.abs(now - ref).argmax())
                raised |= self._detect("chi2:class-mix", self.samples_, (
                    f"chi2 {stat[0]:.1f}, p {p[0]:.2g}; class {k}: {now[k]:.1%} of answers "
                    f"(golden set {ref[k]:.1%})"))
        if s.calibration is not None:
            est = float(self.window_sums_[0] / n)
            record["estimated_accuracy"] = est
            band = max(c.accuracy_drop, 3 * (s.calibrated_std or 0.0) / np.sqrt(n))
            if "cbpe:accuracy" in c.detectors and est < (s.accuracy or 0.0) - band:
                raised |= self._detect("cbpe:accuracy", self.samples_, (
                    f"estimated accuracy {est:.1%} over {n} samples; golden set "
                    f"{s.accuracy:.1%}"))
        self.windows_.append(record)
        self.window_counts_[:] = 0
        self.window_classes_[:] = 0
        self.window_sums_[:] = 0
        self.window_samples_ = 0
        return raised

    def _cap_memory(self) -> None:
        """Reset a detector whose state outgrew ``max_detector_bytes`` (ADWIN's grows by
        about 400 bytes per tenfold longer window). Checked after each block, with or
        without a folder: ~10 us for the default detectors, under 1% of the block."""
        cap = self.config.max_detector_bytes
        for name, det in self.detectors_.items():
            if len(pickle.dumps(det)) > cap:
                self.detectors_[name] = det.clone() if not isinstance(det, drift.KSWIN) else \
                    drift.KSWIN(**{**det._get_params(), "window": None})
                self.resets_[name] = self.resets_.get(name, 0) + 1

    # --- reading and saving -------------------------------------------------------------

    def memory(self) -> dict[str, int]:
        """Bytes of state per detector: a river detector's pickled state, a windowed
        test's counts (``window`` samples of a test cost nothing: only counts are kept)."""
        out = {name: len(pickle.dumps(det)) for name, det in self.detectors_.items()}
        c = self.config.detectors
        if "chi2:inputs" in c:
            out["chi2:inputs"] = self.window_counts_.nbytes + self._ref_counts.nbytes \
                + self._binner.edges.nbytes
        if "chi2:class-mix" in c:
            out["chi2:class-mix"] = 2 * self.window_classes_.nbytes
        if "cbpe:accuracy" in c and self.sketch.calibration is not None:
            out["cbpe:accuracy"] = self.window_sums_.nbytes + 16 * len(
                self.sketch.calibration.x)
        return out

    def flag(self) -> Flag:
        """The flags now (in this process; other processes read
        :func:`~edgeloop.monitor.drift_flag`)."""
        active = tuple(a for a in tuple(self.alerts_.values()) if a.active)
        return Flag(drifted=any(a.detector not in ACCURACY_DETECTORS for a in active),
                    accuracy_drop=any(a.detector in ACCURACY_DETECTORS for a in active),
                    alerts=active)

    @property
    def drifted(self) -> bool:
        """True while an input or output drift alert is raised (cheap: for the runtime)."""
        return any(a.active and a.detector not in ACCURACY_DETECTORS
                   for a in tuple(self.alerts_.values()))

    def status(self) -> dict[str, object]:
        """What ``drift.json`` holds: flags, alerts, recent windows, memory per detector."""
        flag = self.flag()
        return {"format": _FORMAT, "model_sha256": self.model_id, "samples": self.samples_,
                "saved": utc_now(), "drifted": flag.drifted, "accuracy_drop": flag.accuracy_drop,
                "alerts": [asdict(a) for a in self.alerts_.values()],
                "memory_bytes": self.memory(), "memory_resets": dict(self.resets_),
                "errors": self.errors_, "last_error": self.last_error_,
                "detections": list(self.detections_)[-20:],
                "windows": list(self.windows_)[-10:]}

    def _save(self) -> None:
        assert self.path is not None
        # the device's own inputs, and a pickle loaded at start: the owner's alone
        write_bytes_atomic(self.path / STATE_FILE, pickle.dumps(self._state()), mode=0o600)
        if self.recent_:
            save_npz(self.path / RECENT_FILE, Dataset(dict(self.recent_)), mode=0o600)
        write_bytes_atomic(self.path / DRIFT_FILE, json.dumps(self.status()).encode())
        self._saved_at = (self.samples_, time.monotonic())

    def save(self) -> None:
        """Process what is pending and save the state now."""
        if self.path is None:
            raise UsageError("this monitor has no folder to save its state in")
        self.process()
        with self._lock:
            self._save()

    def close(self) -> None:
        """Process what is pending and save (when the monitor has a folder)."""
        if self.path is None:
            self.process()
        else:
            self.save()

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
