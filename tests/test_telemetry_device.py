"""The device side, without a network: the ε ledger (refusal at budget, sliding window,
persistence), report building, signing and the collector's pure checks."""

from __future__ import annotations

import contextlib
import json
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_telemetry_fixtures import make_device

from edgeloop.errors import UsageError, VerificationError
from edgeloop.monitor.telemetry import (
    BadReport,
    Budget,
    Ledger,
    Observation,
    ReportConfig,
    Reporter,
    parse_period,
    parse_report,
    read_key,
)
from edgeloop.monitor.telemetry.report import build_report, encode, plan, sign, signature_ok

OBS = Observation(class_counts=[5, 0, 3, 2], drift=True, mean_confidence=0.8731)


def test_period_parsing() -> None:
    assert [parse_period(p) for p in ("30s", "5m", "12h", "1d", "2w")] == \
        [30, 300, 43200, 86400, 1209600]
    for bad in ("", "1", "0d", "1y", "-1d", "1.5h"):
        with pytest.raises(UsageError, match="`period`"):
            parse_period(bad)


def test_ledger_refuses_at_budget_and_frees_as_the_window_slides() -> None:
    ledger = Ledger(Budget(1.0, 3600))
    seqs = []
    for i in range(4):
        ledger, seq = ledger.charge(0.25, 0.0, 1000.0 + i)
        seqs.append(seq)
    assert seqs == [1, 2, 3, 4]
    assert ledger.spent(1003.0) == (1.0, 0.0)
    with pytest.raises(UsageError, match=r"privacy budget spent: 1 of ε 1 used in the last "
                                         r"1h, this report needs 0.25; enough is free again in "
                                         r"59.8m"):
        ledger.charge(0.25, 0.0, 1010.0)
    later, seq = ledger.charge(0.25, 0.0, 1000.0 + 3600.5)     # the first spend expired
    assert seq == 5 and later.spent(1000.0 + 3600.5) == (1.0, 0.0)
    assert len(later.spends) == 5                    # kept for MIN_KEEP_S all the same
    with pytest.raises(UsageError, match="exceeds the whole budget"):
        ledger.charge(2.0, 0.0, 1e6)
    with pytest.raises(UsageError, match="δ"):
        Ledger(Budget(1.0, 60)).charge(0.1, 1e-6, 0.0)        # delta budget 0: pure only
    with pytest.raises(UsageError, match="privacy budget spent: δ 1e-05 of 1e-05"):
        Ledger(Budget(1.0, 60, 1e-5)).charge(0.1, 1e-5, 0.0)[0].charge(0.1, 1e-6, 1.0)
    with pytest.raises(UsageError, match="no privacy budget"):
        Ledger().charge(0.1, 0.0, 0.0)
    for bad in (0.0, -0.5, float("nan")):
        with pytest.raises(UsageError, match="epsilon"):
            Ledger(Budget(1.0, 60)).charge(bad, 0.0, 0.0)


def test_ledger_ten_tenths_fill_a_budget_of_one() -> None:
    ledger = Ledger(Budget(1.0, 60))
    for _ in range(10):
        ledger, _ = ledger.charge(0.1, 0.0, 5.0)
    with pytest.raises(UsageError):
        ledger.charge(0.1, 0.0, 5.0)


def test_ledger_a_wider_period_still_counts_what_was_spent() -> None:
    """24 reports of ε 1, one an hour under a budget of ε 1 per hour; the owner then
    widens the period to two days: all 24 count, in the ledger saved and read back too."""
    ledger = Ledger(Budget(1.0, 3600))
    for hour in range(24):
        ledger, _ = ledger.charge(1.0, 0.0, hour * 3600.0 + 1)
    wide = Ledger.from_bytes(ledger.with_budget(Budget(30.0, 2 * 86400)).to_bytes())
    assert wide.spent(24 * 3600.0) == (24.0, 0.0)
    with pytest.raises(UsageError, match="privacy budget spent"):
        wide.charge(7.0, 0.0, 24 * 3600.0)
    wide.charge(6.0, 0.0, 24 * 3600.0)
    with pytest.raises(UsageError, match="would count spends older than this ledger keeps"):
        wide.with_budget(Budget(30.0, 60 * 86400))


def test_ledger_round_trip_and_damage() -> None:
    ledger, _ = Ledger(Budget(2.0, 86400, 1e-5)).charge(0.5, 1e-6, 10.0)
    assert Ledger.from_bytes(ledger.to_bytes()) == ledger
    assert json.loads(ledger.to_bytes())["composition"] == "basic"
    for bad in (b"", b"{", b'{"budget": null}', ledger.to_bytes().replace(b'"next_seq": 2',
                                                                          b'"next_seq": -1')):
        with pytest.raises(VerificationError, match="ledger is damaged"):
            Ledger.from_bytes(bad)


def test_reporter_persists_the_ledger_and_refuses_once_spent(tmp_path: Path) -> None:
    clock = [1000.0]
    rep = make_device(tmp_path / "dev", budget=1.0, period_s=3600)
    rep = Reporter(tmp_path / "dev", clock=lambda: clock[0], rng=random.Random(0))
    assert rep.prepare(OBS, epsilon=0.6) == 1
    again = Reporter(tmp_path / "dev", clock=lambda: clock[0])     # a new process
    with pytest.raises(UsageError, match="privacy budget spent"):
        again.prepare(OBS, epsilon=0.6)
    assert len(again.pending()) == 1          # the refusal wrote nothing
    clock[0] += 3601
    assert again.prepare(OBS, epsilon=0.6) == 2
    assert [p.name for p in again.pending()] == ["000000000001.json", "000000000002.json"]
    assert (tmp_path / "dev" / "telemetry.key").stat().st_mode & 0o777 == 0o600


def test_reporter_refuses_a_folder_that_is_not_a_device(tmp_path: Path) -> None:
    for rep in (Reporter(tmp_path), Reporter(tmp_path / "nowhere")):
        with pytest.raises(UsageError, match="is not a device state folder"):
            rep.prepare(OBS, epsilon=1.0)
        with pytest.raises(UsageError, match="is not a device state folder"):
            rep.ledger()
    rep = make_device(tmp_path / "nobudget", budget=None)
    with pytest.raises(UsageError, match="no privacy budget"):
        rep.prepare(OBS, epsilon=1.0)
    assert rep.pending() == []


def _report(rng_seed: int = 0, **config: object) -> tuple[bytes, bytes]:
    mechs = plan(OBS, 1.5, ReportConfig(**config))  # type: ignore[arg-type]
    doc = build_report(OBS, mechs, device="dev-1", seq=7, time=1.8e9,
                       rng=random.Random(rng_seed))
    return encode(doc), b"k" * 32


def test_a_report_holds_only_mechanism_outputs_and_splits_epsilon() -> None:
    body, _ = _report()
    doc = json.loads(body)
    assert set(doc) == {"v", "device", "seq", "time", "epsilon", "delta", "fields"}
    assert doc["epsilon"] == 1.5 and doc["delta"] == 0.0
    assert {f["epsilon"] for f in doc["fields"].values()} == {0.5}
    assert doc["fields"]["class"]["mech"] == "grr" and doc["fields"]["class"]["k"] == 4
    assert doc["fields"]["drift"]["value"] in (0, 1)
    assert b"0.8731" not in body
    parsed = parse_report(body)
    assert (parsed.device, parsed.seq, parsed.epsilon) == ("dev-1", 7, 1.5)
    gauss_body = _report(confidence_mechanism="gaussian", class_mechanism="oue")[0]
    gauss = json.loads(gauss_body)
    assert gauss["delta"] == 1e-6 and len(gauss["fields"]["class"]["value"]) == 4
    assert parse_report(gauss_body).delta == 1e-6


def test_signature_covers_every_byte() -> None:
    body, key = _report()
    mac = sign(body, key)
    assert signature_ok(body, mac, key)
    assert not signature_ok(body.replace(b'"seq":7', b'"seq":8'), mac, key)
    assert not signature_ok(body, mac, b"x" * 32)
    assert not signature_ok(body, "zz", key)
    assert not signature_ok(body, "é" * 64, key)


def _mutate(path: list[str], value: object) -> bytes:
    doc = json.loads(_report()[0])
    node = doc
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value
    return json.dumps(doc).encode()


@pytest.mark.parametrize(("body", "status", "words"), [
    (b"not json", 400, "not JSON"),
    (b"\xff\xfe", 400, "not JSON"),
    (b"[" * 30000 + b"]" * 30000, 400, "not JSON"),
    (b"[1, 2]", 400, "an object with keys"),
    (b'{"v": 1}', 400, "an object with keys"),
    (_mutate(["v"], 2), 422, "format 2"),
    (_mutate(["seq"], 0), 422, "`seq`"),
    (_mutate(["device"], "a b"), 422, "`device`"),
    (_mutate(["epsilon"], 3.0), 422, "not the sum"),
    (_mutate(["fields", "class", "value"], 4), 422, "outside the grr"),
    (_mutate(["fields", "class", "value"], True), 422, "outside the grr"),
    (_mutate(["fields", "class", "epsilon"], 0), 422, "epsilon"),
    (_mutate(["fields", "drift", "k"], 3), 422, "cannot use grr"),
    (_mutate(["fields", "confidence", "value"], "0.87"), 422, "outside the laplace"),
    (_mutate(["fields", "confidence", "raw"], 0.87), 422, "keys"),
    (_mutate(["fields", "input"], {"mech": "grr"}), 422, "`fields`"),
    (_report()[0].replace(b'"value":', b'"value":NaN,"x":', 1), 400, "not JSON"),
])
def test_the_collector_refuses_what_is_not_a_valid_report(body: bytes, status: int,
                                                          words: str) -> None:
    with pytest.raises(BadReport, match=words) as e:
        parse_report(body)
    assert e.value.status == status


def test_key_files(tmp_path: Path) -> None:
    make_device(tmp_path / "d")
    key = read_key(tmp_path / "d" / "telemetry.key")
    assert len(key.key) == 32 and len(key.device) == 32
    (tmp_path / "bad.key").write_text("{}")
    with pytest.raises(UsageError, match="not a telemetry key file"):
        read_key(tmp_path / "bad.key")
    with pytest.raises(UsageError, match="cannot read"):
        read_key(tmp_path / "none.key")


def test_public_names_are_exactly_these_and_documented() -> None:
    import types

    import edgeloop.monitor.telemetry as telemetry

    assert sorted(telemetry.__all__) == sorted(
        n for n in dir(telemetry)
        if not n.startswith("_") and not isinstance(getattr(telemetry, n), types.ModuleType))
    for name in telemetry.__all__:
        obj = getattr(telemetry, name)
        assert not callable(obj) or obj.__doc__, name


def test_the_device_side_imports_no_collector_or_oracle_library() -> None:
    import subprocess
    import sys

    code = ("import sys, edgeloop.monitor.telemetry, edgeloop.cli.bundle\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'torch', 'opendp', 'sqlalchemy', 'psycopg', 'fastapi', 'uvicorn', 'scipy'}))")
    src = Path(__file__).resolve().parent.parent / "src"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"PYTHONPATH": str(src)}, check=True, timeout=60).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("args", [["telemetry", "--help"], ["telemetry", "serve", "--help"],
                                  ["telemetry", "summary", "--help"],
                                  ["device", "report", "--help"],
                                  ["device", "privacy", "--help"]])
def test_help_needs_no_collector_library(args: list[str]) -> None:
    from test_cli_imports import run

    code, out, err, imports = run(*args)
    assert code == 0, err
    assert "Usage:" in out
    assert not {"sqlalchemy", "fastapi", "uvicorn", "psycopg"} & set(imports["loaded"])


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
    | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=16)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=120), _JSON.map(lambda v: json.dumps(v).encode())))
def test_anything_that_is_not_a_report_is_refused_as_such(body: bytes) -> None:
    with contextlib.suppress(BadReport):
        parse_report(body)


@settings(max_examples=300, deadline=None)
@given(path=st.sampled_from([["v"], ["device"], ["seq"], ["time"], ["epsilon"], ["delta"],
                             ["fields"], ["fields", "class"], ["fields", "class", "k"],
                             ["fields", "class", "value"], ["fields", "class", "epsilon"],
                             ["fields", "drift", "value"], ["fields", "confidence", "lo"],
                             ["fields", "confidence", "value"], ["fields", "confidence",
                                                                  "mech"]]),
       value=_JSON | st.integers(min_value=10**300, max_value=10**400))
def test_a_report_with_any_one_value_changed_parses_or_is_refused(path: list[str],
                                                                   value: object) -> None:
    with contextlib.suppress(BadReport):
        report = parse_report(_mutate(path, value))
        for mech, out in report.fields.values():
            assert mech.contains(out)


@settings(max_examples=100, deadline=None)
@given(counts=st.lists(st.integers(0, 10**6), min_size=2, max_size=40).filter(any),
       drift=st.none() | st.booleans(),
       conf=st.none() | st.floats(-1e300, 1e300),
       epsilon=st.floats(1e-3, 100.0), mech=st.sampled_from(["auto", "grr", "oue"]),
       gauss=st.booleans(), seed=st.integers(0, 2**32))
def test_every_report_a_device_builds_parses(counts: list[int], drift: bool | None,
                                             conf: float | None, epsilon: float, mech: str,
                                             gauss: bool, seed: int) -> None:
    obs = Observation(class_counts=counts, drift=drift, mean_confidence=conf)
    config = ReportConfig(class_mechanism=mech,
                          confidence_mechanism="gaussian" if gauss else "laplace")
    try:
        mechs = plan(obs, epsilon, config)
    except UsageError as e:        # a share of ε beyond what a mechanism takes
        assert "epsilon" in str(e)
        return
    doc = build_report(obs, mechs, device="d", seq=1, time=0, rng=random.Random(seed))
    report = parse_report(encode(doc))
    assert report.epsilon == pytest.approx(epsilon)
    assert set(report.fields) == set(mechs)
