"""The server side: a Flower ``ServerApp`` (Message API) that runs FedAvg, FedAvgM,
FedProx or FedAdam over the shared model (body and global head; never a private head),
with a timeout on every exchange, a learning rate that decays over the rounds, and a loud
failure when a round leaves the shared model unchanged (Flower logs such a round and
carries on). Each round samples ``config.sampled`` devices to train and as many to
evaluate; the last round evaluates on every device, so every device ends the run with a
private head fitted to the final global model.

The strategies are Flower's own: FedAvg (McMahan et al., 2017), FedAvgM (Hsu et al., 2019:
server momentum, which non-IID devices need most), FedProx (Li et al., 2020: the server
only sends ``proximal-mu``; :func:`~edgeloop.federated.local.fit_local` adds the term) and
FedAdam (Reddi et al., "Adaptive Federated Optimization", ICLR 2021).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedProx,
    Strategy,
)
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from edgeloop.errors import TransportError, VerificationError
from edgeloop.federated.config import ServerConfig

__all__ = ["RoundReport", "ServerResult", "metric", "sample_evaluation", "server_app",
           "wait_for_devices"]


@dataclass
class RoundReport:
    """One round, as the server saw it."""

    round: int
    seconds: float                 # train and evaluate, wall clock
    train_loss: float | None       # devices' last-epoch loss, weighted by samples (None
                                   # under DP: a DP device sends its update alone)
    accuracy: float                # global body + each device's own head, own test data
    update_norm: float             # L2 norm of the change of the shared model
    replies: int                   # devices whose update was aggregated
    failures: int = 0              # devices that replied with an error or not in time
    # private aggregation (.secagg, .privacy)
    epsilon: float | None = None   # DP: ε spent after this round (None without DP)
    refused: int = 0               # failures that were devices refusing (budget spent)
    halted: bool = False           # SecAgg+ gave up the round: the body did not change
    global_accuracy: float = 0.0   # the global model alone on the evaluating devices' data


@dataclass
class ServerResult:
    """What :func:`server_app`'s main hands to ``on_result``: the final shared model
    (``body``: body and global head) and the rounds."""

    body: dict[str, np.ndarray]
    rounds: list[RoundReport] = field(default_factory=list)


def _make_strategy(config: ServerConfig) -> Strategy:
    n, k = config.clients, config.sampled
    common = {"fraction_train": k / n, "fraction_evaluate": 1.0, "min_train_nodes": k,
              "min_evaluate_nodes": n, "min_available_nodes": n}
    if config.strategy == "fedavgm":
        return FedAvgM(**common, server_momentum=config.server_momentum)
    if config.strategy == "fedprox":
        return FedProx(**common, proximal_mu=config.proximal_mu)
    if config.strategy == "fedadam":
        return FedAdam(**common, eta=config.server_lr)
    return FedAvg(**common)


_STATISTICS = ("running_mean", "running_var")   # BatchNorm's, in a state_dict
_SERVER_OPTIMISERS = ("fedavgm", "fedadam")


def averaged_statistics(keys: list[str], optimised: list[np.ndarray], mean: list[np.ndarray]
                        ) -> list[np.ndarray]:
    """``optimised`` (a server optimiser's new arrays, named by ``keys``) with BatchNorm's
    running statistics taken from ``mean`` (the plain mean of the devices' arrays). They
    are measurements, not parameters: FedAvgM's momentum or FedAdam's step would
    extrapolate them, a ``running_var`` turns negative and the model outputs NaN."""
    return [m if k.endswith(_STATISTICS) else o
            for k, o, m in zip(keys, optimised, mean, strict=True)]


def _flat(arrays: ArrayRecord) -> np.ndarray:
    return np.concatenate([a.ravel().astype(np.float64) for a in arrays.to_numpy_ndarrays()])


def _short(reason: str) -> str:
    """The device's own message from an error reply (in simulation, Ray sends the whole
    traceback, ending "... occurred. Message: <the message>'>)")."""
    last = reason.strip().splitlines()[-1] if reason.strip() else "no reason given"
    return last.rpartition("Message: ")[2].rstrip("'>)") or last


class _RoundWatch(Strategy):
    """Wraps a strategy (as Flower's DP wrappers do): times each round, keeps its figures,
    and raises when a round's aggregate is missing or equal to the body sent out."""

    def __init__(self, inner: Strategy, config: ServerConfig,
                 on_round: Callable[[RoundReport], None] | None) -> None:
        self.inner = inner
        self.config = config
        self.on_round = on_round
        self.rounds: list[RoundReport] = []
        self._sent: np.ndarray | None = None
        self._keys: list[str] = []
        self._sampled = 0
        self._started = 0.0
        self._train: tuple[float | None, float, int, int] = (None, 0.0, 0, 0)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._started = time.perf_counter()
        self._sent, self._keys = _flat(arrays), list(arrays)
        config = ConfigRecord({**config, "lr": self.config.lr_at(server_round)})
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        self._sampled = len(messages)
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        failed = [m for m in replies if m.has_error()]
        ok = len(replies) - len(failed)
        for m in replies:
            sent = list(m.content["arrays"]) if not m.has_error() else self._keys
            if sent != self._keys:
                odd = sorted(set(sent) ^ set(self._keys))
                raise VerificationError(
                    f"round {server_round}: device {m.metadata.src_node_id} sent arrays "
                    f"other than the shared model's (e.g. {odd[0]!r}); refusing them")
        arrays, metrics = self.inner.aggregate_train(server_round, replies)
        if arrays is not None and self.config.strategy in _SERVER_OPTIMISERS and ok:
            keys = list(arrays)
            mean = aggregate_arrayrecords([m.content for m in replies if not m.has_error()],
                                          "num-examples")
            fixed = averaged_statistics(keys, arrays.to_numpy_ndarrays(),
                                        mean.to_numpy_ndarrays())
            arrays = ArrayRecord({k: Array(a) for k, a in zip(keys, fixed, strict=True)})
            if isinstance(self.inner, FedAvgM):   # it steps from what it holds, not what
                self.inner.current_arrays = arrays   # configure_train is given
        if arrays is None:
            why = _short(failed[0].error.reason) if failed else "no reply in time"
            raise TransportError(f"round {server_round}: no device's update arrived "
                                 f"({self._sampled - ok} of {self._sampled} failed; {why})")
        assert self._sent is not None
        change = float(np.linalg.norm(_flat(arrays) - self._sent))
        if not change > 0:
            raise VerificationError(f"round {server_round} left the shared model unchanged")
        loss = float(metrics["train-loss"]) if metrics and "train-loss" in metrics else None
        self._train = (loss, change, ok, self._sampled - ok)
        return arrays, metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord,
                           config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        messages = list(self.inner.configure_evaluate(server_round, arrays, config, grid))
        return sample_evaluation(messages, server_round, self.config)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        replies = list(replies)
        if replies and all(m.has_error() for m in replies):
            raise TransportError(f"round {server_round}: every device failed to evaluate "
                                 f"the new shared model ({len(replies)} of {len(replies)}; "
                                 f"{_short(replies[0].error.reason)})")
        metrics = self.inner.aggregate_evaluate(server_round, replies)
        loss, change, ok, failed = self._train
        spent = (self.inner.privacy_spent()
                 if isinstance(self.inner, DifferentialPrivacyClientSideFixedClipping) else None)
        report = RoundReport(server_round, time.perf_counter() - self._started, loss,
                             metric(metrics, "accuracy"), change, ok, failed,
                             epsilon=None if spent is None else spent.epsilon,
                             global_accuracy=metric(metrics, "global-accuracy"))
        self.rounds.append(report)
        if self.on_round is not None:
            self.on_round(report)
        return metrics

    def summary(self) -> None:
        self.inner.summary()


def metric(metrics: MetricRecord | None, key: str) -> float:
    """The aggregated evaluate metric ``key`` (0 when no device answered)."""
    return float(metrics[key]) if metrics and key in metrics else 0.0  # type: ignore[arg-type]


def sample_evaluation(messages: list[Message], server_round: int, config: ServerConfig
                      ) -> list[Message]:
    """``config.sampled`` of the evaluate ``messages`` (one per device), drawn by the round;
    all of them in the last round."""
    if server_round >= config.rounds or len(messages) <= config.sampled:
        return messages
    rng = np.random.default_rng([server_round, len(messages)])
    return [messages[i] for i in sorted(rng.choice(len(messages), config.sampled,
                                                   replace=False))]


def wait_for_devices(grid: Grid, config: ServerConfig) -> None:
    """Wait until all ``config.clients`` devices are connected (Flower's strategies sample
    before they wait for ``min_available_nodes``)."""
    deadline = time.monotonic() + config.timeout
    while len(list(grid.get_node_ids())) < config.clients:
        if time.monotonic() > deadline:
            raise TransportError(f"only {len(list(grid.get_node_ids()))} of "
                                 f"{config.clients} devices connected within "
                                 f"{config.timeout:g} s")
        time.sleep(0.1)


def server_app(*, initial_body: dict[str, np.ndarray], config: ServerConfig,
               on_round: Callable[[RoundReport], None] | None = None,
               on_result: Callable[[ServerResult], None] | None = None,
               wrap: Callable[[Strategy], Strategy] | None = None) -> ServerApp:
    """The ``ServerApp``: ``config.rounds`` rounds of ``config.strategy`` from
    ``initial_body`` (the shared model's arrays); ``on_round`` gets each round's report,
    ``on_result`` the final shared model and every report (in simulation the app runs in
    this process, so both are plain callbacks). ``wrap`` wraps the strategy (Flower's DP
    wrapper, see :mod:`.privacy`)."""
    strategy = _make_strategy(config)
    if wrap is not None:
        strategy = wrap(strategy)
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        wait_for_devices(grid, config)
        watch = _RoundWatch(strategy, config, on_round)
        result = watch.start(
            grid=grid, initial_arrays=ArrayRecord({k: Array(v) for k, v in initial_body.items()}),
            num_rounds=config.rounds, timeout=config.timeout,
            train_config=ConfigRecord(config.device_config()),
            evaluate_config=ConfigRecord(config.device_config()))
        if on_result is not None:
            body = dict(zip(initial_body, result.arrays.to_numpy_ndarrays(), strict=True))
            on_result(ServerResult(body, watch.rounds))

    return app
