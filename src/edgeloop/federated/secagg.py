"""Secure aggregation of the body with Flower's SecAgg+, and where a run's private pieces
(SecAgg+, DP, device budgets, injected dropouts) are put together on both sides.

SecAgg+ (Bell et al., "Secure Single-Server Aggregation with (Poly)Logarithmic Overhead",
CCS 2020): each device masks its quantised update with pairwise masks shared with
``shares`` neighbours plus a private mask, and Shamir-shares its secrets so that any
``threshold`` of its neighbours can unmask the sum if it drops out. The server learns the
sum of the survivors' updates, never one device's.

**This module is the only place edgeloop uses Flower's legacy API.** In Flower 1.42 the
``SecAggPlusWorkflow`` runs only inside ``LegacyContext`` + ``DefaultWorkflow`` and calls a
legacy ``flwr.server.strategy`` strategy; the device side stays on the Message API (the
``ClientApp``'s ``@app.train``) behind ``secaggplus_mod``, with :func:`legacy_train_mod`
translating the legacy ``fitins``/``fitres`` records to and from the handler's
``arrays``/``config``/``metrics``, and refusing to pass on a reply that holds anything
but the body (the server cannot check what it only sees summed). Evaluation goes through
the Message API as elsewhere.

Also here, because they follow SecAgg+'s order: :func:`private_mods`, the client mods of a
run's private settings, and :func:`private_server_app`, the server for them.

Settings and why:

- every SecAgg+ stage and every round has a timeout (Flower's defaults wait forever);
- ``shares`` and ``threshold`` follow ``shares - max_dropouts >= threshold``: a device whose
  neighbours all dropped still has ``threshold`` of them to rebuild its secrets
  (:func:`secagg_parameters`; a setting that cannot survive the asked dropout is refused);
- SecAgg+ *halts* a round that loses too many devices without raising: the round watch
  compares the body before and after and reports such a round (``halted``);
- with DP, the noise is added here (std z·C/m for the m survivors) and accounted as one
  release per round: Flower's DP wrapper would throw away every round with a dropout.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    RecordDict,
)
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common import (
    Code,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common import recorddict_compat as compat
from flwr.server import Grid, LegacyContext, ServerApp
from flwr.server import ServerConfig as LegacyServerConfig
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAdam as LegacyFedAdam
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.strategy import FedAvgM as LegacyFedAvgM
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_PARAMS_RECORD
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.serverapp.strategy import FedAvg

from edgeloop.errors import TransportError, UsageError, VerificationError
from edgeloop.federated.config import ServerConfig
from edgeloop.federated.privacy import (
    DPPlan,
    add_noise,
    budget_mod,
    clip_mod,
    dp_strategy,
    equal_weights_mod,
    new_accountant,
    positive_variances,
    refusals,
)
from edgeloop.federated.server import (
    RoundReport,
    ServerResult,
    _short,
    averaged_statistics,
    metric,
    sample_evaluation,
    server_app,
    wait_for_devices,
)

__all__ = ["DROPOUT", "dp_plan", "dropout_mod", "dropped", "legacy_train_mod",
           "private_mods", "private_server_app", "secagg_parameters"]

DROPOUT = "injected dropout"   # the error an injected dropout raises
VALUE_RANGE = 32.0             # SecAgg+ clips every uploaded value to ±this, silently;
                               # BatchNorm's running variances of MNIST-1D reach ~13


def secagg_parameters(sampled: int, survive: float) -> tuple[int, int]:
    """SecAgg+'s ``(shares, threshold)`` for ``sampled`` devices of which a fraction
    ``survive`` may drop mid-round (or decline at setup): about half the devices as
    neighbours (all of them below 10), and the largest threshold the rule
    ``shares - max_dropouts >= threshold`` allows. A :class:`UsageError` when no
    threshold of at least 2 survives that.

    The trade-off: ``threshold`` neighbours who collude (with the server) can unmask one
    device's update, so surviving more dropouts costs protection (20 devices, 30%:
    11 neighbours, threshold 5; 100 devices: 51 and 21)."""
    max_dropouts = math.ceil(survive * sampled - 1e-9)
    shares = sampled if sampled < 10 else min(sampled, round(sampled / 2) | 1)
    threshold = shares - max_dropouts
    if threshold < 2:
        raise UsageError(f"SecAgg+ over {sampled} devices cannot survive {max_dropouts} "
                         f"dropouts ({survive:.0%}): each device's {shares} neighbours "
                         f"would keep fewer than the 2 needed to unmask; sample more "
                         f"devices or lower `survive`")
    return shares, threshold


def dropped(pid: int, parts: int, server_round: int, fraction: float, seed: int) -> bool:
    """Whether device ``pid`` of ``parts`` is one of the ``round(fraction * parts)``
    devices (half to even) an injected dropout fails in ``server_round`` (a fresh draw
    every round, fixed by ``seed``)."""
    order = np.random.default_rng([seed, 7, server_round]).permutation(parts)
    return pid in order[:round(fraction * parts)]


def dropout_mod(fraction: float, seed: int) -> Mod:
    """Client mod injecting dropouts: the devices :func:`dropped` names fail their train
    message with a short error. Under SecAgg+ it sits inside ``secaggplus_mod``, so they
    fail after setup and key sharing, before uploading: a mid-round dropout."""
    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if msg.metadata.message_type == MessageType.TRAIN:
            nc = context.node_config
            if dropped(int(nc["partition-id"]), int(nc["num-partitions"]),  # type: ignore[call-overload]
                       int(msg.content["config"]["server-round"]), fraction, seed):
                raise RuntimeError(DROPOUT)
        return call_next(msg, context)

    return mod


def legacy_train_mod(body_keys: tuple[str, ...], *, equal_weights: bool) -> Mod:
    """Client mod between ``secaggplus_mod`` and the Message-API train handler: the legacy
    ``fitins`` become ``arrays`` (named by ``body_keys``) and ``config``, the handler's
    reply becomes a ``fitres`` (weight 1 with ``equal_weights``, as DP needs)."""
    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if msg.metadata.message_type != MessageType.TRAIN:
            return call_next(msg, context)
        fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
        arrays = parameters_to_ndarrays(fitins.parameters)
        msg.content = RecordDict({
            "arrays": ArrayRecord({k: Array(a) for k, a in zip(body_keys, arrays, strict=True)}),
            "config": ConfigRecord(dict(fitins.config))})  # type: ignore[arg-type]
        reply = call_next(msg, context)
        if reply.has_error():
            return reply
        if list(reply.content["arrays"]) != list(body_keys):   # the server sees a sum only
            raise VerificationError("the train reply holds arrays other than the body's; "
                                    "not sending it")
        metrics = dict(reply.content["metrics"])
        weight = 1 if equal_weights else int(metrics["num-examples"])
        body = reply.content["arrays"].to_numpy_ndarrays()
        if (top := max(float(np.abs(a).max(initial=0.0)) for a in body)) > VALUE_RANGE:
            raise VerificationError(f"a body value of {top:.3g} is outside SecAgg+'s "
                                    f"±{VALUE_RANGE:g}, which would clip it silently")
        extra = {} if equal_weights else {k: v for k, v in metrics.items()
                                          if k != "num-examples"}
        fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(body), weight,
                        extra)  # type: ignore[arg-type]
        return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)

    return mod


def _setup_stage(msg: Message) -> bool:
    """Whether ``msg`` opens a SecAgg+ round (its setup stage)."""
    return msg.content.config_records[RECORD_KEY_CONFIGS][Key.STAGE] == Stage.SETUP


def dp_plan(config: ServerConfig) -> DPPlan | None:
    """The run's DP plan (noise calibrated to ``dp_epsilon`` over all rounds of
    ``config.sampled`` devices each), or None without DP."""
    private = config.private
    if private.dp_epsilon is None:
        return None
    return DPPlan.for_target(private.dp_epsilon, clip=private.dp_clip, rounds=config.rounds,
                             population=config.clients, sampled=config.sampled,
                             secagg=private.secagg, delta=private.delta)


def private_mods(config: ServerConfig, *, plan: DPPlan | None, body_keys: tuple[str, ...],
                 state_root: str | os.PathLike[str] | None, seed: int) -> list[Mod]:
    """The client mods a run's private settings need, outermost first (empty for a plain
    run). Under SecAgg+: the budget check before ``secaggplus_mod`` (a refusal at setup
    is a clean dropout), then the legacy translation, injected dropouts and clipping
    inside it, so only masked vectors leave the device."""
    private = config.private
    budget = ([budget_mod(budget=private.device_budget, plan=plan, state_root=state_root,
                          gate=_setup_stage if private.secagg else None)]
              if plan is not None and private.device_budget is not None else [])
    drop = [dropout_mod(private.dropout, seed)] if private.dropout > 0 else []
    clip = [clip_mod] if plan is not None else []
    if private.secagg:
        return [*budget, secaggplus_mod,
                legacy_train_mod(body_keys, equal_weights=plan is not None), *drop, *clip]
    return [*budget, *drop, *([equal_weights_mod] if plan is not None else []), *clip]


@dataclass
class _Round:
    """What the legacy strategy saw of one round's aggregation."""

    survivors: int = 0
    train_loss: float | None = None   # None when the devices sent none (DP)


class _SecAggPlus(SecAggPlusWorkflow):
    """Flower's workflow, keeping the round's protocol state (whose ``failures`` hold the
    refusals even when the round halts before aggregation), and letting devices decline
    at setup.

    Flower 1.42 counts a device that failed the setup stage among the dropouts whose
    secrets the others must rebuild at unmasking, though it never shared any: its
    neighbours then fail (``KeyError``) and the round halts. Such a device never joined
    the round, so after setup it is taken out of the sampled set and the neighbour
    graph, which is what the devices themselves already assume (they only ever receive
    the keys of neighbours that completed setup)."""

    state: WorkflowState | None = None

    def setup_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        self.state = state
        ok = super().setup_stage(grid, context, state)
        joined = set(state.active_node_ids)
        state.sampled_node_ids = joined
        state.nid_to_neighbours = {nid: neighbours & joined for nid, neighbours
                                   in state.nid_to_neighbours.items() if nid in joined}
        return ok


class _Aggregate(LegacyStrategy):
    """The legacy strategy SecAgg+ hands its unmasked mean to: adds the DP noise for the
    survivors (if any DP), composes the release, and lets ``inner`` (FedAvg or FedAdam)
    make the new body. Failures are SecAgg+'s dropouts: counted, never fatal."""

    def __init__(self, inner: LegacyStrategy, plan: DPPlan | None, keys: list[str],
                 seed: int) -> None:
        super().__init__()
        self.inner = inner
        self.keys = keys
        self.plan = plan
        self.rng = np.random.default_rng([seed, 11])
        self.accountant = (new_accountant(plan.population, secagg=True, delta=plan.delta)
                           if plan is not None else None)
        self.last: _Round | None = None

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return self.inner.initialize_parameters(client_manager)

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        self.last = None
        return self.inner.configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[tuple[ClientProxy, FitRes] | BaseException]
                      ) -> tuple[Parameters | None, dict[str, Scalar]]:
        stats = _Round(survivors=len(results))
        if results and all("train-loss" in r.metrics for _, r in results):
            stats.train_loss = float(np.average(
                [float(r.metrics["train-loss"]) for _, r in results],
                weights=[r.num_examples for _, r in results]))
        if self.plan is not None and self.accountant is not None and results:
            mean = parameters_to_ndarrays(results[0][1].parameters)
            noisy = ndarrays_to_parameters(
                positive_variances(self.keys, add_noise(
                    mean, self.plan.noise_std(len(results)), self.rng)))
            for _, fitres in results:
                fitres.parameters = noisy
            self.accountant.compose(self.plan.event())
        self.last = stats
        new, metrics = self.inner.aggregate_fit(server_round, results, [])
        if new is None or not results or not isinstance(self.inner,
                                                        (LegacyFedAvgM, LegacyFedAdam)):
            return new, metrics
        fixed = ndarrays_to_parameters(averaged_statistics(   # the server optimiser's step
            self.keys, parameters_to_ndarrays(new),           # leaves them alone
            parameters_to_ndarrays(results[0][1].parameters)))
        if isinstance(self.inner, LegacyFedAvgM):   # each steps from what it holds
            self.inner.initial_parameters = fixed
        elif isinstance(self.inner, LegacyFedAdam):
            self.inner.current_weights = parameters_to_ndarrays(fixed)
        return fixed, metrics

    def configure_evaluate(self, server_round: int, parameters: Parameters,
                           client_manager: ClientManager) -> list:  # type: ignore[type-arg]
        return []   # evaluation goes through the Message API (_Rounds.evaluate)

    def aggregate_evaluate(self, server_round: int, results: list, failures: list  # type: ignore[type-arg]
                           ) -> tuple[float | None, dict[str, Scalar]]:
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters
                 ) -> tuple[float, dict[str, Scalar]] | None:
        return None


def _legacy_strategy(config: ServerConfig, initial: Parameters) -> LegacyStrategy:
    n, k = config.clients, config.sampled
    dp = config.private.dp_epsilon is not None

    def fit_config(server_round: int) -> dict[str, Scalar]:
        extra: dict[str, Scalar] = {"clipping_norm": config.private.dp_clip} if dp else {}
        if config.strategy == "fedprox":
            extra["proximal-mu"] = config.proximal_mu
        return {**config.device_config(), "lr": config.lr_at(server_round),
                "server-round": server_round, **extra}

    common = {"fraction_fit": k / n, "fraction_evaluate": 0.0, "min_fit_clients": k,
              "min_evaluate_clients": n, "min_available_clients": n,
              "initial_parameters": initial, "on_fit_config_fn": fit_config,
              "accept_failures": True}
    if config.strategy == "fedadam":
        return LegacyFedAdam(**common, eta=config.server_lr)   # type: ignore[arg-type]
    if config.strategy == "fedavgm":
        return LegacyFedAvgM(**common, server_momentum=config.server_momentum)  # type: ignore[arg-type]
    return LegacyFedAvg(**common)   # type: ignore[arg-type]


def _flat(arrays: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([a.ravel().astype(np.float64) for a in arrays])


class _Rounds:
    """The fit and evaluate workflows ``DefaultWorkflow`` runs every round: SecAgg+ with a
    watch for halted rounds, then Flower's FedAvg evaluation over the Message API, then
    the round's report."""

    def __init__(self, config: ServerConfig, keys: list[str], aggregate: _Aggregate,
                 on_round: Callable[[RoundReport], None] | None) -> None:
        self.config = config
        self.keys = keys
        self.aggregate = aggregate
        self.on_round = on_round
        shares, threshold = secagg_parameters(config.sampled, config.private.survive)
        # with DP every device weighs 1: a max_weight of 1 keeps the quantisation's
        # full precision (SecAgg+ scales each upload by weight / max_weight)
        dp = config.private.dp_epsilon is not None
        self.secagg = _SecAggPlus(num_shares=shares, reconstruction_threshold=threshold,
                                  max_weight=1.0 if dp else 1000.0, clipping_range=VALUE_RANGE,
                                  timeout=config.private.stage_timeout)
        n = config.clients
        self.evaluation = FedAvg(fraction_evaluate=1.0, min_evaluate_nodes=n,
                                 min_available_nodes=n)
        self.rounds: list[RoundReport] = []
        self._pending: tuple[float, float] = (0.0, 0.0)   # the round's start, body change

    @staticmethod
    def body(context: LegacyContext) -> list[np.ndarray]:
        """The global body as the legacy workflow holds it (unnamed, in key order)."""
        return parameters_to_ndarrays(compat.arrayrecord_to_parameters(
            context.state.array_records[MAIN_PARAMS_RECORD], keep_input=True))

    def fit(self, grid: Grid, context: LegacyContext) -> None:
        started = time.perf_counter()
        self.secagg.state = None
        before = _flat(self.body(context))
        self.secagg(grid, context)
        change = float(np.linalg.norm(_flat(self.body(context)) - before))
        self._pending = (started, change)

    def reasons(self) -> list[str]:
        """The devices' own words for this round's failures (SecAgg+ keeps each failed
        reply's error in an ``Exception``)."""
        failures = self.secagg.state.failures if self.secagg.state is not None else []
        return [_short(getattr(f.args[0], "reason", str(f)) if f.args else str(f))
                for f in failures]

    def why_halted(self) -> str:
        """The last round's failures in a few words."""
        state, reasons = self.secagg.state, self.reasons()
        if state is None or not reasons:
            return "no device replied in time"
        return (f"{self.config.sampled - len(state.active_node_ids)} of "
                f"{self.config.sampled} devices failed, e.g. {reasons[0]}")

    def evaluate(self, grid: Grid, context: LegacyContext) -> None:
        server_round = len(self.rounds) + 1
        started, change = self._pending
        arrays = ArrayRecord({k: Array(a) for k, a in
                              zip(self.keys, self.body(context), strict=True)})
        config = ConfigRecord({**self.config.device_config(), "server-round": server_round})
        messages = sample_evaluation(list(self.evaluation.configure_evaluate(
            server_round, arrays, config, grid)), server_round, self.config)
        replies = list(grid.send_and_receive(messages, timeout=self.config.timeout))
        metrics = self.evaluation.aggregate_evaluate(server_round, replies)
        stats = self.aggregate.last or _Round()
        halted = not change > 0
        acc = self.aggregate.accountant

        report = RoundReport(
            server_round, time.perf_counter() - started, stats.train_loss,
            metric(metrics, "accuracy"),
            change, 0 if halted else stats.survivors,
            self.config.sampled - (0 if halted else stats.survivors),
            epsilon=acc.get_epsilon(self.config.private.delta)
            if acc is not None and acc.num_releases else None,
            refused=refusals(self.reasons()),
            halted=halted, global_accuracy=metric(metrics, "global-accuracy"))
        self.rounds.append(report)
        if self.on_round is not None:
            self.on_round(report)


def _secagg_server_app(*, initial_body: dict[str, np.ndarray], config: ServerConfig,
                       plan: DPPlan | None, seed: int,
                       on_round: Callable[[RoundReport], None] | None,
                       on_result: Callable[[ServerResult], None] | None) -> ServerApp:
    keys = list(initial_body)
    initial = ndarrays_to_parameters(list(initial_body.values()))
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        wait_for_devices(grid, config)
        aggregate = _Aggregate(_legacy_strategy(config, initial), plan, keys, seed)
        rounds = _Rounds(config, keys, aggregate, on_round)
        legacy = LegacyContext(context=context, strategy=aggregate, config=LegacyServerConfig(
            num_rounds=config.rounds, round_timeout=config.timeout))
        DefaultWorkflow(fit_workflow=rounds.fit, evaluate_workflow=rounds.evaluate)(grid, legacy)
        if all(r.halted for r in rounds.rounds):
            raise TransportError(f"every SecAgg+ round halted, the body never changed "
                                 f"({rounds.why_halted()})")
        if on_result is not None:
            on_result(ServerResult(dict(zip(keys, rounds.body(legacy), strict=True)),
                                   rounds.rounds))

    return app


def private_server_app(*, initial_body: dict[str, np.ndarray], config: ServerConfig,
                       plan: DPPlan | None, seed: int = 0,
                       on_round: Callable[[RoundReport], None] | None = None,
                       on_result: Callable[[ServerResult], None] | None = None) -> ServerApp:
    """The ``ServerApp`` for ``config``: SecAgg+ (this module's legacy workflow) when
    ``config.private.secagg``, else :func:`~edgeloop.federated.server.server_app`, with
    Flower's DP wrapper around its strategy when there is a ``plan``."""
    if config.private.secagg:
        secagg_parameters(config.sampled, config.private.survive)   # refuse early
        return _secagg_server_app(initial_body=initial_body, config=config, plan=plan,
                                  seed=seed, on_round=on_round, on_result=on_result)
    wrap = None if plan is None else (lambda strategy: dp_strategy(strategy, plan))
    return server_app(initial_body=initial_body, config=config, on_round=on_round,
                      on_result=on_result, wrap=wrap)
