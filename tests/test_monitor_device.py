"""The monitor on a real device: a trained MNIST-1D CNN published with its reference
sketch, installed over TUF, watched through shifted data; feedback and status through
the CLI, one-line errors for bad input."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from test_bundle_fixtures import Repo, make_repo

from edgeloop._onnx import run, session
from edgeloop.bundle import Device
from edgeloop.cli import main
from edgeloop.data import Dataset, load_builtin, save_npz
from edgeloop.device import OffloadRule, Policy, Runtime
from edgeloop.device.offload import OffloadPolicy
from edgeloop.device.runtime import DRIFT_PROBE_EVERY
from edgeloop.errors import UsageError, VerificationError
from edgeloop.monitor import Monitor, MonitorConfig, Sketch, sketch_bundle
from edgeloop.serve.offload import OffloadServer, ServerConfig, running

EVERY = MonitorConfig().sample_every      # calls per watched call, by default


@pytest.fixture(scope="module")
def served_repo(tmp_path_factory: pytest.TempPathFactory, cnn_dir: Path
                ) -> Iterator[tuple[Repo, Path]]:
    """A repository serving the CNN, published through the CLI with the MNIST-1D test
    split as its golden set; the golden .npz."""
    r, server = make_repo(tmp_path_factory.mktemp("monrepo"))
    golden = r.work / "golden.npz"
    save_npz(golden, load_builtin("mnist1d", "test"))
    main(["publish", str(cnn_dir / "model.onnx"), "--repo", str(r.dir), "--keys", str(r.keys),
          "--name", "cnn", "--version", "1.0.0", "--golden", str(golden)])
    yield r, golden
    server.shutdown()  # type: ignore[attr-defined]
    server.server_close()  # type: ignore[attr-defined]


@pytest.fixture
def device(served_repo: tuple[Repo, Path], tmp_path: Path) -> Device:
    r, golden = served_repo
    dev = Device.init(tmp_path / "dev", trusted_root=r.root, golden=golden)
    assert dev.update(r.url, "cnn").installed
    return dev


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = 0
    try:
        main([*args])
    except SystemExit as e:
        code = int(e.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err.strip()


def _noisy(data: Dataset, seed: int, sigma: float) -> Dataset:
    x = data.inputs["x"]
    rng = np.random.default_rng(seed)
    return Dataset({"x": (x + rng.normal(0, sigma * x.std(), x.shape)).astype(np.float32)},
                   data.labels)


def test_the_bundle_ships_a_verified_sketch(device: Device, cnn_dir: Path) -> None:
    path, manifest = device.active()  # type: ignore[misc]
    assert [f.name for f in manifest.files] == ["monitor.json"]
    shipped = Sketch.from_bytes(path.with_name("monitor.json").read_bytes())
    assert shipped == sketch_bundle(cnn_dir / "model.onnx", load_builtin("mnist1d", "test"))
    assert shipped.accuracy == pytest.approx(manifest.figures["accuracy"])


def test_the_runtime_path_flags_drift_and_status_shows_it(
        device: Device, capsys: pytest.CaptureFixture[str]) -> None:
    """Observe as the runtime will (one call per answer), restart midway, and read the
    flag from `device status --json` in another 'process'."""
    path, _ = device.active()  # type: ignore[misc]
    sess = session(path, threads=1)
    val = load_builtin("mnist1d", "val")
    x = val.inputs["x"]
    mon = Monitor.for_device(device.dir)
    for i in range(len(x)):
        mon.observe({"x": x[i:i + 1]}, run(sess, {"x": x[i:i + 1]}))
    mon.close()
    assert not mon.flag().raised
    # the device's own inputs and a pickle loaded at start: readable by the owner alone
    for name in ("state.pkl", "recent.npz"):
        assert (device.dir / "monitor" / name).stat().st_mode & 0o777 == 0o600
    mon = Monitor.for_device(device.dir)             # a restart resumes
    assert mon.samples_ == len(x) // EVERY
    shifted = _noisy(val, 1, 0.6).inputs["x"]
    for _ in range(6):
        for i in range(len(shifted)):
            mon.observe({"x": shifted[i:i + 1]}, run(sess, {"x": shifted[i:i + 1]}))
    mon.close()
    assert mon.drifted
    code, out, _ = _cli(capsys, "device", "status", str(device.dir), "--json")
    assert code == 0
    status = json.loads(out)["monitor"]
    # every EVERY-th call is watched (the default)
    assert status["drifted"] is True and status["samples"] == 7 * len(x) // EVERY
    alert = status["alerts"][0]
    assert alert["detector"] in ("chi2:inputs", "chi2:class-mix", "cbpe:accuracy",
                                 "adwin:confidence", "page-hinkley:entropy")
    assert alert["since"] and alert["evidence"] and alert["first_sample"] > len(x) // EVERY
    assert status["memory_bytes"]["chi2:inputs"] > 0
    code, out, _ = _cli(capsys, "device", "status", str(device.dir))
    assert code == 0 and "drifted" in out and alert["detector"] in out
    _the_monitor_reports_what_it_saw(device, status, capsys)


def _the_monitor_reports_what_it_saw(device: Device, status: dict[str, object],
                                     capsys: pytest.CaptureFixture[str]) -> None:
    """`device report` without values sends the monitor's last window and flag."""
    from edgeloop.monitor.telemetry import Budget, Reporter, read_key
    from edgeloop.monitor.telemetry.client import KEY_FILE
    from edgeloop.serve.telemetry import running as collector
    from edgeloop.serve.telemetry_store import TelemetryStore

    last = status["windows"][-1]  # type: ignore[index]
    rep = Reporter(device.dir)
    obs = rep.observed(model_sha256=status["model_sha256"])  # type: ignore[arg-type]
    assert obs.drift is True and obs.mean_confidence == last["confidence"]
    assert obs.class_counts == last["classes"] and sum(obs.class_counts) == last["samples"]
    with pytest.raises(UsageError, match="has closed no window on the active model"):
        rep.observed(model_sha256="0" * 64)          # watched on another model
    rep.set_budget(Budget(2.0, 86400))
    store = TelemetryStore(f"sqlite:///{device.dir.parent / 't.db'}")
    store.enroll(read_key(device.dir / KEY_FILE))
    with collector(store) as url:
        code, out, err = _cli(capsys, "device", "report", str(device.dir), "--to", url,
                              "--epsilon", "1")
    assert code == 0 and "sent report 1" in out, err
    summary = store.summary()
    store.close()
    assert summary.reports == 1 and summary.drift_rate is not None
    assert set(summary.class_mix) == {len(last["classes"])}


def test_the_runtime_watches_its_answers_and_offloads_while_drifted(
        device: Device, cnn_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`Runtime` shows every local answer to the device's monitor: clean inputs raise
    nothing and stay local (`[offload] mode = "never"`); a shifted stream is flagged, and
    from then on `while_drifted` sends inputs to the offload server, whose answers equal
    the model's own (the same file, onnxruntime as the oracle), but for every eighth."""
    val = load_builtin("mnist1d", "val")
    x, shifted = val.inputs["x"], _noisy(val, 1, 0.6).inputs["x"]
    sess = session(cnn_dir / "model.onnx", threads=1)
    with running(OffloadServer(cnn_dir / "model.onnx", config=ServerConfig(max_batch=1))) as url:
        rule = OffloadRule(client=OffloadPolicy(url=url, timeout_s=5.0), mode="never",
                           privacy_class="public", while_drifted=True)
        rt = Runtime(device, Policy(offload=rule))
        assert rt.monitor is not None
        clean = [rt.predict({"x": x[i:i + 1]}) for i in range(len(x))]
        assert not any(a.offloaded for a in clean) and not rt.monitor.drifted
        # the monitor works in blocks of 1024 watched calls, every EVERY-th call watched
        answers = [rt.predict({"x": shifted[i:i + 1]}) for _ in range(8)
                   for i in range(len(shifted))]
        offloaded = np.array([a.offloaded for a in answers])
        assert rt.monitor.drifted and offloaded.any()
        first = int(offloaded.argmax())
        # while drifted, one call in DRIFT_PROBE_EVERY still runs here (the monitor watches
        # it: the alert clears only on samples it sees)
        local = np.flatnonzero(~offloaded[first:])
        assert len(local) == (len(answers) - first) // DRIFT_PROBE_EVERY
        assert (np.diff(local) == DRIFT_PROBE_EVERY).all()
        i = first % len(shifted)
        np.testing.assert_allclose(answers[first].output, run(sess, {"x": shifted[i:i + 1]}),
                                   rtol=1e-5, atol=1e-5)
        rt.close()
    # local answers only (offloaded ones are the server's), every EVERY-th one
    assert abs(rt.monitor.samples_ - (len(x) + first + len(local)) / EVERY) <= 1
    code, out, _ = _cli(capsys, "device", "status", str(device.dir), "--json")
    assert code == 0 and json.loads(out)["monitor"]["drifted"] is True


def test_label_free_estimate_on_a_shifted_stream(device: Device) -> None:
    path, _ = device.active()  # type: ignore[misc]
    sketch = Sketch.from_bytes(path.with_name("monitor.json").read_bytes())
    sess = session(path, threads=1)
    val = load_builtin("mnist1d", "val")
    mon = Monitor(sketch, config=MonitorConfig(sample_every=1, window=250))
    errors = []
    for sigma in (0.0, 0.2):
        data = _noisy(val, 2, sigma)
        out = run(sess, data.inputs)
        for start in range(0, len(data), 250):
            rows = slice(start, start + 250)
            mon.observe({"x": data.inputs["x"][rows]}, out[rows])
            mon.process()
            est = mon.windows_[-1]["estimated_accuracy"]
            true = float((out[rows].argmax(1) == data.labels[rows]).mean())  # type: ignore[index]
            errors.append(abs(est - true))  # type: ignore[operator]
    assert np.mean(errors) < 0.06, errors


def test_feedback_measures_accuracy_as_computed_directly(
        device: Device, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path, manifest = device.active()  # type: ignore[misc]
    val = load_builtin("mnist1d", "val")
    save_npz(tmp_path / "val.npz", val)
    code, out, err = _cli(capsys, "device", "feedback", str(device.dir), "--data",
                          str(tmp_path / "val.npz"), "--window", "250", "--json")
    assert code == 0, err
    records = json.loads(out)
    outputs = run(session(path, threads=1), val.inputs)
    correct = outputs.argmax(1) == val.labels
    assert [r["samples"] for r in records] == [250, 250]
    assert [r["accuracy"] for r in records] == [correct[:250].mean(), correct[250:].mean()]
    assert records[0]["version"] == manifest.version and "estimated_accuracy" in records[0]
    # a much worse stream raises the accuracy alert; the history keeps both evaluations
    save_npz(tmp_path / "bad.npz", _noisy(val, 3, 1.5))
    assert _cli(capsys, "device", "feedback", str(device.dir), "--data",
                str(tmp_path / "bad.npz"))[0] == 0
    code, out, _ = _cli(capsys, "device", "status", str(device.dir), "--json")
    status = json.loads(out)["monitor"]
    assert status["accuracy_drop"] is True
    assert [e["samples"] for e in status["evaluations"]] == [250, 250, 500]
    assert status["alerts"][0]["detector"] == "feedback:accuracy"


def test_bad_input_is_one_line_exit_2_and_loses_nothing(
        device: Device, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    val = load_builtin("mnist1d", "val")
    save_npz(tmp_path / "good.npz", val.take(slice(0, 100)))
    assert _cli(capsys, "device", "feedback", str(device.dir), "--data",
                str(tmp_path / "good.npz"))[0] == 0
    history = device.dir / "monitor" / "evaluations.json"
    before = history.read_bytes()
    save_npz(tmp_path / "unlabelled.npz", Dataset(val.inputs))
    save_npz(tmp_path / "wrong.npz", Dataset({"x": val.inputs["x"][:, :30]}, val.labels))
    (tmp_path / "garbage.npz").write_bytes(b"not a zip file")
    cases = [
        (["device", "status", str(tmp_path)], "is not a device state folder"),
        (["device", "feedback", str(tmp_path), "--data", str(tmp_path / "good.npz")],
         "is not a device state folder"),
        (["device", "feedback", str(device.dir), "--data", str(tmp_path / "unlabelled.npz")],
         "no `labels`"),
        (["device", "feedback", str(device.dir), "--data", str(tmp_path / "wrong.npz")],
         "the feedback data"),
        (["device", "feedback", str(device.dir), "--data", str(tmp_path / "garbage.npz")],
         "not a readable .npz"),
        (["device", "feedback", str(device.dir), "--data", str(tmp_path / "none.npz")],
         "does not exist"),
        (["device", "report", str(device.dir), "--to", "http://127.0.0.1:9", "--epsilon",
          "1"], "has closed no window on the active model yet"),
    ]
    for args, words in cases:
        code, _, err = _cli(capsys, *args)
        assert code == 2, args
        assert words in err and len(err.splitlines()) == 1, err
    assert history.read_bytes() == before
    history.write_text("[1, 2")                    # a damaged history is refused, kept
    code, _, err = _cli(capsys, "device", "feedback", str(device.dir), "--data",
                        str(tmp_path / "good.npz"))
    assert code == 2 and "move it away" in err and history.read_text() == "[1, 2"


def test_a_bundle_without_a_sketch_cannot_be_monitored(
        served_repo: tuple[Repo, Path], cnn_dir: Path, tmp_path: Path) -> None:
    r, golden = served_repo
    main(["publish", str(cnn_dir / "model.onnx"), "--repo", str(r.dir), "--keys", str(r.keys),
          "--name", "plain", "--version", "1.0.0", "--golden", str(golden), "--no-monitor"])
    dev = Device.init(tmp_path / "d", trusted_root=r.root)
    dev.update(r.url, "plain")
    with pytest.raises(UsageError, match=r"ships no monitor\.json"):
        Monitor.for_device(dev.dir)
    with pytest.raises(UsageError, match="not a device state folder"):
        Monitor.for_device(tmp_path)


def _fragile_on_noise(cnn: Path, golden: Dataset, out: Path) -> Path:
    """The CNN, except that it answers all-zero logits (no idea) for any input whose mean
    absolute value is beyond 95% of the golden set's: about as good on the golden set
    (its own floor is set from it), useless on noisy inputs."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    limit = float(np.quantile(np.abs(golden.inputs["x"]).mean(1), 0.95))
    m = onnx.load(cnn)
    g = m.graph
    logits = g.output[0].name
    inner = logits + "_inner"
    for node in g.node:
        node.output[:] = [inner if o == logits else o for o in node.output]
    g.initializer.extend([numpy_helper.from_array(np.array([1], np.int64), "mon_axes"),
                          numpy_helper.from_array(np.array(limit, np.float32), "mon_limit"),
                          numpy_helper.from_array(np.array(0.0, np.float32), "mon_zero")])
    g.node.extend([
        helper.make_node("Abs", [g.input[0].name], ["mon_abs"]),
        helper.make_node("ReduceMean", ["mon_abs", "mon_axes"], ["mon_mean"], keepdims=1),
        helper.make_node("Greater", ["mon_mean", "mon_limit"], ["mon_far"]),
        helper.make_node("Where", ["mon_far", "mon_zero", inner], [logits])])
    assert g.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    onnx.save(m, out)
    return out


def test_a_drifted_device_checks_a_candidate_on_its_recent_inputs(
        served_repo: tuple[Repo, Path], cnn_dir: Path, tmp_path: Path) -> None:
    r, golden_npz = served_repo
    golden = load_builtin("mnist1d", "test")
    dev = Device.init(tmp_path / "dev", trusted_root=r.root, golden=golden_npz)
    assert dev.update(r.url, "cnn").installed
    path, _ = dev.active()  # type: ignore[misc]
    sess = session(path, threads=1)
    noisy = _noisy(load_builtin("mnist1d", "val"), 4, 0.8).inputs["x"]
    with Monitor.for_device(dev.dir) as mon:
        for _ in range(6):          # 3,000 calls: 1,000 watched
            for i in range(len(noisy)):
                mon.observe({"x": noisy[i:i + 1]}, run(sess, {"x": noisy[i:i + 1]}))
    assert mon.drifted and (dev.dir / "monitor" / "recent.npz").is_file()
    fragile = _fragile_on_noise(cnn_dir / "model.onnx", golden, tmp_path / "fragile.onnx")
    main(["publish", str(fragile), "--repo", str(r.dir), "--keys", str(r.keys),
          "--name", "cnn", "--version", "1.1.0", "--golden", str(golden_npz)])
    with pytest.raises(VerificationError, match=r"the device is drifted, and on its \d+ recent"):
        dev.update(r.url, "cnn")
    assert dev.active()[1].version == "1.0.0"  # type: ignore[index]
    # the same model republished passes, and the history says it was checked
    main(["publish", str(cnn_dir / "model.onnx"), "--repo", str(r.dir), "--keys",
          str(r.keys), "--name", "cnn", "--version", "1.2.0", "--golden", str(golden_npz)])
    result = dev.update(r.url, "cnn")
    assert result.installed and re.search(r"checked on the drifted device's \d+ recent inputs",
                                          result.reason)
