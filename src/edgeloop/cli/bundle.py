"""Commands for signed model bundles: `repo ...`, `publish`, `device ...`."""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from edgeloop.bundle.health import HealthConfig
from edgeloop.cli._app import app, console

repo_app = typer.Typer(help="A TUF repository of signed model bundles (build side).",
                       no_args_is_help=True)
device_app = typer.Typer(help="A device's A/B model slots: update, rollback, status.",
                         no_args_is_help=True)
app.add_typer(repo_app, name="repo")
app.add_typer(device_app, name="device")

# the options every publishing command takes
RepoOpt = Annotated[Path, typer.Option("--repo", help="Repository folder")]
NameOpt = Annotated[str, typer.Option(help="Bundle name devices ask for")]
VersionOpt = Annotated[str, typer.Option(help="X.Y.Z, greater than the published one")]
GoldenOpt = Annotated[Path | None, typer.Option(help="Golden .npz for figures and floor")]
MinMetricOpt = Annotated[float | None, typer.Option(
    help="Accuracy floor a device's health check must meet [default: measured - 0.02]")]
KeysOpt = Annotated[Path | None, typer.Option(
    "--keys", help="Folder of key files, outside the repository [default: DIR-keys]")]
PassEnvOpt = Annotated[str, typer.Option(
    "--passphrase-env", help="Environment variable holding the key passphrase (if set, "
                             "key files are encrypted with it)")]
_PASS_ENV = "EDGELOOP_KEY_PASSPHRASE"


def _keys(repo: Path, keys: Path | None) -> Path:
    return keys if keys is not None else repo.with_name(repo.name + "-keys")


@repo_app.command("init")
def repo_init(
    repo: Annotated[Path, typer.Argument(help="Repository folder (published as is)")],
    keys: KeysOpt = None,
    root_threshold: Annotated[int, typer.Option(min=1, help="Root keys needed to sign")] = 1,
    root_keys: Annotated[int | None, typer.Option(
        min=1, help="Root keys to create [default: the threshold]")] = None,
    passphrase_env: PassEnvOpt = _PASS_ENV,
) -> None:
    """Create a repository with ed25519 keys for root, targets, snapshot and timestamp."""
    from edgeloop.bundle import init_repo

    keys_dir = _keys(repo, keys)
    root = init_repo(repo, keys=keys_dir, root_threshold=root_threshold, root_keys=root_keys,
                     passphrase=os.environ.get(passphrase_env))
    console.print(f"created {repo} (keys in {keys_dir}); provision devices with {root}")


@repo_app.command("rotate-key")
def repo_rotate(
    role: Annotated[str, typer.Argument(help="root, targets, snapshot or timestamp")],
    repo: RepoOpt,
    keys: KeysOpt = None,
    revoke: Annotated[str | None, typer.Option(
        help="Replace only this key id [default: every key of the role]")] = None,
    passphrase_env: PassEnvOpt = _PASS_ENV,
) -> None:
    """Replace a role's keys with new ones in a new root version (old keys revoked)."""
    from edgeloop.bundle import rotate_key

    new = rotate_key(repo, role, keys=_keys(repo, keys), revoke=revoke,
                     passphrase=os.environ.get(passphrase_env))
    console.print(f"{role} now signed by new key(s) {', '.join(k[:16] for k in new)}")


@repo_app.command("refresh")
def repo_refresh(
    repo: Annotated[Path, typer.Argument(help="Repository folder")],
    keys: KeysOpt = None,
    passphrase_env: PassEnvOpt = _PASS_ENV,
) -> None:
    """Re-sign timestamp (and snapshot/targets near expiry); run it from cron."""
    from edgeloop.bundle import refresh_repo

    roles = refresh_repo(repo, keys=_keys(repo, keys), passphrase=os.environ.get(passphrase_env))
    console.print(f"re-signed {', '.join(roles)}")


@repo_app.command("serve")
def repo_serve(
    repo: Annotated[Path, typer.Argument(help="Repository folder")],
    port: Annotated[int, typer.Option(min=0, max=65535)] = 8000,
) -> None:
    """Serve the repository over HTTP on 127.0.0.1 until interrupted."""
    from edgeloop.bundle import serve_repo

    server, _ = serve_repo(repo, port=port)
    console.print(f"serving {repo} at http://127.0.0.1:{server.server_address[1]}/ "
                  "(Ctrl-C stops)")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.shutdown()


@app.command("publish")
def publish_cmd(
    model: Annotated[Path, typer.Argument(
        help="The ONNX model file, or a cascade.json (every stage ships in the bundle)")],
    repo: RepoOpt,
    name: NameOpt,
    version: VersionOpt,
    golden: GoldenOpt = None,
    min_metric: MinMetricOpt = None,
    monitor: Annotated[bool, typer.Option(
        help="Ship the drift monitor's reference sketch of --golden (monitor.json; "
             "cascades: not yet)")] = True,
    keys: KeysOpt = None,
    passphrase_env: PassEnvOpt = _PASS_ENV,
) -> None:
    """Sign and publish a model bundle (model + manifest, or a whole cascade) into a
    repository."""
    from edgeloop.bundle import build_manifest, publish_bundle
    from edgeloop.data import load_npz

    data = load_npz(golden) if golden is not None else None
    if model.suffix == ".json":
        from edgeloop.device import publish_cascade

        manifest = publish_cascade(model, repo, keys=_keys(repo, keys), name=name,
                                   version=version, golden=data, min_metric=min_metric,
                                   passphrase=os.environ.get(passphrase_env))
    else:
        from edgeloop.monitor import REFERENCE_FILE, sketch_bundle

        with tempfile.TemporaryDirectory(prefix="edgeloop-publish-") as tmp:
            # the monitor's reference sketch ships beside the model, signed alike
            files = {} if data is None or not monitor else {
                REFERENCE_FILE: sketch_bundle(model, data).write(tmp)}
            manifest = build_manifest(model, name=name, version=version, golden=data,
                                      min_metric=min_metric, files=files)
            publish_bundle(repo, model, keys=_keys(repo, keys), manifest=manifest,
                           passphrase=os.environ.get(passphrase_env), files=files)
    floor = manifest.floor.accuracy
    console.print(f"published {name} {version} ({manifest.size_bytes:,} bytes, sha256 "
                  f"{manifest.sha256[:16]}..., accuracy floor "
                  f"{'none' if floor is None else f'{floor:.4f}'})")


@device_app.command("init")
def device_init(
    state_dir: Annotated[Path, typer.Argument(help="New device state folder")],
    trusted_root: Annotated[Path, typer.Option(help="The repository's root.json")],
    golden: Annotated[Path | None, typer.Option(help="Golden .npz for health checks")] = None,
) -> None:
    """Provision a device folder that trusts a repository's root."""
    from edgeloop.bundle import Device

    Device.init(state_dir, trusted_root=trusted_root, golden=golden)
    console.print(f"device {state_dir} provisioned")


@device_app.command("update")
def device_update(
    state_dir: Annotated[Path, typer.Argument(help="Device state folder")],
    repo: Annotated[str, typer.Option("--repo", help="Repository base URL")],
    name: Annotated[str, typer.Option(help="Bundle name")],
    latency_margin: Annotated[float, typer.Option(
        min=0, help="Allowed latency increase over the current model (0.5 = +50%)")
    ] = HealthConfig.latency_margin,
) -> None:
    """Fetch, verify, health-check and commit the newest bundle into the inactive slot (a
    published federated body with the device's own head, if it has one)."""
    from edgeloop.bundle import Device
    from edgeloop.federated.install import own_head

    result = Device(state_dir, config=HealthConfig(latency_margin=latency_margin)).update(
        repo, name, adapt=own_head(state_dir))
    if result.installed:
        console.print(f"installed {name} {result.version}: health check {result.reason}")
    else:
        console.print(f"no change: {result.reason}")


@device_app.command("rollback")
def device_rollback(
    state_dir: Annotated[Path, typer.Argument(help="Device state folder")],
) -> None:
    """Serve the previous slot's model again."""
    from edgeloop.bundle import Device

    m = Device(state_dir).rollback()
    console.print(f"rolled back to {m.name} {m.version}")


@device_app.command("status")
def device_status(
    state_dir: Annotated[Path, typer.Argument(help="Device state folder")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
) -> None:
    """Both slots, versions, sha256, probation, when and why each change happened, and
    the monitor's flags (drift, accuracy drop: which detector, when, evidence)."""
    from edgeloop.bundle import Device
    from edgeloop.monitor import monitor_status

    status = Device(state_dir).status()
    status["monitor"] = monitor_status(state_dir, model_sha256=_active_sha256(state_dir))
    if as_json:
        console.print_json(json.dumps(status))
        return
    t = Table(title=f"device {state_dir}")
    for col in ("slot", "active", "name", "version", "sha256"):
        t.add_column(col)
    for s in status["slots"]:  # type: ignore[union-attr]
        t.add_row(s["slot"], "yes" if s["active"] else "", s["name"] or "-",
                  s["version"] or "-", (s["sha256"] or "-")[:16])
    console.print(t)
    if status["probation"]:
        console.print(f"on probation: {status['probation']}")
    _print_monitor(status["monitor"])  # type: ignore[arg-type]
    h = Table(title="history")
    for col in ("time", "action", "version", "reason"):
        h.add_column(col)
    for e in status["history"]:  # type: ignore[union-attr]
        h.add_row(e["time"], e["action"], e["version"] or "-", e["reason"])
    console.print(h)


def _active_sha256(state_dir: Path) -> str | None:
    """The sha256 of the model the device at ``state_dir`` serves (None: none yet)."""
    from edgeloop.bundle import Device

    active = Device(state_dir).state().current()
    return active.sha256 if active is not None else None


def _print_monitor(m: dict[str, object]) -> None:
    flags = [name for name in ("drifted", "accuracy_drop") if m[name]]
    console.print(f"monitor: {', '.join(flags) if flags else 'no alert'} "
                  f"({m['samples']} samples watched, saved {m['saved'] or 'never'})")
    if m["alerts"]:
        t = Table(title="alerts")
        for col in ("detector", "since", "last", "detections", "evidence"):
            t.add_column(col)
        for a in m["alerts"]:  # type: ignore[attr-defined]
            t.add_row(a["detector"], a["since"], a["last"], str(a["detections"]),
                      a["evidence"])
        console.print(t)


@device_app.command("feedback")
def device_feedback(
    state_dir: Annotated[Path, typer.Argument(help="Device state folder")],
    data: Annotated[Path, typer.Option("--data", help="Labelled .npz (inputs + labels)")],
    window: Annotated[int, typer.Option(min=1, help="Samples per evaluation window")] = 500,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
) -> None:
    """Measure the active model's accuracy on labelled samples, per window, beside the
    label-free estimate; kept in the device's monitor history (an alert if it dropped)."""
    from edgeloop.data import load_npz
    from edgeloop.monitor import evaluate_feedback

    records = evaluate_feedback(state_dir, load_npz(data), window=window)
    if as_json:
        console.print_json(json.dumps(records))
        return
    t = Table(title=f"feedback on {state_dir}")
    for col in ("model", "samples", "accuracy", "estimated", "golden", "dropped"):
        t.add_column(col)
    for r in records:
        est, gold = r.get("estimated_accuracy"), r.get("golden_accuracy")
        t.add_row(f"{r['model']} {r['version']}", str(r["samples"]), f"{r['accuracy']:.2%}",
                  "-" if est is None else f"{est:.2%}", "-" if gold is None else f"{gold:.2%}",
                  "yes" if r.get("dropped") else "")
    console.print(t)


# --- private telemetry (edgeloop.monitor.telemetry): the owner's budget, and sending reports ---

@device_app.command("privacy")
def device_privacy(
    state_dir: Annotated[Path, typer.Argument(help="Device state folder")],
    budget: Annotated[float | None, typer.Option(
        help="Total ε the device's reports may spend per period")] = None,
    period: Annotated[str, typer.Option(help="Sliding window of the budget: 12h, 1d, 1w")
                      ] = "1d",
    delta: Annotated[float, typer.Option(
        help="Total δ per period (0: pure-ε mechanisms only)")] = 0.0,
    new_key: Annotated[bool, typer.Option(
        help="Create the telemetry key of a device made before telemetry")] = False,
) -> None:
    """Show or set (the device owner's) privacy budget for telemetry reports."""
    from edgeloop.monitor.telemetry import Budget, Reporter, parse_period
    from edgeloop.monitor.telemetry.ledger import format_period

    if budget is None and delta:
        from edgeloop.errors import UsageError

        raise UsageError("`--delta` is set together with `--budget` (and `--period`)")
    rep = Reporter(state_dir)
    if new_key:
        console.print(f"telemetry key written to {rep.new_key()}")
    ledger = rep.set_budget(Budget(budget, parse_period(period), delta)) \
        if budget is not None else rep.ledger()
    b = ledger.budget
    if b is None:
        console.print("no privacy budget set: this device sends no telemetry")
        return
    eps, dlt = ledger.spent(time.time())
    console.print(f"budget ε {b.epsilon:g}, δ {b.delta:g} per {format_period(b.period_s)} "
                  f"(basic composition, sliding window); spent ε {eps:g}, δ {dlt:g}",
                  highlight=False, soft_wrap=True)


@device_app.command("report")
def device_report(
    state_dir: Annotated[Path, typer.Argument(help="Device state folder")],
    to: Annotated[str, typer.Option("--to", help="Collector base URL")],
    epsilon: Annotated[float, typer.Option(help="ε this report spends (split over its fields)")],
    class_counts: Annotated[str | None, typer.Option(
        help="Predictions per class over the window, e.g. 12,0,3")] = None,
    drift: Annotated[bool | None, typer.Option(
        "--drift/--no-drift", help="Whether the drift detector fired")] = None,
    confidence: Annotated[float | None, typer.Option(help="Mean top-class confidence")] = None,
    class_mechanism: Annotated[str, typer.Option(help="auto, grr or oue")] = "auto",
    confidence_mechanism: Annotated[str, typer.Option(help="laplace or gaussian")
                                    ] = "laplace",
) -> None:
    """Send one local-DP report (within the owner's budget) to a telemetry collector.

    Without --class-counts, --drift or --confidence it reports what the device's monitor
    saw: the predicted classes and mean confidence of its last closed window on the
    active model, and whether drift is flagged now."""
    from edgeloop.errors import UsageError
    from edgeloop.monitor.telemetry import Observation, ReportConfig, Reporter

    try:
        counts = [int(c) for c in class_counts.split(",")] if class_counts else None
    except ValueError:
        raise UsageError(f"`--class-counts` must be integers separated by commas; got "
                         f"{class_counts!r}") from None
    reporter = Reporter(state_dir)
    obs = Observation(class_counts=counts, drift=drift, mean_confidence=confidence)
    if obs == Observation():
        obs = reporter.observed(model_sha256=_active_sha256(state_dir))
    result = reporter.report(obs, to, epsilon=epsilon, config=ReportConfig(
        class_mechanism=class_mechanism, confidence_mechanism=confidence_mechanism))
    console.print(f"sent report {result.seq} (ε {result.epsilon:g}; {result.sent} "
                  f"delivered); spent ε {result.spent[0]:g} in the current window",
                  highlight=False, soft_wrap=True)
    refused = Reporter(state_dir).refused()
    if refused:
        console.print(f"{len(refused)} report(s) the collector refused for good are kept in "
                      f"{refused[0].parent} with its reasons", highlight=False, soft_wrap=True)
