"""Commands `device personalise` and `federated publish-body`: a device's private head
learnt from its own feedback, and the federated body published for devices to combine
with their heads."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer

from edgeloop.bundle.health import HealthConfig
from edgeloop.cli._app import console
from edgeloop.cli.bundle import (
    _PASS_ENV,
    GoldenOpt,
    KeysOpt,
    MinMetricOpt,
    NameOpt,
    PassEnvOpt,
    RepoOpt,
    VersionOpt,
    _keys,
    device_app,
)
from edgeloop.cli.federated import federated_app


@device_app.command("personalise")
def device_personalise(
    state_dir: Annotated[Path, typer.Argument(help="Device state folder")],
    data: Annotated[Path, typer.Option("--data", help="Labelled feedback .npz (inputs + "
                                                      "labels, oldest first)")],
    epochs: Annotated[int, typer.Option(min=1, help="Epochs of head-only training")] = 20,
    latency_margin: Annotated[float, typer.Option(
        min=0, help="Allowed latency increase over the current model (0.5 = +50%)")
    ] = HealthConfig.latency_margin,
    if_flagged: Annotated[bool, typer.Option(
        "--if-flagged", help="Only when the device's monitor flags drift or an accuracy "
                             "drop on the active model (for a periodic job)")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON")] = False,
) -> None:
    """Fine-tune the device's private head on its feedback (and its replay buffer); keep
    it only if it is better on the newest feedback held back, and install it through the
    health check like any update. Needs torch (the `train` extra)."""
    if if_flagged:
        from edgeloop.cli.bundle import _active_sha256
        from edgeloop.monitor import drift_flag

        flag = drift_flag(state_dir, model_sha256=_active_sha256(state_dir))
        if not flag.raised:
            if as_json:
                typer.echo(json.dumps({"skipped": "no alert on the active model"}))
            else:
                console.print("no alert on the active model: nothing to personalise")
            return
        if not as_json:
            console.print("the monitor flags " + ", ".join(
                sorted({a.detector for a in flag.alerts})) + ": personalising", highlight=False)
    from edgeloop.data import load_npz
    from edgeloop.federated.personal import PersonalConfig, personalise

    result = personalise(state_dir, load_npz(data), config=PersonalConfig(epochs=epochs),
                         health=HealthConfig(latency_margin=latency_margin))
    if as_json:
        typer.echo(json.dumps(result.to_dict()))
        return
    golden = "" if result.golden_before is None else (
        f"; golden set {result.golden_before:.1%} -> {result.golden_after:.1%}")
    console.print(f"{'installed the new head' if result.kept == 'new' else 'no change'}: "
                  f"{result.reason}{golden} ({result.trained_samples} samples trained on, "
                  f"{result.holdout_samples} held back, buffer {result.buffer_samples})",
                  highlight=False, soft_wrap=True)


@federated_app.command("publish-body")
def federated_publish_body(
    body: Annotated[Path, typer.Argument(help="The global body's state_dict (body.pt of "
                                              "`federated simulate --out`)")],
    model: Annotated[str, typer.Option(
        help="The model the body belongs to, with the default head (model.pt of "
             "`federated simulate --out`, or any form `train` commands read)")],
    repo: RepoOpt,
    name: NameOpt,
    version: VersionOpt,
    golden: GoldenOpt = None,
    min_metric: MinMetricOpt = None,
    head: Annotated[str | None, typer.Option(
        help="The head's parameter prefix [default: `head`, else the last Linear]")] = None,
    keys: KeysOpt = None,
    passphrase_env: PassEnvOpt = _PASS_ENV,
) -> None:
    """Publish a federated body as a signed bundle; devices install it with their own
    head (a device with none yet serves the default head)."""
    from edgeloop.data import load_npz
    from edgeloop.federated.personal import publish_body

    manifest = publish_body(body, model=model, repo=repo, keys=_keys(repo, keys), name=name,
                            version=version, golden=load_npz(golden) if golden else None,
                            min_metric=min_metric, head=head,
                            passphrase=os.environ.get(passphrase_env))
    floor = manifest.floor.accuracy
    console.print(f"published {name} {version} (body + default head, {manifest.size_bytes:,} "
                  f"bytes, accuracy floor {'none' if floor is None else f'{floor:.4f}'})",
                  highlight=False)
