"""Device behaviour against a served repository: health checks, probation, rollback,
status, offline behaviour, and one-line errors for bad input."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from test_bundle_fixtures import (
    GOLDEN,
    W_BAD,
    W_GOOD,
    X,
    assert_serving,
    failing_model,
    fragile_model,
    make_repo,
    matmul_model,
    new_device,
    pass_probation,
    repo,
)

from edgeloop.bundle import Device, HealthConfig, build_manifest, publish_bundle, refresh_repo
from edgeloop.cli import main
from edgeloop.data import Dataset, save_npz
from edgeloop.device import Runtime
from edgeloop.errors import ModelError, TransportError, UsageError, VerificationError

__all__ = ["repo"]


def _actions(dev: Device) -> list[tuple[str, str | None]]:
    return [(e.action, e.version) for e in dev.history()]


def test_low_accuracy_model_is_not_committed(repo) -> None:
    dev = new_device(repo)
    dev.update(repo.url, "kws")
    repo.publish("1.1.0", W_BAD, min_metric=0.9)   # correctly signed, much less accurate
    with pytest.raises(VerificationError, match=r"below the floor 0\.9000"):
        dev.update(repo.url, "kws")
    assert_serving(dev, "1.0.0")
    assert _actions(dev)[-1] == ("rejected", "1.1.0")
    assert dev.update(repo.url, "kws").reason.startswith("1.1.0 was refused")
    assert "accuracy" in dev.history()[-1].reason
    assert dev.state().manifest("b") is None     # the candidate never entered a slot


def test_model_that_raises_at_inference_is_not_committed(repo) -> None:
    dev = new_device(repo)
    dev.update(repo.url, "kws")
    repo.publish("1.1.0", model=failing_model(repo.work / "fail.onnx"), golden=None)
    with pytest.raises(VerificationError, match="inference failed"):
        dev.update(repo.url, "kws")
    assert_serving(dev, "1.0.0")
    assert dev.history()[-1].action == "rejected"


def test_probation_rolls_back_on_model_errors_and_crash_loops(repo, monkeypatch) -> None:
    dev = Device(new_device(repo).dir,
                 config=HealthConfig(probation_inferences=5, probation_boots=2))
    dev.update(repo.url, "kws")
    pass_probation(dev)
    repo.publish("1.1.0", model=fragile_model(repo.work / "fragile.onnx", W_GOOD * 2))
    assert dev.update(repo.url, "kws").installed
    rt = Runtime(dev)
    rt.infer({"x": X[:2]})
    far = X[:2].copy()
    far[0, 0] = 100.0                              # a well-formed feed the model fails on
    with pytest.raises(ModelError, match="out of data bounds"):
        rt.infer({"x": far})                       # a model error while on probation
    assert rt.manifest.version == "1.0.0"          # the runtime switched back already
    assert_serving(dev, "1.0.0")
    assert _actions(dev)[-1] == ("rollback", "1.1.0")
    assert "1 model error(s) at inference during probation" in dev.history()[-1].reason
    refusal = dev.update(repo.url, "kws")          # the bad version is not tried again
    assert not refusal.installed and "was refused on this device" in refusal.reason

    repo.publish("1.2.0", W_GOOD * 3)
    assert dev.update(repo.url, "kws").version == "1.2.0"
    for boot in ("boot-1", "boot-2", "boot-3"):    # device reboots that never finish probation
        monkeypatch.setattr("edgeloop.bundle.device.boot_id", lambda boot=boot: boot)
        Runtime(Device(dev.dir, config=dev.config))
    assert dev.active()[1].version == "1.0.0"      # 1.2.0 went into 1.1.0's slot
    assert "crash loop" in dev.history()[-1].reason


def test_probation_passes_and_manual_rollback(repo) -> None:
    dev = Device(new_device(repo).dir, config=HealthConfig(probation_inferences=3))
    dev.update(repo.url, "kws")
    repo.publish("1.1.0", W_GOOD * 2)
    dev.update(repo.url, "kws")
    rt = Runtime(dev)
    for _ in range(3):
        rt.infer({"x": X[:4]})
    assert dev.state().probation is None and _actions(dev)[-1] == ("kept", "1.1.0")
    assert dev.rollback().version == "1.0.0"
    assert_serving(dev, "1.0.0")
    status = dev.status()
    assert [s["version"] for s in status["slots"]] == ["1.0.0", "1.1.0"]
    assert status["active"] == "a"
    assert (status["history"][-1]["action"], status["history"][-1]["version"]) == (
        "rollback", "1.1.0")


def test_golden_without_labels_uses_reference_outputs(repo) -> None:
    save_npz(repo.work / "nolabels.npz", Dataset({"x": X}))
    dev = Device.init(repo.work / "dev-nl", trusted_root=repo.root,
                      golden=repo.work / "nolabels.npz")
    dev.update(repo.url, "kws")
    assert dev.update(repo.url, "kws").reason == "already at 1.0.0"
    # a model whose outputs disagree with the ones the publisher recorded for 1.1.0
    good = matmul_model(repo.work / "ref.onnx", W_GOOD * 2)
    repo.publish("1.1.0", model=good)
    r = dev.update(repo.url, "kws")
    assert r.version == "1.1.0" and r.verdict.figures["agreement"] == 1.0
    pass_probation(dev)
    bad = matmul_model(repo.work / "swap.onnx", W_BAD)
    m = build_manifest(good, name="kws", version="1.2.0", golden=GOLDEN)
    m2 = build_manifest(bad, name="kws", version="1.2.0")
    publish_bundle(repo.dir, bad, keys=repo.keys,
                   manifest=replace(m2, reference=m.reference, floor=m.floor))
    with pytest.raises(VerificationError, match="top-1 agreement"):
        dev.update(repo.url, "kws")
    assert dev.active()[1].version == "1.1.0"


def test_offline_device_keeps_serving_and_refresh_resigns(repo) -> None:
    dev = new_device(repo)
    dev.update(repo.url, "kws")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(TransportError, match=r"could not be reached.*still serving kws 1\.0\.0"):
        dev.update(dead, "kws")
    assert_serving(dev, "1.0.0")
    before = json.loads((repo.dir / "metadata" / "timestamp.json").read_bytes())
    assert refresh_repo(repo.dir, keys=repo.keys) == ["timestamp"]
    after = json.loads((repo.dir / "metadata" / "timestamp.json").read_bytes())
    assert after["signed"]["version"] == before["signed"]["version"] + 1
    assert dev.update(repo.url, "kws").reason == "already at 1.0.0"


def test_publish_refuses_versions_not_greater(repo) -> None:
    for v in ("1.0.0", "0.9.9"):
        with pytest.raises(UsageError, match=r"not greater than the published 1\.0\.0"):
            repo.publish(v)


def test_encrypted_keys_need_their_passphrase(tmp_path) -> None:
    from edgeloop.bundle import init_repo

    init_repo(tmp_path / "r", keys=tmp_path / "k", passphrase="s3cret")
    assert b"ENCRYPTED" in next((tmp_path / "k").glob("*.pem")).read_bytes()
    model = matmul_model(tmp_path / "m.onnx", W_GOOD)
    m = build_manifest(model, name="kws", version="1.0.0")
    with pytest.raises(UsageError, match="encrypted"):
        publish_bundle(tmp_path / "r", model, keys=tmp_path / "k", manifest=m)
    with pytest.raises(UsageError, match="wrong passphrase"):
        publish_bundle(tmp_path / "r", model, keys=tmp_path / "k", manifest=m, passphrase="no")
    publish_bundle(tmp_path / "r", model, keys=tmp_path / "k", manifest=m, passphrase="s3cret")


def _cli(capsys, *args: str) -> tuple[int, str]:
    code = 0
    try:
        main([*args])
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err.strip()


def test_bad_input_is_one_line_and_exit_2(repo, capsys, tmp_path) -> None:
    dev = new_device(repo)
    dev.update(repo.url, "kws")
    corrupt = tmp_path / "corrupt-root.json"
    corrupt.write_text('{"signed": {"_type": "root"}}')
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    cases = [
        (["device", "init", str(tmp_path / "d1"), "--trusted-root", str(tmp_path / "nope")],
         "does not exist"),
        (["device", "init", str(tmp_path / "d2"), "--trusted-root", str(corrupt)],
         "not valid signed TUF root"),
        (["device", "update", str(dev.dir), "--repo", dead, "--name", "kws"],
         "could not be reached"),
        (["device", "update", str(dev.dir), "--repo", repo.url, "--name", "nothere"],
         "'nothere' is not published"),
        (["device", "status", str(tmp_path)], "is not a device state folder"),
        (["device", "rollback", str(dev.dir)], "no previous model"),
        (["repo", "rotate-key", "owner", "--repo", str(repo.dir), "--keys", str(repo.keys)],
         "`role` must be one of root, targets, snapshot, timestamp"),
    ]
    for args, words in cases:
        code, err = _cli(capsys, *args)
        assert code == 2, args
        assert words in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "d2").exists()
    assert_serving(dev, "1.0.0")


def test_cli_round_trip(tmp_path, capsys) -> None:
    r, server = make_repo(tmp_path / "x")
    try:
        save_npz(tmp_path / "g.npz", GOLDEN)
        model = matmul_model(tmp_path / "m.onnx", W_GOOD)
        assert _cli(capsys, "publish", str(model), "--repo", str(r.dir), "--keys", str(r.keys),
                    "--name", "kws", "--version", "2.0.0", "--golden", str(tmp_path / "g.npz")
                    )[0] == 0
        for args in (["device", "init", str(tmp_path / "dev"), "--trusted-root", str(r.root),
                      "--golden", str(tmp_path / "g.npz")],
                     ["device", "update", str(tmp_path / "dev"), "--repo", r.url, "--name",
                      "kws"],
                     ["repo", "refresh", str(r.dir), "--keys", str(r.keys)]):
            assert _cli(capsys, *args)[0] == 0
        capsys.readouterr()
        main(["device", "status", str(tmp_path / "dev"), "--json"])
        status = json.loads(capsys.readouterr().out)
        assert status["slots"][0]["version"] == "2.0.0"
        assert np.isclose(Runtime(Device(tmp_path / "dev")).infer({"x": X[:1]}),
                          X[:1] @ W_GOOD, atol=1e-5).all()
    finally:
        server.shutdown()
        server.server_close()


def test_device_side_does_not_import_torch() -> None:
    code = ("import sys, edgeloop.bundle, edgeloop.bundle.device; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    env_src = str(Path(__file__).resolve().parent.parent / "src")
    assert subprocess.run([sys.executable, "-c", code], env={"PYTHONPATH": env_src},
                          check=False).returncode == 0
