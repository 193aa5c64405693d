"""Offloading: the server (real uvicorn on 127.0.0.1, real onnxruntime) against the model
run locally as the oracle, dynamic batching, the device client's privacy, budget and
circuit breaker, a server killed and restarted, and bad requests answered 4xx."""

from __future__ import annotations

import json
import re
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from edgeloop.cli import main
from edgeloop.device.offload import OffloadClient, OffloadPolicy
from edgeloop.errors import DataError, UsageError
from edgeloop.serve.loadgen import ServerProcess, drive
from edgeloop.serve.offload import OffloadServer, ServerConfig, running

W = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
JSON = {"content-type": "application/json"}


def two_input_model(path: Path) -> Path:
    """``y = (x * float(mask)) @ W``: a float input and an int64 input, free batch axis."""
    g = helper.make_graph(
        [helper.make_node("Cast", ["mask"], ["mf"], to=TensorProto.FLOAT),
         helper.make_node("Mul", ["x", "mf"], ["xm"]),
         helper.make_node("MatMul", ["xm", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8]),
         helper.make_tensor_value_info("mask", TensorProto.INT64, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(W, "w")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 9
    onnx.save(m, path)
    return path


def feed(seed: int, rows: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((rows, 8)).astype(np.float32),
            "mask": rng.integers(0, 2, (rows, 8)).astype(np.int64)}


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return two_input_model(tmp_path_factory.mktemp("offload") / "two.onnx")


@pytest.fixture(scope="module")
def oracle(model: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])


def local(oracle: ort.InferenceSession, f: dict[str, np.ndarray]) -> np.ndarray:
    return oracle.run(None, f)[0]


@pytest.fixture(scope="module")
def server(model: Path) -> Iterator[tuple[str, OffloadServer]]:
    """A batching server (small body limit, for the size tests) in a thread."""
    srv = OffloadServer(model, config=ServerConfig(max_batch=32, max_queue_delay_ms=2,
                                                   max_body_bytes=64_000))
    with running(srv) as url:
        yield url, srv


def assert_serves(url: str, oracle: ort.InferenceSession) -> None:
    with OffloadClient(OffloadPolicy(url=url)) as c:
        r = c.predict(feed(99), "public")
    assert r.offloaded, r.reason
    np.testing.assert_array_equal(r.outputs[0], local(oracle, feed(99)))


@pytest.mark.parametrize("encoding", ["json", "npz"])
def test_outputs_equal_the_local_model(server, oracle, encoding: str) -> None:
    url, _ = server
    with OffloadClient(OffloadPolicy(url=url, encoding=encoding)) as c:
        for seed, rows in ((1, 1), (2, 5), (3, 40)):
            r = c.predict(feed(seed, rows), "public")
            assert r.offloaded and r.reason is None
            assert r.outputs[0].dtype == np.float32 and r.outputs[0].shape == (rows, 4)
            np.testing.assert_array_equal(r.outputs[0], local(oracle, feed(seed, rows)))
    assert httpx.get(f"{url}/v1/health").json()["inputs"][1] == {
        "name": "mask", "dtype": "int64", "shape": ["N", 8]}


def test_an_answer_is_not_held_back_by_nagle(server) -> None:
    """A response's head and body are written separately; without TCP_NODELAY the body
    waited for the client's delayed ACK (40 ms on Linux loopback)."""
    import time

    url, _ = server
    with httpx.Client() as c:
        times = []
        for _ in range(15):
            t0 = time.perf_counter()
            assert c.get(f"{url}/v1/health").status_code == 200
            times.append(time.perf_counter() - t0)
    assert np.median(times) < 0.02, times


def _concurrent(url: str, n: int, oracle: ort.InferenceSession) -> list[int]:
    """``n`` devices (own client each) send distinct inputs at once; every answer must be
    the oracle's for that device's own input. Returns the batch sizes reported."""
    barrier = threading.Barrier(n)
    clients = [OffloadClient(OffloadPolicy(url=url, timeout_s=10)) for _ in range(n)]
    results: list[object] = [None] * n

    def one(i: int) -> None:
        barrier.wait()
        results[i] = clients[i].predict(feed(1000 + i), "public")

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    for c in clients:
        c.close()
    for i, r in enumerate(results):
        assert r is not None and r.offloaded, getattr(r, "reason", None)
        np.testing.assert_array_equal(r.outputs[0], local(oracle, feed(1000 + i)))
    return [r.batch_size for r in results]


@pytest.mark.parametrize("max_batch", [32, 1])
def test_dynamic_batching_batches_and_routes_answers(model, oracle, max_batch: int) -> None:
    srv = OffloadServer(model, config=ServerConfig(max_batch=max_batch,
                                                   max_queue_delay_ms=50))
    with running(srv) as url:
        sizes = _concurrent(url, 16, oracle)
        stats = httpx.get(f"{url}/v1/stats").json()
    assert stats["requests"] == 16 and stats["errors"] == 0
    if max_batch == 1:
        assert stats["mean_batch_size"] == 1.0 and stats["batches"] == 16
        assert set(sizes) == {1}
    else:
        assert stats["mean_batch_size"] > 1 and stats["batches"] < 16
        assert max(sizes) > 1
    assert stats["queue_delay_p99_ms"] is not None


def test_request_larger_than_max_batch_runs_alone(model, oracle) -> None:
    srv = OffloadServer(model, config=ServerConfig(max_batch=4, max_queue_delay_ms=1))
    with running(srv) as url, OffloadClient(OffloadPolicy(url=url)) as c:
        r = c.predict(feed(5, rows=10), "public")
    assert r.offloaded and r.batch_size == 10
    np.testing.assert_array_equal(r.outputs[0], local(oracle, feed(5, rows=10)))


def test_privacy_class_refused_sends_nothing(server) -> None:
    url, srv = server
    before = srv.stats.requests + srv.stats.rejected
    with OffloadClient(OffloadPolicy(url=url, privacy_classes=["public", "aggregate"])) as c:
        r = c.predict(feed(1), "private")
        assert not r.offloaded and r.reason == "privacy" and r.outputs is None
        assert c.predict(feed(1), "aggregate").offloaded
    assert srv.stats.requests + srv.stats.rejected == before + 1


def test_budget_is_a_sliding_hour(server) -> None:
    url, _ = server
    now = [0.0]
    with OffloadClient(OffloadPolicy(url=url, budget_per_hour=3), clock=lambda: now[0]) as c:
        for t in (0.0, 1000.0, 2000.0):
            now[0] = t
            assert c.predict(feed(1), "public").offloaded
        now[0] = 3599.0
        assert c.predict(feed(1), "public").reason == "budget"
        now[0] = 3600.5                       # the request of t=0 has left the window
        assert c.predict(feed(1), "public").offloaded
        assert c.predict(feed(1), "public").reason == "budget"
    with OffloadClient(OffloadPolicy(url=url, budget_per_hour=0)) as c:
        assert c.predict(feed(1), "public").reason == "budget"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_circuit_opens_and_backs_off_exponentially() -> None:
    now = [0.0]
    policy = OffloadPolicy(url=f"http://127.0.0.1:{_closed_port()}", failures_to_open=2,
                           backoff_s=1.0, max_backoff_s=3.0)
    with OffloadClient(policy, clock=lambda: now[0]) as c:
        first = c.predict(feed(1), "public")
        assert first.reason.startswith("unreachable") and not c.circuit_open
        c.predict(feed(1), "public")
        assert c.circuit_open
        # open for 1 s, then one probe; each failed probe doubles the wait, up to 3 s
        for opened_at, wait in ((0.0, 1.0), (1.0, 2.0), (3.0, 3.0), (6.0, 3.0)):
            now[0] = opened_at + wait - 0.01
            assert c.predict(feed(1), "public").reason == "circuit open"
            now[0] = opened_at + wait
            assert c.predict(feed(1), "public").reason.startswith("unreachable")
        assert c.predict(feed(1), "public").reason == "circuit open"


def test_server_killed_then_restarted(model, oracle) -> None:
    """Killed mid-run: every call returns a local-fallback reason, none raises; restarted
    on the same port: offload resumes once the backoff has passed."""
    with ServerProcess(model, max_queue_delay_ms=1) as proc:
        policy = OffloadPolicy(url=proc.url, timeout_s=2, failures_to_open=2, backoff_s=0.2,
                               max_backoff_s=0.4)
        with OffloadClient(policy) as c:
            assert c.predict(feed(1), "public").offloaded
            proc.kill()
            reasons = [c.predict(feed(1), "public").reason for _ in range(6)]
            assert all(r is not None for r in reasons)
            assert {r.split(":")[0] for r in reasons} <= {"unreachable", "timeout",
                                                          "circuit open"}
            assert "circuit open" in reasons
            proc.start()                                  # same port
            for _ in range(200):
                r = c.predict(feed(2), "public")
                if r.offloaded:
                    break
                threading.Event().wait(0.02)
            assert r.offloaded, r.reason
            np.testing.assert_array_equal(r.outputs[0], local(oracle, feed(2)))


def test_load_generator_survives_a_kill(model, oracle) -> None:
    """The benchmark's driver: 8 devices, the server killed at 0.8 s and started again at
    1.2 s; no request fails (local answers cover the gap) and offload resumes soon after
    the server is back."""
    with ServerProcess(model, max_queue_delay_ms=2) as proc:
        policy = OffloadPolicy(url=proc.url, timeout_s=2, failures_to_open=1, backoff_s=0.1,
                               max_backoff_s=0.2)
        report = drive(policy, [feed(i) for i in range(16)], clients=8, seconds=3.0,
                       local=lambda f: local(oracle, dict(f)),
                       events=[(0.8, proc.kill), (1.2, proc.start)],
                       until_after_events_s=1.5)
    assert report.failed == 0 and report.answers > 0
    back = report.events[1][1]
    assert report.offloaded_between(0, 0.8) > 0 and report.offloaded_between(back, 1e9) > 0
    assert report.resumed_after(back) < 1.0
    assert report.local > 0 and set(report.reasons) <= {"unreachable", "timeout",
                                                        "circuit open"}
    assert report.p99_ms >= report.p50_ms > 0


class _Recorder:
    """ASGI middleware that records what reaches the server and sets a tracking cookie."""

    def __init__(self, app: object) -> None:
        self.app = app
        self.seen: list[tuple[list[str], dict[str, str], bytes]] = []

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        body = b""

        async def recv():
            nonlocal body
            message = await receive()
            body += message.get("body", b"")
            return message

        async def send_with_cookie(message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message["headers"], (b"set-cookie", b"device=tracked")]
            await send(message)

        await self.app(scope, recv, send_with_cookie)
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        self.seen.append((sorted(headers), headers, body))
        return None


def test_only_the_model_input_leaves_the_device(model) -> None:
    srv = OffloadServer(model, config=ServerConfig(max_batch=1))
    recorder = _Recorder(srv.app)
    srv.app = recorder
    f = feed(7, rows=2)
    with running(srv) as url:
        with OffloadClient(OffloadPolicy(url=url)) as c:
            assert c.predict(f, "public").offloaded
            assert c.predict(f, "public").offloaded          # after the server's cookie
        with OffloadClient(OffloadPolicy(url=url, encoding="npz")) as c:
            assert c.predict(f, "public").offloaded
    for names, headers, _ in recorder.seen:
        assert names == ["content-length", "content-type", "host"], headers
    _, headers, body = recorder.seen[0]
    assert headers["content-type"] == "application/json"
    assert json.loads(body) == {"inputs": {k: v.tolist() for k, v in f.items()}}
    assert b"public" not in body


GOOD = {"x": [[0.5] * 8], "mask": [[1] * 8]}


def _body(**inputs: object) -> bytes:
    return json.dumps({"inputs": {**GOOD, **inputs}}).encode()


def _npz(**arrays: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


BAD = {
    "malformed JSON": (b'{"inputs": {"x": [[1, 2', JSON, 400),
    "not an object": (b"[1, 2, 3]", JSON, 400),
    "no inputs key": (b'{"x": [[1]]}', JSON, 400),
    "not UTF-8": (b'{"inputs": "\xff\xfe"}', JSON, 400),
    "deeply nested": (b"[" * 20_000 + b"]" * 20_000, JSON, 400),
    "wrong content type": (_body(), {"content-type": "text/plain"}, 415),
    "no content type": (_body(), {}, 415),
    "missing input": (json.dumps({"inputs": {"x": GOOD["x"]}}).encode(), JSON, 422),
    "unexpected input": (_body(extra=[[1]]), JSON, 422),
    "wrong shape": (_body(x=[[0.5] * 7]), JSON, 422),
    "wrong rank": (_body(x=[0.5] * 8), JSON, 422),
    "scalar": (_body(x=3.0), JSON, 422),
    "ragged": (_body(x=[[0.5] * 8, [0.5] * 7]), JSON, 422),
    "strings": (_body(x=[["a"] * 8]), JSON, 422),
    "nulls": (_body(x=[[None] * 8]), JSON, 422),
    "objects": (_body(x=[[{}] * 8]), JSON, 422),
    "booleans for floats": (_body(x=[[True] * 8]), JSON, 422),
    "floats for int64": (_body(mask=[[0.5] * 8]), JSON, 422),
    "int64 overflow": (_body(mask=[[2**70] * 8]), JSON, 422),
    "NaN": (_body(x=[[float("nan")] * 8]), JSON, 422),
    "Infinity": (_body(x=[[float("inf")] * 8]), JSON, 422),
    "beyond float32": (_body(x=[[1e300] * 8]), JSON, 422),
    "empty array": (_body(x=[], mask=[]), JSON, 422),
    "zero samples": (_body(x=np.zeros((0, 8)).tolist()), JSON, 422),
    "samples disagree": (_body(mask=[[1] * 8, [1] * 8]), JSON, 422),
    "huge body": (_body(x=[[0.5] * 8] * 5000, mask=[[1] * 8] * 5000), JSON, 413),
    "not an npz": (b"PK\x03\x04 not really", {"content-type": "application/x-npz"}, 400),
    "pickled npz": (_npz(x=np.array([[object()]], dtype=object), mask=np.ones((1, 8))),
                    {"content-type": "application/x-npz"}, 400),
    "npz float64 NaN": (_npz(x=np.full((1, 8), np.nan), mask=np.ones((1, 8), np.int64)),
                        {"content-type": "application/x-npz"}, 422),
    "npz zip bomb": (_npz(x=np.zeros((1, 8), np.float32),
                          mask=np.zeros((20_000, 8), np.int64)),
                     {"content-type": "application/x-npz"}, 413),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_requests_are_4xx_with_one_line(server, oracle, case: str) -> None:
    url, _ = server
    body, headers, status = BAD[case]
    r = httpx.post(f"{url}/v1/predict", content=body, headers=headers)
    assert r.status_code == status, r.text
    message = r.json()["error"]
    assert message and "\n" not in message and len(message) < 400
    assert_serves(url, oracle)


def test_malformed_input_is_rejected_not_counted_against_the_server(server, oracle) -> None:
    url, _ = server
    with OffloadClient(OffloadPolicy(url=url, failures_to_open=1)) as c:
        bad = {"x": np.full((1, 8), np.nan, np.float32), "mask": np.ones((1, 8), np.int64)}
        r = c.predict(bad, "public")
        assert r.reason.startswith("rejected 422: input 'x' holds NaN")
        assert not c.circuit_open
        assert c.predict(feed(3), "public").offloaded


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=5), inner,
                                                                 max_size=4),
    max_leaves=40)
arrays = st.lists(st.lists(st.one_of(st.integers(-3, 3), st.floats(width=32)), min_size=0,
                           max_size=9), min_size=0, max_size=3)


@settings(max_examples=50, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=json_values | st.fixed_dictionaries({"inputs": st.dictionaries(
    st.sampled_from(["x", "mask", "y"]), json_values | arrays, max_size=3)}))
def test_fuzzed_json_never_breaks_the_server(server, doc: object) -> None:
    url, _ = server
    r = httpx.post(f"{url}/v1/predict", content=json.dumps(doc).encode(), headers=JSON)
    assert r.status_code in (200, 400, 413, 415, 422), r.text
    if r.status_code != 200:
        assert "\n" not in r.json()["error"]
    assert httpx.get(f"{url}/v1/health").status_code == 200


@settings(max_examples=50, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(x=arrays, mask=arrays)
def test_fuzzed_inputs_are_answered_exactly_or_refused(server, oracle, x, mask) -> None:
    url, _ = server
    r = httpx.post(f"{url}/v1/predict", content=json.dumps(
        {"inputs": {"x": x, "mask": mask}}).encode(), headers=JSON)
    assert r.status_code in (200, 422), r.text
    if r.status_code == 200:
        f = {"x": np.asarray(x, np.float32), "mask": np.asarray(mask, np.int64)}
        np.testing.assert_array_equal(np.asarray(r.json()["outputs"][0], np.float32),
                                      local(oracle, f))


@settings(max_examples=50, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.binary(max_size=300), ctype=st.sampled_from(
    ["application/json", "application/x-npz", "application/x-npz; q=1", ""]))
def test_fuzzed_bytes_never_break_the_server(server, body: bytes, ctype: str) -> None:
    url, _ = server
    r = httpx.post(f"{url}/v1/predict", content=body, headers={"content-type": ctype})
    assert r.status_code in (400, 413, 415, 422), r.text


@pytest.mark.parametrize(("d", "message"), [
    ({"url": "http://h", "timeout": 1}, "offload policy has no key 'timeout'"),
    ({"timeout_s": 1}, "`url` is required"),
    ({"url": "ftp://h"}, "`url` must start with http://"),
    ({"url": "http://h", "timeout_s": "fast"}, "`timeout_s` must be a positive number"),
    ({"url": "http://h", "budget_per_hour": -1}, "`budget_per_hour` must be an integer >= 0"),
    ({"url": "http://h", "failures_to_open": 0}, "`failures_to_open` must be an integer >= 1"),
    ({"url": "http://h", "backoff_s": 5, "max_backoff_s": 1}, "`max_backoff_s` (1) must be"),
    ({"url": "http://h", "privacy_classes": "public"}, "`privacy_classes` must be a list"),
    ({"url": "http://h", "encoding": "xml"}, "encoding` must be one of json, npz; got 'xml'"),
])
def test_policy_errors_name_the_key(d: dict[str, object], message: str) -> None:
    with pytest.raises(UsageError) as e:
        OffloadPolicy.from_dict(d)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_policy_from_dict_reads_a_table() -> None:
    p = OffloadPolicy.from_dict({"url": "https://edge.example:8443", "timeout_s": 0.5,
                                 "privacy_classes": ["public"], "budget_per_hour": 100})
    assert p.privacy_classes == ("public",) and p.timeout_s == 0.5


def test_cli_errors_are_one_line(tmp_path: Path, model: Path, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["offload-server", str(tmp_path / "none.onnx"), "--port", "0"])
    assert e.value.code == 2
    assert "does not exist" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(SystemExit) as e:
            main(["offload-server", str(model), "--port", str(taken.getsockname()[1])])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "cannot listen on 127.0.0.1:" in err and err.count("\n") == 1


def test_a_feed_that_is_not_numbers_raises_and_leaves_the_circuit_usable(server) -> None:
    url, _ = server
    now = [0.0]
    with OffloadClient(OffloadPolicy(url=url, failures_to_open=1), clock=lambda: now[0]) as c:
        with pytest.raises(DataError, match="input 'x' is <U1, not numbers"):
            c.predict({"x": np.array([["a"] * 8]), "mask": np.ones((1, 8), np.int64)},
                      "public")
        assert not c.circuit_open and c.predict(feed(4), "public").offloaded


def lookup_model(path: Path, *, batch: int | str = "N") -> Path:
    """``y = table[idx]``: onnxruntime fails on an index past the table's 10 rows, an
    input the server cannot validate (a model error, not a malformed request)."""
    table = np.arange(40, dtype=np.float32).reshape(10, 4)
    g = helper.make_graph(
        [helper.make_node("Gather", ["table", "idx"], ["y"])], "g",
        [helper.make_tensor_value_info("idx", TensorProto.INT64, [batch])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 4])],
        [numpy_helper.from_array(table, "table")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 9
    onnx.save(m, path)
    return path


def _at_once(url: str, bodies: list[dict[str, object]]) -> list[httpx.Response]:
    barrier = threading.Barrier(len(bodies))
    out: list[httpx.Response | None] = [None] * len(bodies)

    def one(i: int) -> None:
        with httpx.Client(timeout=10) as c:
            barrier.wait()
            out[i] = c.post(f"{url}/v1/predict", json={"inputs": bodies[i]})

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return out


def test_a_request_that_breaks_its_batch_is_refused_alone(tmp_path: Path) -> None:
    srv = OffloadServer(lookup_model(tmp_path / "lookup.onnx"),
                        config=ServerConfig(max_batch=32, max_queue_delay_ms=100))
    idx = [[3], [7], [50], [1], [9], [0]]              # 50 is past the table
    with running(srv) as url:
        answers = _at_once(url, [{"idx": i} for i in idx])
        stats = httpx.get(f"{url}/v1/stats").json()
        assert httpx.post(f"{url}/v1/predict", json={"inputs": {"idx": [2]}}).status_code == 200
    for i, r in zip(idx, answers, strict=True):
        if i == [50]:
            assert r.status_code == 422 and r.json()["error"].startswith("inference failed")
        else:
            assert r.status_code == 200, r.text
            assert r.json()["outputs"][0] == [[4.0 * i[0] + k for k in range(4)]]
    assert stats["errors"] == 1 and stats["requests"] == 5


def test_a_model_without_a_free_batch_axis_is_never_batched(tmp_path: Path) -> None:
    srv = OffloadServer(lookup_model(tmp_path / "fixed.onnx", batch=1),
                        config=ServerConfig(max_batch=32, max_queue_delay_ms=50))
    with running(srv) as url:
        assert httpx.get(f"{url}/v1/health").json()["max_batch"] == 1
        answers = _at_once(url, [{"idx": [i]} for i in range(6)])
        assert all(r.status_code == 200 and r.json()["batch_size"] == 1 for r in answers)
        two = httpx.post(f"{url}/v1/predict", json={"inputs": {"idx": [1, 2]}})
    assert two.status_code == 422 and "expects (1,)" in two.json()["error"]


def test_a_chunked_body_is_cut_off_at_the_limit(server, oracle) -> None:
    url, _ = server
    chunks = (b" " * 10_000 for _ in range(100))           # no Content-Length: chunked
    r = httpx.post(f"{url}/v1/predict", content=chunks, headers=JSON)
    assert r.status_code == 413 and "exceeds the limit" in r.json()["error"]
    assert_serves(url, oracle)


_WITHOUT_SERVE = """
import sys

class Refuse:
    def find_spec(self, name, path=None, target=None):
        top = name.split(".")[0]
        if top in ("fastapi", "uvicorn", "starlette"):
            raise ModuleNotFoundError(f"No module named {top!r}", name=top)
        return None

sys.meta_path.insert(0, Refuse())
from edgeloop.cli import main
main(sys.argv[1:])
"""


def test_without_the_serve_extra_the_command_names_it(model: Path) -> None:
    import subprocess
    import sys

    src = Path(__file__).resolve().parent.parent / "src"
    help_ = subprocess.run([sys.executable, "-c", _WITHOUT_SERVE, "offload-server", "--help"],
                           capture_output=True, text=True, timeout=60, check=False,
                           env={"PYTHONPATH": str(src), "COLUMNS": "100"})
    assert help_.returncode == 0 and "--max-queue-delay-ms" in help_.stdout
    proc = subprocess.run([sys.executable, "-c", _WITHOUT_SERVE, "offload-server", str(model),
                           "--port", "0"], capture_output=True, text=True, timeout=60,
                          check=False, env={"PYTHONPATH": str(src), "COLUMNS": "200"})
    assert proc.returncode == 2
    [line] = proc.stderr.strip().splitlines()
    assert re.fullmatch(r"error: this command needs `(fastapi|uvicorn)`, which is not "
                        r"installed; install it with pip install 'edgeloop\[serve\]'", line)


def test_a_full_queue_answers_503_and_the_server_recovers(model) -> None:
    srv = OffloadServer(model, config=ServerConfig(max_batch=32, max_queue_delay_ms=300,
                                                   max_queue=2))
    body = {k: v.tolist() for k, v in feed(1).items()}
    with running(srv) as url:
        codes = sorted(r.status_code for r in _at_once(url, [body] * 4))
        assert codes == [200, 200, 503, 503]
        r = httpx.post(f"{url}/v1/predict", json={"inputs": body})
        assert r.status_code == 200
    assert srv.stats.rejected == 2


def test_half_open_lets_exactly_one_probe_through() -> None:
    from edgeloop.device.offload import _Circuit

    c = _Circuit(OffloadPolicy(url="http://h", failures_to_open=1, backoff_s=1.0))
    assert c.allow(0.0)
    c.failure(0.0)                      # opens until t=1
    assert not c.allow(0.5)
    assert c.allow(1.0)                 # the probe
    assert not c.allow(1.0) and not c.allow(5.0)   # others wait while it is out
    c.release()                         # the probe's input was refused: no verdict
    assert c.allow(5.0)
    c.success()
    assert c.allow(5.0) and c.allow(5.0) and c.open_until is None
