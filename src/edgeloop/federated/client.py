"""The device side: a Flower ``ClientApp`` (Message API) that trains the shared model and
fine-tunes its own private head, and sends back the shared model only.

Train message in: ``arrays`` (the shared model: body and global head), ``config``
(``local-epochs``, ``lr`` (this round's), ``weight-decay``, ``batch-size``,
``server-round``; ``proximal-mu`` from FedProx). The device trains the shared model on its
data with SGD (:func:`fit_local`) and replies ``arrays`` (the updated shared model) and ``metrics``
(``num-examples``, ``train-loss``). Evaluate message in: the same; the device measures the
global model on its own test data, then fine-tunes its private head from the global head
(``head-epochs`` at ``head-lr``, the body frozen), keeps it and replies ``metrics``
(``num-examples``, ``global-accuracy``, ``accuracy``: the body with its private head).

Where a device keeps its head: the ``state-dir`` key of its node config (deployment:
``flower-supernode --node-config "state-dir='/path'"``), else ``<state root>/node-<id>``
with the node's ``partition-id`` (simulation).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod
from torch import nn

from edgeloop.data import Dataset
from edgeloop.errors import UsageError
from edgeloop.federated.local import fit_local, save_head
from edgeloop.federated.split import BodyHeadSplit, split_model

__all__ = ["DataFn", "ModelFn", "client_app", "state_dir"]

ModelFn = Callable[[], nn.Module]
"""Builds a freshly initialised model (the same architecture on every device)."""
DataFn = Callable[[int, int], tuple[Dataset, Dataset]]
"""``(partition id, partitions) -> (train, test)``: a device's own data."""


def state_dir(node_config: dict[str, object], root: str | os.PathLike[str] | None) -> Path:
    """A device's state folder (module docstring), created if missing, readable by its
    owner only (it holds the private head)."""
    if "state-dir" in node_config:
        folder = Path(str(node_config["state-dir"]))
    elif root is not None and "partition-id" in node_config:
        folder = Path(root) / f"node-{int(node_config['partition-id'])}"  # type: ignore[arg-type]
    else:
        raise UsageError("a device needs a state folder: set `state-dir` in its node config")
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    return folder


def _partition(node_config: dict[str, object]) -> tuple[int, int]:
    try:
        return int(node_config["partition-id"]), int(node_config["num-partitions"])  # type: ignore[call-overload]
    except KeyError as e:
        raise UsageError(f"a device's node config has no {e.args[0]!r}") from None


def _seed(seed: int, pid: int, config: ConfigRecord) -> int:
    return seed * 100_003 + pid * 1009 + 2 * int(config["server-round"])


LOCAL_MOMENTUM = 0.9   # of the devices' SGD on the shared model


def client_app(*, model_fn: ModelFn, data_fn: DataFn, head: str | None = None,
               state_root: str | os.PathLike[str] | None = None, seed: int = 0,
               mods: list[Mod] | None = None) -> ClientApp:
    """The ``ClientApp`` for a model built by ``model_fn``, split at ``head`` (see
    :func:`~edgeloop.federated.split.split_model`), training on ``data_fn``'s data.

    ``mods`` are Flower client mods, outermost first (e.g. a spy in tests, later SecAgg+).
    ``seed`` seeds each device's shuffling (with its partition id and the round)."""
    app = ClientApp(mods=list(mods or []))

    def device(context: Context, msg: Message
               ) -> tuple[nn.Module, BodyHeadSplit, Path, int, int]:
        """The model holding the message's shared model, its split and the device's
        state folder and partition."""
        pid, parts = _partition(dict(context.node_config))
        model = model_fn()
        split = split_model(model, head)
        split.load(model, msg.content["arrays"].to_torch_state_dict(), "shared")
        folder = state_dir(dict(context.node_config), state_root)
        return model, split, folder, pid, parts

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        model, split, _, pid, parts = device(context, msg)
        config = msg.content["config"]
        data, _ = data_fn(pid, parts)
        loss = fit_local(model, split, data, epochs=int(config["local-epochs"]),
                         lr=float(config["lr"]), momentum=LOCAL_MOMENTUM,
                         weight_decay=float(config.get("weight-decay", 0.0)),
                         batch_size=int(config["batch-size"]),
                         proximal_mu=float(config.get("proximal-mu", 0.0)),
                         seed=_seed(seed, pid, config))
        content = RecordDict({
            "arrays": ArrayRecord(split.shared(model)),
            "metrics": MetricRecord({"num-examples": len(data), "train-loss": loss}),
        })
        return Message(content, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        from edgeloop.zoo.train import accuracy

        model, split, folder, pid, parts = device(context, msg)
        config = msg.content["config"]
        data, test = data_fn(pid, parts)
        metrics = {"num-examples": len(test), "global-accuracy": accuracy(model, test)}
        if int(config["head-epochs"]):   # a new global model: the private head follows
            fit_local(model, split, data, epochs=0, head_epochs=int(config["head-epochs"]),
                      lr=float(config["head-lr"]), batch_size=int(config["batch-size"]),
                      seed=_seed(seed, pid, config) + 1)
            save_head(model, split, folder)
        metrics["accuracy"] = accuracy(model, test)
        return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)

    return app
