"""Commands `federated ...`: federated personalisation on Flower."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from edgeloop.cli._app import app, console, err_console
from edgeloop.federated.config import PrivateConfig, SimulationConfig

if TYPE_CHECKING:
    from edgeloop.federated.server import RoundReport

federated_app = typer.Typer(help="Federated personalisation: a shared body trained on Flower, "
                                 "a private head on every device.", no_args_is_help=True)
app.add_typer(federated_app, name="federated")

_DEFAULT = SimulationConfig()
_PRIVATE = PrivateConfig()


@federated_app.command("simulate")
def federated_simulate(
    clients: Annotated[int, typer.Option(help="Simulated devices (at least 2)")
                       ] = _DEFAULT.clients,
    rounds: Annotated[int, typer.Option(help="Federated rounds")] = _DEFAULT.rounds,
    strategy: Annotated[str, typer.Option(help="fedavg, fedavgm, fedprox or fedadam")
                        ] = _DEFAULT.strategy,
    fraction: Annotated[float, typer.Option(
        help="Fraction of the devices sampled to train each round (the last round "
             "evaluates on all)")] = _DEFAULT.fraction,
    alpha: Annotated[float, typer.Option(
        help="Dirichlet concentration of the label split; smaller is more skewed")
                     ] = _DEFAULT.alpha,
    local_epochs: Annotated[int, typer.Option(help="Epochs each device trains per round")
                            ] = _DEFAULT.local_epochs,
    lr: Annotated[float, typer.Option(
        help="Devices' SGD learning rate in round 1 (cosine-decayed over the rounds)")
                  ] = _DEFAULT.lr,
    weight_decay: Annotated[float, typer.Option(help="Devices' SGD weight decay")
                            ] = _DEFAULT.weight_decay,
    seed: Annotated[int, typer.Option(help="Data split, shifts, initial weights")
                    ] = _DEFAULT.seed,
    centralised: Annotated[bool, typer.Option(
        "--centralised", help="Also train one model on all devices' data pooled")] = False,
    out: Annotated[Path | None, typer.Option(
        help="Folder for model.pt (the global model: body + global head), body.pt, "
             "result.json")] = None,
    devices: Annotated[Path | None, typer.Option(
        help="Keep the devices' state folders (node-<id>/head.pt) here [default: a "
             "temporary folder, removed]")] = None,
    secagg: Annotated[bool, typer.Option(
        "--secagg", help="Secure aggregation (Flower's SecAgg+): the server sees only the "
                         "sum of the devices' updates")] = False,
    dropout: Annotated[float, typer.Option(
        help="Fraction of devices made to fail mid-round, every round (tests, benchmarks)")
                       ] = _PRIVATE.dropout,
    dp_epsilon: Annotated[float | None, typer.Option(
        help="Differential privacy: the ε (δ 1e-5) to reach after the last round; the "
             "noise is calibrated to it")] = None,
    dp_clip: Annotated[float, typer.Option(help="DP: L2 norm each body update is clipped to")
                       ] = _PRIVATE.dp_clip,
    device_budget: Annotated[float | None, typer.Option(
        help="DP: each device's own ε budget per 30 days; past it, it refuses to train")
                             ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", help="Show Flower's and Ray's logs")
                       ] = False,
) -> None:
    """Run devices with non-IID MNIST-1D on Flower's simulation engine (one Ray actor) and
    compare global, personalised and local-only accuracy."""
    private = PrivateConfig(secagg=secagg, dropout=dropout, dp_epsilon=dp_epsilon,
                            dp_clip=dp_clip, device_budget=device_budget)
    config = SimulationConfig(clients=clients, rounds=rounds, strategy=strategy, alpha=alpha,
                              fraction=fraction, local_epochs=local_epochs, lr=lr,
                              weight_decay=weight_decay, seed=seed, centralised=centralised,
                              private=private)
    from edgeloop.federated.simulation import simulate

    def show(r: RoundReport) -> None:
        err_console.print(
            f"round {r.round}/{rounds}: {r.seconds:.1f} s, "
            + ("" if r.train_loss is None else f"train loss {r.train_loss:.3f}, ")
            + f"accuracy global {r.global_accuracy:.2%}, with own head {r.accuracy:.2%}, "
            f"model moved "
            f"{r.update_norm:.3g}, {r.replies} devices"
            + (f", {r.failures} failed" if r.failures else "")
            + (f" ({r.refused} refused: budget spent)" if r.refused else "")
            + (f", ε {r.epsilon:.3g}" if r.epsilon is not None else "")
            + (" - HALTED: too many dropouts, model unchanged" if r.halted else ""),
            highlight=False)

    result = simulate(config, out=out, devices=devices, on_round=show, verbose=verbose)
    if as_json:
        typer.echo(json.dumps(result.to_dict()))
        return
    t = Table(title=f"{clients} devices, {rounds} rounds of {strategy}, alpha {alpha:g} "
                    f"(label skew {result.label_skew:.2f})")
    t.add_column("model")
    t.add_column("accuracy")
    t.add_column("on")
    t.add_row("personalised: global body + own head", f"{result.personalised_accuracy:.2%}",
              "each device's own test data")
    t.add_row("local only: own data alone", f"{result.local_only_accuracy:.2%}",
              "each device's own test data")
    t.add_row("global: global body + global head", f"{result.global_accuracy:.2%}",
              "all devices' test data")
    if result.centralised_accuracy is not None:
        t.add_row("centralised: all data pooled", f"{result.centralised_accuracy:.2%}",
                  "all devices' test data")
    console.print(t)
    if result.noise_multiplier is not None:
        spent = result.rounds[-1].epsilon if result.rounds else None
        console.print(f"DP: noise multiplier {result.noise_multiplier:.3g}, clip {dp_clip:g}; "
                      f"ε spent {spent if spent is None else format(spent, '.3g')} "
                      f"(δ {private.delta:g})", highlight=False)
    per_round = result.simulation_seconds / max(rounds, 1)
    console.print(f"{result.seconds:.1f} s in all; simulation {result.simulation_seconds:.1f} s "
                  f"({per_round:.1f} s per round, Ray's start included)", highlight=False)
    if out is not None:
        console.print(f"wrote {out}/model.pt, body.pt, result.json", highlight=False)
