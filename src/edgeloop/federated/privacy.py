"""Differential privacy of the federated body: clipping on the device, Gaussian noise on
the server, ε from a Rényi accountant, and a budget each device enforces on itself.

The mechanism is DP-FedAvg with fixed clipping (McMahan et al., "Learning Differentially
Private Recurrent Language Models", ICLR 2018): every device clips its body *update* to L2
norm ``C`` (Flower's ``fixedclipping_mod``), all devices weigh the same (``num-examples``
1), and the server adds N(0, (z·C/m)²) to the mean of the m updates it aggregated, z being
the noise multiplier. The trust model is central DP: the server adds the noise.

Two server paths, one accounting:

- **plain aggregation**: Flower's ``DifferentialPrivacyClientSideFixedClipping`` with
  Flower's ``RdpAccountant`` (the only setting it accepts: no sampling amplification,
  add-or-remove-one). Flower skips aggregation when *any* device fails, so this path takes
  neither injected dropouts nor device budgets (the run's config refuses both).
- **SecAgg+**: Flower's wrapper cannot be used (it drops every round that has a failure,
  and SecAgg+ reports every dropout as one), so :mod:`.secagg` adds the noise itself with
  m = the devices that survived, and accounts each release as sampling without replacement
  (k of N, replace-one), the way Flower's strategies sample.

Both use Flower's ``RdpAccountant`` (a wrapper of Google's ``dp-accounting``) with explicit
RDP orders: the library's defaults make ``dp-accounting`` log dozens of convergence warnings.

A device's budget: each device keeps its own accountant in ``privacy.json`` in its state
folder (written atomically, under a lock). Every time it takes part it composes one
Gaussian release of noise multiplier z (its own view: no amplification); before it trains
it refuses when that would take its ε for the current period past its budget.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord
from flwr.app.message_type import MessageType
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.serverapp import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyConfig,
    RdpAccountant,
    SamplingMethod,
)
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping, Strategy

from edgeloop._io import locked, write_text_atomic
from edgeloop.errors import EdgeloopError, UsageError
from edgeloop.federated.client import state_dir

__all__ = ["BUDGET_FILE", "ORDERS", "BudgetSpent", "DPPlan", "DeviceBudget", "add_noise",
           "budget_mod", "calibrate", "clip_mod", "dp_strategy", "epsilon", "equal_weights_mod",
           "new_accountant", "noise_to_clip", "positive_variances", "refusals"]

BUDGET_FILE = "privacy.json"
# RDP orders: fine steps where small ε is decided, integers up to 63 for large noise
ORDERS: tuple[float, ...] = tuple([1 + x / 10 for x in range(1, 100)] + list(range(12, 64)))
REFUSAL = "privacy budget spent"   # in a refusing device's error; the server counts these
_Z_RANGE = (0.05, 200.0)           # noise multipliers the calibration searches
VAR_FLOOR = 1e-2                   # least BatchNorm variance after noise

logging.getLogger("absl").setLevel(logging.ERROR)   # dp-accounting's convergence notes


def new_accountant(population: int, *, secagg: bool, delta: float) -> RdpAccountant:
    """Flower's ``RdpAccountant`` for a run of ``population`` devices: sampling without
    replacement, replace-one under SecAgg+; no amplification, add-or-remove-one (all that
    Flower's DP wrapper accepts) otherwise."""
    if secagg:
        config = PrivacyConfig(target_delta=delta, population_size=population,
                               neighboring_relation=NeighboringRelation.REPLACE_ONE,
                               sampling_method=SamplingMethod.WITHOUT_REPLACEMENT)
    else:
        config = PrivacyConfig(target_delta=delta, population_size=population,
                               neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                               sampling_method=SamplingMethod.NO_AMPLIFICATION)
    return RdpAccountant(config, orders=ORDERS)


def epsilon(noise_multiplier: float, *, rounds: int, population: int, sampled: int,
            secagg: bool, delta: float) -> float:
    """ε after ``rounds`` releases of ``sampled`` of ``population`` devices."""
    acc = new_accountant(population, secagg=secagg, delta=delta)
    acc.compose(GaussianPrivacyEvent(noise_multiplier, sampled, population), rounds)
    return acc.get_epsilon(delta)


def calibrate(target_epsilon: float, *, rounds: int, population: int, sampled: int,
              secagg: bool, delta: float) -> float:
    """The smallest noise multiplier z (to 0.5%) whose ε after ``rounds`` releases is at
    most ``target_epsilon``; bisection on log z (ε falls as z grows)."""
    def eps(z: float) -> float:
        return epsilon(z, rounds=rounds, population=population, sampled=sampled,
                       secagg=secagg, delta=delta)

    low, high = _Z_RANGE
    if eps(high) > target_epsilon:
        raise UsageError(f"ε {target_epsilon:g} cannot be reached in {rounds} rounds with "
                         f"noise multiplier up to {high:g}; ask for a larger ε")
    if eps(low) <= target_epsilon:
        return low
    while high / low > 1.005:
        mid = math.sqrt(low * high)
        low, high = (low, mid) if eps(mid) <= target_epsilon else (mid, high)
    return high


@dataclass(frozen=True)
class DPPlan:
    """The DP settings of one run, as server and devices both use them."""

    noise_multiplier: float        # z: the noise's std over the mean update's sensitivity
    clip: float                    # C: L2 norm each device's body update is clipped to
    delta: float                   # δ of every ε reported
    population: int                # devices in the run (N)
    sampled: int                   # devices sampled per round (k)
    secagg: bool                   # which accounting (module docstring)

    @classmethod
    def for_target(cls, target_epsilon: float, *, clip: float, rounds: int, population: int,
                   sampled: int, secagg: bool, delta: float) -> DPPlan:
        """The plan whose ε after ``rounds`` rounds is at most ``target_epsilon``."""
        z = calibrate(target_epsilon, rounds=rounds, population=population, sampled=sampled,
                      secagg=secagg, delta=delta)
        return cls(z, clip, delta, population, sampled, secagg)

    def event(self) -> GaussianPrivacyEvent:
        """One round's release, for the server's accountant."""
        return GaussianPrivacyEvent(self.noise_multiplier, self.sampled, self.population)

    def noise_std(self, survivors: int) -> float:
        """The std of the noise added to the mean of ``survivors`` clipped updates."""
        return self.noise_multiplier * self.clip / survivors


def noise_to_clip(noise_multiplier: float, *, sampled: int, entries: int) -> float:
    """The L2 norm of one round's noise over a shared model of ``entries`` numbers, as a
    multiple of the clip C (the mean of ``sampled`` clipped updates has norm at most C):
    z·√entries / sampled. Above 1, a round's noise outweighs all of its signal."""
    return noise_multiplier * math.sqrt(entries) / sampled


def add_noise(arrays: list[np.ndarray], std: float, rng: np.random.Generator
              ) -> list[np.ndarray]:
    """``arrays`` plus independent N(0, std²) noise on every entry (dtypes kept)."""
    return [(a + rng.normal(0.0, std, a.shape)).astype(a.dtype) for a in arrays]


def positive_variances(keys: list[str], arrays: list[np.ndarray]) -> list[np.ndarray]:
    """``arrays`` (named by ``keys``) with every BatchNorm ``running_var`` at least
    ``VAR_FLOOR``: noise can make a variance negative, and the model then outputs NaN.
    Post-processing of a DP release, so it costs no privacy."""
    return [np.maximum(a, VAR_FLOOR).astype(a.dtype) if k.endswith("running_var") else a
            for k, a in zip(keys, arrays, strict=True)]


class _DPFixedClipping(DifferentialPrivacyClientSideFixedClipping):
    """Flower's wrapper, its noisy mean post-processed by :func:`positive_variances`."""

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is not None:
            keys = list(arrays)
            arrays = ArrayRecord({k: Array(a) for k, a in zip(keys, positive_variances(
                keys, arrays.to_numpy_ndarrays()), strict=True)})
        return arrays, metrics


def dp_strategy(strategy: Strategy, plan: DPPlan) -> DifferentialPrivacyClientSideFixedClipping:
    """Flower's client-side fixed-clipping DP wrapper around ``strategy`` (plain path),
    with Flower's accountant; ``privacy_spent()`` gives ε after each round."""
    return _DPFixedClipping(
        strategy, noise_multiplier=plan.noise_multiplier, clipping_norm=plan.clip,
        num_sampled_clients=plan.sampled,
        accountant=new_accountant(plan.population, secagg=False, delta=plan.delta))


def clip_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Client mod: Flower's ``fixedclipping_mod`` on train messages only (it answers any
    other message without a clipping norm, an evaluate one too, with an error)."""
    if msg.metadata.message_type == MessageType.TRAIN:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


def equal_weights_mod(msg: Message, context: Context, call_next: ClientAppCallable
                      ) -> Message:
    """Client mod: a train reply weighs 1 (``num-examples``), so the mean's sensitivity
    to one device is C/m whatever its data size (Flower's DP wrapper checks it), and
    carries no other metric: ε accounts for the clipped update, not for a device's loss
    sent beside it."""
    reply = call_next(msg, context)
    if msg.metadata.message_type == MessageType.TRAIN and reply.has_content():
        reply.content["metrics"] = MetricRecord({"num-examples": 1})
    return reply


class BudgetSpent(EdgeloopError):
    """A device refused to take part: its ε for the period would pass its budget."""


class DeviceBudget:
    """A device's own ε ledger in ``folder/privacy.json``: one Gaussian release of noise
    multiplier z per round it takes part in, reset when ``period`` seconds have passed
    since the period began."""

    def __init__(self, folder: str | os.PathLike[str], *, budget: float, delta: float,
                 period: float = 30 * 86400.0) -> None:
        self.path = Path(folder) / BUDGET_FILE
        self.budget = budget
        self.delta = delta
        self.period = period

    def _accountant(self) -> RdpAccountant:
        return RdpAccountant(PrivacyConfig(
            target_delta=self.delta, population_size=1,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION), orders=ORDERS)

    def _load(self, now: float) -> tuple[RdpAccountant, float]:
        acc = self._accountant()
        if self.path.is_file():
            state = json.loads(self.path.read_text())
            if now - float(state["period-start"]) < self.period:
                acc.load_state_dict(state["accountant"])
                return acc, float(state["period-start"])
        return acc, now

    def spent(self, now: float | None = None) -> float:
        """ε this device has spent in the current period (0 before any release)."""
        acc, _ = self._load(time.time() if now is None else now)
        return acc.get_epsilon(self.delta) if acc.num_releases else 0.0

    def admit(self, noise_multiplier: float, now: float | None = None) -> None:
        """Record one release of ``noise_multiplier`` if it keeps ε within the budget;
        raise :class:`BudgetSpent` (recording nothing) if it would not."""
        now = time.time() if now is None else now
        event = GaussianPrivacyEvent(noise_multiplier, 1, 1)
        with locked(self.path.with_suffix(".lock")):
            acc, start = self._load(now)
            if acc.would_exceed(event, max_epsilon=self.budget):
                spent = acc.get_epsilon(self.delta) if acc.num_releases else 0.0
                raise BudgetSpent(f"{REFUSAL}: ε {spent:.3g} of {self.budget:g} this period; "
                                  "one more round would pass it")
            acc.compose(event)
            write_text_atomic(self.path, json.dumps(
                {"period-start": start, "period-seconds": self.period,
                 "budget": self.budget, "accountant": acc.state_dict()}, indent=1) + "\n")


def budget_mod(*, budget: float, plan: DPPlan, state_root: str | os.PathLike[str] | None,
               gate: Callable[[Message], bool] | None = None) -> Mod:
    """Client mod enforcing a device's own budget before it trains (:class:`DeviceBudget`)
    on the train messages ``gate`` picks (default: every one). Under SecAgg+ it sits
    before ``secaggplus_mod`` and picks the protocol's setup stage, so that a refusal
    is a device declining the round rather than a dropout mid-protocol."""
    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if msg.metadata.message_type == MessageType.TRAIN and (gate is None or gate(msg)):
            folder = state_dir(dict(context.node_config), state_root)
            DeviceBudget(folder, budget=budget, delta=plan.delta).admit(plan.noise_multiplier)
        return call_next(msg, context)

    return mod


def refusals(reasons: list[str]) -> int:
    """How many of the devices' error ``reasons`` are budget refusals."""
    return sum(REFUSAL in r for r in reasons)
