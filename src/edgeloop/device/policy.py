"""How a device's runtime serves: one dataclass, loaded from TOML.

A policy file (every key optional)::

    cascade = "cascade.json"   # serve this cascade (from `edgeloop cascade`) instead of
                               # the device's slot; relative paths from the policy's folder
    thresholds = [0.9, inf]    # override the cascade's thresholds, one per stage but the
                               # last (inf: that stage never answers)
    threads = 1                # onnxruntime intra-op threads per model
    max_batch = 1              # micro-batching: samples per onnxruntime call gathered from
                               # concurrent callers; 1 = off
    max_delay_ms = 2.0         # longest the first caller waits for others to join
    target = "auto"            # the profile whose package watts feed the energy estimate

    [offload]                  # send inputs to an offload server (see OffloadRule)
    mode = "when-unsure"       # never | when-unsure | always
    min_confidence = 0.9       # when-unsure: run the last stage and offload what it
                               # answers below this (default: offload everything that
                               # would reach the last stage, without running it)
    privacy_class = "private"  # the class of an input whose caller names none
    url = "http://10.0.0.2:8080"   # and the other OffloadPolicy keys: timeout_s,
                                   # privacy_classes, budget_per_hour, ...

    [stream]                   # consecutive windows of a sensor (see StreamRule)
    min_change = 0.05          # skip a window whose relative change from the last
                               # processed one is below this (0: skip none)
    energy_budget_mw = 50.0    # average power inference may use; omit: no budget
    period_ms = 20.0           # time between windows; omit: the wall clock between them
    burst_s = 1.0              # budget saved while idle, at most this many seconds' worth

A wrong key or value is one line naming it and what was expected.
"""

from __future__ import annotations

import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from edgeloop.device.offload import OffloadPolicy
from edgeloop.errors import UsageError, check_table, one_of
from edgeloop.targets import get_target

__all__ = ["OFFLOAD_MODES", "OffloadRule", "Policy", "StreamRule"]

OFFLOAD_MODES = ("never", "when-unsure", "always")


@dataclass(frozen=True)
class OffloadRule:
    """When the runtime offloads (``mode``), and through which client (``client``).

    ``never``: every input runs locally. ``always``: every input goes to the server first,
    and runs locally only when it cannot go or the server gives no answer.
    ``when-unsure`` (a cascade only: a single model has no calibrated confidence): the
    stages before the last run locally, and an input none of them was sure about goes to
    the server *instead of* the last stage (the large model is what offloading saves);
    the last stage runs for it only if the server gives no answer. With
    ``min_confidence`` the last stage runs first, and what it answers below that goes
    to the server (its local answer is kept if the server gives none).

    ``while_drifted``: while the device's monitor flags input or output drift
    (:mod:`edgeloop.monitor`; a bundle that ships a reference sketch), inputs go to the
    server first, as with ``always``, but for one call in eight, which runs here so the
    monitor sees when the drift is over (its alerts clear only on answers it watches).
    Privacy class, budget and circuit breaker still apply.
    """

    client: OffloadPolicy
    mode: str = "when-unsure"
    min_confidence: float | None = None   # when-unsure: offload last-stage answers below it
    privacy_class: str = "private"        # inputs whose caller names no class
    while_drifted: bool = False           # offload everything while the monitor flags drift

    def __post_init__(self) -> None:
        if self.mode not in OFFLOAD_MODES:
            raise one_of("offload.mode", OFFLOAD_MODES, self.mode)
        m = self.min_confidence
        if m is not None and (isinstance(m, bool) or not isinstance(m, int | float)
                              or math.isnan(m)):
            raise UsageError(f"`offload.min_confidence` must be a number; got {m!r}")
        if m is not None and self.mode != "when-unsure":
            raise UsageError("`offload.min_confidence` applies to mode `when-unsure` only; "
                             f"the mode is {self.mode!r}")
        if not isinstance(self.while_drifted, bool):
            raise UsageError(f"`offload.while_drifted` must be true or false; got "
                             f"{self.while_drifted!r}")
        if not isinstance(self.privacy_class, str) or not self.privacy_class:
            raise UsageError(f"`offload.privacy_class` must be a non-empty string; got "
                             f"{self.privacy_class!r}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> OffloadRule:
        """From the policy's ``[offload]`` table: this rule's keys, the rest the client's
        (:meth:`OffloadPolicy.from_dict`)."""
        own = [f.name for f in fields(cls) if f.name != "client"]
        check_table(d, own + [f.name for f in fields(OffloadPolicy)], name="offload",
                    shown="[offload]")
        client = OffloadPolicy.from_dict({k: v for k, v in d.items() if k not in own})
        return cls(client=client, **{k: v for k, v in d.items() if k in own})


def _number(key: str, v: object, *, low: float, strict: bool, unit: str = "") -> float:
    """``v`` as a float, or the one-line error naming ``key``: a number > (or >=) ``low``."""
    ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and (
        v > low if strict else v >= low)
    if not ok:
        raise UsageError(f"`{key}` must be a number {'>' if strict else '>='} {low:g}"
                         f"{f' ({unit})' if unit else ''}; got {v!r}")
    return float(v)  # type: ignore[arg-type]


@dataclass(frozen=True)
class StreamRule:
    """How the runtime thins a stream of windows (:meth:`Runtime.predict_stream`).

    A window is skipped, and answered with the last processed window's answer, when its
    change from the last *processed* window is below ``min_change``; the change is the
    relative L2 distance over all its inputs, ``||x - x_last|| / ||x_last||``
    (:func:`edgeloop.device.stream.relative_change`). With ``energy_budget_mw`` the
    runtime also skips windows while inference would use more than that average power:
    credit accrues at the budget over stream time (``period_ms`` per window, or the wall
    clock between arrivals) up to ``burst_s`` seconds' worth, and a window runs when the
    credit covers the last processed window's energy
    (:class:`~edgeloop.device.stream.EnergyBudget`).
    """

    min_change: float = 0.0                 # relative L2 change below which a window is skipped
    energy_budget_mw: float | None = None   # average inference power allowed (mW); None: none
    period_ms: float | None = None          # stream time per window (ms); None: wall clock
    burst_s: float = 1.0                    # seconds of budget that may be saved up

    def __post_init__(self) -> None:
        object.__setattr__(self, "min_change",
                           _number("stream.min_change", self.min_change, low=0, strict=False,
                                   unit="relative L2 change, 0 = skip none"))
        if self.energy_budget_mw is not None:
            object.__setattr__(self, "energy_budget_mw", _number(
                "stream.energy_budget_mw", self.energy_budget_mw, low=0, strict=True,
                unit="milliwatts"))
        if self.period_ms is not None:
            object.__setattr__(self, "period_ms", _number(
                "stream.period_ms", self.period_ms, low=0, strict=True, unit="milliseconds"))
        object.__setattr__(self, "burst_s", _number("stream.burst_s", self.burst_s, low=0,
                                                    strict=False, unit="seconds"))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> StreamRule:
        """From the policy's ``[stream]`` table."""
        check_table(d, [f.name for f in fields(cls)], name="stream", shown="[stream]")
        return cls(**d)


@dataclass(frozen=True)
class Policy:
    """The runtime's policy (see the module docstring for the TOML keys)."""

    cascade: Path | None = None     # a cascade.json to serve instead of the device's slot
    thresholds: tuple[float, ...] | None = None   # per stage but the last; inf = never
    threads: int = 1                # onnxruntime intra-op threads per model
    max_batch: int = 1              # samples per call from concurrent callers; 1 = off
    max_delay_ms: float = 2.0       # longest the first caller waits for company
    offload: OffloadRule | None = None   # None: never offload
    stream: StreamRule | None = None     # None: every window of a stream runs
    target: str = "auto"            # profile whose package watts feed the energy estimate

    def __post_init__(self) -> None:
        for name in ("threads", "max_batch"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise UsageError(f"`{name}` must be an integer >= 1; got {v!r}")
        d = self.max_delay_ms
        if isinstance(d, bool) or not isinstance(d, int | float) or not d >= 0:
            raise UsageError(f"`max_delay_ms` must be a number >= 0 (milliseconds); got {d!r}")
        if self.offload is not None and not isinstance(self.offload, OffloadRule):
            object.__setattr__(self, "offload", OffloadRule.from_dict(self.offload))
        if self.stream is not None and not isinstance(self.stream, StreamRule):
            object.__setattr__(self, "stream", StreamRule.from_dict(self.stream))
        if not isinstance(self.target, str):
            raise UsageError(f"`target` must be a target profile's name; got {self.target!r}")
        if self.target != "auto":
            get_target(self.target)     # a one-line error for an unknown profile
        if self.thresholds is not None:
            t = self.thresholds
            if not isinstance(t, (list, tuple)) or not t or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)
                    for v in t):
                raise UsageError("`thresholds` must be a non-empty list of numbers (inf: the "
                                 f"stage never answers); got {t!r}")
            object.__setattr__(self, "thresholds", tuple(float(v) for v in t))
            if self.cascade is None:
                raise UsageError("`thresholds` needs `cascade`: they override a cascade's "
                                 "thresholds")
        if self.cascade is not None and not isinstance(self.cascade, Path):
            if not isinstance(self.cascade, str) or not self.cascade:
                raise UsageError(f"`cascade` must be the path of a cascade.json; got "
                                 f"{self.cascade!r}")
            object.__setattr__(self, "cascade", Path(self.cascade))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Policy:
        """Read a policy TOML file; relative paths in it are from the file's folder."""
        p = Path(path)
        if not p.is_file():
            raise UsageError(f"policy file {str(p)!r} does not exist")
        try:
            d = tomllib.loads(p.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise UsageError(f"policy file {str(p)!r} is not valid TOML ({e})") from None
        known = [f.name for f in fields(cls)]
        for key in d:
            if key not in known:
                raise UsageError(f"policy file {str(p)!r}: unknown key `{key}`; expected one "
                                 f"of {', '.join(known)}")
        try:
            policy = cls(**d)
        except UsageError as e:
            raise UsageError(f"policy file {str(p)!r}: {e}") from None
        if policy.cascade is not None and not policy.cascade.is_absolute():
            policy = replace(policy, cascade=p.parent / policy.cascade)
        return policy
