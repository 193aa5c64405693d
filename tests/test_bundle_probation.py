"""Probation never hurts a healthy device: counters kept in memory and saved at a bounded
rate under the device lock, a caller's bad input is not the model's fault, boots of the
device (not process starts) count, a corrupt active slot falls back, an update never
overwrites the last known-good model, and the health check compares with the current
model. Real files, real onnxruntime, a real repository over HTTP."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from test_bundle_fixtures import (
    W_BAD,
    W_GOOD,
    X,
    assert_serving,
    new_device,
    pass_probation,
    repo,
)

import edgeloop.bundle.device as device_module
from edgeloop.bundle import Device, HealthConfig
from edgeloop.device import Runtime, bad_input_calls, malformed_feeds, probation_cost_ratio
from edgeloop.errors import DataError, VerificationError

__all__ = ["repo"]

SRC = str(Path(__file__).resolve().parent.parent / "src")


def _actions(dev: Device) -> list[tuple[str, str | None]]:
    return [(e.action, e.version) for e in dev.history()]


def _count_pointer_writes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    writes: list[int] = []
    real = device_module.write_bytes_atomic

    def counting(target, data, **kw):
        if Path(target).name == "pointer.json":
            writes.append(1)
        return real(target, data, **kw)

    monkeypatch.setattr(device_module, "write_bytes_atomic", counting)
    return writes


def test_update_by_another_process_during_probation_is_not_reverted(repo) -> None:
    cfg = HealthConfig(probation_inferences=10**6, probation_save_inferences=20,
                       probation_save_seconds=3600)
    dev = Device(new_device(repo).dir, config=cfg)
    dev.update(repo.url, "kws")          # the first model: nothing known-good to protect
    repo.publish("1.1.0", W_GOOD * 2)
    rt = Runtime(dev)
    updater = subprocess.Popen(
        [sys.executable, "-c", "import sys; from edgeloop.bundle import Device; "
         "Device(sys.argv[1]).update(sys.argv[2], 'kws')", str(dev.dir), repo.url],
        env={"PYTHONPATH": SRC, "EDGELOOP_QUIET": "1"})
    while updater.poll() is None:        # serve (and save probation) while it installs
        rt.infer({"x": X[:2]})
    assert updater.returncode == 0
    for _ in range(100):                 # past several save points of the old runtime
        rt.infer({"x": X[:2]})
    state = dev.state()
    assert state.current().version == "1.1.0"
    # the runtime still serving 1.0.0 counts nothing towards 1.1.0's probation
    assert state.probation.remaining == HealthConfig().probation_inferences
    assert _actions(dev)[-1] == ("commit", "1.1.0")
    assert_serving(dev, "1.1.0", W_GOOD * 2)


def test_probation_writes_the_pointer_at_a_bounded_rate(repo, monkeypatch) -> None:
    cfg = HealthConfig(probation_inferences=100, probation_save_inferences=30,
                       probation_save_seconds=3600)
    dev = Device(new_device(repo).dir, config=cfg)
    dev.update(repo.url, "kws")
    writes = _count_pointer_writes(monkeypatch)
    rt = Runtime(dev)
    for _ in range(10):                  # process starts in one boot write nothing
        Runtime(Device(dev.dir, config=cfg))
    assert not writes
    for _ in range(99):
        rt.infer({"x": X[:1]})
    assert len(writes) == 3 and dev.state().probation.remaining == 10     # at 30, 60, 90
    rt.infer({"x": X[:1]})
    assert len(writes) == 4 and dev.state().probation is None             # the verdict
    assert _actions(dev)[-1] == ("kept", "1.0.0")

    timed = Device(new_device(repo).dir, config=HealthConfig(
        probation_inferences=10**6, probation_save_inferences=10**9,
        probation_save_seconds=0.2))
    timed.update(repo.url, "kws")
    writes.clear()
    rt = Runtime(timed)
    start = time.monotonic()
    while time.monotonic() - start < 1.0:
        rt.infer({"x": X[:1]})
    assert 2 <= len(writes) <= 6         # every 0.2 s, not every inference
    assert timed.state().probation.remaining < 10**6


def test_a_process_per_request_still_finishes_probation(repo) -> None:
    dev = Device(new_device(repo).dir, config=HealthConfig(probation_inferences=3))
    dev.update(repo.url, "kws")
    code = ("import sys; import numpy as np; from edgeloop.bundle import Device; "
            "from edgeloop.device import Runtime; "
            "Runtime(Device(sys.argv[1])).infer({'x': np.ones((1, 8), np.float32)})")
    for remaining in (2, 1, None):       # each process saves its outcome as it exits
        subprocess.run([sys.executable, "-c", code, str(dev.dir)], check=True,
                       env={"PYTHONPATH": SRC, "EDGELOOP_QUIET": "1"})
        p = dev.state().probation
        assert (p and p.remaining) == remaining
    assert _actions(dev)[-1] == ("kept", "1.0.0")


def test_inference_cost_during_probation_is_that_after_it(repo) -> None:
    on = Device(new_device(repo).dir, config=HealthConfig(probation_inferences=10**9))
    on.update(repo.url, "kws")
    off = Device(new_device(repo).dir, config=HealthConfig(probation_inferences=1))
    off.update(repo.url, "kws")
    pass_probation(off)
    ratio = probation_cost_ratio(on, off, {"x": X[:1]})
    # the aim is within 5%; the bound is loose so a loaded machine cannot make it flake
    # (a pointer write per inference made it about 600x)
    assert ratio < 1.5, ratio


def test_bad_input_during_probation_is_the_callers_mistake(repo) -> None:
    dev = new_device(repo)               # default config: probation_errors=0
    dev.update(repo.url, "kws")
    pass_probation(dev)
    repo.publish("1.1.0", W_GOOD * 2)
    dev.update(repo.url, "kws")
    rt = Runtime(dev)
    bad = malformed_feeds({"x": X[:2]}, rt.inputs)
    assert [words for _, words in bad] == [
        "has no array 'x'", "has shape (8,)", "has shape (2, 7)",
        "is float64; the model expects float32", "is a list; the model expects a numpy array"]
    for feed, words in bad:
        with pytest.raises(DataError, match=re.escape(words)):
            rt.infer(feed)
    assert bad_input_calls(rt, {"x": X[:2]}, calls=1000) == 1000
    state = dev.state()
    assert state.current().version == "1.1.0" and rt.manifest.version == "1.1.0"
    assert state.probation.errors == 0
    assert state.probation.remaining == HealthConfig().probation_inferences
    assert _actions(dev)[-1] == ("commit", "1.1.0")
    nan = X[:2].copy()
    nan[0, 3] = np.nan                   # well-formed: NaN is data, the model's to handle
    assert np.isnan(rt.infer({"x": nan})[0]).all()
    assert_serving(dev, "1.1.0", W_GOOD * 2)


def test_process_starts_are_not_boots_but_reboots_are(repo, monkeypatch) -> None:
    cfg = HealthConfig(probation_boots=2)
    dev = Device(new_device(repo).dir, config=cfg)
    dev.update(repo.url, "kws")
    pass_probation(dev)
    repo.publish("1.1.0", W_GOOD * 2)
    dev.update(repo.url, "kws")
    for _ in range(20):                  # a process per request, one device boot
        Runtime(Device(dev.dir, config=cfg)).infer({"x": X[:1]})
    assert dev.state().current().version == "1.1.0" and dev.state().probation.boots == 0
    for n, boot in enumerate(("boot-1", "boot-2"), 1):
        monkeypatch.setattr(device_module, "boot_id", lambda boot=boot: boot)
        for _ in range(3):
            Runtime(Device(dev.dir, config=cfg))
        assert dev.state().probation.boots == n
    monkeypatch.setattr(device_module, "boot_id", lambda: "boot-3")
    assert Runtime(Device(dev.dir, config=cfg)).manifest.version == "1.0.0"
    assert _actions(dev)[-1] == ("rollback", "1.1.0")
    assert "device booted 3 times during probation" in dev.history()[-1].reason


@pytest.mark.parametrize("damage", ["flip", "delete"])
def test_corrupt_active_slot_falls_back_to_the_verified_other_slot(repo, damage) -> None:
    dev = new_device(repo)
    dev.update(repo.url, "kws")
    pass_probation(dev)
    repo.publish("1.1.0", W_GOOD * 2)
    dev.update(repo.url, "kws")
    path = dev.model_path("b")
    if damage == "flip":
        data = bytearray(path.read_bytes())
        data[-10] ^= 0xFF
        path.write_bytes(bytes(data))
    else:
        path.unlink()
    rt = Runtime(dev)
    assert rt.manifest.version == "1.0.0"
    np.testing.assert_allclose(rt.infer({"x": X[:4]}), X[:4] @ W_GOOD, rtol=1e-5, atol=1e-5)
    last = dev.history()[-1]
    assert (last.action, last.version) == ("corrupt", "1.1.0")
    assert ("does not match its manifest" if damage == "flip" else "is missing") in last.reason
    assert "now serving 1.0.0" in last.reason
    state = dev.state()
    assert state.active == "a" and state.manifest("b") is None and state.probation is None
    # a damaged copy is not a refused version: the next update installs it again
    assert dev.update(repo.url, "kws").installed
    assert_serving(dev, "1.1.0", W_GOOD * 2)


def test_no_fallback_when_both_slots_are_corrupt(repo) -> None:
    dev = new_device(repo)
    dev.update(repo.url, "kws")
    pass_probation(dev)
    repo.publish("1.1.0", W_GOOD * 2)
    dev.update(repo.url, "kws")
    for slot in ("a", "b"):
        dev.model_path(slot).write_bytes(b"not a model")
    with pytest.raises(VerificationError, match="cannot fall back"):
        Runtime(dev)


def test_update_during_probation_keeps_the_known_good_model(repo) -> None:
    dev = new_device(repo)
    dev.update(repo.url, "kws")
    pass_probation(dev)
    repo.publish("1.1.0", W_GOOD * 2)
    dev.update(repo.url, "kws")          # 1.1.0 on probation; 1.0.0 known-good in slot a
    repo.publish("1.2.0", W_GOOD * 3)
    with pytest.raises(VerificationError, match=r"1\.1\.0 is on probation .* last known-good "
                                                r"model, 1\.0\.0"):
        dev.update(repo.url, "kws")
    state = dev.state()
    assert state.manifest("a").version == "1.0.0" and dev._verified(state, "a")
    assert state.current().version == "1.1.0"
    pass_probation(dev)
    assert dev.update(repo.url, "kws").version == "1.2.0"
    assert_serving(dev, "1.2.0", W_GOOD * 3)


def test_without_a_floor_the_candidate_is_compared_with_the_current_model(repo) -> None:
    dev = new_device(repo)
    dev.update(repo.url, "kws")
    pass_probation(dev)
    repo.publish("1.1.0", W_BAD, golden=None)          # manifest without an accuracy floor
    with pytest.raises(VerificationError, match=r"below the current model's 1\.0000"):
        dev.update(repo.url, "kws")
    assert _actions(dev)[-1] == ("rejected", "1.1.0")
    repo.publish("1.2.0", W_GOOD * 2, golden=None)     # as accurate as the current model
    r = dev.update(repo.url, "kws")
    assert r.installed and "compared with the current model" in r.reason
    assert r.verdict.figures["current_accuracy"] == 1.0


def test_slow_candidate_is_rejected_now_and_tried_again_later(repo, monkeypatch) -> None:
    dev = new_device(repo)
    dev.update(repo.url, "kws")
    pass_probation(dev)
    repo.publish("1.1.0", W_GOOD * 2)
    timed: list[int] = []
    real = device_module.served_latency

    def spy(bundles, data, **kw):
        timed.append(len(bundles))
        return real(bundles, data, **kw)

    monkeypatch.setattr(device_module, "served_latency", spy)
    strict = Device(dev.dir, config=HealthConfig(latency_margin=-0.99, latency_slack_ms=0))
    with pytest.raises(VerificationError, match=r"latency p50 .* a later update tries it again"):
        strict.update(repo.url, "kws")
    assert timed == [2]                  # candidate and current timed in one interleaved run
    assert _actions(dev)[-1] == ("deferred", "1.1.0")
    assert dev.update(repo.url, "kws").installed
    assert_serving(dev, "1.1.0", W_GOOD * 2)


def test_concurrent_writers_in_threads_keep_every_change(repo) -> None:
    cfg = HealthConfig(probation_inferences=10**6, probation_save_inferences=1)
    dev = Device(new_device(repo).dir, config=cfg)
    dev.update(repo.url, "kws")
    runtimes = [Runtime(Device(dev.dir, config=cfg)) for _ in range(4)]

    def serve(rt) -> None:
        for _ in range(25):
            rt.infer({"x": X[:1]})

    threads = [threading.Thread(target=serve, args=(rt,)) for rt in runtimes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # every save re-reads the pointer under the lock: no runtime's counts are lost
    assert dev.state().probation.remaining == 10**6 - 100
