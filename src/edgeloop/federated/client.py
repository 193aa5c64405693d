"""The device side: a Flower ``ClientApp`` (Message API) that trains the shared body and
its own private head, and sends back the body only.

Train message in: ``arrays`` (the global body), ``config`` (``local-epochs``,
``head-epochs``, ``lr``, ``batch-size``, ``server-round``; ``proximal-mu`` from FedProx).
The device fits its head to the new body, then trains both (:func:`fit_local`), keeps the
head and replies ``arrays`` (the updated body) and ``metrics`` (``num-examples``,
``train-loss``). Evaluate message in: the same; the device installs the global body (its
head refitted to it, ``head-epochs``) and replies ``metrics`` (``num-examples``,
``accuracy`` on its own test data).

Where a device keeps its head: the ``state-dir`` key of its node config (deployment:
``flower-supernode --node-config "state-dir='/path'"``), else ``<state root>/node-<id>``
with the node's ``partition-id`` (simulation).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod
from torch import nn

from edgeloop.data import Dataset
from edgeloop.errors import UsageError
from edgeloop.federated.local import fit_local, load_head, save_head
from edgeloop.federated.split import BodyHeadSplit, split_model

__all__ = ["DataFn", "ModelFn", "client_app", "state_dir"]

ModelFn = Callable[[], nn.Module]
"""Builds a freshly initialised model (the same architecture on every device)."""
DataFn = Callable[[int, int], tuple[Dataset, Dataset]]
"""``(partition id, partitions) -> (train, test)``: a device's own data."""


def state_dir(node_config: dict[str, object], root: str | os.PathLike[str] | None) -> Path:
    """A device's state folder (module docstring), created if missing."""
    if "state-dir" in node_config:
        folder = Path(str(node_config["state-dir"]))
    elif root is not None and "partition-id" in node_config:
        folder = Path(root) / f"node-{int(node_config['partition-id'])}"  # type: ignore[arg-type]
    else:
        raise UsageError("a device needs a state folder: set `state-dir` in its node config")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _partition(node_config: dict[str, object]) -> tuple[int, int]:
    try:
        return int(node_config["partition-id"]), int(node_config["num-partitions"])  # type: ignore[call-overload]
    except KeyError as e:
        raise UsageError(f"a device's node config has no {e.args[0]!r}") from None


def _seed(seed: int, pid: int, config: ConfigRecord) -> int:
    return seed * 100_003 + pid * 1009 + 2 * int(config["server-round"])


def _fit(model: nn.Module, split: BodyHeadSplit, data: Dataset, config: ConfigRecord, *,
         epochs: int, seed: int) -> float:
    """:func:`fit_local` with the round's settings from the server's ``config``."""
    return fit_local(model, split, data, epochs=epochs, head_epochs=int(config["head-epochs"]),
                     lr=float(config["lr"]), batch_size=int(config["batch-size"]),
                     proximal_mu=float(config.get("proximal-mu", 0.0)), seed=seed)


def client_app(*, model_fn: ModelFn, data_fn: DataFn, head: str | None = None,
               state_root: str | os.PathLike[str] | None = None, seed: int = 0,
               mods: list[Mod] | None = None) -> ClientApp:
    """The ``ClientApp`` for a model built by ``model_fn``, split at ``head`` (see
    :func:`~edgeloop.federated.split.split_model`), training on ``data_fn``'s data.

    ``mods`` are Flower client mods, outermost first (e.g. a spy in tests, later SecAgg+).
    A device's initial head is ``model_fn``'s, seeded by ``seed`` and its partition id."""
    app = ClientApp(mods=list(mods or []))

    def device(context: Context) -> tuple[nn.Module, BodyHeadSplit, Path, int, int]:
        pid, parts = _partition(dict(context.node_config))
        with torch.random.fork_rng():
            torch.manual_seed(seed * 100_003 + pid)
            model = model_fn()
        split = split_model(model, head)
        folder = state_dir(dict(context.node_config), state_root)
        load_head(model, split, folder)
        return model, split, folder, pid, parts

    def load_body(model: nn.Module, split: BodyHeadSplit, msg: Message) -> None:
        split.load(model, msg.content["arrays"].to_torch_state_dict(), "body")

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        model, split, folder, pid, parts = device(context)
        load_body(model, split, msg)
        config = msg.content["config"]
        data, _ = data_fn(pid, parts)
        loss = _fit(model, split, data, config, epochs=int(config["local-epochs"]),
                    seed=_seed(seed, pid, config))
        save_head(model, split, folder)
        content = RecordDict({
            "arrays": ArrayRecord(split.body(model)),
            "metrics": MetricRecord({"num-examples": len(data), "train-loss": loss}),
        })
        return Message(content, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        from edgeloop.zoo.train import accuracy

        model, split, folder, pid, parts = device(context)
        load_body(model, split, msg)
        config = msg.content["config"]
        data, test = data_fn(pid, parts)
        if int(config["head-epochs"]):   # the device installs the body: its head follows
            _fit(model, split, data, config, epochs=0, seed=_seed(seed, pid, config) + 1)
            save_head(model, split, folder)
        content = RecordDict({"metrics": MetricRecord(
            {"num-examples": len(test), "accuracy": accuracy(model, test)})})
        return Message(content, reply_to=msg)

    return app
