"""A real cascade: a narrow MNIST-1D CNN in front of the reference CNN, built by the CLI,
served by the runtime in onnxruntime, checked against the stage models run directly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_bundle_fixtures import X, new_device, repo
from test_cli import cli

from edgeloop._onnx import session
from edgeloop.data import Dataset, load_builtin, save_npz
from edgeloop.device import (
    Cascade,
    Policy,
    Runtime,
    build_cascade,
    evaluate_thresholds,
    summarize,
)
from edgeloop.errors import DataError, UsageError
from edgeloop.zoo import TrainConfig, train_zoo_model

__all__ = ["repo"]

MAX_DROP = 2.0       # accuracy points


@pytest.fixture(scope="session")
def narrow_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A briefly trained MNIST-1D CNN half as wide as the reference (about 88%)."""
    out = tmp_path_factory.mktemp("narrow")
    train_zoo_model("mnist1d-cnn", out, config=TrainConfig(epochs=6), width=16)
    return out


@pytest.fixture(scope="session")
def big_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference: the MNIST-1D CNN at twice the zoo width, trained long enough to be
    clearly better (about 97%). At the zoo width, its batch-1 latency was so close to the
    narrow model's on x86-avx2 (0.07 against 0.05 ms) that a cascade saved about 1%, and
    timing noise could make `edgeloop cascade` drop the small stage; at this width a
    cascade saves about 30% there."""
    out = tmp_path_factory.mktemp("big")
    train_zoo_model("mnist1d-cnn", out, config=TrainConfig(epochs=8), width=64)
    return out


@pytest.fixture(scope="session")
def splits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("splits")
    paths = {}
    for split in ("val", "test"):
        paths[split] = root / f"{split}.npz"
        save_npz(paths[split], load_builtin("mnist1d", split))
    paths["unlabelled"] = root / "unlabelled.npz"
    save_npz(paths["unlabelled"], Dataset(load_builtin("mnist1d", "val").inputs))
    return paths


@pytest.fixture(scope="session")
def built(narrow_dir: Path, big_dir: Path, splits: dict[str, Path],
          tmp_path_factory: pytest.TempPathFactory) -> Path:
    """cascade.json written by `edgeloop cascade`."""
    out = tmp_path_factory.mktemp("cascade") / "cascade.json"
    code, stdout, stderr = cli("cascade", narrow_dir / "model.onnx", big_dir / "model.onnx",
                               "--val", splits["val"], "--max-drop", MAX_DROP, "--safety", 1,
                               "--out", out)
    assert code == 0, stderr
    assert "expected on 500 validation samples: accuracy" in stdout
    return out


def _direct(model: Path, x: np.ndarray) -> np.ndarray:
    return session(model, threads=1).run(None, {"x": x})[0]


@pytest.mark.slow   # trains two CNNs once per session (~30 s alone, more on a busy machine)
def test_cascade_file_records_the_choice(built: Path) -> None:
    c = Cascade.load(built)
    d = json.loads(built.read_text())
    assert d["format"] == 1 and d["measure"] == "max-softmax" and d["max_drop"] == MAX_DROP
    assert d["safety"] == 1.0
    assert [s.name for s in c.stages] == ["narrow*/model", "cnn*/model"] or len(c.stages) == 2
    small, large = c.stages
    assert not small.chained and not large.chained and large.threshold is None
    assert small.threshold is not None and 0 < small.threshold <= 1
    e = c.expected
    assert e["accuracy"] >= e["reference_accuracy"] - MAX_DROP / 100 - 1e-12
    assert e["mean_latency_ms"] <= e["reference_latency_ms"]
    assert sum(e["answered"]) == pytest.approx(1.0)
    assert e["answered"][0] > 0.5                  # most inputs stop at the small model
    # temperature scaling lowers each stage's validation NLL (or keeps it: T = 1 is allowed)
    assert all(s.nll_after <= s.nll_before for s in c.stages)
    assert len(c.curve) >= 2
    assert [p.mean_latency_ms for p in c.curve] == sorted(p.mean_latency_ms for p in c.curve)


@pytest.mark.slow   # trains two CNNs once per session (~30 s alone, more on a busy machine)
def test_runtime_meets_the_budget_on_held_out_data(built: Path, narrow_dir: Path,
                                                   big_dir: Path) -> None:
    test = load_builtin("mnist1d", "test")
    x, y = test.inputs["x"], test.labels
    small, large = _direct(narrow_dir / "model.onnx", x), _direct(big_dir / "model.onnx", x)
    rt = Runtime(None, Policy(cascade=built))
    answers = list(rt.predict_each(test))
    s = summarize(answers, y)
    stage_of = np.array([a.stage for a in answers])
    names = rt.stages()
    first = stage_of == names[0]
    out = np.concatenate([a.output for a in answers])
    # oracle: every answer is exactly the answering stage's own output
    np.testing.assert_allclose(out[first], small[first], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[~first], large[~first], rtol=1e-5, atol=1e-5)
    large_acc = float((large.argmax(1) == y).mean())
    # held out: within the budget, with two standard errors of a 1000-sample estimate
    assert s.accuracy >= large_acc - MAX_DROP / 100 - 0.02
    assert first.mean() > 0.5
    assert s.answered == {n: int((stage_of == n).sum()) for n in names}
    assert all(a.confidence is not None and not a.offloaded for a in answers)
    # a batch gives the same answers as one sample at a time
    np.testing.assert_allclose(rt.predict({"x": x[:64]}).output, out[:64], rtol=1e-5, atol=1e-5)
    # the pure evaluation of those thresholds on the same data agrees with the runtime
    c = Cascade.load(built)
    from edgeloop.device import confidence, softmax

    conf = confidence(softmax(small, c.stages[0].temperature))
    point = evaluate_thresholds([conf], [small.argmax(1) == y, large.argmax(1) == y],
                                [s.latency_ms for s in c.stages], c.thresholds())
    assert point.accuracy == pytest.approx(s.accuracy, abs=0.002)
    assert point.answered[0] == pytest.approx(first.mean(), abs=0.002)


@pytest.mark.slow   # trains two CNNs once per session (~30 s alone, more on a busy machine)
def test_thresholds_zero_and_never(built: Path, narrow_dir: Path, big_dir: Path) -> None:
    x = load_builtin("mnist1d", "test").inputs["x"][:50]
    only_small = Runtime(None, Policy(cascade=built, thresholds=(0.0,)))
    a = only_small.predict({"x": x})
    assert a.stage == only_small.stages()[0]
    np.testing.assert_allclose(a.output, _direct(narrow_dir / "model.onnx", x), rtol=1e-5,
                               atol=1e-5)
    only_large = Runtime(None, Policy(cascade=built, thresholds=(float("inf"),)))
    assert len(only_large.stages()) == 1              # the small model is not even run
    np.testing.assert_allclose(only_large.predict({"x": x}).output,
                               _direct(big_dir / "model.onnx", x), rtol=1e-5, atol=1e-5)


@pytest.mark.slow   # trains two CNNs once per session (~30 s alone, more on a busy machine)
def test_policy_toml(built: Path, tmp_path: Path) -> None:
    p = tmp_path / "policy.toml"
    rel = Path("..") / built.parent.name / built.name
    p.write_text(f'cascade = "{rel}"\nthresholds = [inf]\nthreads = 2\n')
    policy = Policy.load(p)
    assert policy == Policy(cascade=tmp_path / rel, thresholds=(float("inf"),), threads=2)
    for text, words in [
        ('cascade = "c.json"\nthreds = 2\n', "unknown key `threds`; expected one of cascade, "
                                             "thresholds, threads"),
        ("threads = 0\n", "`threads` must be an integer >= 1; got 0"),
        ('threads = "two"\n', "`threads` must be an integer >= 1; got 'two'"),
        ("thresholds = [0.5]\n", "`thresholds` needs `cascade`"),
        ('cascade = "c.json"\nthresholds = "high"\n', "`thresholds` must be a non-empty list"),
        ("cascade = 3\n", "`cascade` must be the path of a cascade.json; got 3"),
        ("cascade = [\n", "is not valid TOML"),
    ]:
        p.write_text(text)
        with pytest.raises(UsageError, match=words.replace("[", r"\[")):
            Policy.load(p)
    with pytest.raises(UsageError, match="one per stage but the last; got 2"):
        Runtime(None, Policy(cascade=built, thresholds=(0.5, 0.5)))
    with pytest.raises(DataError, match="has no array 'x'"):
        Runtime(None, Policy(cascade=built)).predict({"y": X[:1]})


def _classifier(path: Path, features: int, classes: int) -> Path:
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["logits"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", features])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])],
        [numpy_helper.from_array(np.ones((features, classes), np.float32), "w")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 9
    onnx.save(m, path)
    return path


def test_bad_inputs_are_one_line_and_write_nothing(splits: dict[str, Path],
                                                   tmp_path: Path) -> None:
    big = _classifier(tmp_path / "ten.onnx", 40, 10)
    four = _classifier(tmp_path / "four.onnx", 40, 4)
    other_input = _classifier(tmp_path / "eight.onnx", 8, 10)
    out = tmp_path / "cascade.json"
    val = splits["val"]
    cases = [
        ([tmp_path / "nope.onnx", big, "--val", val], "model file '" + str(tmp_path / "nope.onnx")
         + "' does not exist"),
        ([four, big, "--val", splits["unlabelled"]], "has no `labels` array"),
        ([four, big, "--val", tmp_path / "nope.npz"], "does not exist"),
        ([four, big, "--val", val], "must output logits over the same classes"),
        ([other_input, big, "--val", val], "validation data for 'eight.onnx'"),
        ([big, big, "--val", val, "--max-drop", -1], "`max-drop` must be >= 0"),
        ([big, big, "--val", val, "--measure", "top1"], "`measure` must be one of "
                                                        "max-softmax, margin, entropy"),
        ([big, "--val", val], "a cascade needs at least two models"),
    ]
    for args, words in cases:
        code, _, stderr = cli("cascade", *args, "--out", out)
        assert code == 2, (args, stderr)
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and words in lines[0], (args, stderr)
        assert not out.exists()


def test_latency_batch_times_the_stages_per_sample_at_that_batch(tmp_path: Path) -> None:
    a = _classifier(tmp_path / "a.onnx", 40, 10)
    b = _classifier(tmp_path / "b.onnx", 40, 10)
    val = load_builtin("mnist1d", "val")
    out = tmp_path / "cascade.json"
    c = build_cascade([a, b], val, out=out, latency_batch=32, latency_rounds=1,
                      latency_runs=5)
    assert c.latency_batch == 32 and Cascade.load(out).latency_batch == 32
    assert all(s.latency_ms > 0 for s in c.stages)
    for bad in (0, 33, 1.5, True):
        with pytest.raises(UsageError, match=r"`latency_batch` must be an integer in 1\.\.32"):
            build_cascade([a, b], val, latency_batch=bad)


@pytest.mark.slow   # trains two CNNs once per session (~30 s alone, more on a busy machine)
def test_device_run_cli(built: Path, splits: dict[str, Path], tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(f'cascade = "{built}"\n')
    code, stdout, stderr = cli("device", "run", "--data", splits["test"], "--policy", policy)
    assert code == 0, stderr
    assert "1000 samples" in stdout and "accuracy" in stdout and "mean" in stdout
    small = Path(json.loads(built.read_text())["stages"][0]["name"]).name
    assert small in stdout
    code, stdout, stderr = cli("device", "run", "--data", splits["unlabelled"], "--policy",
                               policy, "--json")
    assert code == 0, stderr
    rows = [json.loads(line) for line in stdout.splitlines()]
    assert len(rows) == 500
    assert set(rows[0]) == {"answer", "stage", "latency_ms", "confidence", "offloaded",
                            "offload_reason", "energy_mj", "energy_source", "skipped"}
    assert all(0 <= r["answer"] < 10 and r["offloaded"] is False for r in rows)
    # errors: one line, exit 2
    policy.write_text('cascade = "c.json"\nthreads = 0\n')
    for args, words in [
        (["--data", splits["test"], "--policy", policy], "`threads` must be an integer >= 1"),
        (["--data", splits["test"]], "give a device state folder, or a policy that names a "
                                     "cascade"),
        ([tmp_path / "nodev", "--data", splits["test"]], "is not a device state folder"),
    ]:
        code, _, stderr = cli("device", "run", *args)
        assert code == 2 and len(stderr.strip().splitlines()) == 1 and words in stderr, stderr


def test_device_run_serves_the_slot_and_reports_probation(repo, tmp_path: Path) -> None:
    dev = new_device(repo)
    dev.update(repo.url, "kws")
    before = dev.state().probation
    assert before is not None
    save_npz(tmp_path / "x.npz", Dataset({"x": X[:30]}))
    code, stdout, stderr = cli("device", "run", dev.dir, "--data", tmp_path / "x.npz")
    assert code == 0, stderr
    assert "kws" in stdout and "30 (100.0%)" in stdout
    after = dev.state().probation
    assert after is None or after.remaining == before.remaining - 30
    rt = Runtime(dev)
    a = rt.predict({"x": X[:2]})
    assert a.stage == "kws" and a.output.shape == (2, 4) and a.confidence is None
