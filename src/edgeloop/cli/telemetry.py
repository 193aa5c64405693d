"""Commands `telemetry serve|enroll|summary`: the fleet's private telemetry collector."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from edgeloop.cli._app import app, console

telemetry_app = typer.Typer(help="The fleet's collector of private (local-DP) device reports.",
                            no_args_is_help=True)
app.add_typer(telemetry_app, name="telemetry")

DbOpt = Annotated[str, typer.Option(
    "--db", help="Database: a file path or sqlite:///PATH (SQLite), or "
                 "postgresql://USER@HOST:PORT/DB")]


@telemetry_app.command("serve")
def telemetry_serve(
    db: DbOpt,
    port: Annotated[int, typer.Option(min=0, max=65535, help="TCP port; 0 = any free one")],
    host: Annotated[str, typer.Option(help="Address to listen on")] = "127.0.0.1",
) -> None:
    """Receive signed reports on POST /v1/reports and store them."""
    from edgeloop._http import listen
    from edgeloop.serve.telemetry import serve
    from edgeloop.serve.telemetry_store import TelemetryStore

    store = TelemetryStore(db)
    sock = listen(host, port)
    shown = f"[{host}]" if ":" in host else host
    console.print(f"collecting telemetry on http://{shown}:{sock.getsockname()[1]} into "
                  f"{store.shown}", highlight=False, soft_wrap=True)
    sys.stdout.flush()
    serve(store, sock)


@telemetry_app.command("enroll")
def telemetry_enroll(
    keys: Annotated[list[Path], typer.Argument(
        help="Key files (a device's STATE/telemetry.key, copied from it)")],
    db: DbOpt,
    replace: Annotated[bool, typer.Option(
        help="Trust a new key for a device enrolled with another one")] = False,
) -> None:
    """Register devices' keys so the collector accepts their reports."""
    from edgeloop.monitor.telemetry import read_key
    from edgeloop.serve.telemetry_store import TelemetryStore

    read = [read_key(k) for k in keys]     # every file checked before anything is stored
    store = TelemetryStore(db)
    for k in read:
        new = store.enroll(k, replace=replace)
        console.print(f"device {k.device} {'enrolled' if new else 'already enrolled'}",
                      highlight=False)


@telemetry_app.command("summary")
def telemetry_summary(
    db: DbOpt,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
    level: Annotated[float, typer.Option(
        min=0.5, max=0.999, help="Confidence level of the intervals")] = 0.95,
    last: Annotated[str | None, typer.Option(
        help="Only reports received in this period (e.g. 1d, 12h) [default: all]")] = None,
    round_above: Annotated[float | None, typer.Option(
        min=0.0, max=1.0, help="Say whether a federated round is due: the fleet's drift "
                               "rate above this share, its whole interval above it")] = None,
) -> None:
    """Fleet estimates de-biased from the reports: class mix, drift rate, mean confidence,
    each with its confidence interval; with --round-above, whether the devices' private
    drift flags call for a federated personalisation round."""
    from edgeloop.monitor.telemetry import parse_period
    from edgeloop.serve.telemetry_store import TelemetryStore

    since = time.time() - parse_period(last) if last else None
    s = TelemetryStore(db, create=False).summary(level=level, since=since)
    due = None if round_above is None else s.drift_above(round_above)
    if as_json:
        console.print_json(json.dumps(
            s.to_dict() if due is None else {**s.to_dict(), "round_due": due}))
        return
    pct = f"{level:.0%}"
    console.print(f"{s.reports} reports from {s.devices} devices (mean ε per report "
                  f"{s.epsilon_mean:.3g})", highlight=False)
    t = Table(title=f"fleet estimates ({pct} intervals)")
    for col in ("quantity", "estimate", "interval", "devices"):
        t.add_column(col)
    rows = [(f"class {c} of {k}", e) for k, mix in s.class_mix.items()
            for c, e in enumerate(mix)]
    rows += [(name, e) for name, e in (("drift rate", s.drift_rate),
                                        ("mean confidence", s.mean_confidence)) if e]
    for name, e in rows:
        interval = "needs 2 devices" if e.devices < 2 else f"{e.low:.4f} to {e.high:.4f}"
        t.add_row(name, f"{e.value:.4f}", interval, str(e.devices))
    console.print(t)
    if due is not None:
        console.print(f"{'a federated round is due' if due else 'no federated round due'}: "
                      f"the drift rate's {pct} interval is "
                      f"{'above' if due else 'not wholly above'} {round_above:g}",
                      highlight=False)
