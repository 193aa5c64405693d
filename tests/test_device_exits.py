"""Early exit: mnist1d-cnn-exits trained by the CLI, its segments exported as chained ONNX
files and served as a cascade; PyTorch's exit outputs are the oracle."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_cli import cli

from edgeloop._onnx import session
from edgeloop.data import load_builtin
from edgeloop.device import Policy, Runtime, build_cascade, confidence, softmax
from edgeloop.errors import UsageError
from edgeloop.zoo import build, load_torch
from edgeloop.zoo.exits import joint_loss

SEGMENTS = ("exit1.onnx", "exit2.onnx", "exit3.onnx")


@pytest.fixture(scope="session")
def exits_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("exits")
    code, _stdout, stderr = cli("zoo", "train", "mnist1d-cnn-exits", "--out", out,
                               "--epochs", 3, "--width", 16)
    assert code == 0, stderr
    return out


@pytest.fixture(scope="session")
def exits_cascade(exits_dir: Path) -> Path:
    out = exits_dir / "cascade.json"
    build_cascade([exits_dir / s for s in SEGMENTS], load_builtin("mnist1d", "val"),
                  max_drop=1.0, out=out, latency_rounds=2, latency_runs=10,
                  baseline=exits_dir / "model.onnx")
    return out


@pytest.fixture(scope="session")
def oracle(exits_dir: Path) -> tuple[np.ndarray, list[np.ndarray]]:
    """Test inputs and PyTorch's logits at every exit."""
    model, arch = load_torch(exits_dir / "model.pt")
    assert arch == "mnist1d-cnn-exits"
    x = load_builtin("mnist1d", "test").inputs["x"][:200]
    with torch.no_grad():
        return x, [e.numpy() for e in model.forward_exits(torch.from_numpy(x))]


def test_segments_equal_pytorch_exits(exits_dir: Path, oracle) -> None:
    x, exits = oracle
    feed = {"x": x}
    for i, name in enumerate(SEGMENTS):
        sess = session(exits_dir / name)
        outs = sess.run(None, feed)
        np.testing.assert_allclose(outs[0], exits[i], rtol=1e-4, atol=1e-4)
        if i < len(SEGMENTS) - 1:
            assert [o.name for o in sess.get_outputs()] == ["logits", f"features_{i + 1}"]
            feed = {f"features_{i + 1}": outs[1]}
        else:
            assert [o.name for o in sess.get_outputs()] == ["logits"]
    whole = session(exits_dir / "model.onnx").run(None, {"x": x})[0]
    np.testing.assert_allclose(whole, exits[-1], rtol=1e-4, atol=1e-4)


def test_every_exit_learned(oracle) -> None:
    _x, exits = oracle
    y = load_builtin("mnist1d", "test").labels[:200]
    acc = [float((e.argmax(1) == y).mean()) for e in exits]
    assert all(a > 0.4 for a in acc), acc        # jointly trained: no exit left untrained


def test_thresholds_zero_and_never_are_first_and_final_exit(exits_cascade: Path,
                                                            oracle) -> None:
    x, exits = oracle
    first = Runtime(None, Policy(cascade=exits_cascade, thresholds=(0.0, 0.0)))
    a = first.predict({"x": x})
    assert a.stage == "exit1"
    np.testing.assert_allclose(a.output, exits[0], rtol=1e-4, atol=1e-4)
    final = Runtime(None, Policy(cascade=exits_cascade, thresholds=(np.inf, np.inf)))
    assert final.stages() == ("exit1", "exit2", "exit3")   # chained: all run for features
    for i in range(5):
        b = final.predict({"x": x[i:i + 1]})
        assert b.stage == "exit3"
        np.testing.assert_allclose(b.output, exits[-1][i:i + 1], rtol=1e-4, atol=1e-4)


def test_runtime_takes_the_first_sure_exit(exits_cascade: Path, oracle) -> None:
    x, exits = oracle
    rt = Runtime(None, Policy(cascade=exits_cascade))
    c = rt.cascade
    assert [s.chained for s in c.stages] == [False, True, True]
    base = c.expected["baseline"]
    # the whole model in one piece is exactly the final exit: same validation accuracy
    assert base["model"] == "model.onnx" and base["latency_ms"] > 0
    assert base["accuracy"] == pytest.approx(c.stages[-1].accuracy)
    conf = [confidence(softmax(e, s.temperature), c.measure) for e, s in zip(exits, c.stages,
                                                                              strict=True)]
    t = [np.inf if v is None else v for v in c.thresholds()]
    expected_stage = np.where(conf[0] >= t[0] - 1e-6, 0, np.where(conf[1] >= t[1] - 1e-6, 1, 2))
    borderline = (np.abs(conf[0] - t[0]) < 1e-5) | (np.abs(conf[1] - t[1]) < 1e-5)
    got = [rt.predict({"x": x[i:i + 1]}) for i in range(len(x))]
    stage = np.array([["exit1", "exit2", "exit3"].index(a.stage) for a in got])
    assert (stage == expected_stage)[~borderline].all()
    for i, a in enumerate(got):
        np.testing.assert_allclose(a.output[0], exits[stage[i]][i], rtol=1e-4, atol=1e-4)
    # a batch answers each sample as one at a time would
    np.testing.assert_allclose(rt.predict({"x": x}).output,
                               np.concatenate([a.output for a in got]), rtol=1e-5, atol=1e-5)
    # an early-exit model stops early for some inputs
    assert (stage == 0).mean() > 0.1


def test_exit_config_errors() -> None:
    with pytest.raises(UsageError, match="`exits` must be increasing block numbers"):
        build("mnist1d-cnn-exits", exits=[3, 2])
    with pytest.raises(UsageError, match="`weights` must be 3 non-negative numbers"):
        build("mnist1d-cnn-exits", weights=[1.0, 1.0])
    with pytest.raises(UsageError, match="`distill` must lie in"):
        build("mnist1d-cnn-exits", distill=1.5)
    for bad in ([1, 2, 3], [1, 2, 0, 3], [1, 2, 2.5, 3]):
        with pytest.raises(UsageError, match="`channels` must be 4 integers >= 1"):
            build("mnist1d-cnn-exits", channels=bad)


def test_joint_loss_distils_earlier_exits_from_the_final_one() -> None:
    """The joint loss is the final exit's cross-entropy plus each earlier exit's
    distillation loss from the final exit's logits, which it never trains: with
    ``distill=0`` it is the plain sum of cross-entropies."""
    torch.manual_seed(0)
    x, y = torch.randn(16, 40), torch.randint(0, 10, (16,))
    for distill in (0.0, 0.7):
        model = build("mnist1d-cnn-exits", distill=distill, temperature=3.0).eval()
        forward, loss = joint_loss(model, y)
        stacked = forward(x)
        got = loss(stacked, torch.arange(16))
        ce = [torch.nn.functional.cross_entropy(stacked[:, i], y) for i in range(3)]
        soft = [torch.nn.functional.kl_div(
            torch.log_softmax(stacked[:, i] / 3.0, -1), torch.log_softmax(stacked[:, 2] / 3.0, -1),
            reduction="batchmean", log_target=True) for i in range(2)]
        want = ce[2] + sum(distill * 9.0 * s + (1 - distill) * c
                           for s, c in zip(soft, ce[:2], strict=True))
        torch.testing.assert_close(got, want)
    # the final head's gradient comes from its own cross-entropy alone
    stacked = forward(x)
    loss(stacked, torch.arange(16)).backward()
    g_joint = model.head.weight.grad.clone()
    model.zero_grad()
    torch.nn.functional.cross_entropy(forward(x)[:, 2], y).backward()
    torch.testing.assert_close(g_joint, model.head.weight.grad)
