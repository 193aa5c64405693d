"""On-device personalisation of the private head, and the federated body in the release
loop: a real TUF repository over HTTP on 127.0.0.1, real devices (state folders), the ONNX
models they serve checked against torch as the oracle."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from test_bundle_fixtures import make_repo

from edgeloop.bundle import Device, HealthConfig
from edgeloop.bundle.served import served
from edgeloop.cli import main
from edgeloop.data import Dataset, save_npz
from edgeloop.device import Runtime
from edgeloop.errors import VerificationError
from edgeloop.federated import (
    PersonalConfig,
    ReplayBuffer,
    mnist1d_partition,
    own_head,
    personalise,
    publish_body,
    split_model,
)
from edgeloop.federated.install import HEAD_FILE, settle_head
from edgeloop.federated.local import HEAD_FILE as LOCAL_HEAD_FILE
from edgeloop.federated.local import save_head
from edgeloop.federated.partition import public_set
from edgeloop.measure import predict, top1_accuracy
from edgeloop.models import load_model
from edgeloop.monitor import REFERENCE_FILE, evaluate_feedback
from edgeloop.monitor.alerts import DRIFT_FILE, FOLDER, Alert

HEALTH = HealthConfig(latency_rounds=2, latency_runs=3, probation_inferences=3)
CLIENT = 1            # a shifted, label-skewed device of 10 (Dirichlet alpha 0.3)


@dataclass
class Fleet:
    """A served repository with the CNN's body published as ``m`` 1.0.0."""

    url: str
    root: Path
    keys: Path
    trusted: Path
    model: Path          # the publisher's checkpoint: body + default head
    body: Path
    work: Path


@pytest.fixture(scope="module")
def fleet(cnn_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("fleet")
    module = load_model(cnn_dir / "model.pt").module
    torch.save(split_model(module).body(module), tmp / "body.pt")
    repo, server = make_repo(tmp)
    publish_body(tmp / "body.pt", model=cnn_dir / "model.pt", repo=repo.dir, keys=repo.keys,
                 name="m", version="1.0.0", golden=public_set(), min_metric=0.3)
    yield Fleet(repo.url, repo.dir, repo.keys, repo.root, cnn_dir / "model.pt",
                tmp / "body.pt", tmp)
    server.shutdown()  # type: ignore[attr-defined]
    server.server_close()  # type: ignore[attr-defined]


def _device(fleet: Fleet, name: str, client: int = CLIENT) -> tuple[Device, Dataset, Dataset]:
    """A device of ``client`` (golden set: half its test data) with 1.0.0 installed and
    past probation; returns it, its feedback (its train data) and its other test half."""
    p = mnist1d_partition(client, 10)
    half = len(p.test) // 2
    save_npz(fleet.work / f"{name}-golden.npz", p.test.take(slice(0, half)))
    dev = Device.init(fleet.work / name, trusted_root=fleet.trusted,
                      golden=fleet.work / f"{name}-golden.npz", config=HEALTH)
    assert dev.update(fleet.url, "m", adapt=own_head(dev.dir)).installed
    _pass_probation(dev)
    return dev, p.train, p.test.take(slice(half, None))


def _pass_probation(dev: Device) -> None:
    rt = Runtime(dev)
    while dev.state().probation is not None:
        rt.infer({"x": np.zeros((1, 40), np.float32)})


def _file(dev: Device, name: str) -> bytes:
    path, _ = dev.active()  # type: ignore[misc]
    return path.with_name(name).read_bytes()


def _served_accuracy(dev: Device, data: Dataset) -> float:
    path, manifest = dev.active()  # type: ignore[misc]
    with served(path, {f.name: path.with_name(f.name) for f in manifest.files}) as b:
        return top1_accuracy(predict(b.answer, data), data.labels)  # type: ignore[arg-type]


def _oracle(fleet: Fleet, dev: Device, body: Path | None = None) -> torch.nn.Module:
    """The torch model the device should serve: the published body + its head."""
    module = load_model(fleet.model).module
    split = split_model(module)
    split.load(module, torch.load(body or fleet.body, weights_only=True), "body")
    split.load(module, torch.load(settle_head(dev.dir), weights_only=True), "head")  # type: ignore[arg-type]
    return module.eval()


def _assert_serves(dev: Device, module: torch.nn.Module, x: np.ndarray) -> None:
    with torch.no_grad():
        expected = module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(Runtime(dev).infer({"x": x}), expected, atol=1e-4)


def test_personalisation_improves_a_shifted_client(fleet: Fleet) -> None:
    dev, feedback, test = _device(fleet, "improves")
    before = _served_accuracy(dev, test)
    sketch = _file(dev, REFERENCE_FILE)
    result = personalise(dev.dir, feedback, health=HEALTH)
    after = _served_accuracy(dev, test)
    print(f"client {CLIENT}: {before:.3f} -> {after:.3f} on its own test data; {result}")
    assert result.kept == "new" and result.holdout_after > result.holdout_before
    assert after >= before + 0.05
    assert dev.history()[-1].action == "personalise"
    assert dev.state().probation is not None          # on probation like any update
    _assert_serves(dev, _oracle(fleet, dev), test.inputs["x"][:32])
    # the drift reference is redrawn for the personalised model on the device's golden set
    assert _file(dev, REFERENCE_FILE) != sketch
    (window,) = evaluate_feedback(dev.dir, test, window=len(test))
    assert window["accuracy"] == pytest.approx(after) and not window.get("dropped")
    pending = settle_head(dev.dir)
    assert pending is not None and pending.name.startswith("head.pending-")
    assert not (dev.dir / HEAD_FILE).exists()         # not the device's head until...
    with pytest.raises(VerificationError, match="is on probation"):
        personalise(dev.dir, feedback, health=HEALTH)
    _pass_probation(dev)
    head = pending.read_bytes()
    assert settle_head(dev.dir) == dev.dir / HEAD_FILE
    assert (dev.dir / HEAD_FILE).read_bytes() == head and not pending.exists()


def test_rolled_back_personalisation_drops_its_head(fleet: Fleet) -> None:
    dev, feedback, _ = _device(fleet, "rollback")
    assert personalise(dev.dir, feedback, health=HEALTH).kept == "new"
    dev.rollback()                                    # as a failed probation would
    assert settle_head(dev.dir) is None
    assert not list(dev.dir.glob("head*.pt"))


def test_forgetting_guard_keeps_the_current_head(fleet: Fleet) -> None:
    dev, feedback, _ = _device(fleet, "guard")
    assert personalise(dev.dir, feedback, health=HEALTH).kept == "new"
    _pass_probation(dev)
    head = settle_head(dev.dir).read_bytes()  # type: ignore[union-attr]
    serving = dev.active()[1].sha256  # type: ignore[index]
    # newest 40 samples clean (held back); the rest with every label moved by one class
    labels = np.asarray(feedback.labels).copy()
    labels[:-40] = (labels[:-40] + 1) % 10
    bad = Dataset(feedback.inputs, labels)
    result = personalise(dev.dir, bad, config=PersonalConfig(min_holdout=40, holdout=0.1),
                         health=HEALTH)
    assert result.kept == "current" and "golden set" in result.reason
    assert result.golden_after < result.golden_before - 0.02  # type: ignore[operator]
    assert (dev.dir / HEAD_FILE).read_bytes() == head
    assert dev.active()[1].sha256 == serving  # type: ignore[index]


def test_guard_rules() -> None:
    from edgeloop.federated.personal import _guard

    # (held-back, golden) accuracy before and after, (loss before, after), tolerance
    assert _guard((0.8, 0.9), (0.85, 0.89), (1.0, 0.9), 0.02)[0]
    assert not _guard((0.8, 0.9), (0.85, 0.85), (1.0, 0.9), 0.02)[0]     # forgets golden
    assert not _guard((0.8, None), (0.75, None), (1.0, 0.9), 0.02)[0]    # worse on recent
    assert _guard((0.8, None), (0.8, None), (1.0, 0.9), 0.02)[0]         # tie: lower loss
    assert not _guard((0.8, None), (0.8, None), (0.9, 1.0), 0.02)[0]


def test_failed_health_check_keeps_the_previous_model(fleet: Fleet) -> None:
    dev, feedback, test = _device(fleet, "health")
    serving = dev.active()[1].sha256  # type: ignore[index]
    # a user whose labels all mean another class: better on its own held-back feedback,
    # below the bundle's floor on the golden set; the guard is told to ignore the golden
    # set, so the health check is what stops it
    permuted = Dataset(feedback.inputs, (np.asarray(feedback.labels) + 3) % 10)
    with pytest.raises(VerificationError, match=r"failed its health check.*still serving m"):
        personalise(dev.dir, permuted, config=PersonalConfig(golden_tolerance=1.0),
                    health=HEALTH)
    assert dev.active()[1].sha256 == serving  # type: ignore[index]
    assert settle_head(dev.dir) is None and not list(dev.dir.glob("head*.pt"))
    assert dev.history()[-1].action == "personalise-rejected"
    assert _served_accuracy(dev, test) > 0.5


def test_buffer_stays_within_its_caps_and_survives_a_restart(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    cap_bytes = 30 * (40 * 4 + 8)                # 30 samples of 40 float32 + an int64 label
    for call in range(40):
        x = rng.normal(size=(7, 40)).astype(np.float32)
        batch = Dataset({"x": x}, np.full(7, call, np.int64))
        held = ReplayBuffer(tmp_path, max_samples=50, max_bytes=cap_bytes).add(batch)
        assert len(held) <= 30
    held, seen = ReplayBuffer(tmp_path, max_samples=50, max_bytes=cap_bytes).read()
    assert held is not None and len(held) == 30 and seen == 280
    assert held.inputs["x"].nbytes + held.labels.nbytes <= cap_bytes  # type: ignore[union-attr]
    # a reservoir: old feedback stays represented, not only the newest calls
    assert np.asarray(held.labels).min() < 20
    small = ReplayBuffer(tmp_path, max_samples=10)            # caps lowered after a restart
    assert len(small.add(Dataset({"x": x}, np.zeros(7, np.int64)))) == 10


def test_published_body_installs_with_the_devices_own_head(fleet: Fleet, capsys) -> None:
    dev, _, test = _device(fleet, "own-head")
    fresh, _, _ = _device(fleet, "no-head")
    module = load_model(fleet.model).module
    split = split_model(module)
    torch.manual_seed(1)
    with torch.no_grad():                        # the device's own head, as a client keeps it
        for name, p in module.named_parameters():
            if name.startswith(split.head):
                p.add_(0.1 * torch.randn_like(p))
    save_head(module, split, dev.dir)
    head = (dev.dir / HEAD_FILE).read_bytes()
    # the next global body: the publisher's, nudged (as a federated round would)
    body = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v
            for k, v in torch.load(fleet.body, weights_only=True).items()}
    torch.save(body, fleet.work / "body2.pt")
    code = _cli(capsys, "federated", "publish-body", fleet.work / "body2.pt", "--model",
                fleet.model, "--repo", fleet.root, "--keys", fleet.keys, "--name", "m",
                "--version", "1.1.0", "--min-metric", "0.3")[0]
    assert code == 0
    for d in (dev, fresh):
        code, out = _cli(capsys, "device", "update", d.dir, "--repo", fleet.url,
                         "--name", "m")
        assert code == 0 and "installed m 1.1.0" in out
    assert (dev.dir / HEAD_FILE).read_bytes() == head
    _assert_serves(dev, _oracle(fleet, dev, fleet.work / "body2.pt"), test.inputs["x"][:32])
    default = load_model(fleet.model).module
    split.load(default, body, "body")
    _assert_serves(fresh, default.eval(), test.inputs["x"][:32])
    assert not (fresh.dir / HEAD_FILE).exists()


def _cli(capsys, *args: object) -> tuple[int, str]:
    capsys.readouterr()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out = capsys.readouterr()
    return code, out.out + out.err


def test_cli_personalise_json_and_bad_input(fleet: Fleet, capsys, tmp_path: Path) -> None:
    dev, feedback, _ = _device(fleet, "cli")
    save_npz(tmp_path / "feedback.npz", feedback.take(slice(0, 120)))
    history = len(dev.history())
    code, out = _cli(capsys, "device", "personalise", dev.dir, "--data",
                     tmp_path / "feedback.npz", "--if-flagged")
    assert code == 0 and "no alert on the active model: nothing to personalise" in out, out
    assert len(dev.history()) == history
    # the monitor's alert on the active model (as the monitor saves it) lets it run
    alert = Alert("chi2:inputs", "2026-01-01T00:00:00Z", "2026-01-01T00:00:00Z", 10, 10, 1,
                  "feature 3 differs")
    (dev.dir / FOLDER).mkdir(exist_ok=True)
    (dev.dir / FOLDER / DRIFT_FILE).write_text(json.dumps(
        {"model_sha256": dev.state().current().sha256, "alerts": [asdict(alert)]}))
    code, out = _cli(capsys, "device", "personalise", dev.dir, "--data",
                     tmp_path / "feedback.npz", "--epochs", "5", "--json", "--if-flagged")
    assert code == 0, out
    assert json.loads(out)["feedback_samples"] == 120
    save_npz(tmp_path / "nolabels.npz", Dataset(feedback.inputs))
    save_npz(tmp_path / "shape.npz", Dataset({"x": feedback.inputs["x"][:, :30]},
                                             feedback.labels))
    save_npz(tmp_path / "few.npz", feedback.take(slice(0, 5)))
    save_npz(tmp_path / "classes.npz", Dataset(feedback.inputs,
                                               np.asarray(feedback.labels) + 10))
    plain = _plain_device(fleet, tmp_path)
    cases = [
        (dev.dir, tmp_path / "nolabels.npz", "no `labels` array"),
        (dev.dir, tmp_path / "shape.npz", "has shape (338, 30); the model expects ('N', 40)"),
        (dev.dir, tmp_path / "few.npz", "needs more than 8 labelled samples"),
        (dev.dir, tmp_path / "classes.npz", "must be classes 0..9"),
        (plain, tmp_path / "feedback.npz", "no torch model with a body/head split"),
        (tmp_path / "nowhere", tmp_path / "feedback.npz", "not a device state folder"),
    ]
    for state, data, words in cases:
        code, out = _cli(capsys, "device", "personalise", state, "--data", data)
        assert code == 2 and words in out and len(out.strip().splitlines()) == 1, out
    torch.save({"nope": torch.zeros(1)}, tmp_path / "wrong-body.pt")
    code, out = _cli(capsys, "federated", "publish-body", tmp_path / "wrong-body.pt",
                     "--model", fleet.model, "--repo", fleet.root, "--keys", fleet.keys,
                     "--name", "m", "--version", "9.0.0")
    assert code == 2 and "the body does not fit the model" in out, out
    torch.save(torch.nn.Sequential(torch.nn.Conv1d(1, 4, 3), torch.nn.Flatten()),
               tmp_path / "headless.pt")
    code, out = _cli(capsys, "federated", "publish-body", fleet.body, "--model",
                     tmp_path / "headless.pt", "--repo", fleet.root, "--keys", fleet.keys,
                     "--name", "m", "--version", "9.0.0")
    assert code == 2 and "no `head` module and no nn.Linear" in out, out
    assert len(out.strip().splitlines()) == 1


def _plain_device(fleet: Fleet, tmp: Path) -> Path:
    """A device serving a plain ONNX bundle (no torch model, no head split)."""
    from edgeloop.bundle import build_manifest, publish_bundle

    onnx_model = fleet.model.with_name("model.onnx")
    manifest = build_manifest(onnx_model, name="plain", version="1.0.0")
    publish_bundle(fleet.root, onnx_model, keys=fleet.keys, manifest=manifest)
    dev = Device.init(tmp / "plain", trusted_root=fleet.trusted, config=HEALTH)
    assert dev.update(fleet.url, "plain").installed
    return dev.dir


def test_personalise_without_torch_names_the_extra(tmp_path: Path) -> None:
    from test_cli_imports import _without_torch, run

    for args in (["device", "personalise"], ["federated", "publish-body"]):
        code, out, err, imports = run(*args, "--help")
        assert code == 0 and "Usage:" in out, err
        assert imports["refused"] == [] and "torch" not in imports["loaded"]

    assert HEAD_FILE == LOCAL_HEAD_FILE      # install.py names it without importing torch
    save_npz(tmp_path / "f.npz", Dataset({"x": np.zeros((20, 40), np.float32)},
                                         np.zeros(20, np.int64)))
    proc = _without_torch("device", "personalise", tmp_path, "--data", tmp_path / "f.npz")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: this command needs `torch`, which is not installed; install it with pip "
        "install 'edgeloop[train]'"]
    code = "import sys, edgeloop.federated.install; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False,
                          env={"PYTHONPATH": str(Path(__file__).parent.parent / "src")}
                          ).returncode == 0
