"""A cascade shipped as one signed bundle: published by the CLI into a real TUF repository
served on 127.0.0.1, installed by a device, served by the runtime with probation."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from test_bundle_fixtures import GOLDEN, W_GOOD, X, matmul_model, new_device, repo
from test_cli import cli

from edgeloop.bundle import Device, HealthConfig, Manifest
from edgeloop.data import save_npz
from edgeloop.device import Policy, Runtime, build_cascade
from edgeloop.errors import VerificationError

__all__ = ["repo"]

W_SMALL = W_GOOD * 0.5 + 0.3      # right on most of the golden set, less sure


@pytest.fixture
def cascade_file(tmp_path: Path) -> Path:
    small = matmul_model(tmp_path / "small.onnx", W_SMALL)
    large = matmul_model(tmp_path / "large.onnx", W_GOOD)
    out = tmp_path / "c" / "cascade.json"
    c = build_cascade([small, large], GOLDEN, max_drop=5.0, out=out, latency_rounds=2,
                      latency_runs=5)
    # models this small time alike, so the chosen threshold may be "never": fix one
    out.write_text(c.with_thresholds([0.9]).to_json())
    return out


def test_cascade_bundle_installs_and_serves_with_probation(repo, cascade_file: Path,
                                                           tmp_path: Path) -> None:
    save_npz(tmp_path / "golden.npz", GOLDEN)
    code, _, err = cli("publish", cascade_file, "--repo", repo.dir, "--keys", repo.keys,
                         "--name", "casc", "--version", "1.0.0", "--golden",
                         tmp_path / "golden.npz")
    assert code == 0, err
    dev = Device(new_device(repo).dir, config=HealthConfig(probation_inferences=5,
                                                           probation_save_inferences=1))
    result = dev.update(repo.url, "casc")
    assert result.installed
    slot = dev.dir / "slots" / dev.state().active
    assert sorted(p.name for p in slot.iterdir()) == ["cascade.json", "model.onnx",
                                                      "stage1.onnx"]
    manifest = dev.state().current()
    assert [f.name for f in manifest.files] == ["stage1.onnx", "cascade.json"]
    assert [s["model"] for s in json.loads((slot / "cascade.json").read_text())["stages"]] \
        == ["stage1.onnx", "model.onnx"]

    rt = Runtime(dev)
    assert rt.cascade is not None and rt.stages() == ("small", "large")
    answers = [rt.predict({"x": X[i:i + 1]}) for i in range(5)]
    for i, a in enumerate(answers):
        w = W_SMALL if a.stage == "small" else W_GOOD
        np.testing.assert_allclose(a.output, X[i:i + 1] @ w, rtol=1e-5, atol=1e-5)
    assert dev.state().probation is None                     # five good answers: kept
    assert dev.history()[-1].action == "kept"


def test_a_tampered_stage_is_refused_at_start(repo, cascade_file: Path) -> None:
    from edgeloop.device import publish_cascade

    publish_cascade(cascade_file, repo.dir, keys=repo.keys, name="casc", version="1.0.0",
                    golden=GOLDEN)
    dev = new_device(repo)
    dev.update(repo.url, "casc")
    stage = dev.dir / "slots" / dev.state().active / "stage1.onnx"
    stage.write_bytes(stage.read_bytes()[:-1] + b"\0")
    with pytest.raises(VerificationError, match=r"file stage1\.onnx of casc 1\.0\.0 does not "
                                                "match its manifest"):
        Runtime(dev)


def test_one_model_manifests_are_unchanged(tmp_path: Path) -> None:
    from edgeloop.bundle import build_manifest

    m = build_manifest(matmul_model(tmp_path / "m.onnx", W_GOOD), name="kws", version="1.0.0")
    assert b"files" not in m.to_bytes()
    assert Manifest.from_bytes(m.to_bytes()) == m


@pytest.mark.parametrize(("point", "serving"), [("verify", "1.0.0"),
                                                ("pointer-switch", "1.0.0"),
                                                ("committed", "1.1.0")])
def test_power_loss_during_a_cascade_update(repo, tmp_path: Path, point: str,
                                            serving: str) -> None:
    import os
    import subprocess
    import sys

    from edgeloop.device import publish_cascade

    def cascade(tag: str, w_small: np.ndarray) -> Path:
        d = tmp_path / tag
        d.mkdir()
        small = matmul_model(d / "small.onnx", w_small)
        large = matmul_model(d / "large.onnx", W_GOOD)
        build_cascade([small, large], GOLDEN, max_drop=5.0, out=d / "cascade.json",
                      latency_rounds=1, latency_runs=3)
        return d / "cascade.json"

    w_new = W_GOOD * 0.4 - 0.2
    publish_cascade(cascade("v1", W_SMALL), repo.dir, keys=repo.keys, name="casc",
                    version="1.0.0", golden=GOLDEN)
    dev = new_device(repo)
    dev.update(repo.url, "casc")
    Runtime(Device(dev.dir, config=HealthConfig(probation_inferences=1))).predict(
        {"x": X[:1]})                                   # 1.0.0 passes probation
    publish_cascade(cascade("v2", w_new), repo.dir, keys=repo.keys, name="casc",
                    version="1.1.0", golden=GOLDEN)
    src = str(Path(__file__).resolve().parent.parent / "src")
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from edgeloop.bundle import Device; "
         "Device(sys.argv[1]).update(sys.argv[2], 'casc')", str(dev.dir), repo.url],
        env={**os.environ, "PYTHONPATH": src, "EDGELOOP_CRASH_AT": point}, check=False)
    assert proc.returncode == -9                        # killed at the point, as on power loss
    rt = Runtime(dev)
    assert rt.manifest.version == serving
    w_small = W_SMALL if serving == "1.0.0" else w_new
    for i in range(20):
        a = rt.predict({"x": X[i:i + 1]})
        w = w_small if a.stage == "small" else W_GOOD
        np.testing.assert_allclose(a.output, X[i:i + 1] @ w, rtol=1e-5, atol=1e-5)


def test_when_unsure_offload_reports_one_inference_per_call(repo, cascade_file: Path) -> None:
    """Probation counts calls whose stages ran here, once each, whether the server or the
    last stage (after the small one) answered them."""
    from edgeloop.device import Cascade, confidence, publish_cascade, softmax
    from edgeloop.serve.offload import OffloadServer, ServerConfig, running

    conf = confidence(softmax(X[:40] @ W_SMALL, 1.0), "max-softmax")
    threshold = float(np.median(conf))                  # half of them reach the large stage
    c = Cascade.load(cascade_file)
    c = replace(c, stages=tuple(replace(st, temperature=1.0) for st in c.stages))
    cascade_file.write_text(c.with_thresholds([threshold]).to_json())
    picked = [*np.flatnonzero(conf < threshold)[:2], int(np.argmax(conf))]   # 2 unsure, 1 sure
    publish_cascade(cascade_file, repo.dir, keys=repo.keys, name="casc", version="1.0.0",
                    golden=GOLDEN)
    dev = Device(new_device(repo).dir, config=HealthConfig(probation_inferences=6,
                                                           probation_save_inferences=1))
    dev.update(repo.url, "casc")
    server = OffloadServer(cascade_file.parent.parent / "large.onnx",
                           config=ServerConfig(max_batch=1))
    with running(server) as url:
        rule = {"url": url, "privacy_class": "public", "timeout_s": 0.5}
        with Runtime(dev, Policy(offload=rule)) as rt:
            up = [rt.predict({"x": X[i:i + 1]}) for i in picked]
    assert [a.stage for a in up] == ["offload", "offload", "small"]
    assert dev.state().probation.remaining == 3
    with Runtime(dev, Policy(offload=rule)) as rt:                # the server is gone
        down = [rt.predict({"x": X[i:i + 1]}) for i in picked]
    assert [a.stage for a in down] == ["large", "large", "small"]
    assert dev.state().probation is None and dev.history()[-1].action == "kept"


def _broken_cascade(root: Path) -> Path:
    """A cascade whose small stage is confidently wrong (large random weights, left
    uncalibrated) and answers most inputs, in front of a good last stage."""
    from test_bundle_fixtures import W_BAD

    root.mkdir()
    small = matmul_model(root / "small.onnx", W_BAD * 20)
    large = matmul_model(root / "large.onnx", W_GOOD)
    c = build_cascade([small, large], GOLDEN, max_drop=100.0, out=root / "cascade.json",
                      latency_rounds=1, latency_runs=3)
    c = replace(c, stages=tuple(replace(st, temperature=1.0) for st in c.stages))
    (root / "cascade.json").write_text(c.with_thresholds([0.5]).to_json())
    return root / "cascade.json"


def test_a_cascade_with_a_broken_small_stage_fails_its_health_check(
        repo, cascade_file: Path, tmp_path: Path) -> None:
    """The health check measures the cascade as served, not its last stage: a broken
    small stage is refused, whether judged against the current model (no floor) or
    against the publisher's floor, and the device keeps serving what it served."""
    from edgeloop.bundle.served import served
    from edgeloop.device import publish_cascade

    publish_cascade(cascade_file, repo.dir, keys=repo.keys, name="casc", version="1.0.0",
                    golden=GOLDEN)
    dev = new_device(repo)
    assert dev.update(repo.url, "casc").installed
    broken = _broken_cascade(tmp_path / "broken")
    with served(broken.parent / "large.onnx", {}) as last:       # the last stage is good
        assert (last.answer({"x": X}).argmax(1) == GOLDEN.labels).mean() == 1.0
    with Runtime(None, Policy(cascade=broken)) as rt:
        answers = rt.infer({"x": X})
    served_accuracy = float((answers.argmax(1) == GOLDEN.labels).mean())
    assert served_accuracy < 0.8

    # no floor in the manifest: compared with the current cascade
    publish_cascade(broken, repo.dir, keys=repo.keys, name="casc", version="1.1.0")
    with pytest.raises(VerificationError, match=r"casc 1\.1\.0 failed its health check "
                                                r"\(accuracy 0\.\d+ on the golden set is below "
                                                r"the current model's 1\.0000 - 0\.01"):
        dev.update(repo.url, "casc")
    # the publisher measures it as served too: its figures and predictions are the
    # cascade's, so the floor it is held to is a floor for the cascade
    m = publish_cascade(broken, repo.dir, keys=repo.keys, name="casc", version="1.2.0",
                        golden=GOLDEN, min_metric=0.9)
    assert m.figures["accuracy"] == pytest.approx(served_accuracy)
    assert m.reference.top1 == answers.argmax(1).tolist()
    with pytest.raises(VerificationError, match=r"below the floor 0\.9000"):
        dev.update(repo.url, "casc")
    assert [e.action for e in dev.history()][-2:] == ["rejected", "rejected"]
    assert dev.state().current().version == "1.0.0"
    assert Runtime(dev).manifest.version == "1.0.0"
