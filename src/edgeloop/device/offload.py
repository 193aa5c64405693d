"""The device side of offloading: send a model input to an offload server, or say why not.

An :class:`OffloadClient` sends an input to the server of its :class:`OffloadPolicy`
only when all of these hold, checked in this order:

1. **privacy**: the input's privacy class is one the policy lets leave the device;
2. **budget**: fewer than ``budget_per_hour`` requests went out in the last hour (a
   sliding window, so a burst cannot spend two hours' budget at a window edge);
3. **circuit**: the circuit breaker is closed, or half-open and this is its one probe.
   After ``failures_to_open`` consecutive failures (timeouts, unreachable server, 5xx,
   a malformed answer) it opens for ``backoff_s``, doubling after each failed probe up to
   ``max_backoff_s``; once that wait is over one request probes the server, and its
   success closes the circuit again.

:meth:`OffloadClient.predict` never raises for a network or server problem and never
waits beyond ``timeout_s`` per phase: it returns an :class:`OffloadResult` whose
``reason`` says why it did not offload ("privacy", "budget", "circuit open", "timeout",
"unreachable: ...", "server error 503: ...", "rejected 422: ..."), so the runtime answers
locally and marks its answer as local. Only a feed that is not arrays of numbers raises
(:class:`~edgeloop.errors.DataError`): that is the caller's mistake, and it would fail
locally as well.

What leaves the device is the model input and nothing else: the request carries only
the headers HTTP needs (``Host``, ``Content-Type``, ``Content-Length``): no user agent,
no cookies (none are ever stored), no credentials from the environment or ``.netrc``, no
device identifier, no privacy class. Use an ``https://`` URL for anything beyond a
trusted network; certificates are verified.
"""

from __future__ import annotations

import http.cookiejar
import io
import json
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

import httpx
import numpy as np

from edgeloop.errors import DataError, UsageError, check_table, one_of

__all__ = ["ENCODINGS", "OffloadClient", "OffloadPolicy", "OffloadResult"]

ENCODINGS = ("json", "npz")
_HOUR = 3600.0


@dataclass(frozen=True)
class OffloadPolicy:
    """When a device may offload, and to where."""

    url: str                                  # the server, e.g. http://10.0.0.2:8080
    timeout_s: float = 1.0                    # per phase: connect, send, wait for answer
    privacy_classes: tuple[str, ...] = ("public",)   # classes allowed to leave the device
    budget_per_hour: int = 3600               # requests sent per sliding hour; 0 = none
    failures_to_open: int = 3                 # consecutive failures that open the circuit
    backoff_s: float = 1.0                    # first wait before a half-open probe
    max_backoff_s: float = 60.0               # the wait doubles per failed probe up to this
    encoding: str = "json"                    # json or npz (smaller for large inputs)
    max_connections: int = 4                  # the connection pool's size

    def __post_init__(self) -> None:
        if not isinstance(self.url, str) or not self.url.startswith(("http://", "https://")):
            raise UsageError(f"offload policy: `url` must start with http:// or https://; "
                             f"got {self.url!r}")
        for name in ("timeout_s", "backoff_s", "max_backoff_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise UsageError(f"offload policy: `{name}` must be a positive number of "
                                 f"seconds; got {value!r}")
        for name, least in (("budget_per_hour", 0), ("failures_to_open", 1),
                            ("max_connections", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise UsageError(f"offload policy: `{name}` must be an integer >= {least}; "
                                 f"got {value!r}")
        if self.max_backoff_s < self.backoff_s:
            raise UsageError(f"offload policy: `max_backoff_s` ({self.max_backoff_s}) must be "
                             f">= `backoff_s` ({self.backoff_s})")
        if (not isinstance(self.privacy_classes, tuple | list)
                or not all(isinstance(c, str) for c in self.privacy_classes)):
            raise UsageError(f"offload policy: `privacy_classes` must be a list of strings; "
                             f"got {self.privacy_classes!r}")
        object.__setattr__(self, "privacy_classes", tuple(self.privacy_classes))
        if self.encoding not in ENCODINGS:
            raise one_of("offload policy: encoding", ENCODINGS, self.encoding)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> OffloadPolicy:
        """A policy from a TOML/JSON table; unknown or missing keys are one-line errors."""
        check_table(d, [f.name for f in fields(cls)], name="offload policy",
                    shown="offload policy")
        if "url" not in d:
            raise UsageError("offload policy: `url` is required")
        return cls(**d)


@dataclass(frozen=True)
class OffloadResult:
    """What came of one offload attempt: the server's outputs, or why there are none."""

    outputs: list[np.ndarray] | None   # the model's outputs, in its output order
    reason: str | None = None          # why not offloaded (None when it was)
    latency_ms: float = 0.0            # time spent, refusals included
    batch_size: int | None = None      # samples in the server batch it ran in

    @property
    def offloaded(self) -> bool:
        """Whether the server answered (otherwise answer locally and say so)."""
        return self.outputs is not None


class _Circuit:
    """Consecutive failures open it; after a backoff, one probe may go; success closes."""

    def __init__(self, policy: OffloadPolicy) -> None:
        self.policy = policy
        self.failures = 0
        self.opens = 0            # failed openings in a row: the backoff's exponent
        self.open_until: float | None = None
        self.probing = False

    def allow(self, now: float) -> bool:
        if self.open_until is None:
            return True
        if now < self.open_until or self.probing:
            return False
        self.probing = True       # half-open: this caller is the probe
        return True

    def success(self) -> None:
        self.failures = self.opens = 0
        self.open_until = None
        self.probing = False

    def failure(self, now: float) -> None:
        self.failures += 1
        if self.probing or self.failures >= self.policy.failures_to_open:
            wait = min(self.policy.backoff_s * 2 ** self.opens, self.policy.max_backoff_s)
            self.opens += 1
            self.open_until = now + wait
            self.failures = 0
            self.probing = False

    def release(self) -> None:
        """A probe that told nothing about the server (input refused): let another go."""
        self.probing = False


class OffloadClient:
    """Offloads inputs under ``policy``; safe to share between threads."""

    def __init__(self, policy: OffloadPolicy, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self._clock = clock
        self._lock = threading.Lock()
        self._sent: deque[float] = deque()
        self._circuit = _Circuit(policy)
        never_store = http.cookiejar.DefaultCookiePolicy(allowed_domains=[])
        self._http = httpx.Client(
            base_url=policy.url.rstrip("/"), timeout=httpx.Timeout(policy.timeout_s),
            limits=httpx.Limits(max_connections=policy.max_connections,
                                max_keepalive_connections=policy.max_connections),
            trust_env=False, follow_redirects=False,
            cookies=http.cookiejar.CookieJar(policy=never_store))
        self._http.headers.clear()   # no user agent, accept or encoding headers

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> OffloadClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def circuit_open(self) -> bool:
        """Whether requests are being refused for the server's recent failures."""
        with self._lock:
            return self._circuit.open_until is not None

    def predict(self, feed: Mapping[str, np.ndarray], privacy_class: str) -> OffloadResult:
        """The server's outputs for ``feed``, or an :class:`OffloadResult` saying why not."""
        started = time.perf_counter()

        def refused(reason: str) -> OffloadResult:
            return OffloadResult(None, reason, (time.perf_counter() - started) * 1e3)

        if privacy_class not in self.policy.privacy_classes:
            return refused("privacy")
        with self._lock:
            now = self._clock()
            while self._sent and self._sent[0] <= now - _HOUR:
                self._sent.popleft()
            if len(self._sent) >= self.policy.budget_per_hour:
                return refused("budget")
            if not self._circuit.allow(now):
                return refused("circuit open")
            self._sent.append(now)
        outcome: str = "rejected"     # if encoding raises: the caller's feed, not the server
        try:
            content, ctype = _encode(feed, self.policy.encoding)
            outcome, result = self._send(content, ctype)
        finally:
            with self._lock:
                if outcome == "ok":
                    self._circuit.success()
                elif outcome == "failure":
                    self._circuit.failure(self._clock())
                else:
                    self._circuit.release()
        if isinstance(result, str):
            return refused(result)
        outputs, batch_size = result
        return OffloadResult(outputs, None, (time.perf_counter() - started) * 1e3, batch_size)

    def _send(self, content: bytes, ctype: str,
              ) -> tuple[str, str | tuple[list[np.ndarray], int]]:
        """("ok" | "failure" | "rejected", outputs or the reason)."""
        try:
            r = self._http.post("/v1/predict", content=content,
                                headers={"content-type": ctype})
        except httpx.TimeoutException:
            return "failure", "timeout"
        except httpx.HTTPError as e:   # refused, reset, disconnected, protocol errors
            return "failure", f"unreachable: {_first_line(e)}"
        if 400 <= r.status_code < 500:
            return "rejected", f"rejected {r.status_code}: {_error_text(r)}"
        if r.status_code != 200:
            return "failure", f"server error {r.status_code}: {_error_text(r)}"
        try:
            doc = r.json()
            outputs = [np.asarray(o, dtype=d) for o, d in zip(doc["outputs"], doc["dtypes"],
                                                              strict=True)]
            batch_size = int(doc["batch_size"])
        except (ValueError, KeyError, TypeError):
            return "failure", "server error: malformed answer"
        return "ok", (outputs, batch_size)


def _encode(feed: Mapping[str, np.ndarray], encoding: str) -> tuple[bytes, str]:
    arrays = {k: np.asarray(v) for k, v in feed.items()}
    if bad := [k for k, a in arrays.items() if a.dtype.kind not in "biuf"]:
        raise DataError(f"offload: input {bad[0]!r} is {arrays[bad[0]].dtype}, not numbers")
    if encoding == "npz":
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        return buf.getvalue(), "application/x-npz"
    body = {"inputs": {k: a.tolist() for k, a in arrays.items()}}
    return json.dumps(body, separators=(",", ":")).encode(), "application/json"


def _error_text(r: httpx.Response) -> str:
    try:
        return str(r.json()["error"])[:200]
    except (ValueError, KeyError, TypeError):
        return r.text.strip().splitlines()[0][:200] if r.text.strip() else r.reason_phrase


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__
