"""Every quantization scheme and `optimize` on every corpus model (the models users bring,
at their small size): each succeeds, or says in one line, exit code 2, why it does not
apply. Never a traceback, never "failed" for a graph-preparation problem; and when the
`int8` scheme succeeds its output meets its bound on held-out data."""

from __future__ import annotations

import dataclasses
import importlib
import json
import sys
from pathlib import Path

import onnx
import pytest

from edgeloop._onnx import session
from edgeloop.compress.fuse import read_preparation
from edgeloop.compress.mixed import read_plan
from edgeloop.data import load_npz
from edgeloop.measure import LatencyConfig, fidelity, predict
from edgeloop.zoo.corpus import CORPUS, CorpusModel, build

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _tiers import tiered
from test_cli import cli

optimize_module = importlib.import_module("edgeloop.optimize")

pytestmark = pytest.mark.slow

SCHEMES = ["int8", "int8-static", "int8-dynamic", "int4-weight", "binary", "ort-dynamic"]
# the largest CNNs take minutes per scheme at test size; they get the int8 schemes here,
# and every scheme in benchmarks/bench_real_models.py
LARGEST = {"efficientnet_b0", "resnet18"}


@pytest.fixture(scope="module")
def root(small_corpus: Path) -> Path:
    return small_corpus


def _entry(root: Path, name: str) -> CorpusModel:
    return build(name, root / name, small=True)


def _edgeloop(args: list[str], cwd: Path) -> tuple[int, str]:
    """The CLI in-process (a subprocess per call would double the test's time), from
    ``cwd``; returns the exit code and stderr. Anything but SystemExit propagates, so a
    traceback fails the test."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        code, _, err = cli(*args)
    return code, err


def _one_line_or_success(code: int, err: str) -> None:
    if code:
        assert code == 2, err[-2000:]
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:"), err
        assert "Incomplete symbolic shape inference" not in lines[0]


@pytest.mark.parametrize("name", tiered(CORPUS, LARGEST | {"mobilenet_v2"}))
def test_every_scheme_succeeds_or_says_why(root, tmp_path, name):
    entry = _entry(root, name)
    val = load_npz(entry.val)
    reference = predict(session(onnx.load(entry.model)), val)
    outcomes = {}
    schemes = ["int8", "int8-static", "ort-dynamic"] if name in LARGEST else SCHEMES
    for scheme in schemes:
        out = tmp_path / f"{scheme}.onnx"
        code, err = _edgeloop(["quantize", str(entry.model), "--scheme", scheme, "--data",
                               str(entry.calib), "--out", str(out)], tmp_path)
        _one_line_or_success(code, err)
        assert out.exists() == (code == 0)
        outcomes[scheme] = code
        if scheme == "int8" and code == 0:
            model = onnx.load(out)
            plan, prep = read_plan(model), read_preparation(model)
            assert plan is not None and prep is not None and prep["used"] != "none"
            got = fidelity(predict(session(model), val), reference)
            # the bound holds on calibration data; held out, allow a little slack (64 small
            # crops of two photographs calibrate a CNN less well than held-out text: 4x)
            slack = 4 if entry.metric == "agreement" else 2
            error = 1 - (got.top1_agreement if plan["compare"] == "top1" else got.mean_cosine)
            assert error <= slack * plan["max_error"], (name, got)
            assert plan["compare"] == ("top1" if entry.kind == "classifier" else "outputs")
    # int8 works on every model these schemes were made for (the stock ones always do)
    assert outcomes["ort-dynamic"] == 0
    assert sorted(set(tmp_path.iterdir()) - {tmp_path / f"{s}.onnx" for s in schemes}) == []


@dataclasses.dataclass(frozen=True)
class _QuickTiming(optimize_module.OptimizeConfig):
    """`optimize`'s settings with a few timed runs per candidate and batch size (the
    default times each for up to 1 s, at least 20 runs: a third of this test's time).
    Which candidate is fastest is not what the test below asserts."""

    latency: LatencyConfig = dataclasses.field(default_factory=lambda: LatencyConfig(
        warmup=1, min_runs=10, max_seconds=0.1, floor_runs=3))


# Two exporters' transformers here; optimize on CNNs is tested on the zoo CNN
# (test_optimize.py), and on every corpus model by benchmarks/bench_real_models.py (a
# mobile CNN here took 50 s of make test on x86-avx2).
@pytest.mark.parametrize("name", ["minilm-ts", "bert-dynamo"])
def test_optimize_chooses_or_says_why_each_candidate_was_rejected(root, tmp_path, name,
                                                                  monkeypatch):
    monkeypatch.setattr(optimize_module, "OptimizeConfig", _QuickTiming)  # what the CLI builds
    entry = _entry(root, name)
    code, err = _edgeloop(["optimize", str(entry.model), "--data", str(entry.calib), "--val",
                           str(entry.val), "--metric", "cosine", "--max-drop", "0.01",
                           "--time-budget", "4m", "--out", str(tmp_path / "opt")], tmp_path)
    _one_line_or_success(code, err)
    assert code == 0
    report = json.loads((tmp_path / "opt" / "report.json").read_text())
    assert report["candidates"], report
    for c in report["candidates"]:
        if c["status"] != "fits":
            assert c["error"], c      # every rejection carries its reason
