"""The runtime with offload and micro-batching: a cascade of two tiny classifiers served
from files, a real offload server (uvicorn on 127.0.0.1) running a third model, and the
models run directly in onnxruntime as the oracles."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from test_bundle_fixtures import CLASSES, FEATURES, X, matmul_model
from test_cli import cli

from edgeloop.data import Dataset, save_npz
from edgeloop.device import Cascade, OffloadRule, Policy, Runtime, Stage
from edgeloop.device import runtime as runtime_module
from edgeloop.device.calibration import confidence, softmax
from edgeloop.device.offload import OffloadPolicy
from edgeloop.errors import UsageError
from edgeloop.serve.offload import OffloadServer, ServerConfig, running

_RNG = np.random.default_rng(7)
W = {name: _RNG.normal(size=(FEATURES, CLASSES)).astype(np.float32)
     for name in ("small", "large", "server")}
N = 40


def _direct(path: Path, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """small/large (the cascade, its threshold the median confidence of the small model
    on X[:N], so about half the samples reach the large one), server, and cascade.json."""
    root = tmp_path_factory.mktemp("offload-cascade")
    paths = {name: matmul_model(root / f"{name}.onnx", w) for name, w in W.items()}
    conf = confidence(softmax(_direct(paths["small"], X[:N]), 1.0), "max-softmax")
    stages = (Stage(name="small", model="small.onnx", threshold=float(np.median(conf))),
              Stage(name="large", model="large.onnx"))
    paths["cascade"] = root / "cascade.json"
    paths["cascade"].write_text(Cascade(stages=stages).to_json())
    paths["three"] = matmul_model(root / "three.onnx", W["server"][:, :3])
    return paths


@pytest.fixture(scope="module")
def server(models: dict[str, Path]) -> Iterator[tuple[str, OffloadServer]]:
    srv = OffloadServer(models["server"], config=ServerConfig(max_batch=1))
    with running(srv) as url:
        yield url, srv


def _rule(url: str, **kw: object) -> dict[str, object]:
    return {"url": url, "privacy_class": "public", **kw}


def _local_cascade(models: dict[str, Path]) -> tuple[np.ndarray, np.ndarray]:
    """What the cascade answers locally for X[:N], sample by sample: output, stage index."""
    rt = Runtime(None, Policy(cascade=models["cascade"]))
    answers = [rt.predict({"x": X[i:i + 1]}) for i in range(N)]
    return (np.concatenate([a.output for a in answers]),
            np.array([rt.stages().index(a.stage) for a in answers]))


def test_when_unsure_offloads_what_would_reach_the_last_stage(models, server) -> None:
    url, _ = server
    want_server = _direct(models["server"], X[:N])
    small = _direct(models["small"], X[:N])
    _, stage = _local_cascade(models)
    unsure = stage == 1
    assert 5 < unsure.sum() < N - 5
    with Runtime(None, Policy(cascade=models["cascade"], offload=_rule(url))) as rt:
        answers = [rt.predict({"x": X[i:i + 1]}) for i in range(N)]
        for a, u, srv_out, small_out in zip(answers, unsure, want_server, small, strict=True):
            assert a.offloaded == u and a.offload_reason is None
            if u:     # the server model's own output, exactly
                assert a.stage == "offload" and a.confidence is None
                np.testing.assert_array_equal(a.output[0], srv_out)
            else:
                assert a.stage == "small"
                np.testing.assert_allclose(a.output[0], small_out, rtol=1e-6, atol=1e-6)
        # a batch: only its unsure rows go out, in one request
        b = rt.predict({"x": X[:N]})
        assert b.offloaded and b.stage == "offload"
        np.testing.assert_array_equal(b.output[unsure], want_server[unsure])
        np.testing.assert_allclose(b.output[~unsure], small[~unsure], rtol=1e-6, atol=1e-6)
        s = rt.stats.to_dict()
        assert s["offloaded"] == unsure.sum() + 1 and s["errors"] == 0
        assert s["answered"] == {"offload": unsure.sum() + 1, "small": N - unsure.sum()}
    # min_confidence: only last-stage answers below it go out (0: none)
    with Runtime(None, Policy(cascade=models["cascade"],
                              offload=_rule(url, min_confidence=0.0))) as rt:
        a = rt.predict({"x": X[int(np.argmax(unsure)):][:1]})
        assert a.stage == "large" and not a.offloaded and a.offload_reason is None


def test_always_offloads_and_answers_the_server_models_output(models, server) -> None:
    url, _ = server
    want = _direct(models["server"], X[:N])
    with Runtime(None, Policy(cascade=models["cascade"], offload=_rule(url, mode="always"))
                 ) as rt:
        for i in range(0, N, 4):
            a = rt.predict({"x": X[i:i + 4]})
            assert a.offloaded and a.stage == "offload" and a.confidence is None
            np.testing.assert_array_equal(a.output, want[i:i + 4])


def test_with_the_server_stopped_every_call_answers_locally(models) -> None:
    srv = OffloadServer(models["server"], config=ServerConfig(max_batch=1))
    with running(srv) as url:
        pass                                   # started, then stopped: nothing listens
    local, _ = _local_cascade(models)
    rule = _rule(url, mode="always", timeout_s=0.5, failures_to_open=2, backoff_s=60.0)
    reasons = []
    with Runtime(None, Policy(cascade=models["cascade"], offload=rule)) as rt:
        for i in range(N):                     # any exception here fails the test
            a = rt.predict({"x": X[i:i + 1]})
            assert not a.offloaded and a.stage in ("small", "large")
            np.testing.assert_allclose(a.output[0], local[i], rtol=1e-6, atol=1e-6)
            reasons.append(a.offload_reason)
        assert rt.stats.to_dict()["kept_local"] == {"unreachable": 2, "circuit open": N - 2}
    assert all(r.startswith("unreachable") for r in reasons[:2])
    assert set(reasons[2:]) == {"circuit open"}


def test_a_refused_privacy_class_stays_local(models, server) -> None:
    url, srv = server
    before = srv.stats.requests + srv.stats.rejected
    rule = {"url": url, "mode": "always"}                 # default class: private
    with Runtime(None, Policy(cascade=models["cascade"], offload=rule)) as rt:
        a = rt.predict({"x": X[:1]})
        assert not a.offloaded and a.offload_reason == "privacy"
        assert srv.stats.requests + srv.stats.rejected == before
        # only the model input leaves (the server refuses unexpected inputs with a 422)
        a = rt.predict({"x": X[:1], "user_id": np.array([42])}, privacy_class="public")
        assert a.offloaded, a.offload_reason
        assert rt.predict({"x": X[:1]}, privacy_class="secret").offload_reason == "privacy"
    assert srv.stats.requests + srv.stats.rejected == before + 1


def test_a_server_answer_that_does_not_fit_is_refused(models) -> None:
    srv = OffloadServer(models["three"], config=ServerConfig(max_batch=1))   # 3 classes
    local, _ = _local_cascade(models)
    with running(srv) as url, Runtime(None, Policy(
            cascade=models["cascade"], offload=_rule(url))) as rt:
        for i in range(N):
            a = rt.predict({"x": X[i:i + 1]})
            assert not a.offloaded
            np.testing.assert_allclose(a.output[0], local[i], rtol=1e-6, atol=1e-6)
            if a.stage == "large":
                assert "the local model's is float32 (1, 4)" in a.offload_reason


@pytest.mark.parametrize("offload", [False, True])
def test_micro_batching_answers_each_caller_its_own(models, server, offload: bool) -> None:
    """16 callers at once: each gets what it gets alone, and calls shared batches."""
    url, _ = server
    n = 16
    want, stage = _local_cascade(models)
    if offload:
        want = np.where((stage == 1)[:, None], _direct(models["server"], X[:N]), want)
    policy = Policy(cascade=models["cascade"], max_batch=n, max_delay_ms=200,
                    offload=_rule(url) if offload else None)
    answers: list[object] = [None] * n
    barrier = threading.Barrier(n)

    def call(i: int) -> None:
        barrier.wait()
        answers[i] = rt.predict({"x": X[i:i + 1]})

    with Runtime(None, policy) as rt:
        # The first caller finds nobody in flight and runs alone; make that run slow, as
        # a larger model's would be, so the other callers are surely in flight meanwhile
        # however loaded the machine (else each may finish before the next arrives).
        first = rt._batchers["head" if offload else "all"]   # what every caller runs first
        alone = first.infer

        def slow_alone(arrays: object) -> object:
            time.sleep(0.3)
            return alone(arrays)

        first.infer = slow_alone
        threads = [threading.Thread(target=call, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        b = rt.batch_stats()
    for i, a in enumerate(answers):
        assert a is not None
        np.testing.assert_allclose(a.output[0], want[i], rtol=1e-6, atol=1e-6)
        assert a.offloaded == (offload and stage[i] == 1)
    assert b is not None and b["samples"] == n and b["batches"] < n
    assert b["mean_batch_size"] > 1


def test_offload_policy_in_toml(models, tmp_path: Path) -> None:
    p = tmp_path / "policy.toml"
    p.write_text(f'cascade = "{models["cascade"]}"\nmax_batch = 8\nmax_delay_ms = 1.5\n'
                 '[offload]\nmode = "when-unsure"\nmin_confidence = 0.9\n'
                 'privacy_class = "public"\nurl = "http://10.0.0.2:8080"\ntimeout_s = 0.25\n')
    policy = Policy.load(p)
    assert policy.max_batch == 8 and policy.max_delay_ms == 1.5
    assert policy.offload == OffloadRule(
        client=OffloadPolicy(url="http://10.0.0.2:8080", timeout_s=0.25), mode="when-unsure",
        min_confidence=0.9, privacy_class="public")
    for text, words in [
        ('[offload]\nurl = "http://a"\ntimeout = 1\n', "[offload] has no key 'timeout'; "
                                                       "keys: mode, min_confidence"),
        ('[offload]\nurl = "http://a"\nmode = "sometimes"\n',
         "`offload.mode` must be one of never, when-unsure, always; got 'sometimes'"),
        ('[offload]\nmode = "always"\n', "offload policy: `url` is required"),
        ('[offload]\nurl = "http://a"\nmode = "always"\nmin_confidence = 0.5\n',
         "`offload.min_confidence` applies to mode `when-unsure` only"),
        ('[offload]\nurl = "ftp://a"\n', "`url` must start with http:// or https://"),
        ('offload = "always"\n', "`offload` must be a table of keys; got str"),
        ("max_batch = 0\n", "`max_batch` must be an integer >= 1; got 0"),
        ("max_delay_ms = -1\n", "`max_delay_ms` must be a number >= 0"),
    ]:
        p.write_text(text)
        with pytest.raises(UsageError, match=words.replace("[", r"\[").replace("(", r"\(")
                           .replace(")", r"\)")) as e:
            Policy.load(p)
        assert str(p) in str(e.value) and "\n" not in str(e.value)


def test_device_run_with_offload(models, tmp_path: Path) -> None:
    data = tmp_path / "x.npz"
    save_npz(data, Dataset({"x": X[:N]}))
    _, stage = _local_cascade(models)
    policy = tmp_path / "policy.toml"
    srv = OffloadServer(models["server"], config=ServerConfig(max_batch=1))
    with running(srv) as url:
        policy.write_text(f'cascade = "{models["cascade"]}"\n[offload]\nurl = "{url}"\n'
                          'privacy_class = "public"\n')
        code, stdout, stderr = cli("device", "run", "--data", data, "--policy", policy)
        assert code == 0, stderr
        assert f"offload │ {(stage == 1).sum()} " in stdout, stdout
    # the server is gone: the same inputs are answered locally, and the summary says why
    code, stdout, stderr = cli("device", "run", "--data", data, "--policy", policy)
    assert code == 0, stderr
    assert "offload │ 0 " in stdout
    assert "offload wanted, answered locally: circuit open" in stdout


# --- when-unsure: the last stage waits for the server --------------------------------

@pytest.fixture
def stage_runs(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Samples each cascade stage ran on (by stage name), counted around the runtime's
    one call into onnxruntime per stage (runtimes made after the fixture)."""
    runs: dict[str, int] = {}
    real = runtime_module.runner

    def counting(sess: object, what: str = "inference") -> object:
        run, name = real(sess, what), what.removeprefix("stage ").strip("'")

        def counted(feed: dict[str, np.ndarray]) -> list[np.ndarray]:
            runs[name] = runs.get(name, 0) + len(next(iter(feed.values())))
            return run(feed)
        return counted

    monkeypatch.setattr(runtime_module, "runner", counting)
    return runs


def _stopped_url(model: Path) -> str:
    with running(OffloadServer(model, config=ServerConfig(max_batch=1))) as url:
        return url                             # started, then stopped: nothing listens


def test_when_unsure_the_last_stage_runs_only_without_an_answer(models, server,
                                                                stage_runs) -> None:
    """Server up: the large stage never runs, and exactly the unsure inputs go out.
    Server down (unreachable, then the circuit open): each unsure input runs the large
    stage once, after the small one, and gets its output (onnxruntime as the oracle)."""
    url, srv = server
    _, stage = _local_cascade(models)
    unsure = stage == 1
    small, large = _direct(models["small"], X[:N]), _direct(models["large"], X[:N])
    want_server = _direct(models["server"], X[:N])
    stage_runs.clear()
    sent = srv.stats.requests
    with Runtime(None, Policy(cascade=models["cascade"], offload=_rule(url))) as rt:
        for i in range(N):
            a = rt.predict({"x": X[i:i + 1]})
            assert a.offloaded == unsure[i]
            np.testing.assert_allclose(a.output[0], want_server[i] if unsure[i] else small[i],
                                       rtol=1e-6, atol=1e-6)
        b = rt.predict({"x": X[:N]})
        np.testing.assert_allclose(b.output, np.where(unsure[:, None], want_server, small),
                                   rtol=1e-6, atol=1e-6)
    assert stage_runs == {"small": 2 * N}
    assert srv.stats.requests - sent == unsure.sum() + 1

    stage_runs.clear()
    rule = _rule(_stopped_url(models["server"]), timeout_s=0.5, failures_to_open=2, backoff_s=60.0)
    with Runtime(None, Policy(cascade=models["cascade"], offload=rule)) as rt:
        answers = [rt.predict({"x": X[i:i + 1]}) for i in range(N)]
        b = rt.predict({"x": X[:N]})
    want = np.where(unsure[:, None], large, small)
    for a, u, w in zip(answers, unsure, want, strict=True):
        assert not a.offloaded and a.stage == ("large" if u else "small")
        assert (a.offload_reason is not None) == u
        np.testing.assert_allclose(a.output[0], w, rtol=1e-6, atol=1e-6)
    assert b.stage == "large" and b.offload_reason == "circuit open"
    np.testing.assert_allclose(b.output, want, rtol=1e-6, atol=1e-6)
    assert stage_runs == {"small": 2 * N, "large": 2 * unsure.sum()}
    assert {a.offload_reason.split(":")[0] for a in answers if a.offload_reason} == \
        {"unreachable", "circuit open"}


def test_when_unsure_with_no_stage_before_the_last_offloads_first(models, server,
                                                                  stage_runs) -> None:
    """Thresholds that leave the last stage alone: every input is one no earlier stage
    was sure about, so it goes out before anything runs here."""
    url, _ = server
    policy = Policy(cascade=models["cascade"], thresholds=[math.inf], offload=_rule(url))
    with Runtime(None, policy) as rt:
        a = rt.predict({"x": X[:N]})
    assert a.offloaded and a.stage == "offload" and stage_runs == {}
    np.testing.assert_array_equal(a.output, _direct(models["server"], X[:N]))
    rule = _rule(_stopped_url(models["server"]), timeout_s=0.5)
    with Runtime(None, Policy(cascade=models["cascade"], thresholds=[math.inf],
                              offload=rule)) as rt:
        a = rt.predict({"x": X[:N]})
    assert not a.offloaded and a.stage == "large" and stage_runs == {"large": N}
    np.testing.assert_allclose(a.output, _direct(models["large"], X[:N]), rtol=1e-6,
                               atol=1e-6)


def _segment(path: Path, w: np.ndarray, *, features: np.ndarray | None,
             inputs: str = "x") -> Path:
    """An early-exit segment: ``logits = inp @ w`` and, with ``features``, also
    ``feat = inp @ features`` for the next segment."""
    from onnx import TensorProto, helper, numpy_helper, save

    width = w.shape[0]
    nodes = [helper.make_node("MatMul", [inputs, "w"], ["logits"])]
    inits = [numpy_helper.from_array(w, "w")]
    outs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES])]
    if features is not None:
        nodes.append(helper.make_node("MatMul", [inputs, "f"], ["feat"]))
        inits.append(numpy_helper.from_array(features, "f"))
        outs.append(helper.make_tensor_value_info("feat", TensorProto.FLOAT,
                                                  ["N", features.shape[1]]))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(
        inputs, TensorProto.FLOAT, ["N", width])], outs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 9
    save(m, path)
    return path


def test_when_unsure_a_chained_last_stage_gets_its_features_on_fallback(
        tmp_path: Path, stage_runs) -> None:
    """An early-exit cascade: the last segment takes the first one's features, which
    wait beside the input while it is offloaded; with the server down it runs on them."""
    rng = np.random.default_rng(3)
    feat, w1, w2 = (rng.normal(size=s).astype(np.float32)
                    for s in ((FEATURES, 6), (FEATURES, CLASSES), (6, CLASSES)))
    _segment(tmp_path / "seg1.onnx", w1, features=feat)
    _segment(tmp_path / "seg2.onnx", w2, features=None, inputs="feat")
    conf = confidence(softmax(X[:N] @ w1, 1.0), "max-softmax")
    threshold = float(np.median(conf))
    (tmp_path / "cascade.json").write_text(Cascade(stages=(
        Stage(name="exit1", model="seg1.onnx", threshold=threshold),
        Stage(name="exit2", model="seg2.onnx", chained=True))).to_json())
    unsure = conf < threshold
    want = np.where(unsure[:, None], (X[:N] @ feat) @ w2, X[:N] @ w1)
    rule = _rule(_stopped_url(tmp_path / "seg2.onnx"), timeout_s=0.5, failures_to_open=1,
                 backoff_s=60.0)
    with Runtime(None, Policy(cascade=tmp_path / "cascade.json", offload=rule)) as rt:
        b = rt.predict({"x": X[:N]})
        ones = [rt.predict({"x": X[i:i + 1]}) for i in range(N)]
    np.testing.assert_allclose(b.output, want, rtol=1e-5, atol=1e-5)
    for a, w in zip(ones, want, strict=True):
        np.testing.assert_allclose(a.output[0], w, rtol=1e-5, atol=1e-5)
    assert stage_runs == {"exit1": 2 * N, "exit2": 2 * unsure.sum()}


def test_device_runtimes_under_load_fall_back_when_the_server_is_killed(models) -> None:
    """loadgen.drive(devices=): 6 device runtimes offloading `always`; the server is
    SIGKILLed and restarted mid-run; no request fails and offload resumes."""
    from edgeloop.serve.loadgen import ServerProcess, drive

    with ServerProcess(models["server"], max_queue_delay_ms=1) as proc:
        client = OffloadPolicy(url=proc.url, timeout_s=2, failures_to_open=1, backoff_s=0.1,
                               max_backoff_s=0.2)
        policy = Policy(cascade=models["cascade"],
                        offload=OffloadRule(client=client, mode="always",
                                            privacy_class="public"))
        report = drive(client, [{"x": X[i:i + 1]} for i in range(N)], clients=6,
                       seconds=2.5, devices=lambda: Runtime(None, policy),
                       events=[(0.8, proc.kill), (1.2, proc.start)],
                       until_after_events_s=1.0)
    assert report.failed == 0 and report.local > 0
    back = report.events[1][1]
    assert report.offloaded_between(0, 0.8) > 0 and report.offloaded_between(back, 1e9) > 0
    assert set(report.reasons) <= {"unreachable", "timeout", "circuit open"}
