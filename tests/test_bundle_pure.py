"""The pure parts: manifest, version order, health verdicts, probation, slot transitions."""

from __future__ import annotations

import numpy as np
import pytest

from edgeloop.bundle.health import HealthConfig, Measured, Probation, judge, probation_step
from edgeloop.bundle.manifest import (
    Floor,
    Manifest,
    Reference,
    TensorSpec,
    check_model_bytes,
    check_newer,
    golden_digest,
    parse_version,
)
from edgeloop.bundle.slots import SlotState, begin_install, commit, fall_back, rollback
from edgeloop.data import Dataset
from edgeloop.errors import UsageError, VerificationError


def _manifest(version: str = "1.0.0", sha: str = "ab" * 32) -> Manifest:
    return Manifest(name="kws", version=version, model_target=f"kws/{version}.onnx",
                    sha256=sha, size_bytes=10,
                    inputs=(TensorSpec("x", "tensor(float)", (None, 8)),),
                    outputs=(TensorSpec("logits", "tensor(float)", (None, 4)),),
                    figures={"accuracy": 0.9}, floor=Floor(accuracy=0.88),
                    reference=Reference("cd" * 32, [1, 0, 3]))


def test_manifest_round_trip_and_corruption() -> None:
    m = _manifest()
    assert Manifest.from_bytes(m.to_bytes()) == m
    for bad in (b"", b"{}", m.to_bytes()[:-5], m.to_bytes().replace(b"1.0.0", b"1.0")):
        with pytest.raises(VerificationError, match="malformed"):
            Manifest.from_bytes(bad)


def test_versions_order_numerically_and_never_go_back() -> None:
    assert parse_version("1.10.0") > parse_version("1.9.9")
    for bad in ("1.0", "v1.0.0", "01.0.0", "1.0.0-rc1"):
        with pytest.raises(UsageError, match=r"X\.Y\.Z"):
            parse_version(bad)
    assert check_newer(None, "0.0.1") and check_newer("1.9.0", "1.10.0")
    assert not check_newer("1.0.0", "1.0.0")
    with pytest.raises(VerificationError, match="refusing to downgrade"):
        check_newer("1.2.0", "1.1.9")


def test_model_bytes_must_match_manifest() -> None:
    m = _manifest()
    check_model_bytes(m, m.sha256, 10)
    with pytest.raises(VerificationError, match="does not match its manifest"):
        check_model_bytes(m, m.sha256, 11)
    with pytest.raises(VerificationError):
        check_model_bytes(m, "00" * 32, 10)


def test_golden_digest_ignores_labels_and_sees_inputs() -> None:
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    a = golden_digest(Dataset({"x": x}, np.array([0, 1, 2])))
    assert a == golden_digest(Dataset({"x": x.copy()}))
    assert a != golden_digest(Dataset({"x": x + 1}))
    assert a != golden_digest(Dataset({"x": x.reshape(3, 2, 2)}))


CFG = HealthConfig(latency_margin=0.5, latency_slack_ms=0.0)


@pytest.mark.parametrize(("measured", "ok", "words"), [
    (Measured(load_error="cannot load"), False, "cannot load"),
    (Measured(accuracy=0.87), False, "below the floor 0.8800"),
    (Measured(accuracy=0.88, latency_p50_ms=1.4, current_latency_p50_ms=1.0), True, "passed"),
    (Measured(accuracy=0.95, latency_p50_ms=1.6, current_latency_p50_ms=1.0), False, "latency"),
    (Measured(agreement=0.5), False, "agreement 0.5000"),
    (Measured(agreement=1.0), True, "latency check skipped"),
    (Measured(reference_note="no labels"), True, "output check skipped: no labels"),
])
def test_health_verdicts(measured: Measured, ok: bool, words: str) -> None:
    v = judge(Floor(accuracy=0.88, agreement=0.99), measured, CFG)
    assert v.ok is ok and words in v.reason


def test_probation_errors_boots_and_latency() -> None:
    cfg = HealthConfig(probation_inferences=3, probation_errors=0, probation_boots=2,
                       latency_margin=0.5, latency_slack_ms=0.0)
    p = Probation(remaining=3, baseline_p50_ms=1.0, boot_id="boot-0")
    p1, why = probation_step(p, cfg, latencies_ms=[1.0])
    assert why is None and p1.remaining == 2
    _, why = probation_step(p1, cfg, failed=1)
    assert "1 model error(s)" in why
    q = p
    for _ in range(10):                               # process starts within one boot
        q, why = probation_step(q, cfg, boot_id="boot-0")
        assert why is None and q == p
    for boot in ("boot-1", "boot-2"):
        q, why = probation_step(q, cfg, boot_id=boot)
        assert why is None and q.boot_id == boot
    _, why = probation_step(q, cfg, boot_id="boot-3")
    assert "booted 3 times" in why and "crash loop" in why
    fast, why_fast = probation_step(p, cfg, latencies_ms=[1.2] * 3)
    _, why_slow = probation_step(p, cfg, latencies_ms=[1.2, 2.0, 2.0])
    assert fast is None and why_fast is None          # kept: probation over
    assert "median latency 2.000" in why_slow
    one_by_one = p
    for _ in range(2):
        one_by_one, _ = probation_step(one_by_one, cfg, latencies_ms=[1.2])
    assert one_by_one == probation_step(p, cfg, latencies_ms=[1.2] * 2)[0]


def test_a_long_probation_keeps_a_bounded_evenly_spaced_latency_sample() -> None:
    """100,000 inferences saved in uneven chunks: the pointer holds at most 2 x 512
    latencies, every k-th one whatever the chunking, and the verdict's median is the
    stream's (latencies rise linearly, so the sample's median must sit mid-way)."""
    from edgeloop.bundle.health import LATENCY_SAMPLE

    n = 100_000
    cfg = HealthConfig(probation_inferences=n, latency_margin=0.0, latency_slack_ms=0.0)
    lat = np.linspace(1.0, 3.0, n)
    p: Probation | None = Probation(remaining=n, baseline_p50_ms=1.99)
    whole = probation_step(Probation(remaining=n, baseline_p50_ms=1.99), cfg,
                           latencies_ms=lat[:-1])[0]
    start, why = 0, None
    for size in [1, 7, 999, 20_000, 33_333] * 10:
        chunk = lat[start:min(start + size, n - 1)]
        if not len(chunk):
            break
        p, why = probation_step(p, cfg, latencies_ms=chunk)
        start += len(chunk)
    assert start == n - 1 and p == whole
    assert LATENCY_SAMPLE <= len(p.latencies_ms) < 2 * LATENCY_SAMPLE
    assert p.latencies_ms == tuple(lat[:n - 1:p.latency_every])
    _, why = probation_step(p, cfg, latencies_ms=[2.0])
    assert why is not None and "median latency 2.00" in why      # 2.0 > 1.99: rolled back


def test_no_floor_compares_accuracy_with_the_current_model() -> None:
    cfg = HealthConfig(accuracy_margin=0.01)
    no_floor = Floor(accuracy=None)
    worse = judge(no_floor, Measured(accuracy=0.80, current_accuracy=0.90), cfg)
    assert not worse.ok and not worse.retry and "current model's 0.9000" in worse.reason
    assert judge(no_floor, Measured(accuracy=0.895, current_accuracy=0.90), cfg).ok
    first = judge(no_floor, Measured(accuracy=0.10), cfg)
    assert first.ok and "no current model" in first.reason


def test_only_a_latency_failure_may_be_retried() -> None:
    slow = judge(Floor(accuracy=0.5), Measured(accuracy=0.9, latency_p50_ms=9.0,
                                               current_latency_p50_ms=1.0), CFG)
    assert not slow.ok and slow.retry and "latency" in slow.reason
    bad = judge(Floor(accuracy=0.95), Measured(accuracy=0.9, latency_p50_ms=9.0,
                                               current_latency_p50_ms=1.0), CFG)
    assert not bad.ok and not bad.retry


def test_slot_transitions() -> None:
    s0 = SlotState()
    assert s0.target_slot() == "a" and s0.current() is None
    s1 = commit(begin_install(s0), _manifest("1.0.0"), None)
    assert s1.active == "a" and s1.current().version == "1.0.0"
    with pytest.raises(VerificationError, match="no previous model"):
        rollback(s1)
    p = Probation(remaining=5)
    s2 = commit(begin_install(s1), _manifest("1.1.0"), p)
    assert (s2.active, s2.probation, s2.manifest("a").version) == ("b", p, "1.0.0")
    half = begin_install(s2)                # installing again wipes only the inactive slot
    assert half.active == "b" and half.manifest("a") is None
    back = rollback(s2)
    assert back.active == "a" and back.probation is None
    saved = fall_back(s2)                   # b's file is corrupt: serve a, b holds nothing
    assert (saved.active, saved.manifest("b"), saved.probation) == ("a", None, None)
    with pytest.raises(VerificationError, match="no previous model"):
        fall_back(saved)
    assert SlotState.from_bytes(s2.to_bytes()) == s2
    with pytest.raises(VerificationError, match="malformed"):
        SlotState.from_bytes(b'{"active": "c", "slots": [null, null], "probation": null}')


def test_bundle_public_names_are_exactly_these_and_documented() -> None:
    import types

    import edgeloop.bundle as b

    public = {n for n in dir(b) if not n.startswith("_")
              and not isinstance(getattr(b, n), types.ModuleType)}
    assert public == set(b.__all__)
    assert all(getattr(b, n).__doc__ for n in b.__all__)
