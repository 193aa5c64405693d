"""The ServerApp and ClientApp that ``flwr run`` starts on a Deployment Engine: the
components of the app folder :func:`~edgeloop.federated.deploy.write_app` makes.

Flower imports them in its own processes (``flwr-serverapp`` under the SuperLink, a fresh
``flwr-clientapp`` per message under each SuperNode), so they take their settings from
the run's config (:class:`~edgeloop.federated.deploy.DeploymentConfig`, plus
``results-dir``) and each device's node config (``partition-id``, ``num-partitions``,
``state-dir``), not from arguments. The server writes each round's report and the final
body into ``results-dir``, a folder on the SuperLink's machine:

- ``rounds.json``: the rounds so far (:class:`~edgeloop.federated.server.RoundReport`),
  rewritten after each round;
- ``body.npz``: the final shared model (body and global head), one array per
  ``state_dict`` key.

The devices' data is their Dirichlet share of MNIST-1D (:func:`mnist1d_partition`), as
in simulation: a stand-in for each device's own data. A device makes it once and keeps it
in its state folder (``data-<split>.npz``, 0600), as a device keeps its own data; every
message starts a fresh process, which then only reads it.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from torch import nn

from edgeloop._io import atomic_path, write_text_atomic
from edgeloop.data import Dataset, load_npz, save_npz
from edgeloop.federated.client import client_app, state_dir
from edgeloop.federated.deploy import BODY_FILE, RESULTS_KEY, ROUNDS_FILE, DeploymentConfig
from edgeloop.federated.partition import mnist1d_partition
from edgeloop.federated.server import RoundReport, ServerResult, server_app
from edgeloop.federated.split import split_model
from edgeloop.zoo import build

__all__ = ["clientapp", "serverapp"]

serverapp = ServerApp()
clientapp = ClientApp()


def _model(config: DeploymentConfig) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(config.seed * 100_003)
        return build(config.arch)


def _data(pid: int, parts: int, *, folder: Path, alpha: float, seed: int
          ) -> tuple[Dataset, Dataset]:
    tag = f"{pid}of{parts}-alpha{alpha:g}-seed{seed}"
    train, test = folder / f"data-{tag}-train.npz", folder / f"data-{tag}-test.npz"
    if not (train.is_file() and test.is_file()):
        p = mnist1d_partition(pid, parts, alpha, seed=seed)
        save_npz(train, p.train, mode=0o600)
        save_npz(test, p.test, mode=0o600)
    return load_npz(train), load_npz(test)


@serverapp.main()
def _main(grid: Grid, context: Context) -> None:
    config = DeploymentConfig.from_run_config(dict(context.run_config))
    results = Path(str(context.run_config[RESULTS_KEY]))
    model = _model(config)
    split = split_model(model, config.head)
    rounds: list[RoundReport] = []

    def on_round(report: RoundReport) -> None:
        rounds.append(report)
        write_text_atomic(results / ROUNDS_FILE,
                          json.dumps([asdict(r) for r in rounds], indent=2) + "\n")

    def on_result(result: ServerResult) -> None:
        with atomic_path(results / BODY_FILE) as tmp, open(tmp, "wb") as f:
            np.savez(f, **result.body)

    app = server_app(initial_body={k: v.numpy() for k, v in split.shared(model).items()},
                     config=config, on_round=on_round, on_result=on_result)
    app(grid, context)


def _device_app(context: Context) -> ClientApp:
    config = DeploymentConfig.from_run_config(dict(context.run_config))
    folder = state_dir(dict(context.node_config), None)
    return client_app(model_fn=functools.partial(build, config.arch),
                      data_fn=functools.partial(_data, folder=folder, alpha=config.alpha,
                                                seed=config.seed),
                      head=config.head, seed=config.seed)


@clientapp.train()
def _train(msg: Message, context: Context) -> Message:
    return _device_app(context)(msg, context)


@clientapp.evaluate()
def _evaluate(msg: Message, context: Context) -> Message:
    return _device_app(context)(msg, context)
