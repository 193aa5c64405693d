"""Settings of a federated run, kept apart from the modules that import torch and Flower
so that the command line can check them (and show their defaults) without either."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from edgeloop.errors import UsageError, one_of

__all__ = ["STRATEGIES", "PrivateConfig", "ServerConfig", "SimulationConfig"]

STRATEGIES = ("fedavg", "fedavgm", "fedprox", "fedadam")


def _at_least(name: str, value: float, low: float, *, strict: bool = False) -> None:
    if value < low or (strict and value == low):
        raise UsageError(f"`{name}` must be {'>' if strict else 'at least'} {low:g}; "
                         f"got {value:g}")


@dataclass
class ServerConfig:
    """How the server runs the rounds. Every field is checked on construction."""

    rounds: int = 3
    strategy: str = "fedavgm"      # one of STRATEGIES
    clients: int = 10              # devices in the run
    fraction: float = 1.0          # of them sampled to train each round (the last round
                                   # evaluates on every device)
    local_epochs: int = 1          # epochs each device trains the shared model per round
    head_epochs: int = 10          # epochs a device fine-tunes its private head, from
                                   # the global head, on each new global model
    lr: float = 0.05               # devices' SGD learning rate (momentum 0.9) in round
                                   # 1, decayed by a cosine over the rounds
    weight_decay: float = 1e-3     # devices' SGD weight decay (a device holds a few
                                   # dozen samples: without it the shared model overfits
                                   # them, about 3 points under centralised training)
    head_lr: float = 1e-3          # Adam learning rate of the private head's fine-tune
                                   # (at 1e-2 the head overfits a device's few dozen
                                   # samples and ends under the global head)
    batch_size: int = 16           # samples per local step
    proximal_mu: float = 0.01      # FedProx's mu (fedprox only)
    server_lr: float = 0.01        # FedAdam's server learning rate, eta (fedadam only)
    server_momentum: float = 0.9   # FedAvgM's server momentum (fedavgm only)
    timeout: float = 600.0         # s to wait for one round's train or evaluate replies,
                                   # and for every device to connect before round 1
    private: PrivateConfig = field(default_factory=lambda: PrivateConfig())
                                   # secure aggregation and differential privacy

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise one_of("strategy", STRATEGIES, self.strategy)
        _at_least("clients", self.clients, 2)
        _at_least("rounds", self.rounds, 1)
        _at_least("local_epochs", self.local_epochs, 1)
        _at_least("head_epochs", self.head_epochs, 0)
        _at_least("batch_size", self.batch_size, 1)
        _at_least("proximal_mu", self.proximal_mu, 0)
        _at_least("weight_decay", self.weight_decay, 0)
        for name in ("lr", "head_lr", "server_lr", "timeout", "fraction"):
            _at_least(name, getattr(self, name), 0, strict=True)
        private = self.private
        if (private.dp_epsilon is not None and not private.secagg
                and self.strategy not in ("fedavg", "fedprox")):
            raise UsageError(f"DP without `secagg` runs Flower's DP wrapper, which accounts only "
                             f"for fedavg or fedprox; got `strategy` {self.strategy!r}")
        if self.fraction > 1 or not 0 <= self.server_momentum < 1:
            raise UsageError(f"`fraction` must be in (0, 1] and `server_momentum` in [0, 1); "
                             f"got {self.fraction:g} and {self.server_momentum:g}")

    @property
    def sampled(self) -> int:
        """Devices sampled to train each round: ``fraction`` of them, at least two."""
        return min(self.clients, max(2, round(self.fraction * self.clients)))

    def lr_at(self, server_round: int) -> float:
        """The devices' learning rate in round ``server_round`` (1-based): ``lr`` decayed
        by a half cosine over the rounds (a decaying step is what lets FedAvg settle)."""
        return self.lr * 0.5 * (1 + math.cos(math.pi * (server_round - 1) / self.rounds))

    def device_config(self) -> dict[str, int | float]:
        """The config every device receives with each train and evaluate message (Flower
        adds ``server-round``; FedProx adds ``proximal-mu``; ``lr`` is round 1's, the
        server sends each round's)."""
        return {"local-epochs": self.local_epochs, "head-epochs": self.head_epochs,
                "lr": self.lr, "weight-decay": self.weight_decay, "head-lr": self.head_lr,
                "batch-size": self.batch_size}


@dataclass
class SimulationConfig(ServerConfig):
    """A simulated run on non-IID MNIST-1D: the server's settings plus the data and the
    model."""

    alpha: float = 0.3             # Dirichlet concentration of the label split
    seed: int = 0                  # data split, shifts, initial weights, shuffling
    arch: str = "mnist1d-cnn"      # a zoo model for MNIST-1D
    head: str | None = None        # the private head's prefix (default: split_model's)
    centralised: bool = False      # also train one model on all devices' data pooled

    def __post_init__(self) -> None:
        super().__post_init__()
        _at_least("alpha", self.alpha, 0, strict=True)


# --- secure aggregation and differential privacy (see .secagg and .privacy) ------------

@dataclass
class PrivateConfig:
    """Secure aggregation, DP and injected dropouts of a run. Every field is checked on
    construction, including the combinations the plain DP path cannot run (Flower's DP
    wrapper skips every round in which a device fails)."""

    secagg: bool = False           # Flower's SecAgg+: the server sees only the sum
    survive: float = 0.3           # fraction of sampled devices a SecAgg+ round must
                                   # survive losing mid-round (sets shares and threshold)
    dropout: float = 0.0           # fraction of sampled devices made to fail mid-round,
                                   # every round (tests and benchmarks)
    dp_epsilon: float | None = None  # target ε after the last round; None: no DP
    dp_clip: float = 1.0           # L2 norm each body update is clipped to
    delta: float = 1e-5            # δ of every ε
    device_budget: float | None = None  # each device's own ε per period; None: none
    stage_timeout: float = 120.0   # s to wait for each SecAgg+ stage's replies

    def __post_init__(self) -> None:
        if not 0 <= self.dropout <= 0.5:
            raise UsageError(f"`dropout` must be in [0, 0.5]; got {self.dropout:g}")
        if not 0 <= self.survive <= 0.5:
            raise UsageError(f"`survive` must be in [0, 0.5]; got {self.survive:g}")
        if not 0 < self.delta < 1:
            raise UsageError(f"`delta` must be in (0, 1); got {self.delta:g}")
        for name in ("dp_epsilon", "device_budget"):
            if (value := getattr(self, name)) is not None:
                _at_least(name, value, 0, strict=True)
        _at_least("dp_clip", self.dp_clip, 0, strict=True)
        _at_least("stage_timeout", self.stage_timeout, 0, strict=True)
        if self.device_budget is not None and self.dp_epsilon is None:
            raise UsageError("`device_budget` needs DP (`dp_epsilon`): a device counts the "
                             "noise the server adds")
        if self.dp_epsilon is not None and not self.secagg and (
                self.dropout > 0 or self.device_budget is not None):
            raise UsageError("DP with dropouts or device budgets needs `secagg`: Flower's "
                             "DP wrapper skips every round in which a device fails")
