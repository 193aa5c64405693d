"""Commands `federated credentials|superlink|supernode|register|run`: Flower's Deployment
Engine with TLS and SuperNode authentication."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from edgeloop.cli._app import console, err_console
from edgeloop.cli.federated import _DEFAULT, federated_app

if TYPE_CHECKING:
    from edgeloop.federated.server import RoundReport

_LINK = "127.0.0.1:8000"   # flower-superlink's own default address

CredsOption = Annotated[Path, typer.Option(
    "--creds", help="Credentials folder (from `edgeloop federated credentials`)")]
LinkOption = Annotated[str, typer.Option("--superlink", help="The SuperLink's HOST:PORT")]


@federated_app.command("credentials")
def federated_credentials(
    out: Annotated[Path, typer.Option(help="New folder for the credentials")],
    nodes: Annotated[int, typer.Option(help="SuperNode key pairs to make")] = 3,
    host: Annotated[list[str] | None, typer.Option(
        help="A name or IP the SuperLink's certificate is for (repeat) "
             "[default: 127.0.0.1 and localhost]")] = None,
    days: Annotated[int, typer.Option(help="Days the certificates are valid")] = 30,
) -> None:
    """Make a CA, the SuperLink's TLS certificate, and SuperNode key pairs."""
    from edgeloop.federated.credentials import make_credentials

    creds = make_credentials(out, nodes=nodes, days=days,
                             **({"hosts": tuple(host)} if host else {}))
    console.print(f"wrote {creds.ca_cert}, {creds.server_cert} (+ keys) and {nodes} "
                  f"SuperNode key pairs in {creds.folder / 'nodes'}; register each "
                  "node-<i>.pub with `edgeloop federated register`", highlight=False)


@federated_app.command("superlink")
def federated_superlink(
    creds: CredsOption,
    port: Annotated[int, typer.Option(help="Port to serve on (0: a free one)")] = 8000,
    host: Annotated[str, typer.Option(help="Address to serve on")] = "127.0.0.1",
    state: Annotated[Path, typer.Option(
        help="Folder for its database (registrations, runs), log and Flower home")
                     ] = Path("superlink"),
) -> None:
    """Run a SuperLink with TLS and SuperNode authentication until Ctrl-C."""
    from edgeloop.federated.credentials import Credentials
    from edgeloop.federated.deploy import SuperLink

    link = SuperLink(Credentials(creds), home=state / "flwr", port=port, host=host,
                     database=state / "superlink.db", log=state / "superlink.log")
    try:
        link.start()
        err_console.print(f"SuperLink on {link.address} (TLS, SuperNode authentication); "
                          f"log: {link.log}; Ctrl-C stops it", highlight=False)
        assert link.proc is not None
        link.proc.wait()
        raise link.failure()
    finally:
        link.stop()


@federated_app.command("supernode")
def federated_supernode(
    creds: CredsOption,
    key: Annotated[Path, typer.Option(help="This SuperNode's private key (registered)")],
    partition_id: Annotated[int, typer.Option(help="This device's share of the data")],
    num_partitions: Annotated[int, typer.Option(help="Devices the data is split over")],
    state_dir: Annotated[Path, typer.Option(
        help="The device's state folder: its private head, data and log")],
    superlink: LinkOption = _LINK,
    port: Annotated[int, typer.Option(
        help="Its local runtime API port, one per SuperNode on a host (0: a free one)")
                    ] = 0,
    wait: Annotated[float, typer.Option(
        help="Seconds to wait for the SuperLink to be reachable")] = 10.0,
    threads: Annotated[int, typer.Option(
        min=0, help="Training threads; 0 = every core (SuperNodes on one host share its "
                    "cores: give each its part)")] = 0,
) -> None:
    """Run a SuperNode (a device) until Ctrl-C or until the SuperLink refuses it."""
    from edgeloop.federated.credentials import Credentials
    from edgeloop.federated.deploy import SuperNode

    node = SuperNode(Credentials(creds), key, superlink=superlink, partition_id=partition_id,
                     num_partitions=num_partitions, state_dir=state_dir, port=port,
                     reach_timeout=wait, threads=threads)
    try:
        node.start()
        err_console.print(f"SuperNode {partition_id} of {num_partitions} connecting to "
                          f"{superlink}; log: {node.log}; Ctrl-C stops it", highlight=False)
        node.wait()
    finally:
        node.stop()


@federated_app.command("register")
def federated_register(
    public_key: Annotated[Path, typer.Argument(help="A SuperNode's public key (.pub)")],
    creds: CredsOption,
    superlink: LinkOption = _LINK,
) -> None:
    """Register a SuperNode's public key: only registered SuperNodes may connect."""
    from edgeloop.federated.credentials import Credentials
    from edgeloop.federated.deploy import register

    node_id = register(public_key, superlink=superlink, creds=Credentials(creds))
    console.print(f"registered {public_key.name}: SuperNode {node_id}", highlight=False)


@federated_app.command("run")
def federated_run(
    creds: CredsOption,
    results: Annotated[Path, typer.Option(help="Folder for rounds.json, body.npz, the log")],
    clients: Annotated[int, typer.Option(help="SuperNodes taking part (all of them)")
                       ] = _DEFAULT.clients,
    superlink: LinkOption = _LINK,
    rounds: Annotated[int, typer.Option(help="Federated rounds")] = _DEFAULT.rounds,
    strategy: Annotated[str, typer.Option(help="fedavg, fedavgm, fedprox or fedadam")
                        ] = _DEFAULT.strategy,
    alpha: Annotated[float, typer.Option(help="Dirichlet concentration of the label split")
                     ] = _DEFAULT.alpha,
    local_epochs: Annotated[int, typer.Option(help="Epochs each device trains per round")
                            ] = _DEFAULT.local_epochs,
    seed: Annotated[int, typer.Option(help="Data split, shifts, initial weights")
                    ] = _DEFAULT.seed,
    timeout: Annotated[float, typer.Option(help="Seconds the whole run may take")
                       ] = 1800.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the rounds as JSON")] = False,
) -> None:
    """Run the federated body with private heads on the SuperLink's SuperNodes."""
    from dataclasses import asdict

    from edgeloop.federated.credentials import Credentials
    from edgeloop.federated.deploy import DeploymentConfig, run

    config = DeploymentConfig(clients=clients, rounds=rounds, strategy=strategy, alpha=alpha,
                              local_epochs=local_epochs, seed=seed)

    def show(r: RoundReport) -> None:
        err_console.print(
            f"round {r.round}/{rounds}: {r.seconds:.1f} s, "
            + ("" if r.train_loss is None else f"train loss {r.train_loss:.3f}, ")
            + f"accuracy (global body + own head) {r.accuracy:.2%}, {r.replies} devices"
            + (f", {r.failures} failed" if r.failures else ""), highlight=False)

    result = run(config, superlink=superlink, creds=Credentials(creds), results=results,
                 timeout=timeout, on_round=show)
    if as_json:
        typer.echo(json.dumps({"seconds": result.seconds,
                               "rounds": [asdict(r) for r in result.rounds]}))
        return
    console.print(f"{len(result.rounds)} rounds in {result.seconds:.1f} s; wrote "
                  f"{results}/rounds.json, body.npz; log: {result.log}", highlight=False)
