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

    [offload]                  # send inputs to an offload server (see OffloadRule)
    mode = "when-unsure"       # never | when-unsure | always
    min_confidence = 0.9       # when-unsure: run the last stage and offload what it
                               # answers below this (default: offload everything that
                               # would reach the last stage, without running it)
    privacy_class = "private"  # the class of an input whose caller names none
    url = "http://10.0.0.2:8080"   # and the other OffloadPolicy keys: timeout_s,
                                   # privacy_classes, budget_per_hour, ...

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
from edgeloop.errors import UsageError, one_of

__all__ = ["OFFLOAD_MODES", "OffloadRule", "Policy"]

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
    """

    client: OffloadPolicy
    mode: str = "when-unsure"
    min_confidence: float | None = None   # when-unsure: offload last-stage answers below it
    privacy_class: str = "private"        # inputs whose caller names no class

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
        if not isinstance(self.privacy_class, str) or not self.privacy_class:
            raise UsageError(f"`offload.privacy_class` must be a non-empty string; got "
                             f"{self.privacy_class!r}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> OffloadRule:
        """From the policy's ``[offload]`` table: this rule's keys, the rest the client's
        (:meth:`OffloadPolicy.from_dict`)."""
        if not isinstance(d, Mapping):
            raise UsageError(f"`offload` must be a table of keys; got {type(d).__name__}")
        own = [f.name for f in fields(cls) if f.name != "client"]
        known = own + [f.name for f in fields(OffloadPolicy)]
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise UsageError(f"[offload] has no key {unknown[0]!r}; keys: {', '.join(known)}")
        client = OffloadPolicy.from_dict({k: v for k, v in d.items() if k not in own})
        return cls(client=client, **{k: v for k, v in d.items() if k in own})


@dataclass(frozen=True)
class Policy:
    """The runtime's policy (see the module docstring for the TOML keys)."""

    cascade: Path | None = None     # a cascade.json to serve instead of the device's slot
    thresholds: tuple[float, ...] | None = None   # per stage but the last; inf = never
    threads: int = 1                # onnxruntime intra-op threads per model
    max_batch: int = 1              # samples per call from concurrent callers; 1 = off
    max_delay_ms: float = 2.0       # longest the first caller waits for company
    offload: OffloadRule | None = None   # None: never offload

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
