"""Federated personalisation on Flower (``flwr`` 1.42, Message API).

Devices train a shared **body** together; each keeps a private **head**, trained on its
own data and stored in its own state folder, never sent. Modules:

- :mod:`.split`: the body/head split of any torch model (:func:`split_model`).
- :mod:`.partition`: non-IID MNIST-1D (Dirichlet label split, per-client input shifts).
- :mod:`.local`: a device's training step (FedProx term) and its head on disk.
- :mod:`.client` / :mod:`.server`: the ``ClientApp`` and the ``ServerApp`` (FedAvg,
  FedProx, FedAdam; a timeout on every exchange; a round that changes nothing fails).
- :mod:`.simulation`: many devices on Flower's simulation engine (Ray), with baselines.
- :mod:`.config`: the run's settings, checked on construction (no torch, no Flower).
- :mod:`.personal`: on-device continual learning of the head from labelled feedback
  (replay buffer :mod:`.buffer`, forgetting guard, health-checked install), and the
  global body published as a signed bundle that devices combine with their own head
  (:mod:`.install`).

Secure aggregation goes in its own module: Flower 1.42's SecAgg+ still needs the legacy
server API (``LegacyContext``/``DefaultWorkflow``), which is to stay there; client mods
(SecAgg+, DP clipping) go through ``client_app(mods=...)``.

Importing this package switches off Flower's usage telemetry and Ray's usage statistics
(see :mod:`._flower`); names are imported on first use, so ``flwr`` loads only then.
"""

from edgeloop._lazy import lazy_names
from edgeloop.federated._flower import quiet_env

quiet_env()

_SOURCES = {
    "BodyHeadSplit": ".split", "split_model": ".split",
    "ClientShift": ".partition", "Partition": ".partition",
    "dirichlet_split": ".partition", "mnist1d_partition": ".partition",
    "client_app": ".client",
    "STRATEGIES": ".config", "ServerConfig": ".config", "SimulationConfig": ".config",
    "RoundReport": ".server", "server_app": ".server",
    "SimulationResult": ".simulation",
    "simulate": ".simulation",
    # on-device personalisation and the body's release (fl-personal)
    "PersonalConfig": ".personal", "PersonalResult": ".personal",
    "personalise": ".personal", "publish_body": ".personal",
    "ReplayBuffer": ".buffer", "own_head": ".install",
}

__all__ = [
    "STRATEGIES",
    "BodyHeadSplit",
    "ClientShift",
    "Partition",
    "PersonalConfig",
    "PersonalResult",
    "ReplayBuffer",
    "RoundReport",
    "ServerConfig",
    "SimulationConfig",
    "SimulationResult",
    "client_app",
    "dirichlet_split",
    "mnist1d_partition",
    "own_head",
    "personalise",
    "publish_body",
    "server_app",
    "simulate",
    "split_model",
]

# The Deployment Engine (TLS, SuperNode authentication): .credentials, .deploy, and the
# apps `flwr run` starts, .deployed.
_SOURCES |= {"Credentials": ".credentials", "make_credentials": ".credentials",
             "DeploymentConfig": ".deploy", "DeploymentResult": ".deploy",
             "LocalFleet": ".deploy", "SuperLink": ".deploy", "SuperNode": ".deploy",
             "local_fleet": ".deploy"}
__all__ += ["Credentials", "DeploymentConfig", "DeploymentResult", "LocalFleet",
            "SuperLink", "SuperNode", "local_fleet", "make_credentials"]

__getattr__, __dir__ = lazy_names(__name__, _SOURCES)
