"""Shared by the telemetry tests: device folders, a PostgreSQL server, a byte-recording
TCP proxy."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgeloop.monitor.telemetry import Budget, Reporter, create_key

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from _postgres import free_port, pg_bin, postgres_server

__all__ = ["RecordingProxy", "free_port", "make_device", "postgres"]


def make_device(path: Path, *, budget: float | None = 100.0, period_s: int = 86400,
                delta: float = 1e-5) -> Reporter:
    """A device folder as ``Device.init`` leaves it, as far as telemetry goes (marker and
    key), with an owner's budget."""
    path.mkdir(parents=True)
    (path / "device.json").write_text(json.dumps({"format": 1}))
    create_key(path)
    rep = Reporter(path)
    if budget is not None:
        rep.set_budget(Budget(budget, period_s, delta))
    return rep


@pytest.fixture(scope="session")
def postgres() -> Iterator[str]:
    """A real PostgreSQL server on 127.0.0.1 (Debian's postgresql package), for the
    session; yields a database URL. Without the binaries: skips, or fails under
    ``.ci/run`` (which installs them and sets ``EDGELOOP_CI``)."""
    bindir = pg_bin()
    if bindir is None:
        reason = "PostgreSQL binaries absent (Debian package `postgresql`)"
        if os.environ.get("EDGELOOP_CI"):
            pytest.fail(f"{reason}; CI must test the collector on PostgreSQL", pytrace=False)
        pytest.skip(reason)
    with postgres_server(bindir) as url:
        yield url


class RecordingProxy:
    """A TCP proxy on 127.0.0.1 that forwards to ``target`` and records every byte the
    clients send through it."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.sent = bytearray()
        self._lock = threading.Lock()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = self.sock.accept()
                upstream = socket.create_connection(self.target)
                threading.Thread(target=self._pipe, args=(client, upstream, True),
                                 daemon=True).start()
                threading.Thread(target=self._pipe, args=(upstream, client, False),
                                 daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, record: bool) -> None:
        with contextlib.suppress(OSError):
            while chunk := src.recv(65536):
                if record:
                    with self._lock:
                        self.sent += chunk
                dst.sendall(chunk)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.sock.close()
