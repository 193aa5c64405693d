"""Federated personalisation on Flower: the body/head split, the non-IID split, FedProx's
term, the round watch, the command line's bad input, and one real simulation (Flower's
simulation engine on Ray) whose every client reply is serialised and searched for the
device's private head and raw inputs."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("flwr")

from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.serverapp.strategy import Strategy
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from edgeloop.cli import main
from edgeloop.errors import TransportError, UsageError, VerificationError
from edgeloop.federated import (
    ServerConfig,
    SimulationConfig,
    SimulationResult,
    dirichlet_split,
    mnist1d_partition,
    simulate,
    split_model,
)
from edgeloop.federated.local import fit_local
from edgeloop.federated.partition import label_skew
from edgeloop.federated.server import _RoundWatch
from edgeloop.zoo.models import MNIST1DCNN, MNIST1DMLP

simulation_module = importlib.import_module("edgeloop.federated.simulation")
CLIENTS, ROUNDS = 3, 2
Run = tuple[SimulationResult, Path, Path, Path]


# --- the split ------------------------------------------------------------------------

def test_the_default_head_is_the_head_module_or_the_last_linear() -> None:
    cnn = split_model(MNIST1DCNN(width=4))
    assert cnn.head == "head." and set(cnn.head_keys) == {"head.weight", "head.bias"}
    assert "features.0.0.weight" in cnn.body_keys
    assert not any(k.endswith("num_batches_tracked") for k in cnn.body_keys)
    mlp = split_model(MNIST1DMLP(hidden=8))
    assert mlp.head == "net.4." and "net.0.weight" in mlp.body_keys


@pytest.mark.parametrize("model,head,message", [
    (nn.Sequential(nn.Conv1d(1, 2, 3), nn.ReLU()), None, "no `head` module and no nn.Linear"),
    (nn.Linear(4, 2), None, "no body is left"),
    (MNIST1DCNN(width=4), "classifier", "names no trainable parameter"),
], ids=["no linear", "only a head", "unknown prefix"])
def test_a_model_without_a_usable_split_is_a_usage_error(model: nn.Module, head: str | None,
                                                        message: str) -> None:
    with pytest.raises(UsageError, match=message):
        split_model(model, head)


# --- the data -------------------------------------------------------------------------

def test_dirichlet_split_assigns_every_sample_once_and_skews_with_alpha() -> None:
    labels = np.random.default_rng(0).integers(0, 10, 2000)
    skews = []
    for alpha in (100.0, 1.0, 0.1):
        parts = dirichlet_split(labels, 20, alpha, seed=1)
        joined = np.concatenate(parts)
        assert len(joined) == len(labels) and len(np.unique(joined)) == len(labels)
        assert min(map(len, parts)) >= len(labels) // 20
        skews.append(label_skew([labels[p] for p in parts]))
    assert skews[0] < skews[1] < skews[2], skews
    again = dirichlet_split(labels, 20, 0.1, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


def test_devices_have_their_own_split_and_input_shift() -> None:
    a, b = mnist1d_partition(0, 4), mnist1d_partition(1, 4)
    assert a.shift != b.shift
    assert len(a.train) > len(a.test) > 0
    rows = {r.tobytes() for r in a.train.inputs["x"]}
    assert not rows & {r.tobytes() for r in a.test.inputs["x"]}
    assert not rows & {r.tobytes() for r in b.train.inputs["x"]}
    again = mnist1d_partition(0, 4)
    assert np.array_equal(again.train.inputs["x"], a.train.inputs["x"])


# --- local training and the server's checks ------------------------------------------

def test_the_proximal_term_pulls_the_body_towards_the_global_one() -> None:
    data = mnist1d_partition(0, 4).train
    moved = {}
    for mu in (0.0, 10.0):
        torch.manual_seed(0)
        model = MNIST1DCNN(width=8)
        split = split_model(model)
        start = split.body(model)
        fit_local(model, split, data, epochs=2, lr=3e-3, proximal_mu=mu, seed=0)
        end = split.body(model)
        moved[mu] = sum(float((end[k].float() - start[k].float()).norm()) for k in start
                        if "running" not in k)
    assert moved[10.0] < 0.8 * moved[0.0], moved


def test_weight_decay_shrinks_the_weights_sgd_trains() -> None:
    data = mnist1d_partition(0, 4).train
    norms = {}
    for decay in (0.0, 0.05):
        torch.manual_seed(0)
        model = MNIST1DCNN(width=8)
        fit_local(model, split_model(model), data, epochs=3, lr=0.05, momentum=0.9,
                  weight_decay=decay, seed=0)
        norms[decay] = float(torch.cat([p.detach().flatten() for p in model.parameters()
                                        ]).norm())
    assert norms[0.05] < 0.9 * norms[0.0], norms


class _Unchanged(Strategy):
    """A strategy whose aggregate is the body it sent: what a silently skipped round
    looks like from outside."""

    def configure_train(self, server_round, arrays, config, grid):  # type: ignore[no-untyped-def]
        self.arrays = arrays
        return []

    def aggregate_train(self, server_round, replies):  # type: ignore[no-untyped-def]
        return self.arrays, MetricRecord({"train-loss": 1.0})

    def configure_evaluate(self, server_round, arrays, config, grid):  # type: ignore[no-untyped-def]
        return []

    def aggregate_evaluate(self, server_round, replies):  # type: ignore[no-untyped-def]
        return None

    def summary(self) -> None:
        pass


def test_a_round_that_leaves_the_body_unchanged_fails() -> None:
    watch = _RoundWatch(_Unchanged(), ServerConfig(), None)
    arrays = ArrayRecord({"w": Array(np.ones(3, np.float32))})
    watch.configure_train(1, arrays, ConfigRecord(), None)  # type: ignore[arg-type]
    with pytest.raises(VerificationError, match="round 1 left the shared model unchanged"):
        watch.aggregate_train(1, [])


# --- the command line ------------------------------------------------------------------

@pytest.mark.parametrize("args,message", [
    (["--clients", "1"], "`clients` must be at least 2; got 1"),
    (["--rounds", "0"], "`rounds` must be at least 1; got 0"),
    (["--alpha", "0"], "`alpha` must be > 0; got 0"),
    (["--strategy", "fedsgd"], "`strategy` must be one of fedavg, fedavgm, fedprox, fedadam"),
    (["--weight-decay", "-1"], "`weight_decay` must be at least 0; got -1"),
    (["--out", __file__], f"`out` {__file__!r} cannot be used as a folder (File exists)"),
    (["--devices", __file__], f"`devices` {__file__!r} cannot be used as a folder"),
])
def test_bad_simulate_input_is_one_line_and_exit_2(args: list[str], message: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["federated", "simulate", *args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1 and message in err, err


def test_a_devices_folder_with_state_is_refused(tmp_path: Path) -> None:
    (tmp_path / "node-0").mkdir()
    with pytest.raises(UsageError, match="already holds device state"):
        simulate(SimulationConfig(clients=2, rounds=1), devices=tmp_path)


def test_without_flower_the_command_names_both_install_steps() -> None:
    code = ("import sys; sys.modules['flwr'] = None\n"
            "from edgeloop.cli import main; main(sys.argv[1:])")
    proc = subprocess.run([sys.executable, "-c", code, "federated", "simulate", "--clients", "2"],
                          capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, "EDGELOOP_QUIET": "1", "COLUMNS": "300"})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: this command needs `flwr`, which is not installed; install it with pip install "
        "'edgeloop[federated]' && pip install --no-deps flwr==1.42.0 dp-accounting==0.6.0"]


# --- a real simulation ----------------------------------------------------------------

class Spy:
    """The outermost client mod: serialises every reply exactly as Flower sends it (all
    of its inflatable objects, deflated) and keeps, beside it, the private head the device
    held when it replied (none before its first evaluation) and the shared model's arrays
    it put in the reply."""

    def __init__(self, folder: Path, devices: Path) -> None:
        self.folder, self.devices = folder, devices

    def __call__(self, msg: Message, context: Context, call_next: ClientAppCallable
                 ) -> Message:
        reply = call_next(msg, context)
        wire = b"".join(o.deflate() for o in get_all_nested_objects(reply).values())
        pid = int(context.node_config["partition-id"])
        name = f"{msg.metadata.message_type}-{pid}-{time.monotonic_ns()}"
        (self.folder / f"{name}.wire").write_bytes(wire)
        head = self.devices / f"node-{pid}" / "head.pt"
        if head.is_file():
            (self.folder / f"{name}.head").write_bytes(head.read_bytes())
        if "config" in msg.content:
            (self.folder / f"{name}.config.json").write_text(
                json.dumps(dict(msg.content["config"])))
        if "arrays" in reply.content:
            np.savez(self.folder / f"{name}.body.npz",
                     *reply.content["arrays"].to_numpy_ndarrays())
        return reply


def _descendants() -> set[int]:
    """Live processes below this one (from /proc)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = set(), {os.getpid()}
    while frontier:
        frontier = {p for p, pp in parents.items() if pp in frontier} - found
        found |= frontier
    return found


def _no_process_left(before: set[int]) -> None:
    """Every process started since ``before`` (Ray's) has ended, within 20 s."""
    deadline = time.monotonic() + 20
    while _descendants() - before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _descendants() - before, "Ray processes outlived the simulation"


def _short_baselines(mp: pytest.MonkeyPatch) -> None:
    """No test here asserts the local-only baselines simulate trains after the run (300
    steps per device): at 1 (one epoch) their code still runs, in a fraction of the time."""
    mp.setattr(simulation_module, "LOCAL_ONLY_STEPS", 1)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """One FedProx run: its result, the devices' folder, the spied replies, ``--out``."""
    root = tmp_path_factory.mktemp("federated")
    devices, wire, out = root / "devices", root / "wire", root / "out"
    wire.mkdir()
    before = _descendants()
    with pytest.MonkeyPatch.context() as mp:
        _short_baselines(mp)
        result = simulate(SimulationConfig(clients=CLIENTS, rounds=ROUNDS, strategy="fedprox",
                                           proximal_mu=0.1),
                          out=out, devices=devices, mods=[Spy(wire, devices)])
    _no_process_left(before)
    return result, devices, wire, out


def test_simulation_learns_and_keeps_heads_on_the_devices(run: Run) -> None:
    result, devices, _, out = run
    assert len(result.rounds) == ROUNDS
    assert all(r.update_norm > 0 and r.replies == CLIENTS for r in result.rounds)
    assert result.global_accuracy > 0.2            # chance is 0.1
    assert result.personalised_accuracy > 0.3
    assert all(0 < r.global_accuracy < 1 for r in result.rounds)
    heads = [torch.load(devices / f"node-{i}" / "head.pt", weights_only=True)
             for i in range(CLIENTS)]
    assert set(heads[0]) == {"head.weight", "head.bias"}
    assert not torch.equal(heads[0]["head.weight"], heads[1]["head.weight"])
    assert {p.name for p in out.iterdir()} == {"model.pt", "body.pt", "result.json"}
    body = torch.load(out / "body.pt", weights_only=True)
    assert not any(k.startswith("head.") for k in body)


def test_fedprox_sends_its_mu_and_the_settings_to_every_device(run: Run) -> None:
    _, _, wire, _ = run
    configs = [json.loads(p.read_text()) for p in wire.glob("train-*.config.json")]
    assert len(configs) == CLIENTS * ROUNDS
    assert all(c["proximal-mu"] == 0.1 and c["local-epochs"] == 1
               and c["weight-decay"] == ServerConfig().weight_decay for c in configs)


def test_what_a_device_sends_holds_the_shared_model_but_not_its_head_or_inputs(run: Run
                                                                               ) -> None:
    _, _, wire, _ = run
    replies = sorted(wire.glob("*.wire"))
    assert len(replies) == 2 * CLIENTS * ROUNDS    # train and evaluate, every round
    for path in replies:
        sent = path.read_bytes()
        stem = path.name.removesuffix(".wire")
        pid = int(stem.split("-")[1])
        kept = wire / f"{stem}.head"
        head = torch.load(kept, weights_only=True) if kept.is_file() else {}
        assert head or stem.startswith("train-"), stem   # evaluation writes the head
        for tensor in head.values():   # as float32 (arrays) and float64 (metrics)
            rows = tensor.numpy().reshape(-1 if tensor.ndim > 1 else 1, tensor.shape[-1])
            for row in (*rows, *rows.astype(np.float64)):
                assert row.tobytes() not in sent, f"{stem} sent its head"
        data = mnist1d_partition(pid, CLIENTS)
        for split in (data.train, data.test):
            assert all(row.tobytes() not in sent for row in split.inputs["x"]), stem
        if stem.startswith("train"):
            with np.load(wire / f"{stem}.body.npz") as body:
                assert len(body.files) > 1
                assert all(body[k].tobytes() in sent for k in body.files), stem


def test_the_byte_search_finds_a_head_when_one_is_sent() -> None:
    head = {"head.weight": torch.randn(10, 64), "head.bias": torch.randn(10)}
    leaky = RecordDict({"arrays": ArrayRecord(head), "metrics": MetricRecord({"n": 1})})
    sent = b"".join(o.deflate() for o in get_all_nested_objects(leaky).values())
    assert all(t.numpy().tobytes() in sent for t in head.values())


def _unplugged(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    raise RuntimeError("sensor unplugged")


def _cannot_evaluate(msg: Message, context: Context, call_next: ClientAppCallable
                     ) -> Message:
    if msg.metadata.message_type == MessageType.EVALUATE:
        raise RuntimeError("test data lost")
    return call_next(msg, context)


@pytest.mark.parametrize(("mod", "error"), [
    (_unplugged, r"round 1: no device's update arrived \(2 of 2 failed; sensor unplugged\)$"),
    pytest.param(_cannot_evaluate, r"round 1: every device failed to evaluate the new "
                 r"shared model \(2 of 2; test data lost\)$", marks=pytest.mark.heavy),
], ids=["train", "evaluate"])
def test_a_round_in_which_every_device_fails_is_one_error(mod: Mod, error: str) -> None:
    before = _descendants()
    with pytest.raises(TransportError, match=error):
        simulate(SimulationConfig(clients=2, rounds=1, timeout=300), mods=[mod])
    _no_process_left(before)


def test_fedavgm_steps_the_weights_but_averages_the_batchnorm_statistics(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A server optimiser's step is for parameters; BatchNorm's running statistics are
    the devices' plain mean (momentum on them drives a variance negative: NaN). Only the
    shared body matters here: no private head is fine-tuned (head_epochs=0)."""
    wire = tmp_path / "wire"
    wire.mkdir()
    _short_baselines(monkeypatch)
    simulate(SimulationConfig(clients=4, rounds=2, strategy="fedavgm", head_epochs=0),
             out=tmp_path / "out", devices=tmp_path / "devices",
             mods=[Spy(wire, tmp_path / "devices")])
    keys = split_model(MNIST1DCNN()).shared_keys     # the order of every reply's arrays
    replies, weights = [], []
    for config in wire.glob("train-*.config.json"):
        if json.loads(config.read_text())["server-round"] == 2:
            stem = config.name.removesuffix(".config.json")
            with np.load(wire / f"{stem}.body.npz") as arrays:
                replies.append([arrays[f"arr_{i}"] for i in range(len(keys))])
            weights.append(len(mnist1d_partition(int(stem.split("-")[1]), 4).train))
    assert len(replies) == 4
    final = torch.load(tmp_path / "out" / "body.pt", weights_only=True)
    stepped = 0
    for i, key in enumerate(keys):
        if key not in final:
            continue                                 # the global head: not in body.pt
        mean = np.average([r[i] for r in replies], axis=0, weights=weights)
        if key.endswith(("running_mean", "running_var")):
            np.testing.assert_allclose(final[key].numpy(), mean, rtol=1e-5, atol=1e-6)
        else:
            stepped += not np.allclose(final[key].numpy(), mean, rtol=1e-4, atol=1e-6)
    assert stepped > 0                               # momentum moved the parameters
