"""The device's side of telemetry: its key, its privacy ledger and its outbox, in the
device state folder, and sending reports to a collector.

Files in the state folder (beside the ones :mod:`edgeloop.bundle.device` keeps)::

    STATE/telemetry.key     {"device": id, "key": hex} (0600), made at `device init`
    STATE/privacy.json      the ledger: budget, next sequence number, spends in the window
    STATE/outbox/SEQ.json   signed reports not yet acknowledged by a collector
    STATE/outbox/refused/   reports a collector refused for good (400, 413, 422: it can
                            never take them), with its reason; set aside so that they
                            do not hold up the rest
    STATE/telemetry.lock    flock'ed around every read-modify-write of the ledger

A report is made in this order: the ledger records its cost and sequence number
(atomically), then the signed report is written to the outbox, then it is sent; it leaves
the outbox when the collector answers 200 (stored) or 409 (this report stored before; a
409 for *another* report under its number keeps it, and says so). A crash or an
unreachable collector therefore loses nothing and never spends twice: the next
:meth:`Reporter.report` sends what waits in the outbox first, and makes no new report
while the collector cannot be reached.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from edgeloop._io import locked, write_bytes_atomic
from edgeloop.errors import TransportError, UsageError
from edgeloop.monitor.telemetry.ledger import Budget, Ledger
from edgeloop.monitor.telemetry.report import (
    DEVICE_ID,
    Observation,
    ReportConfig,
    build_report,
    encode,
    plan,
    sign,
)

__all__ = ["KEY_FILE", "DeviceKey", "Reporter", "SendResult", "create_key", "read_key"]

KEY_FILE = "telemetry.key"
LEDGER_FILE = "privacy.json"
OUTBOX = "outbox"
REFUSED = "refused"             # in the outbox
_FOR_GOOD = (400, 413, 422)     # a collector can never take such a report
_LOCK = "telemetry.lock"
_MARKER = "device.json"   # what marks a device state folder (edgeloop.bundle.device)
DEVICE_HEADER = "X-Edgeloop-Device"
SIGNATURE_HEADER = "X-Edgeloop-Signature"
REPORTS_PATH = "/v1/reports"


@dataclass(frozen=True)
class DeviceKey:
    """A device's telemetry identity: its id and its HMAC key."""

    device: str
    key: bytes


def create_key(state_dir: str | os.PathLike[str]) -> Path:
    """Write a new random device id and 256-bit HMAC key to ``STATE/telemetry.key``
    (mode 0600); the collector needs a copy (``edgeloop telemetry enroll``)."""
    path = Path(state_dir) / KEY_FILE
    if path.exists():
        raise UsageError(f"{str(path)!r} exists; a device keeps its telemetry key")
    doc = {"device": uuid.uuid4().hex, "key": secrets.token_hex(32)}
    write_bytes_atomic(path, json.dumps(doc).encode(), mode=0o600)
    return path


def read_key(path: str | os.PathLike[str]) -> DeviceKey:
    """Read a key file written by :func:`create_key`."""
    try:
        doc = json.loads(Path(path).read_bytes())
        key = DeviceKey(str(doc["device"]), bytes.fromhex(doc["key"]))
    except OSError as e:
        raise UsageError(f"cannot read the telemetry key {str(path)!r}: "
                         f"{e.strerror or e}") from None
    except (ValueError, KeyError, TypeError):
        raise UsageError(f"{str(path)!r} is not a telemetry key file") from None
    if len(key.key) < 16:
        raise UsageError(f"{str(path)!r} holds a key shorter than 128 bits")
    if not DEVICE_ID.fullmatch(key.device):
        raise UsageError(f"{str(path)!r} names device {key.device[:80]!r}; a device id is 1 "
                         "to 64 characters of A-Z a-z 0-9 . _ -")
    return key


@dataclass(frozen=True)
class SendResult:
    """What :meth:`Reporter.report` did: the new report's sequence number and ε, how
    many reports the collector acknowledged, and the (ε, δ) spent in the window now."""

    seq: int
    epsilon: float
    sent: int
    spent: tuple[float, float]


class Reporter:
    """Telemetry of one device state folder. ``__init__`` only stores its arguments;
    ``clock`` (unix seconds) and ``rng`` are for tests and simulations."""

    def __init__(self, state_dir: str | os.PathLike[str], *,
                 clock: Callable[[], float] = time.time,
                 rng: random.Random | None = None) -> None:
        self.dir = Path(state_dir)
        self.clock = clock
        self.rng = rng or secrets.SystemRandom()

    def _check_folder(self) -> None:
        if not (self.dir / _MARKER).is_file():
            raise UsageError(f"{str(self.dir)!r} is not a device state folder (no {_MARKER}); "
                             "create one with `edgeloop device init`")

    def _check(self) -> DeviceKey:
        self._check_folder()
        if not (self.dir / KEY_FILE).is_file():
            raise UsageError(f"device {str(self.dir)!r} has no telemetry key ({KEY_FILE}); "
                             "devices made before telemetry get one with `edgeloop device "
                             "privacy STATE --new-key`")
        return read_key(self.dir / KEY_FILE)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self._check_folder()               # never a lock file in a folder that is no device
        with locked(self.dir / _LOCK):
            yield

    def ledger(self) -> Ledger:
        """The ledger as stored (a device that never set a budget has an empty one)."""
        self._check_folder()
        path = self.dir / LEDGER_FILE
        return Ledger.from_bytes(path.read_bytes()) if path.is_file() else Ledger()

    def set_budget(self, budget: Budget) -> Ledger:
        """Set the owner's budget (what was already spent still counts; see
        :meth:`Ledger.with_budget`)."""
        with self._locked():
            ledger = self.ledger().with_budget(budget)
            write_bytes_atomic(self.dir / LEDGER_FILE, ledger.to_bytes())
        return ledger

    def new_key(self) -> Path:
        """Give a device made before telemetry its key (see :func:`create_key`)."""
        self._check_folder()
        return create_key(self.dir)

    def observed(self, *, model_sha256: str | None = None) -> Observation:
        """What the device's monitor saw, as a report's plain values: the predicted
        classes and mean top-class confidence of its last closed window, and whether
        drift is flagged now (:func:`edgeloop.monitor.drift_flag`). ``model_sha256``
        (the active model's) leaves out what was watched on another model. A
        :class:`UsageError` when the monitor has closed no window yet."""
        from edgeloop.monitor.alerts import monitor_status

        self._check_folder()
        status = monitor_status(self.dir, model_sha256=model_sha256)
        same = model_sha256 is None or status["model_sha256"] == model_sha256
        windows = [w for w in status["windows"] if "classes" in w] if same else []  # type: ignore[attr-defined]
        if not windows:
            raise UsageError(f"the monitor of device {str(self.dir)!r} has closed no window "
                             "on the active model yet: nothing of its own to report (give "
                             "--class-counts, --drift or --confidence to report values)")
        last = windows[-1]
        return Observation(class_counts=[int(c) for c in last["classes"]],
                           drift=bool(status["drifted"]),
                           mean_confidence=float(last["confidence"]))

    def pending(self) -> list[Path]:
        """Signed reports waiting in the outbox, oldest first."""
        box = self.dir / OUTBOX
        return sorted(box.glob("*.json")) if box.is_dir() else []

    def refused(self) -> list[Path]:
        """Reports a collector refused for good (each holds its ``refused`` reason)."""
        box = self.dir / OUTBOX / REFUSED
        return sorted(box.glob("*.json")) if box.is_dir() else []

    def prepare(self, obs: Observation, *, epsilon: float,
                config: ReportConfig | None = None) -> int:
        """Charge the ledger and put one signed report in the outbox; returns its
        sequence number. Raises :class:`UsageError` when the budget refuses it."""
        key = self._check()
        mechs = plan(obs, epsilon, config or ReportConfig())
        cost = sum(m.epsilon for m in mechs.values()), sum(m.delta for m in mechs.values())
        with self._locked():
            now = self.clock()
            ledger, seq = self.ledger().charge(*cost, now)
            doc = build_report(obs, mechs, device=key.device, seq=seq, time=now, rng=self.rng)
            body = encode(doc)
            write_bytes_atomic(self.dir / LEDGER_FILE, ledger.to_bytes())
            write_bytes_atomic(self.dir / OUTBOX / f"{seq:012d}.json",
                               json.dumps({"signature": sign(body, key.key),
                                           "body": body.decode()}).encode())
        return seq

    def flush(self, url: str, *, client: httpx.Client | None = None,
              timeout: float = 10.0) -> int:
        """Send every report in the outbox to the collector at ``url``, oldest first;
        returns how many it acknowledged. Stops at the first failure with
        :class:`TransportError` (what was not acknowledged stays in the outbox). Holds
        the telemetry lock meanwhile, so two processes never send the same report."""
        key = self._check()
        base = _base(url)
        sent = 0
        with contextlib.ExitStack() as stack:
            stack.enter_context(self._locked())     # one sender at a time, oldest first
            http = client or stack.enter_context(_client(timeout))
            for path in self.pending():
                entry = json.loads(path.read_bytes())
                try:
                    r = http.post(base + REPORTS_PATH, content=entry["body"].encode(),
                                  headers={"Content-Type": "application/json",
                                           DEVICE_HEADER: key.device,
                                           SIGNATURE_HEADER: entry["signature"]})
                except httpx.HTTPError as e:
                    raise TransportError(f"collector {base} unreachable ({type(e).__name__}); "
                                         f"{len(self.pending())} report(s) kept in the outbox"
                                         ) from None
                if r.status_code in _FOR_GOOD:     # set aside: it would block the rest
                    entry["refused"] = f"{r.status_code}: {_message(r)}"
                    write_bytes_atomic(path.parent / REFUSED / path.name,
                                       json.dumps(entry).encode())
                    path.unlink()
                    continue
                if r.status_code not in (200, 409) or _conflict(r):
                    raise TransportError(f"collector {base} refused report {path.stem.lstrip('0')}"
                                         f" ({r.status_code}: {_message(r)}); kept in the "
                                         "outbox")
                path.unlink()
                sent += 1
        return sent

    def report(self, obs: Observation, url: str, *, epsilon: float,
               config: ReportConfig | None = None,
               client: httpx.Client | None = None) -> SendResult:
        """Send what waits in the outbox, then make and send one new report. Makes none
        (and spends nothing) while older reports cannot be delivered."""
        _base(url)     # a URL that can never work spends nothing
        sent = self.flush(url, client=client) if self.pending() else 0
        seq = self.prepare(obs, epsilon=epsilon, config=config)
        sent += self.flush(url, client=client)
        ledger = self.ledger()
        cost = next(s for s in ledger.spends if s.seq == seq)
        return SendResult(seq, cost.epsilon, sent, ledger.spent(self.clock()))


def _base(url: str) -> str:
    base = url.rstrip("/")
    if not base.startswith(("http://", "https://")):
        raise UsageError(f"the collector URL must start with http:// or https://; got {url!r}")
    return base


def _client(timeout: float) -> httpx.Client:
    """An HTTP client that sends what HTTP needs and the report, nothing else: no user
    agent, accept or encoding headers, no proxy or .netrc credentials from the
    environment, no redirects (as the offload client, edgeloop.device.offload)."""
    http = httpx.Client(timeout=timeout, trust_env=False, follow_redirects=False)
    http.headers.clear()
    return http


def _conflict(r: httpx.Response) -> bool:
    """A 409 saying the collector holds *another* report under this number (not this
    one stored before): the report is not delivered."""
    try:
        return r.status_code == 409 and r.json().get("conflict") is True
    except (ValueError, AttributeError):
        return False


def _message(r: httpx.Response) -> str:
    try:
        return str(r.json()["error"])[:200]
    except (ValueError, KeyError, TypeError):
        return r.text[:200] or r.reason_phrase

