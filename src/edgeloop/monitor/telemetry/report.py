"""A telemetry report: built on the device from plain observations, checked on the
collector from bytes. Pure functions, no I/O (the device's side of the wire is
:mod:`edgeloop.monitor.telemetry.client`, the collector's :mod:`edgeloop.serve.telemetry`).

A report carries mechanism outputs and nothing else about the device's data::

    {"v": 1, "device": "3f2c...", "seq": 17, "time": 1795680000,
     "epsilon": 1.0, "delta": 0.0,
     "fields": {"class":      {"mech": "grr", "k": 10, "epsilon": 0.333.., "value": 7},
                "drift":      {"mech": "grr", "k": 2, "epsilon": 0.333.., "value": 0},
                "confidence": {"mech": "laplace", "lo": 0.0, "hi": 1.0,
                               "epsilon": 0.333.., "value": 1.318211}}}

- ``class``: one prediction drawn uniformly from the window's predicted-class counts,
  through GRR or OUE (a mixture of ε-LDP outputs is ε-LDP for the whole window; the
  fleet average of the estimates is the fleet's class mix);
- ``drift``: the drift flag through GRR with k = 2 (randomized response);
- ``confidence``: the window's mean confidence, clipped, through Laplace or Gaussian.

The report's ε (δ) is the sum of its fields' (basic composition); by default each field
present gets an equal share. ``seq`` is the device's report counter, never reused (the
ledger records it before the report exists): with the device id it names the report, and
the collector stores each name once, which refuses replays. The body is sent as the
canonical JSON below, authenticated by ``X-Edgeloop-Signature: HMAC-SHA256(key, body)``
with the key provisioned at ``device init``.
"""

from __future__ import annotations

import bisect
import hashlib
import hmac
import itertools
import json
import math
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from edgeloop.errors import DataError, UsageError, one_of
from edgeloop.monitor.telemetry.mechanisms import (
    Gaussian,
    Laplace,
    Mechanism,
    RandomizedResponse,
    categorical,
    finite,
    from_params,
)

__all__ = ["FIELDS", "BadReport", "Observation", "Report", "ReportConfig", "build_report",
           "encode", "parse_report", "plan", "sign", "signature_ok"]

FIELDS = ("class", "drift", "confidence")
FORMAT = 1
MAX_BODY = 64 << 10               # bytes; OUE with the largest k is about 9 KB
DEVICE_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_TOP = {"v", "device", "seq", "time", "epsilon", "delta", "fields"}


class BadReport(DataError):
    """A report the collector refuses; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Observation:
    """The plain values a report is made from; they never leave the device. Give any
    of them (a field left ``None`` is not reported)."""

    class_counts: Sequence[int] | None = None   # predictions per class over the window
    drift: bool | None = None                   # did the drift detector fire
    mean_confidence: float | None = None        # mean top-class probability


@dataclass(frozen=True)
class ReportConfig:
    """How a device privatizes its observations."""

    class_mechanism: str = "auto"          # grr, oue, or auto (lower variance for k, ε)
    confidence_mechanism: str = "laplace"  # laplace (pure ε) or gaussian ((ε, δ))
    confidence_lo: float = 0.0             # clipping range of the mean confidence
    confidence_hi: float = 1.0
    delta: float = 1e-6                    # the Gaussian mechanism's δ

    def __post_init__(self) -> None:
        if self.class_mechanism not in ("auto", "grr", "oue"):
            raise one_of("class mechanism", ["auto", "grr", "oue"], self.class_mechanism)
        if self.confidence_mechanism not in ("laplace", "gaussian"):
            raise one_of("confidence mechanism", ["laplace", "gaussian"],
                         self.confidence_mechanism)


@dataclass(frozen=True)
class Report:
    """A parsed, validated report: its name, cost and the mechanism behind each output."""

    device: str
    seq: int
    time: float
    epsilon: float
    delta: float
    fields: dict[str, tuple[Mechanism, Any]]   # name -> (mechanism, output)


def plan(obs: Observation, epsilon: float, config: ReportConfig) -> dict[str, Mechanism]:
    """The mechanism for each field present, sharing ``epsilon`` equally."""
    present = [n for n, v in zip(FIELDS, (obs.class_counts, obs.drift, obs.mean_confidence),
                                 strict=True) if v is not None]
    if not present:
        raise UsageError("a report needs at least one of: class counts, drift flag, "
                         "mean confidence")
    if not finite(epsilon) or epsilon <= 0:
        raise UsageError(f"`epsilon` must be a finite number > 0; got {epsilon!r}")
    share = epsilon / len(present)
    mechs: dict[str, Mechanism] = {}
    if obs.class_counts is not None:
        mechs["class"] = categorical(len(obs.class_counts), share, config.class_mechanism)
    if obs.drift is not None:
        mechs["drift"] = RandomizedResponse(2, share)
    if obs.mean_confidence is not None:
        lo, hi = config.confidence_lo, config.confidence_hi
        mechs["confidence"] = Laplace(lo, hi, share) if config.confidence_mechanism == \
            "laplace" else Gaussian(lo, hi, share, config.delta)
    return mechs


def _draw_class(counts: Sequence[int], rng: random.Random) -> int:
    if any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in counts):
        raise UsageError("class counts must be non-negative integers")
    total = sum(counts)
    if total == 0:
        raise UsageError("the class counts are all zero: no prediction to report")
    return bisect.bisect_right(list(itertools.accumulate(counts)), rng.randrange(total))


def build_report(obs: Observation, mechs: Mapping[str, Mechanism], *, device: str, seq: int,
                 time: float, rng: random.Random) -> dict[str, Any]:
    """The report document: each observation through its mechanism (see :func:`plan`)."""
    fields: dict[str, dict[str, Any]] = {}
    for name, mech in mechs.items():
        if name == "class":
            value: Any = mech.privatize(_draw_class(obs.class_counts or (), rng), rng)
        elif name == "drift":
            value = mech.privatize(int(bool(obs.drift)), rng)
        else:
            conf = obs.mean_confidence
            if not finite(conf):
                raise UsageError(f"mean confidence must be a finite number; got {conf!r}")
            value = mech.privatize(float(conf), rng)
        fields[name] = {**mech.params(), "value": value}
    return {"v": FORMAT, "device": device, "seq": seq, "time": int(time),
            "epsilon": math.fsum(m.epsilon for m in mechs.values()),
            "delta": math.fsum(m.delta for m in mechs.values()), "fields": fields}


def encode(report: Mapping[str, Any]) -> bytes:
    """The canonical bytes of a report (what is signed and sent)."""
    return json.dumps(report, sort_keys=True, separators=(",", ":"),
                      allow_nan=False).encode()


def sign(body: bytes, key: bytes) -> str:
    """The hex HMAC-SHA256 of ``body`` under the device key."""
    return hmac.new(key, body, hashlib.sha256).hexdigest()


def signature_ok(body: bytes, signature: str, key: bytes) -> bool:
    """Whether ``signature`` is ``body``'s HMAC under ``key`` (constant time)."""
    given = signature.strip().lower().encode("utf-8", "replace")   # headers may hold any text
    return hmac.compare_digest(sign(body, key).encode(), given)


def _int(doc: Mapping[str, Any], name: str, lo: int, hi: int) -> int:
    v = doc.get(name)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise BadReport(422, f"`{name}` must be an integer in [{lo}, {hi}]; got {v!r}")
    return v


def _number(doc: Mapping[str, Any], name: str) -> float:
    v = doc.get(name)
    if not finite(v) or v < 0:
        raise BadReport(422, f"`{name}` must be a finite number >= 0; got {v!r}")
    return float(v)


def parse_report(body: bytes) -> Report:
    """Validate a report's bytes (schema, mechanism parameters, every output inside its
    mechanism's output space, ε and δ the sums of the fields'); raises
    :class:`BadReport` (400: not a report; 422: a report with invalid content)."""
    if len(body) > MAX_BODY:
        raise BadReport(413, f"a report is at most {MAX_BODY} bytes; got {len(body)}")
    try:
        doc = json.loads(body, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as e:   # UnicodeDecodeError is a ValueError
        raise BadReport(400, f"the body is not JSON ({str(e)[:80]})") from None
    if not isinstance(doc, dict) or set(doc) != _TOP:
        got = sorted(doc) if isinstance(doc, dict) else type(doc).__name__
        raise BadReport(400, f"a report is an object with keys {', '.join(sorted(_TOP))}; "
                             f"got {got}")
    if doc["v"] != FORMAT:
        raise BadReport(422, f"report format {doc['v']!r} is not supported (expected {FORMAT})")
    device = doc["device"]
    if not isinstance(device, str) or not DEVICE_ID.fullmatch(device):
        raise BadReport(422, "`device` must be 1 to 64 characters of A-Z a-z 0-9 . _ -")
    seq = _int(doc, "seq", 1, 2**62)
    time = _number(doc, "time")
    epsilon, delta = _number(doc, "epsilon"), _number(doc, "delta")
    raw = doc["fields"]
    if not isinstance(raw, dict) or not raw or not set(raw) <= set(FIELDS):
        raise BadReport(422, f"`fields` must be a non-empty object with keys among "
                             f"{', '.join(FIELDS)}")
    fields: dict[str, tuple[Mechanism, Any]] = {}
    for name, params in raw.items():
        if not isinstance(params, dict):
            raise BadReport(422, f"field {name!r} must be an object")
        try:
            mech = from_params(params)
        except UsageError as e:
            raise BadReport(422, f"field {name!r}: {e}") from None
        allowed = {"class": ("grr", "oue"), "drift": ("grr",),
                   "confidence": ("laplace", "gaussian")}[name]
        if mech.name not in allowed or (name == "drift" and mech.k != 2):  # type: ignore[union-attr]
            raise BadReport(422, f"field {name!r} cannot use {mech.name} with these "
                                 "parameters")
        if not mech.contains(params["value"]):
            raise BadReport(422, f"field {name!r}: value is outside the {mech.name} "
                                 "mechanism's output space")
        fields[name] = (mech, params["value"])
    for total, part, what in ((epsilon, [m.epsilon for m, _ in fields.values()], "epsilon"),
                              (delta, [m.delta for m, _ in fields.values()], "delta")):
        if not math.isclose(total, math.fsum(part), rel_tol=1e-9, abs_tol=1e-12):
            raise BadReport(422, f"`{what}` {total!r} is not the sum of the fields' "
                                 f"({math.fsum(part)!r})")
    return Report(device, seq, time, epsilon, delta, fields)


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number JSON allows")
