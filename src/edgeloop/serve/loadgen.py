"""Measuring an offload server under a fleet of device clients.

:func:`drive` runs ``clients`` simulated devices for ``seconds``: each is a thread with
its own :class:`~edgeloop.device.offload.OffloadClient` (own connection pool, circuit
breaker and budget) that sends its inputs back to back and, whenever the client does not
offload, answers locally the way a device runtime would. It reports throughput, latency
percentiles of the answers, how many were offloaded or local and why, and how many
failed (an exception anywhere, or a local answer that was needed but not possible).
``events`` run at given times during the run, e.g. killing and restarting the server.

:class:`ServerProcess` runs ``edgeloop offload-server`` as a child process on
127.0.0.1, so a test or benchmark can kill it (SIGKILL, no goodbye) and start it again
on the same port.
"""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx
import numpy as np

from edgeloop.device.offload import OffloadClient, OffloadPolicy
from edgeloop.errors import TransportError

__all__ = ["LoadReport", "ServerProcess", "drive"]


@dataclass
class LoadReport:
    """What :func:`drive` measured (latencies in milliseconds, per answer)."""

    clients: int
    seconds: float
    answers: int              # requests answered, offloaded or locally
    offloaded: int
    local: int
    failed: int               # requests that got no answer at all
    throughput: float         # answers per second
    p50_ms: float
    p99_ms: float
    offloaded_p50_ms: float | None
    offloaded_p99_ms: float | None
    reasons: dict[str, int] = field(default_factory=dict)   # why answers were local
    # (started, finished) of each event, in seconds since the run began
    events: list[tuple[float, float]] = field(default_factory=list)
    # (seconds since start, offloaded?) of every answer, in completion order
    timeline: list[tuple[float, bool]] = field(default_factory=list, repr=False)

    def offloaded_between(self, start: float, end: float) -> int:
        """Answers offloaded in ``[start, end)`` seconds after the run began."""
        return sum(1 for t, off in self.timeline if start <= t < end and off)

    def resumed_after(self, t: float) -> float | None:
        """Seconds from ``t`` to the first offloaded answer after it (None: never)."""
        return next((end - t for end, off in sorted(self.timeline) if end >= t and off), None)

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready dictionary (without the timeline)."""
        d = asdict(self)
        d.pop("timeline")
        return d


def drive(policy: OffloadPolicy, feeds: Sequence[Mapping[str, np.ndarray]], *,
          clients: int = 32, seconds: float = 10.0,
          local: Callable[[Mapping[str, np.ndarray]], object] | None = None,
          privacy_class: str = "public",
          events: Sequence[tuple[float, Callable[[], object]]] = (),
          until_after_events_s: float = 0.0,
          devices: Callable[[], Any] | None = None) -> LoadReport:
    """Run ``clients`` device clients against ``policy.url`` for ``seconds``; client ``i``
    sends ``feeds[i % len(feeds)]``, ``feeds[(i + clients) % len(feeds)]``, ... .

    ``local`` answers what was not offloaded (without it such requests count as failed).
    With ``devices``, each client calls it once for a device runtime of its own (an
    :class:`edgeloop.device.Runtime` whose policy offloads to ``policy.url``: anything
    with ``predict(feed, privacy_class=...)`` returning an answer with ``offloaded`` and
    ``offload_reason``, and ``close()``) and sends its inputs through it instead of a
    bare client, so the device's own fallback answers what the server does not;
    each of ``events`` is ``(seconds after start, callable)``, run in order from the
    calling thread; the run goes on for at least ``until_after_events_s`` after the last
    event has finished (a restarted server takes a while to come up). The run is
    bounded: every thread stops at the deadline.
    """
    if not feeds:
        raise ValueError("drive needs at least one feed")
    lock = threading.Lock()
    lat: list[float] = []
    off_lat: list[float] = []
    timeline: list[tuple[float, bool]] = []
    reasons: Counter[str] = Counter()
    failed = [0]
    begin = time.perf_counter()
    deadline = [math.inf if events else begin + seconds]   # final once events are done

    def device(i: int) -> None:
        ask: Callable[[Mapping[str, np.ndarray]], tuple[bool, str | None]]
        if devices is not None:
            try:
                runtime = devices()
            except Exception:          # a device that cannot start answers nothing
                with lock:
                    failed[0] += 1
                return
            close = runtime.close

            def ask(feed: Mapping[str, np.ndarray]) -> tuple[bool, str | None]:
                a = runtime.predict(feed, privacy_class=privacy_class)
                return a.offloaded, a.offload_reason
        else:
            client = OffloadClient(policy)
            close = client.close

            def ask(feed: Mapping[str, np.ndarray]) -> tuple[bool, str | None]:
                res = client.predict(feed, privacy_class)
                if not res.offloaded:
                    if local is None:
                        raise RuntimeError(res.reason)
                    local(feed)
                return res.offloaded, res.reason
        try:
            k = i
            while time.perf_counter() < deadline[0]:
                feed = feeds[k % len(feeds)]
                k += clients
                t0 = time.perf_counter()
                try:
                    offloaded, reason = ask(feed)
                except Exception:
                    with lock:
                        failed[0] += 1
                    continue
                t1 = time.perf_counter()
                with lock:
                    lat.append(t1 - t0)
                    timeline.append((t1 - begin, offloaded))
                    if offloaded:
                        off_lat.append(t1 - t0)
                    else:
                        reasons[_reason_kind(reason)] += 1
        finally:
            close()

    threads = [threading.Thread(target=device, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    done: list[tuple[float, float]] = []
    for at, action in sorted(events, key=lambda e: e[0]):
        time.sleep(max(0.0, begin + at - time.perf_counter()))
        started = time.perf_counter() - begin
        action()
        done.append((started, time.perf_counter() - begin))
    if done:
        deadline[0] = max(begin + seconds, time.perf_counter() + until_after_events_s)
    for t in threads:
        t.join(timeout=max(0.0, deadline[0] - time.perf_counter()) + 10 * policy.timeout_s + 30)
    elapsed = time.perf_counter() - begin

    def pct(xs: list[float], q: float) -> float | None:
        return float(np.percentile(xs, q) * 1e3) if xs else None

    n_off = len(off_lat)
    return LoadReport(
        clients=clients, seconds=elapsed, answers=len(lat), offloaded=n_off,
        local=len(lat) - n_off, failed=failed[0], throughput=len(lat) / elapsed,
        p50_ms=pct(lat, 50) or 0.0, p99_ms=pct(lat, 99) or 0.0,
        offloaded_p50_ms=pct(off_lat, 50), offloaded_p99_ms=pct(off_lat, 99),
        reasons=dict(reasons), events=done, timeline=timeline)


def _reason_kind(reason: str | None) -> str:
    return (reason or "").split(":")[0]


class ServerProcess:
    """``edgeloop offload-server MODEL`` as a child process on 127.0.0.1 (or the fleet's
    telemetry collector: :meth:`collector`)."""

    def __init__(self, model: str | os.PathLike[str], *, port: int = 0, max_batch: int = 32,
                 max_queue_delay_ms: float = 5.0, threads: int = 0,
                 start_timeout_s: float = 60.0,
                 _command: tuple[list[str], str] | None = None) -> None:
        self.port = port
        self.command, self.what = _command or (
            ["offload-server", str(Path(model)), "--max-batch", str(max_batch),
             "--max-queue-delay-ms", str(max_queue_delay_ms), "--threads", str(threads)],
            "the offload server")
        self.start_timeout_s = start_timeout_s
        self.proc: subprocess.Popen[str] | None = None
        self._stderr: IO[str] | None = None

    @classmethod
    def collector(cls, db: str, *, port: int = 0, start_timeout_s: float = 60.0
                  ) -> ServerProcess:
        """``edgeloop telemetry serve --db DB`` (the fleet's telemetry collector)."""
        return cls("", port=port, start_timeout_s=start_timeout_s,
                   _command=(["telemetry", "serve", "--db", db], "the collector"))

    @property
    def url(self) -> str:
        """The server's base URL."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ServerProcess:
        """Start the server and wait until it answers ``/v1/health``."""
        self._close()
        # a file, not a pipe: a pipe nobody reads could fill up and stall the server
        self._stderr = tempfile.TemporaryFile("w+")  # noqa: SIM115  (closed by _close)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edgeloop", *self.command, "--host", "127.0.0.1",
             "--port", str(self.port)],
            stdout=subprocess.PIPE, stderr=self._stderr, text=True,
            env=os.environ | {"COLUMNS": "400"})
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        match = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        if match is None:
            self.proc.wait(timeout=self.start_timeout_s)
            self._stderr.seek(0)
            err = self._stderr.read().strip()
            raise TransportError(f"{self.what} did not start: {err or line}")
        self.port = int(match.group(1))
        until = time.monotonic() + self.start_timeout_s
        while True:
            try:
                if httpx.get(f"{self.url}/v1/health", timeout=1.0,
                             trust_env=False).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > until or self.proc.poll() is not None:
                raise TransportError(f"{self.what} did not become healthy")
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: the server vanishes mid-request, as on a crash or power loss."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        """SIGTERM (uvicorn finishes what it has), then SIGKILL if it lingers."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
        self._close()

    def _close(self) -> None:
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def stats(self) -> dict[str, object]:
        """The server's ``/v1/stats``."""
        return httpx.get(f"{self.url}/v1/stats", timeout=5.0, trust_env=False).json()

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
