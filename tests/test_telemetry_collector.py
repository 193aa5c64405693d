"""The collector over real HTTP on 127.0.0.1, with SQLite and with a real PostgreSQL:
reports stored once, bad input refused with nothing stored, restarts losing nothing,
every byte a device sends captured at the socket, and the CLI."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from test_cli import cli
from test_telemetry_fixtures import RecordingProxy, free_port, make_device, postgres

from edgeloop.errors import TransportError
from edgeloop.monitor.telemetry import Observation, ReportConfig, Reporter, read_key
from edgeloop.monitor.telemetry.client import (
    DEVICE_HEADER,
    KEY_FILE,
    LEDGER_FILE,
    SIGNATURE_HEADER,
)
from edgeloop.monitor.telemetry.report import parse_report, sign
from edgeloop.serve.telemetry import running
from edgeloop.serve.telemetry_store import TelemetryStore

__all__ = ["postgres"]

SRC = Path(__file__).resolve().parent.parent / "src"




def fleet(root: Path, store: TelemetryStore, n: int, *, seed: int = 0) -> list[Reporter]:
    """``n`` enrolled devices with seeded noise."""
    devices = []
    for i in range(n):
        make_device(root / f"dev{i}")
        devices.append(Reporter(root / f"dev{i}", rng=random.Random(seed * 1000 + i)))
        store.enroll(read_key(root / f"dev{i}" / KEY_FILE))
    return devices


def observation(i: int) -> Observation:
    """Device ``i``'s window: class mix (i % 3 favours one class), drift on every
    fourth device, confidence 0.6 to 0.9."""
    counts = [10, 10, 10, 10]
    counts[i % 3] += 60
    return Observation(class_counts=counts, drift=i % 4 == 0,
                       mean_confidence=0.6 + 0.3 * (i % 7) / 6)


def check_round_trip(db: str, root: Path) -> None:
    store = TelemetryStore(db)
    devices = fleet(root, store, 24)
    with running(store) as url:
        for _ in range(3):
            for i, dev in enumerate(devices):
                assert dev.report(observation(i), url, epsilon=30.0).sent == 1
        assert httpx.get(url + "/v1/health").json() == {"status": "ok", "reports": 72}
    s = store.summary()
    assert (s.reports, s.devices) == (72, 24)
    truth_mix = np.mean([np.array(observation(i).class_counts) / 100 for i in range(24)], 0)
    # one prediction drawn per report: the sampling spread is in the intervals
    assert all(e.low < t < e.high for e, t in zip(s.class_mix[4], truth_mix, strict=True))
    assert s.drift_rate is not None and abs(s.drift_rate.value - 0.25) < 0.03
    # a round is due when the whole interval is above the share asked for
    assert s.drift_above(s.drift_rate.low - 0.01) and not s.drift_above(s.drift_rate.low)
    truth_conf = np.mean([observation(i).mean_confidence for i in range(24)])
    assert s.mean_confidence is not None
    assert s.mean_confidence.low < truth_conf < s.mean_confidence.high
    assert {q for _, q in store.seqs()} == {1, 2, 3}
    store.close()


def test_collector_with_sqlite(tmp_path: Path) -> None:
    check_round_trip(str(tmp_path / "telemetry.db"), tmp_path)


def test_collector_with_postgresql(postgres: str, tmp_path: Path) -> None:
    check_round_trip(postgres, tmp_path)


def test_bad_requests_are_refused_and_store_nothing(tmp_path: Path) -> None:
    store = TelemetryStore(str(tmp_path / "t.db"))
    [dev] = fleet(tmp_path, store, 1)
    stranger = make_device(tmp_path / "stranger")
    key = read_key(dev.dir / KEY_FILE)
    with running(store) as url:
        dev.report(observation(0), url, epsilon=1.0)
        replay_body = _stored_body(store)

        def post(content: bytes, device: str = key.device, signature: str | None = None
                 ) -> httpx.Response:
            return httpx.post(url + "/v1/reports", content=content, headers={
                DEVICE_HEADER: device, SIGNATURE_HEADER: signature or sign(content, key.key)})

        cases = [
            (post(replay_body), 409, "stored already (replay refused)"),
            (post(replay_body, signature="0" * 64), 401, "signature does not match"),
            (post(b"{not json"), 400, "not JSON"),
            (post(replay_body.replace(b'"seq":1', b'"seq":0')), 422, "`seq`"),
            (post(replay_body, device=read_key(stranger.dir / KEY_FILE).device), 401,
             "is not enrolled"),
            (httpx.post(url + "/v1/reports", content=replay_body), 401, "headers"),
            (post(b"x" * 70000), 413, "limit"),
        ]
        for response, status, words in cases:
            assert response.status_code == status, response.text
            assert words in response.json()["error"]
        # another enrolled device cannot send in this one's name
        other_key = read_key(stranger.dir / KEY_FILE)
        store.enroll(other_key)
        forged = replay_body.replace(b'"seq":1', b'"seq":99')
        r = post(forged, device=other_key.device, signature=sign(forged, other_key.key))
        assert r.status_code == 401 and "another device" in r.json()["error"]
    assert store.seqs() == {(key.device, 1)}


def test_a_device_whose_ledger_went_back_is_told_and_keeps_its_report(tmp_path: Path
                                                                       ) -> None:
    """The device's ledger is restored from an old copy: its next report reuses a number
    the collector holds under another report. The collector stores nothing and says so
    (409, conflict); the device keeps the report in its outbox and raises, rather than
    count it delivered. Its first report, resent as it was, is still acknowledged."""
    store = TelemetryStore(str(tmp_path / "t.db"))
    [dev] = fleet(tmp_path, store, 1)
    old = (dev.dir / LEDGER_FILE).read_bytes()
    with running(store) as url:
        dev.report(observation(0), url, epsilon=1.0)
        first = _stored_body(store)
        (dev.dir / LEDGER_FILE).write_bytes(old)             # the ledger went back
        with pytest.raises(TransportError, match="already sent another report numbered 1"):
            dev.report(observation(1), url, epsilon=1.0)
        assert len(dev.pending()) == 1 and store.seqs() == {(read_key(dev.dir / KEY_FILE)
                                                             .device, 1)}
        assert _stored_body(store) == first
    store.close()


def test_a_report_refused_for_good_is_set_aside_and_the_rest_go_on(tmp_path: Path) -> None:
    """A signed report the collector can never take (422: invalid content) would block
    the outbox: it is set aside with the collector's reason, and the next report goes."""
    store = TelemetryStore(str(tmp_path / "t.db"))
    [dev] = fleet(tmp_path, store, 1)
    key = read_key(dev.dir / KEY_FILE)
    with running(store) as url:
        dev.report(observation(0), url, epsilon=1.0)
        body = _stored_body(store).replace(b'"seq":1', b'"seq":0')       # never valid
        (dev.dir / "outbox" / "000000000000.json").write_text(
            json.dumps({"body": body.decode(), "signature": sign(body, key.key)}))
        assert dev.report(observation(1), url, epsilon=1.0).sent == 1
    [aside] = dev.refused()
    assert dev.pending() == [] and json.loads(aside.read_text())["refused"].startswith("422")
    assert {q for _, q in store.seqs()} == {1, 2}
    store.close()


def _stored_body(store: TelemetryStore) -> bytes:
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from edgeloop.serve.telemetry_store import ReportRow

    with Session(store.engine) as s:
        return s.scalars(select(ReportRow.body)).one().encode()


def test_an_unreachable_collector_keeps_reports_and_spends_nothing_more(tmp_path: Path) -> None:
    store = TelemetryStore(str(tmp_path / "t.db"))
    [dev] = fleet(tmp_path, store, 1)
    dead = f"http://127.0.0.1:{free_port()}"
    for _ in range(2):
        with pytest.raises(TransportError, match=r"unreachable .* 1 report\(s\) kept"):
            dev.report(observation(0), dead, epsilon=1.0)
    assert len(dev.pending()) == 1 and len(dev.ledger().spends) == 1
    with running(store) as url:
        assert dev.report(observation(0), url, epsilon=1.0).sent == 2
    assert store.seqs() == {(read_key(dev.dir / KEY_FILE).device, 1),
                            (read_key(dev.dir / KEY_FILE).device, 2)}
    assert dev.pending() == []


@contextlib.contextmanager
def collector_process(db: Path, port: int) -> Iterator[subprocess.Popen[bytes]]:
    """``edgeloop telemetry serve`` as a process of its own (killed on exit)."""
    proc = subprocess.Popen([sys.executable, "-m", "edgeloop", "telemetry", "serve", "--db",
                             str(db), "--port", str(port)],
                            env={**os.environ, "PYTHONPATH": str(SRC)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/v1/health", timeout=1).is_success:
                    break
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline
            time.sleep(0.05)
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_a_collector_killed_mid_run_loses_nothing(tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    store = TelemetryStore(str(db))
    devices = fleet(tmp_path, store, 4)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    made = dict.fromkeys(range(4), 0)
    failures = 0
    with collector_process(db, port) as proc:
        for rnd in range(6):
            for i, dev in enumerate(devices):
                if rnd == 3 and i == 2:
                    proc.send_signal(signal.SIGKILL)      # a crash, mid-round
                    proc.wait()
                try:
                    dev.report(observation(i), url, epsilon=1.0)
                except TransportError:
                    failures += 1
                made[i] = dev.ledger().next_seq - 1
    assert failures > 0
    with collector_process(db, port):
        for dev in devices:
            dev.flush(url)
    ids = [read_key(d.dir / KEY_FILE).device for d in devices]
    assert store.seqs() == {(ids[i], q) for i in range(4) for q in range(1, made[i] + 1)}
    assert all(d.pending() == [] for d in devices)


def test_every_byte_a_device_sends_is_a_mechanism_output(tmp_path: Path) -> None:
    store = TelemetryStore(str(tmp_path / "t.db"))
    devices = fleet(tmp_path, store, 3)
    secret_counts = [1234567, 7654321, 3141592, 2718281]
    secret_conf = 0.61803398
    with running(store) as url:
        port = int(url.rsplit(":", 1)[1])
        proxy = RecordingProxy(("127.0.0.1", port))
        via = f"http://127.0.0.1:{proxy.port}"
        configs = (ReportConfig(class_mechanism="grr"), ReportConfig(class_mechanism="oue"),
                   ReportConfig(confidence_mechanism="gaussian"))
        for dev in devices:
            for config in configs:
                obs = Observation(class_counts=secret_counts, drift=True,
                                  mean_confidence=secret_conf)
                dev.report(obs, via, epsilon=2.0, config=config)
        proxy.close()
    sent = bytes(proxy.sent)
    assert store.count() == 9
    requests = sent.split(b"POST /v1/reports HTTP/1.1\r\n")
    assert requests[0] == b"" and len(requests) == 10
    mechanisms: set[str] = set()
    only = {b"host", b"content-length", b"content-type", DEVICE_HEADER.lower().encode(),
            SIGNATURE_HEADER.lower().encode()}
    for req in requests[1:]:
        head, _, body = req.partition(b"\r\n\r\n")
        headers = dict(line.split(b": ", 1) for line in head.split(b"\r\n"))
        assert {h.lower() for h in headers} == only     # no user agent, nothing else
        assert int(headers[b"Content-Length"]) == len(body)
        report = parse_report(body)   # every value inside its mechanism's output space
        doc = json.loads(body)
        assert set(doc) == {"v", "device", "seq", "time", "epsilon", "delta", "fields"}
        for name, f in doc["fields"].items():
            mech, value = report.fields[name]
            assert mech.contains(value)
            assert set(f) == {*mech.params(), "value"}
            mechanisms.add(mech.name)
    assert mechanisms == {"grr", "oue", "laplace", "gaussian"}
    for secret in (*secret_counts, secret_conf, "0.618034", "0.6180"):
        assert str(secret).encode() not in sent


def test_device_init_provisions_a_private_key(tmp_path: Path) -> None:
    from edgeloop.bundle import Device, init_repo

    root = init_repo(tmp_path / "repo", keys=tmp_path / "keys")
    Device.init(tmp_path / "dev", trusted_root=root)
    key = tmp_path / "dev" / KEY_FILE
    assert key.stat().st_mode & 0o777 == 0o600
    assert len(read_key(key).key) == 32


def test_cli_end_to_end_and_bad_input(tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    dev = tmp_path / "dev"
    make_device(dev, budget=None)
    code, _, err = cli("device", "privacy", dev, "--budget", "1.5", "--period", "1d")
    assert code == 0, err
    code, out, err = cli("telemetry", "enroll", dev / KEY_FILE, "--db", db)
    assert code == 0 and "enrolled" in out, err
    store = TelemetryStore(str(db))
    bad_id = tmp_path / "bad.key"          # an id the collector's table could not hold
    bad_id.write_text(json.dumps({"device": "d" * 65, "key": "ab" * 32}))
    with running(store) as url:
        code, out, err = cli("device", "report", dev, "--to", url, "--epsilon", "1",
                             "--class-counts", "5,1,0", "--drift", "--confidence", "0.9")
        assert code == 0 and "sent report 1" in out, err
        bad = [
            (("device", "report", dev, "--to", url, "--epsilon", "1", "--drift"),
             "privacy budget spent: 1 of ε 1.5"),
            (("device", "report", dev, "--to", url, "--epsilon", "0", "--drift"),
             "`epsilon` must be a finite number > 0"),
            (("device", "report", dev, "--to", url, "--epsilon", "-1", "--drift"),
             "`epsilon` must be a finite number > 0"),
            (("device", "report", tmp_path, "--to", url, "--epsilon", "0.1", "--drift"),
             "is not a device state folder"),
            (("device", "report", dev, "--to", url, "--epsilon", "0.1",
              "--class-counts", "1,x"), "`--class-counts` must be integers"),
            (("device", "report", dev, "--to", "ftp://x", "--epsilon", "0.1", "--drift"),
             "the collector URL must start with http:// or https://"),
            (("device", "privacy", dev, "--budget", "0"), "`budget` must be"),
            (("device", "privacy", dev, "--budget", "1", "--period", "1y"), "`period`"),
            (("telemetry", "enroll", tmp_path / "t.db", "--db", db),
             "is not a telemetry key file"),
            (("telemetry", "enroll", bad_id, "--db", db), "a device id is 1 to 64 characters"),
            (("telemetry", "summary", "--db", "nosuchdialect://x"), "`--db` must be"),
            (("telemetry", "summary", "--db", tmp_path / "typo.db"), "no telemetry database"),
            (("telemetry", "summary", "--db", f"postgresql://edgeloop@127.0.0.1:{free_port()}/x"),
             "database postgresql+psycopg://edgeloop@127.0.0.1"),
        ]
        for args, words in bad:
            code, out, err = cli(*args)
            assert code == 2, (args, out, err)
            assert len(err.strip().splitlines()) == 1 and words in err, (args, err)
    assert store.count() == 1
    code, out, err = cli("telemetry", "summary", "--db", db, "--json")
    assert code == 0, err
    s = json.loads(out)
    assert (s["reports"], s["devices"], len(s["class_mix"]["3"])) == (1, 1, 3)
    code, out, err = cli("telemetry", "summary", "--db", db, "--last", "1h")
    assert code == 0 and "1 reports from 1 devices" in out, err
    # one device's flag is no evidence about a fleet: no round is due on it
    code, out, err = cli("telemetry", "summary", "--db", db, "--round-above", "0", "--json")
    assert code == 0 and json.loads(out)["round_due"] is False, err
    code, out, err = cli("telemetry", "summary", "--db", db, "--round-above", "0.1")
    assert code == 0 and "no federated round due" in out, err


def test_a_replaced_key_is_used_once_the_cache_expires(tmp_path: Path) -> None:
    db = str(tmp_path / "t.db")
    store = TelemetryStore(db)
    [dev] = fleet(tmp_path, store, 1)
    old = read_key(dev.dir / KEY_FILE)
    with running(store) as url:
        dev.report(observation(0), url, epsilon=1.0)
        (dev.dir / KEY_FILE).unlink()                # the device is re-keyed ...
        (dev.dir / KEY_FILE).write_text(json.dumps({"device": old.device,
                                                    "key": "ab" * 32}))
        code, _, err = cli("telemetry", "enroll", dev.dir / KEY_FILE, "--db", db)
        assert code == 2 and "enrolled with another key; pass --replace" in err
        assert cli("telemetry", "enroll", dev.dir / KEY_FILE, "--db", db, "--replace")[0] == 0
        with pytest.raises(TransportError, match="signature does not match"):
            dev.report(observation(0), url, epsilon=1.0)   # the collector's cached key
        store.KEY_CACHE_S = 0.0
        assert dev.flush(url) == 1                         # kept, then delivered
    assert {q for _, q in store.seqs()} == {1, 2}
