"""The device's local HTTP API and `edgeloop device run`/`serve` on a real device folder
(a signed bundle installed from a repository over HTTP, on probation): answers against
the model run directly, micro-batching of concurrent requests, and fuzzed bad input that
is refused with one line, never crashes, and never counts against probation."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from test_bundle_fixtures import GOLDEN, W_GOOD, X, fragile_model, new_device, pass_probation, repo
from test_cli import cli

from edgeloop.bundle import Device
from edgeloop.bundle.health import HealthConfig
from edgeloop.data import Dataset, save_npz
from edgeloop.device import Policy, Runtime
from edgeloop.device.http import running
from edgeloop.errors import ModelError, UsageError

__all__ = ["repo"]

JSON = {"content-type": "application/json"}
NPZ = {"content-type": "application/x-npz"}
PROBATION = 100_000      # inferences: long enough that no test ends it
LIMIT = 64_000           # the test servers' body limit, bytes


@pytest.fixture
def device(repo) -> Device:
    """A device that installed kws 1.0.0 (``x @ W_GOOD``) and is on probation."""
    golden = repo.work / "golden.npz"
    save_npz(golden, GOLDEN)
    dev = Device.init(repo.work / "dev", trusted_root=repo.root, golden=golden,
                      config=HealthConfig(probation_inferences=PROBATION))
    dev.update(repo.url, "kws")
    assert dev.state().probation is not None
    return dev


def _probation(dev: Device) -> tuple[int, int]:
    p = Device(dev.dir, config=dev.config).state().probation
    assert p is not None
    return p.remaining, p.errors


def _npz(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _post(url: str, body: bytes, headers: dict[str, str]) -> httpx.Response:
    return httpx.post(f"{url}/v1/predict", content=body, headers=headers, timeout=10)


def test_device_api_answers_and_batches_concurrent_callers(device: Device) -> None:
    n = 8
    with Runtime(device, Policy(max_batch=n, max_delay_ms=200)) as rt, running(rt) as url:
        r = _post(url, json.dumps({"inputs": {"x": X[:1].tolist()}}).encode(), JSON)
        assert r.status_code == 200, r.text
        a = r.json()
        assert a["stage"] == "kws" and a["offloaded"] is False and a["offload_reason"] is None
        assert a["energy_source"] == "estimate" and a["energy_mj"] >= 0
        assert a["dtype"] == "float32" and a["latency_ms"] > 0
        np.testing.assert_allclose(a["output"], X[:1] @ W_GOOD, rtol=1e-5, atol=1e-5)
        r = _post(url, _npz(x=X[:5]), NPZ)
        np.testing.assert_allclose(r.json()["output"], X[:5] @ W_GOOD, rtol=1e-5, atol=1e-5)
        stats = httpx.get(f"{url}/v1/stats").json()
        assert stats["answers"] == 2 and stats["answered"] == {"kws": 2}
        assert stats["mean_latency_ms"] > 0 and stats["skipped"] == {}
        assert stats["energy"]["source"] in ("estimate", "rapl")
        assert stats["energy"]["joules"] > 0 and stats["energy"]["per_inference_mj"] > 0
    # Concurrent callers share one onnxruntime call and each gets its own rows. One more
    # caller announced keeps the batch open until all n are waiting (never by the delay):
    # however slowly a loaded machine lets them arrive, that is one batch. Each of them
    # needs a server thread to wait in (2 cores: asyncio's default pool has only 6).
    with Runtime(device, Policy(max_batch=n, max_delay_ms=60_000)) as rt, \
            running(rt) as url, rt.arriving():
        barrier, got = threading.Barrier(n), [None] * n

        def call(i: int) -> None:
            barrier.wait()
            got[i] = _post(url, json.dumps({"inputs": {"x": X[10 + i:11 + i].tolist()}})
                           .encode(), JSON).json()["output"]

        threads = [threading.Thread(target=call, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert None not in got, "a caller got no answer within the HTTP timeout"
        for i, out in enumerate(got):
            np.testing.assert_allclose(out, X[10 + i:11 + i] @ W_GOOD, rtol=1e-5, atol=1e-5)
        stats = httpx.get(f"{url}/v1/stats").json()
        assert stats["answers"] == n and stats["answered"] == {"kws": n}
        assert stats["errors"] == 0 and stats["rejected"] == 0 and stats["offloaded"] == 0
        assert stats["batching"]["batches"] == 1
        assert stats["batching"]["mean_requests_per_batch"] == n
        health = httpx.get(f"{url}/v1/health").json()
    assert health["name"] == "kws" and health["version"] == "1.0.0"
    assert health["probation"] == {"remaining": PROBATION - n - 2, "errors": 0,
                                   "boots": health["probation"]["boots"]}
    assert health["inputs"] == [{"name": "x", "dtype": "float32", "shape": ["N", 8]}]
    assert health["offload"] == "never" and health["max_batch"] == n


def test_a_model_error_in_a_micro_batch_is_one_callers_and_rolls_back(repo) -> None:
    """8 callers share a batch on a model on probation; one input makes onnxruntime fail:
    only that caller gets the ModelError, the probation counts one error and rolls back,
    and the others get their answers (from the candidate, or after the switch, from the
    model rolled back to)."""
    dev = Device(new_device(repo).dir, config=HealthConfig(probation_inferences=50))
    dev.update(repo.url, "kws")
    repo.publish("1.1.0", model=fragile_model(repo.work / "fragile.onnx", W_GOOD * 2))
    pass_probation(dev)
    assert dev.update(repo.url, "kws").installed and dev.state().probation is not None
    n, bad = 8, 3
    far = X[:n].copy()
    far[bad, 0] = 100.0                  # well-formed, but out of the fragile model's table
    got: list[object] = [None] * n
    barrier = threading.Barrier(n)

    def call(i: int) -> None:
        barrier.wait()
        try:
            got[i] = rt.predict({"x": far[i:i + 1]}).output
        except ModelError as e:
            got[i] = e

    with Runtime(dev, Policy(max_batch=n, max_delay_ms=200)) as rt:
        threads = [threading.Thread(target=call, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert isinstance(got[bad], ModelError)
        for i in set(range(n)) - {bad}:
            assert any(np.allclose(got[i], X[i:i + 1] @ w, rtol=1e-5, atol=1e-5)
                       for w in (W_GOOD * 2, W_GOOD)), i
        assert rt.manifest.version == "1.0.0" and rt.stats.errors == 1
        assert rt.batch_stats()["batches"] < n
    assert dev.active()[1].version == "1.0.0"
    assert "1 model error(s)" in dev.history()[-1].reason


BAD = {
    "malformed JSON": (b'{"inputs": {"x": [[1, 2', JSON, 400),
    "not an object": (b"[1, 2, 3]", JSON, 400),
    "deeply nested": (b"[" * 20_000 + b"]" * 20_000, JSON, 400),
    "wrong content type": (b"{}", {"content-type": "text/plain"}, 415),
    "wrong name": (json.dumps({"inputs": {"y": [[0.5] * 8]}}).encode(), JSON, 422),
    "wrong shape": (json.dumps({"inputs": {"x": [[0.5] * 7]}}).encode(), JSON, 422),
    "wrong rank": (json.dumps({"inputs": {"x": [0.5] * 8}}).encode(), JSON, 422),
    "strings": (json.dumps({"inputs": {"x": [["a"] * 8]}}).encode(), JSON, 422),
    "booleans": (json.dumps({"inputs": {"x": [[True] * 8]}}).encode(), JSON, 422),
    "NaN": (_npz(x=np.full((1, 8), np.nan, np.float32)), NPZ, 422),
    "Inf": (b'{"inputs": {"x": [[Infinity, 0, 0, 0, 0, 0, 0, 0]]}}', JSON, 422),
    "beyond float32": (json.dumps({"inputs": {"x": [[1e300] * 8]}}).encode(), JSON, 422),
    "empty": (json.dumps({"inputs": {"x": []}}).encode(), JSON, 422),
    "zero samples": (_npz(x=np.zeros((0, 8), np.float32)), NPZ, 422),
    "huge": (json.dumps({"inputs": {"x": [[0.5] * 8] * 5000}}).encode(), JSON, 413),
    "npz bomb": (_npz(x=np.zeros((20_000, 8), np.float32)), NPZ, 413),
    "pickled npz": (_npz(x=np.array([[object()]], dtype=object)), NPZ, 400),
}


def test_bad_requests_are_4xx_and_never_count_against_probation(device: Device) -> None:
    with Runtime(device) as rt, running(rt, max_body_bytes=LIMIT) as url:
        before = _probation(device)
        for case, (body, headers, status) in BAD.items():
            r = _post(url, body, headers)
            assert r.status_code == status, (case, r.text)
            message = r.json()["error"]
            assert message and "\n" not in message and len(message) < 400, case
        stats = httpx.get(f"{url}/v1/stats").json()
        assert stats["rejected"] == len(BAD) and stats["errors"] == 0 and stats["answers"] == 0
        rt.health()                                    # saves probation outcomes
        assert _probation(device) == before            # nothing was run, nothing counted
        assert _post(url, _npz(x=X[:1]), NPZ).status_code == 200
        assert httpx.get(f"{url}/v1/health").json()["probation"]["remaining"] == before[0] - 1


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=5), inner,
                                                                 max_size=4),
    max_leaves=40)
shapes = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=10)
dtypes = st.sampled_from([np.float32, np.float64, np.float16, np.int64, np.int8, np.uint8,
                          np.bool_, np.complex64])
fuzzed_arrays = st.builds(lambda dt, shape, fill: (dt, shape, fill), dtypes, shapes,
                          st.sampled_from(["random", "nan", "inf", "huge"]))


def _make(spec: tuple[type, tuple[int, ...], str], seed: int) -> np.ndarray:
    dt, shape, fill = spec
    a = (np.random.default_rng(seed).normal(size=shape) * 4).astype(dt)
    if a.size and np.dtype(dt).kind in "fc" and fill != "random":
        a.flat[0] = {"nan": np.nan, "inf": np.inf, "huge": np.finfo(dt).max}[fill]
    return a


@pytest.fixture
def served(device: Device):
    with Runtime(device, Policy(max_batch=4, max_delay_ms=1)) as rt, \
            running(rt, max_body_bytes=LIMIT) as url:
        yield device, rt, url


def _still_serving(device: Device, rt: Runtime, url: str) -> None:
    r = _post(url, _npz(x=X[:2]), NPZ)
    assert r.status_code == 200
    np.testing.assert_allclose(r.json()["output"], X[:2] @ W_GOOD, rtol=1e-5, atol=1e-5)
    assert rt.stats.errors == 0
    rt.health()
    assert _probation(device)[1] == 0 and device.active()[1].version == "1.0.0"


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=json_values | st.fixed_dictionaries({"inputs": st.dictionaries(
    st.sampled_from(["x", "y"]), json_values, max_size=2)}))
def test_fuzzed_json_is_refused_with_one_line(served, doc: object) -> None:
    device, rt, url = served
    r = _post(url, json.dumps(doc).encode(), JSON)
    assert r.status_code in (200, 400, 413, 415, 422), r.text
    if r.status_code != 200:
        assert "\n" not in r.json()["error"]
    _still_serving(device, rt, url)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=fuzzed_arrays, name=st.sampled_from(["x", "x", "y"]), seed=st.integers(0, 99))
def test_fuzzed_arrays_are_answered_exactly_or_refused(served, spec, name: str,
                                                       seed: int) -> None:
    device, rt, url = served
    a = _make(spec, seed)
    r = _post(url, _npz(**{name: a}), NPZ)
    assert r.status_code in (200, 400, 413, 422), r.text
    if r.status_code == 200:
        x = a.astype(np.float32)
        np.testing.assert_allclose(r.json()["output"], x @ W_GOOD, rtol=1e-4, atol=1e-4)
    else:
        assert "\n" not in r.json()["error"]
    _still_serving(device, rt, url)


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=fuzzed_arrays, name=st.sampled_from(["x", "x", "y"]), seed=st.integers(0, 99),
       garbage=st.none() | st.binary(max_size=64))
def test_fuzzed_device_run_exits_0_or_2_with_one_line(device: Device, tmp_path: Path, spec,
                                                      name: str, seed: int,
                                                      garbage: bytes | None) -> None:
    data = tmp_path / "fuzz.npz"
    if garbage is not None:
        data.write_bytes(garbage)
    else:
        data.write_bytes(_npz(**{name: _make(spec, seed)}))
    errors_before = _probation(device)[1]
    code, _, stderr = cli("device", "run", device.dir, "--data", data)   # no exception
    assert code in (0, 2), stderr
    if code == 2:
        assert len(stderr.strip().splitlines()) == 1 and stderr.startswith("error:"), stderr
    assert _probation(device)[1] == errors_before == 0


def test_device_serve_cli(device: Device, tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text('[offload]\nmode = "when-unsure"\nurl = "http://127.0.0.1:9"\n')
    code, _, stderr = cli("device", "serve", device.dir, "--port", 0, "--policy", policy)
    assert code == 2 and len(stderr.strip().splitlines()) == 1
    assert "`when-unsure` needs a cascade" in stderr
    with pytest.raises(UsageError, match="needs a cascade"):
        Runtime(device, Policy.load(policy))
    policy.write_text("max_batch = 4\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgeloop", "device", "serve", str(device.dir), "--port", "0",
         "--policy", str(policy)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "serving kws 1.0.0 on http://127.0.0.1:" in line, (line, proc.poll())
        url = line.split(" on ")[1].split()[0]
        r = _post(url, json.dumps({"inputs": {"x": X[:3].tolist()}}).encode(), JSON)
        np.testing.assert_allclose(r.json()["output"], X[:3] @ W_GOOD, rtol=1e-5, atol=1e-5)
        assert _post(url, b"{", JSON).status_code == 400
        assert httpx.get(f"{url}/v1/health").json()["max_batch"] == 4
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    saved = Dataset({"x": X[:3]})
    save_npz(tmp_path / "x.npz", saved)
    code, stdout, _ = cli("device", "run", device.dir, "--data", tmp_path / "x.npz", "--json")
    rows = [json.loads(line) for line in stdout.splitlines()]
    assert code == 0 and [r["offload_reason"] for r in rows] == [None] * 3


def test_device_serve_without_the_serve_extra_names_it(device: Device) -> None:
    """A device installed without FastAPI still runs `device run`; `device serve` says
    which extra it needs, in one line."""
    import re

    from test_offload import _WITHOUT_SERVE

    src = Path(__file__).resolve().parent.parent / "src"
    proc = subprocess.run([sys.executable, "-c", _WITHOUT_SERVE, "device", "serve",
                           str(device.dir), "--port", "0"], capture_output=True, text=True,
                          timeout=60, check=False, env={"PYTHONPATH": str(src),
                                                        "COLUMNS": "200"})
    assert proc.returncode == 2
    [line] = proc.stderr.strip().splitlines()
    assert re.fullmatch(r"error: this command needs `(fastapi|uvicorn|starlette)`, which is "
                        r"not installed; install it with pip install 'edgeloop\[serve\]'", line)
