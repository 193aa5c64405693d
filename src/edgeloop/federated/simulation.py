"""Many devices on one machine: Flower's simulation engine (Ray, one actor per core this
process may use, each on one core) running the federated body with private heads on
non-IID MNIST-1D, and the figures that say whether it was worth it.

- **personalised**: the final global body with each device's private head (fine-tuned by
  the device in the last round), on its own test data: what a device would run;
- **global**: the final shared model (body and global head) on all devices' test data
  pooled: the one model a new device would start from;
- **local only**: each device trains a fresh model on its own data alone (Adam,
  ``LOCAL_ONLY_STEPS`` steps: about 100 epochs of a few dozen samples);
- **centralised** (optional): one model trained on all devices' training data pooled, the
  way the zoo trains (:func:`edgeloop.zoo.train.train`, its default settings; the best
  epoch chosen on the server's public set, MNIST-1D's ``val`` split shifted like the
  devices' data), on the pooled test data.

Accuracies over devices are weighted by their test samples.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from flwr.clientapp.typing import Mod
from flwr.simulation import run_simulation
from torch import nn

from edgeloop._io import atomic_path, output_folder, write_text_atomic
from edgeloop._progress import progress
from edgeloop._trainconfig import TrainConfig
from edgeloop.data import Dataset
from edgeloop.errors import TransportError, UsageError
from edgeloop.federated._flower import quiet_flower
from edgeloop.federated._procs import usable_cores
from edgeloop.federated.client import client_app
from edgeloop.federated.config import SimulationConfig
from edgeloop.federated.local import fit_local, load_head
from edgeloop.federated.partition import (
    Partition,
    label_skew,
    mnist1d_partition,
    public_set,
)
from edgeloop.federated.secagg import dp_plan, private_mods, private_server_app
from edgeloop.federated.server import RoundReport, ServerResult
from edgeloop.federated.split import split_model
from edgeloop.zoo import ARCHS, build, save_torch
from edgeloop.zoo.train import accuracy, train

__all__ = ["SimulationResult", "simulate"]

MODEL_FILE, BODY_FILE, RESULT_FILE = "model.pt", "body.pt", "result.json"
LOCAL_ONLY_STEPS = 300   # a device's whole model on its own data, to convergence


@dataclass
class SimulationResult:
    """The figures of one simulated run (module docstring); accuracies in [0, 1]."""

    config: SimulationConfig
    rounds: list[RoundReport]
    global_accuracy: float
    personalised_accuracy: float
    local_only_accuracy: float
    centralised_accuracy: float | None
    label_skew: float              # mean total-variation distance of device label mixes
    seconds: float                 # the whole call
    simulation_seconds: float      # run_simulation alone (Ray start included)
    per_device: list[dict[str, float]] = field(default_factory=list)
    noise_multiplier: float | None = None   # DP: the z calibrated to the target ε

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return asdict(self)


def _device_data(pid: int, parts: int, *, alpha: float, seed: int) -> tuple[Dataset, Dataset]:
    p = mnist1d_partition(pid, parts, alpha, seed=seed)
    return p.train, p.test


def _fresh(config: SimulationConfig, salt: int = 0) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(config.seed * 100_003 + salt)
        return build(config.arch)


def _mean(pairs: list[tuple[float, int]]) -> float:
    return sum(a * n for a, n in pairs) / sum(n for _, n in pairs)


@contextlib.contextmanager
def _folder(path: str | os.PathLike[str] | None) -> Iterator[Path]:
    if path is not None:
        if stale := sorted(Path(path).glob("node-*")):
            raise UsageError(f"{str(path)!r} already holds device state ({stale[0].name}); "
                             "its heads would carry over: give an empty or new folder")
        yield output_folder(path, "devices")
        return
    with tempfile.TemporaryDirectory(prefix="edgeloop-devices-") as tmp:
        yield Path(tmp)


def simulate(config: SimulationConfig | None = None, *,
             out: str | os.PathLike[str] | None = None,
             devices: str | os.PathLike[str] | None = None,
             on_round: Callable[[RoundReport], None] | None = None,
             mods: list[Mod] | None = None, verbose: bool = False) -> SimulationResult:
    """Run ``config`` on Flower's simulation engine and measure it (module docstring).

    ``devices``: the folder of the devices' state folders (``node-<id>/head.pt``); default
    a temporary one, removed. ``out``: a folder to write ``model.pt`` (an edgeloop
    checkpoint: global body + global head), ``body.pt`` (the body's
    ``state_dict``) and ``result.json``, each atomically. ``on_round`` gets every round's
    report as it ends. ``mods``: Flower client mods, outermost first. ``verbose`` lets
    Flower's and Ray's own logs through.
    """
    config = config or SimulationConfig()
    if config.arch not in ARCHS or ARCHS[config.arch].dataset != "mnist1d":
        raise UsageError(f"`arch` must be an MNIST-1D zoo model "
                         f"({', '.join(a for a, e in ARCHS.items() if e.dataset == 'mnist1d')});"
                         f" got {config.arch!r}")
    if out is not None:
        out = output_folder(out, "out")
    started = time.perf_counter()
    model = _fresh(config)
    split = split_model(model, config.head)
    data_fn = functools.partial(_device_data, alpha=config.alpha, seed=config.seed)
    parts: list[Partition] = [mnist1d_partition(i, config.clients, config.alpha,
                                                seed=config.seed)
                              for i in range(config.clients)]
    results: list[ServerResult] = []
    plan = dp_plan(config)
    with _folder(devices) as root:
        private = private_mods(config, plan=plan, body_keys=split.shared_keys, state_root=root,
                               seed=config.seed)
        client = client_app(model_fn=functools.partial(build, config.arch), data_fn=data_fn,
                            head=config.head, state_root=root, seed=config.seed,
                            mods=[*(mods or []), *private])
        server = private_server_app(
            initial_body={k: v.numpy() for k, v in split.shared(model).items()},
            config=config, plan=plan, seed=config.seed, on_round=on_round,
            on_result=results.append)
        # one actor (device) per core this process may use, each on one core
        backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                   "init_args": {"num_cpus": usable_cores(),
                                 "include_dashboard": False,
                                 "log_to_driver": verbose,
                                 "logging_level": "INFO" if verbose else "ERROR"}}
        sim_started = time.perf_counter()
        with quiet_flower(verbose):
            run_simulation(server_app=server, client_app=client,
                           num_supernodes=config.clients, backend_config=backend)
        sim_seconds = time.perf_counter() - sim_started
        if not results:
            raise TransportError("the simulation ended without a result; run it again with "
                                 "verbose logs (--verbose) to see Flower's")
        shared = {k: torch.from_numpy(v) for k, v in results[0].body.items()}

        per_device = []
        for i, p in progress(enumerate(parts), "local-only baselines", total=len(parts)):
            personal = _fresh(config, salt=i)
            split.load(personal, shared, "shared")
            load_head(personal, split, root / f"node-{i}")
            local = _fresh(config, salt=i)
            steps_per_epoch = -(-len(p.train) // config.batch_size)
            fit_local(local, split, p.train, epochs=-(-LOCAL_ONLY_STEPS // steps_per_epoch),
                      lr=3e-3, batch_size=config.batch_size, seed=config.seed + i)
            per_device.append({"test_samples": len(p.test),
                               "personalised": accuracy(personal, p.test),
                               "local_only": accuracy(local, p.test)})

    split.load(model, shared, "shared")
    pooled_test = Dataset.concat([p.test for p in parts])
    centralised = None
    if config.centralised:
        central = train(_fresh(config), Dataset.concat([p.train for p in parts]),
                        public_set(seed=config.seed), TrainConfig(seed=config.seed),
                        description="centralised baseline")
        centralised = accuracy(central, pooled_test)
    weights = [d["test_samples"] for d in per_device]
    result = SimulationResult(
        config=config, rounds=results[0].rounds,
        global_accuracy=accuracy(model, pooled_test),
        personalised_accuracy=_mean([(d["personalised"], n)
                                     for d, n in zip(per_device, weights, strict=True)]),
        local_only_accuracy=_mean([(d["local_only"], n)
                                   for d, n in zip(per_device, weights, strict=True)]),
        centralised_accuracy=centralised,
        label_skew=label_skew([Dataset.concat([p.train, p.test]).labels for p in parts]),  # type: ignore[misc]
        seconds=time.perf_counter() - started, simulation_seconds=sim_seconds,
        per_device=per_device,
        noise_multiplier=None if plan is None else plan.noise_multiplier)
    if out is not None:
        _write(Path(out), model, split.body(model), config, result)
    return result


def _write(out: Path, model: nn.Module, body: dict[str, torch.Tensor],
           config: SimulationConfig, result: SimulationResult) -> None:
    save_torch(out / MODEL_FILE, model, config.arch, {})
    with atomic_path(out / BODY_FILE) as tmp:
        torch.save(body, tmp)
    write_text_atomic(out / RESULT_FILE, json.dumps(result.to_dict(), indent=2) + "\n")
