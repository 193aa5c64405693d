"""Private aggregation on Flower: SecAgg+ with mid-round dropouts (checked against the plain
mean of the survivors' bodies), DP (clipping seen on what devices send, the noise's std,
ε against dp-accounting), per-device budgets, halted rounds, the bytes a device sends
under SecAgg+, and the command line's bad input.

Four real simulations of 5 devices (Flower's simulation engine on Ray, one round or two
each: SecAgg+ with dropouts, SecAgg+ with DP, device budgets, DP without SecAgg);
everything else is pure."""

from __future__ import annotations

import importlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")
pytest.importorskip("dp_accounting")

from dp_accounting import dp_event
from dp_accounting.privacy_accountant import NeighboringRelation
from dp_accounting.rdp import RdpAccountant
from flwr.app import Context, Message
from flwr.app.message_type import MessageType
from flwr.clientapp.typing import ClientAppCallable
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from test_federated import _short_baselines

from edgeloop.cli import main
from edgeloop.errors import TransportError, UsageError
from edgeloop.federated import mnist1d_partition
from edgeloop.federated.config import PrivateConfig, SimulationConfig
from edgeloop.federated.privacy import (
    ORDERS,
    BudgetSpent,
    DeviceBudget,
    calibrate,
    epsilon,
)
from edgeloop.federated.secagg import dropped, legacy_train_mod, secagg_parameters
from edgeloop.federated.simulation import SimulationResult, simulate

simulate_module = importlib.import_module("edgeloop.federated.simulation")
CLIENTS = 5
DELTA = 1e-5
Run = tuple[SimulationResult, Path, Path, Path]              # result, tap, wire, out
Taps = dict[int, tuple[list[np.ndarray], list[np.ndarray], int]]
logging.getLogger("absl").setLevel(logging.ERROR)


def _dp_accounting_epsilon(z: float, rounds: int, population: int, sampled: int) -> float:
    """The oracle: Google's dp-accounting itself, no Flower in between."""
    acc = RdpAccountant(list(ORDERS), NeighboringRelation.REPLACE_ONE)
    acc.compose(dp_event.SampledWithoutReplacementDpEvent(
        population, sampled, dp_event.GaussianDpEvent(z)), rounds)
    return float(acc.get_epsilon(DELTA))


def _device_epsilon(z: float, releases: int) -> float:
    acc = RdpAccountant(list(ORDERS), NeighboringRelation.ADD_OR_REMOVE_ONE)
    acc.compose(dp_event.GaussianDpEvent(z), releases)
    return float(acc.get_epsilon(DELTA))


# --- pure parts -------------------------------------------------------------------------

@pytest.mark.parametrize("sampled,survive", [(5, 0.3), (20, 0.3), (100, 0.3), (20, 0.1)])
def test_shares_and_threshold_survive_the_asked_dropout(sampled: int, survive: float) -> None:
    shares, threshold = secagg_parameters(sampled, survive)
    assert 2 <= threshold < shares <= sampled
    assert shares - round(survive * sampled + 0.5) >= threshold   # the rule, rounded up


def test_a_secagg_setting_that_cannot_survive_is_refused() -> None:
    with pytest.raises(UsageError, match=r"cannot survive 1 dropouts"):
        secagg_parameters(2, 0.3)


def test_injected_dropouts_fail_the_asked_fraction_every_round() -> None:
    for server_round in (1, 2, 3):
        failed = [p for p in range(20) if dropped(p, 20, server_round, 0.3, seed=0)]
        assert len(failed) == 6
    assert failed != [p for p in range(20) if dropped(p, 20, 1, 0.3, seed=0)]


def test_epsilon_is_dp_accountings_and_calibration_meets_the_target() -> None:
    for z in (0.8, 2.0):
        assert epsilon(z, rounds=4, population=10, sampled=10, secagg=True, delta=DELTA) == \
            pytest.approx(_dp_accounting_epsilon(z, 4, 10, 10), rel=1e-9)
    for target in (8.0, 2.0):
        z = calibrate(target, rounds=3, population=20, sampled=20, secagg=True, delta=DELTA)
        assert _dp_accounting_epsilon(z, 3, 20, 20) <= target
        assert _dp_accounting_epsilon(z * 0.99, 3, 20, 20) > target   # not much more noise


def test_a_device_budget_refuses_past_it_and_persists(tmp_path: Path) -> None:
    z = 1.0
    budget = _device_epsilon(z, 2) + 1e-6
    ledger = DeviceBudget(tmp_path, budget=budget, delta=DELTA)
    ledger.admit(z, now=1000.0)
    ledger.admit(z, now=1001.0)
    with pytest.raises(BudgetSpent, match="privacy budget spent"):
        ledger.admit(z, now=1002.0)
    again = DeviceBudget(tmp_path, budget=budget, delta=DELTA)   # another run, same disk
    assert again.spent(now=1003.0) == pytest.approx(_device_epsilon(z, 2))
    with pytest.raises(BudgetSpent):
        again.admit(z, now=1004.0)
    again.admit(z, now=1000.0 + again.period + 1)                 # a new period
    assert again.spent(now=1000.0 + again.period + 2) == pytest.approx(_device_epsilon(z, 1))


@pytest.mark.parametrize("args,message", [
    (["--dp-epsilon", "0"], "`dp_epsilon` must be > 0; got 0"),
    (["--dp-epsilon", "-1"], "`dp_epsilon` must be > 0; got -1"),
    (["--dropout", "0.6"], "`dropout` must be in [0, 0.5]; got 0.6"),
    (["--dropout", "-0.1"], "`dropout` must be in [0, 0.5]; got -0.1"),
    (["--dp-clip", "0", "--dp-epsilon", "2"], "`dp_clip` must be > 0; got 0"),
    (["--device-budget", "2"], "`device_budget` needs DP"),
    (["--device-budget", "0", "--dp-epsilon", "2", "--secagg"],
     "`device_budget` must be > 0; got 0"),
    (["--dp-epsilon", "2", "--dropout", "0.1"], "needs `secagg`"),
    (["--secagg", "--clients", "2"], "SecAgg+ over 2 devices cannot survive"),
    (["--dp-epsilon", "2"], "accounts only for fedavg or fedprox; got `strategy` 'fedavgm'"),
    (["--fraction", "1.5"], "`fraction` must be in (0, 1]"),
])
def test_bad_private_input_is_one_line_and_exit_2(args: list[str], message: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["federated", "simulate", "--rounds", "1", *args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1 and message in err, err


# --- real simulations -------------------------------------------------------------------

class Tap:
    """A client mod inside SecAgg+'s masking, outside clipping: keeps, per device and
    round, the global body it received and the (clipped) body it hands to the mask."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def __call__(self, msg: Message, context: Context, call_next: ClientAppCallable
                 ) -> Message:
        reply = call_next(msg, context)
        if msg.metadata.message_type != MessageType.TRAIN:
            return reply
        pid = int(context.node_config["partition-id"])
        server_round = int(msg.content["config"]["server-round"])
        got = msg.content["arrays"].to_numpy_ndarrays()
        sent = reply.content["arrays"].to_numpy_ndarrays()
        np.savez(self.folder / f"r{server_round}-{pid}.npz", *got, *sent,
                 weight=np.array(int(reply.content["metrics"]["num-examples"])))
        return reply


class Carry:
    """The outermost client mod: puts a device's ledger from an earlier run in its state
    folder before the device first handles a message."""

    def __init__(self, ledgers: dict[int, Path], devices: Path) -> None:
        self.ledgers, self.devices = ledgers, devices

    def __call__(self, msg: Message, context: Context, call_next: ClientAppCallable
                 ) -> Message:
        pid = int(context.node_config["partition-id"])
        target = self.devices / f"node-{pid}" / "privacy.json"
        if pid in self.ledgers and not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(self.ledgers[pid], target)
        return call_next(msg, context)


class Wire:
    """The outermost client mod: every reply exactly as serialised for the wire."""

    def __init__(self, folder: Path, devices: Path) -> None:
        self.folder, self.devices = folder, devices

    def __call__(self, msg: Message, context: Context, call_next: ClientAppCallable
                 ) -> Message:
        reply = call_next(msg, context)
        pid = int(context.node_config["partition-id"])
        name = f"{msg.metadata.message_type}-{pid}-{time.monotonic_ns()}"
        (self.folder / f"{name}.wire").write_bytes(
            b"".join(o.deflate() for o in get_all_nested_objects(reply).values()))
        head = self.devices / f"node-{pid}" / "head.pt"
        if head.is_file():
            shutil.copy(head, self.folder / f"{name}.head")
        return reply


def _simulate(root: Path, private: PrivateConfig, *, rounds: int = 1,
              devices: Path | None = None, monkeypatch: pytest.MonkeyPatch,
              outer: list[Any] | None = None, head_epochs: int = 0) -> Run:
    """One run with a Tap inside SecAgg+ (before clipping) and a Wire outermost.

    What is asserted here is the shared body, ε and the bytes sent: the private heads'
    fine-tune is skipped unless asked for (``head_epochs``), and the local-only baselines
    trained after the run are cut short (:func:`_short_baselines`)."""
    devices = devices or root / "devices"
    tap, wire, out = root / "tap", root / "wire", root / "out"
    for folder in (tap, wire):
        folder.mkdir(parents=True)
    original: Callable[..., list[Any]] = simulate_module.private_mods

    def with_tap(*args: Any, **kwargs: Any) -> list[Any]:
        mods = original(*args, **kwargs)
        at = next(i for i, m in enumerate(mods) if m.__qualname__.startswith(
            legacy_train_mod.__qualname__)) + 1
        return [*mods[:at], Tap(tap), *mods[at:]]

    with monkeypatch.context() as m:
        m.setattr(simulate_module, "private_mods", with_tap)
        _short_baselines(m)
        result = simulate(SimulationConfig(clients=CLIENTS, rounds=rounds, timeout=300,
                                           head_epochs=head_epochs, private=private),
                          devices=devices, out=out, mods=[*(outer or []), Wire(wire, devices)])
    return result, tap, wire, out


def _taps(tap: Path, server_round: int) -> Taps:
    """Per surviving device: the body it received, the body it sent, its weight."""
    taps = {}
    for path in sorted(tap.glob(f"r{server_round}-*.npz")):
        with np.load(path) as z:
            arrays = [z[f"arr_{i}"] for i in range(len(z.files) - 1)]
            half = len(arrays) // 2
            taps[int(path.stem.split("-")[1])] = (arrays[:half], arrays[half:], int(z["weight"]))
    return taps


def _final_body(out: Path) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in torch.load(out / "body.pt", weights_only=True).items()}


@pytest.fixture(scope="module")
def secagg_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    with pytest.MonkeyPatch.context() as mp:
        return _simulate(tmp_path_factory.mktemp("secagg"),
                         PrivateConfig(secagg=True, dropout=0.3, stage_timeout=120),
                         monkeypatch=mp, head_epochs=1)   # a head to look for on the wire


def test_secagg_round_completes_with_30_percent_dropped_and_gives_the_survivors_mean(
        secagg_run: Run) -> None:
    result, tap, _, out = secagg_run
    (report,) = result.rounds
    survivors = _taps(tap, 1)
    expected_drop = [p for p in range(CLIENTS) if dropped(p, CLIENTS, 1, 0.3, seed=0)]
    assert len(expected_drop) == 2 and set(survivors) == set(range(CLIENTS)) - set(expected_drop)
    assert not report.halted and report.replies == 3 and report.failures == 2
    assert report.train_loss is not None and report.train_loss > 0   # no DP: sent
    # the oracle: the plain weighted mean of what the survivors handed to the mask
    weights = np.array([min(w, 1000) for _, _, w in survivors.values()],  # max_weight
                       dtype=np.float64)
    final = list(_final_body(out).values())
    for i, got in enumerate(final):
        mean = sum(w * s[1][i].astype(np.float64)
                   for w, s in zip(weights, survivors.values(), strict=True)) / weights.sum()
        assert np.abs(got - mean).max() < 1e-4, i   # SecAgg+'s quantisation step is 3.8e-6


def test_under_secagg_a_device_sends_only_masked_vectors(
        secagg_run: Run) -> None:
    _, tap, wire, _ = secagg_run
    bodies = {pid: sent for pid, (_, sent, _) in _taps(tap, 1).items()}
    replies = sorted(wire.glob("*.wire"))
    assert replies
    for path in replies:
        sent = path.read_bytes()
        stem = path.name.removesuffix(".wire")
        pid = int(stem.split("-")[1])
        for array in bodies.get(pid, []):
            if array.size >= 8:
                assert array.tobytes() not in sent, f"{stem} sent its plain body"
        head_file = wire / f"{stem}.head"
        if head_file.is_file():
            for tensor in torch.load(head_file, weights_only=True).values():
                rows = tensor.numpy().reshape(-1 if tensor.ndim > 1 else 1, tensor.shape[-1])
                assert all(r.tobytes() not in sent for r in rows), f"{stem} sent its head"
        data = mnist1d_partition(pid, CLIENTS)
        assert all(row.tobytes() not in sent for row in data.train.inputs["x"]), stem


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    with pytest.MonkeyPatch.context() as mp:
        return _simulate(tmp_path_factory.mktemp("dp"),
                         PrivateConfig(secagg=True, dropout=0.3, dp_epsilon=8.0, dp_clip=0.5,
                                       device_budget=50.0),
                         monkeypatch=mp)


def test_dp_clips_what_devices_send_and_adds_noise_for_the_survivors(
        dp_run: Run) -> None:
    result, tap, _, out = dp_run
    z, clip = result.noise_multiplier, 0.5
    assert z is not None
    survivors = _taps(tap, 1)
    assert len(survivors) == 3
    for got, sent, _ in survivors.values():
        update = np.sqrt(sum(((s.astype(np.float64) - g) ** 2).sum()
                             for g, s in zip(got, sent, strict=True)))
        assert update <= clip * (1 + 1e-5)
    keys = list(_final_body(out))
    final = list(_final_body(out).values())
    residual = np.concatenate([
        (got - np.mean([s[1][i].astype(np.float64) for s in survivors.values()], axis=0)).ravel()
        for i, (k, got) in enumerate(zip(keys, final, strict=True))
        if not k.endswith("running_var")])
    std = z * clip / 3
    assert residual.std() == pytest.approx(std, rel=0.03)
    assert abs(residual.mean()) < 5 * std / np.sqrt(residual.size)
    # ε covers the clipped update: no device sent its loss beside it
    assert all(r.train_loss is None for r in result.rounds)


def test_the_reported_epsilon_is_dp_accountings(
        dp_run: Run) -> None:
    result, *_ = dp_run
    (report,) = result.rounds
    assert result.noise_multiplier is not None
    assert report.epsilon == pytest.approx(
        _dp_accounting_epsilon(result.noise_multiplier, 1, CLIENTS, CLIENTS), rel=1e-9)
    assert report.epsilon <= 8.0


def test_a_device_past_its_budget_refuses_and_the_round_completes_then_halts(
        dp_run: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first, tap, _, _ = dp_run
    z_first = first.noise_multiplier
    assert z_first is not None
    # two rounds need more noise for the same target ε; each device can afford one
    z = calibrate(8.0, rounds=2, population=CLIENTS, sampled=CLIENTS, secagg=True,
                  delta=DELTA)
    budget = _device_epsilon(z, 1) * 1.001
    # devices 0 and 1 come with their ledgers from the first run (a device's state folder
    # persists; simulate refuses a devices folder holding state, so they are put in place
    # as each device first runs), each already holding one round
    ledgers = {}
    for pid in (0, 1):
        ledger = tap.parent / "devices" / f"node-{pid}" / "privacy.json"
        state = json.loads(ledger.read_text())
        assert state["accountant"]["compositions"][0]["event"]["noise_multiplier"] == z_first
        ledgers[pid] = ledger
    devices = tmp_path / "devices"
    result, *_ = _simulate(tmp_path / "run", PrivateConfig(
        secagg=True, dp_epsilon=8.0, dp_clip=0.5, device_budget=budget),
        rounds=2, devices=devices, monkeypatch=monkeypatch, outer=[Carry(ledgers, devices)])
    assert result.noise_multiplier == z
    first_round, second_round = result.rounds
    assert first_round.refused == 2 and first_round.replies == 3 and not first_round.halted
    assert second_round.refused == CLIENTS and second_round.halted
    assert second_round.update_norm == 0 and second_round.epsilon == first_round.epsilon
    for pid in range(CLIENTS):
        spent = DeviceBudget(devices / f"node-{pid}", budget=budget, delta=DELTA).spent()
        assert spent == pytest.approx(_device_epsilon(z_first if pid < 2 else z, 1))


def test_plain_dp_uses_flowers_wrapper_and_reports_its_accountants_epsilon(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _short_baselines(monkeypatch)
    result = simulate(SimulationConfig(clients=CLIENTS, rounds=1, timeout=300, strategy="fedavg",
                                       head_epochs=0, private=PrivateConfig(dp_epsilon=8.0)),
                      devices=tmp_path / "devices")
    (report,) = result.rounds
    z = result.noise_multiplier
    assert z is not None and report.replies == CLIENTS and report.update_norm > 0
    assert report.train_loss is None        # a DP device sends its clipped update alone
    # Flower's wrapper accepts no amplification only: one Gaussian release, add/remove
    assert report.epsilon == pytest.approx(_device_epsilon(z, 1), rel=1e-9)
    assert report.epsilon <= 8.0


def test_a_run_whose_every_secagg_round_halts_is_one_error(tmp_path: Path) -> None:
    rounds: list[Any] = []
    # shares and threshold set for 10% dropouts (5 of 5, threshold 4); 2 of 5 drop
    halted = (r"every SecAgg\+ round halted, the body never changed \(2 of 5 devices "
              r"failed, e.g. injected dropout\)$")
    with pytest.raises(TransportError, match=halted):
        simulate(SimulationConfig(clients=CLIENTS, rounds=1, timeout=300, head_epochs=0,
                                  private=PrivateConfig(secagg=True, survive=0.1, dropout=0.5)),
                 devices=tmp_path / "devices", on_round=rounds.append)
    (report,) = rounds
    assert report.halted and report.replies == 0 and report.update_norm == 0
