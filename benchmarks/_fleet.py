"""Private telemetry at fleet scale: estimates against the truth, the ledger, the collector.

1. :func:`fleet_estimates`: 1000 simulated devices (10 classes, each its own class mix
   over a window of 200 predictions, a drift flag, a mean confidence) send one report each
   at ε = 0.5, 1, 2, 4 per report (a third per field), through the real path: mechanisms,
   canonical encoding, the collector's parser, the de-biasing summary. Repeated runs give
   the error against the fleet's true values and how often the 95% intervals hold them.
   Then the ε ledger of one device refusing at its budget.
2. :func:`collector_load`: 1000 enrolled devices x 10 signed reports against ``edgeloop
   telemetry serve`` (its own process) over HTTP on 127.0.0.1, with SQLite and with a
   PostgreSQL server started here: reports/s, then a run where the collector is killed
   (SIGKILL) halfway and restarted, devices retrying until acknowledged: every report
   stored exactly once.

Both return (markdown lines, {claim: holds}); ``benchmarks/bench_monitor.py`` calls them.
``python benchmarks/_fleet.py`` prints both in quick mode (``--full`` for the real sizes).
"""

from __future__ import annotations

import itertools
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from _postgres import free_port, pg_bin, postgres_server  # noqa: E402

from edgeloop.errors import UsageError  # noqa: E402
from edgeloop.monitor.telemetry import (  # noqa: E402
    Budget,
    DeviceKey,
    Observation,
    ReportConfig,
    Reporter,
    create_key,
    parse_report,
    summarize,
)
from edgeloop.monitor.telemetry.client import DEVICE_HEADER, SIGNATURE_HEADER  # noqa: E402
from edgeloop.monitor.telemetry.report import build_report, encode, plan, sign  # noqa: E402
from edgeloop.serve.loadgen import ServerProcess  # noqa: E402
from edgeloop.serve.telemetry_store import TelemetryStore  # noqa: E402

EPSILONS = (0.5, 1.0, 2.0, 4.0)
K = 10
WINDOW = 200      # predictions per device window


def _fleet(n: int, rng: np.random.Generator) -> tuple[list[Observation], dict[str, object]]:
    """``n`` devices' windows and the fleet's true class mix, drift rate, confidence."""
    base = rng.dirichlet(np.full(K, 2.0))
    mixes = rng.dirichlet(base * 20, size=n)
    counts = np.stack([rng.multinomial(WINDOW, m) for m in mixes])
    drift = rng.random(n) < 0.15 + 0.2 * mixes[:, 0]
    conf = np.clip(rng.beta(8, 2, size=n), 0, 1)
    obs = [Observation(class_counts=[int(c) for c in counts[i]], drift=bool(drift[i]),
                       mean_confidence=float(conf[i])) for i in range(n)]
    return obs, {"mix": (counts / WINDOW).mean(0), "drift": drift.mean(), "conf": conf.mean()}


def _one_run(obs: list[Observation], epsilon: float, rng: random.Random) -> object:
    reports = []
    for i, o in enumerate(obs):
        mechs = plan(o, epsilon, ReportConfig())
        doc = build_report(o, mechs, device=f"d{i}", seq=1, time=0, rng=rng)
        reports.append(parse_report(encode(doc)))
    return summarize(reports)


def fleet_estimates(quick: bool) -> tuple[list[str], dict[str, bool]]:
    """Fleet estimates vs truth at each ε, and the ledger refusing at budget."""
    n, runs = (300, 12) if quick else (1000, 60)
    rng = random.Random(12)
    nprng = np.random.default_rng(12)
    lines = [f"Fleet estimates: {n} simulated devices, {K} classes, one report each, "
             f"{runs} runs per ε (a new fleet each run); ε per report split equally over "
             "class (GRR or OUE, whichever has the lower variance), drift flag (GRR, k=2) "
             "and mean confidence (Laplace, clipped to [0, 1]).", "",
             "| ε per report | class mix: mean abs error | coverage | drift rate: abs error "
             "| coverage | mean confidence: abs error | coverage | ±half-width (conf.) |",
             "|---|---|---|---|---|---|---|---|"]
    claims: dict[str, bool] = {}
    errors = {}
    for eps in EPSILONS:
        err = {"mix": [], "drift": [], "conf": []}
        hit = {"mix": [], "drift": [], "conf": []}
        width = []
        for _ in range(runs):
            obs, truth = _fleet(n, nprng)
            s = _one_run(obs, eps, rng)
            mix = s.class_mix[K]  # type: ignore[attr-defined]
            for e, t in zip(mix, truth["mix"], strict=True):  # type: ignore[call-overload]
                err["mix"].append(abs(e.value - t))
                hit["mix"].append(e.low <= t <= e.high)
            for name, e in (("drift", s.drift_rate), ("conf", s.mean_confidence)):  # type: ignore[attr-defined]
                err[name].append(abs(e.value - truth[name]))
                hit[name].append(e.low <= truth[name] <= e.high)
            width.append((s.mean_confidence.high - s.mean_confidence.low) / 2)  # type: ignore[attr-defined]
        cov = {k: float(np.mean(v)) for k, v in hit.items()}
        errors[eps] = {k: float(np.mean(v)) for k, v in err.items()}
        lines.append(f"| {eps:g} | {errors[eps]['mix']:.4f} | {cov['mix']:.1%} | "
                     f"{errors[eps]['drift']:.4f} | {cov['drift']:.1%} | "
                     f"{errors[eps]['conf']:.4f} | {cov['conf']:.1%} | {np.mean(width):.4f} |")
        low = 0.85 if quick else 0.9
        claims[f"ε={eps:g}: 95% intervals hold the truth in >= {low:.0%} of runs "
               "(class mix, drift rate, mean confidence)"] = min(cov.values()) >= low
    claims["errors shrink as ε grows: every quantity's error at ε=4 is below a third of "
           "its error at ε=0.5"] = all(errors[4.0][k] < errors[0.5][k] / 3
                                       for k in errors[4.0])
    ledger_lines, ledger_claims = _ledger()
    return [*lines, "", *ledger_lines], {**claims, **ledger_claims}


def _ledger() -> tuple[list[str], dict[str, bool]]:
    """One device, budget ε 4 per day, reports of ε 1: refused at the fifth, allowed
    again once the first has left the window."""
    clock = [1_800_000_000.0]
    with tempfile.TemporaryDirectory(prefix="edgeloop-ledger-") as tmp:
        (Path(tmp) / "device.json").write_text("{}")
        create_key(tmp)
        rep = Reporter(tmp, clock=lambda: clock[0])
        rep.set_budget(Budget(4.0, 86400))
        obs = Observation(drift=False, mean_confidence=0.9)
        outcomes = []
        for hour in range(6):
            clock[0] = 1_800_000_000.0 + 3600 * hour
            try:
                rep.prepare(obs, epsilon=1.0)
                outcomes.append("sent")
            except UsageError as e:
                outcomes.append("refused")
                message = str(e)
        clock[0] = 1_800_000_000.0 + 86400 + 1
        rep.prepare(obs, epsilon=1.0)
        outcomes.append("sent")
    lines = ["Ledger: budget ε 4 per sliding day, one report of ε 1 per hour: "
             f"{', '.join(outcomes[:6])}; a day after the first: {outcomes[6]}.",
             f"The refusal: \"{message}\""]
    return lines, {"the ledger refuses the 5th report of ε 1 under a budget of 4 and allows "
                   "one again once the first leaves the window":
                   outcomes == ["sent"] * 4 + ["refused"] * 2 + ["sent"]}


# --- the collector under load -------------------------------------------------------

def _signed(devices: int, per_device: int) -> tuple[list[DeviceKey],
                                                     list[tuple[str, str, bytes]]]:
    """Keys and signed reports, round by round (every device's report 1, then 2, ...)."""
    rng = random.Random(7)
    keys = [DeviceKey(f"dev{i:05d}", rng.randbytes(32)) for i in range(devices)]
    out = []
    for seq in range(1, per_device + 1):
        for i, key in enumerate(keys):
            counts = [1] * K
            counts[i % K] += 20
            obs = Observation(class_counts=counts, drift=seq % 3 == 0, mean_confidence=0.8)
            doc = build_report(obs, plan(obs, 1.0, ReportConfig()), device=key.device,
                               seq=seq, time=1.8e9 + seq, rng=rng)
            body = encode(doc)
            out.append((key.device, sign(body, key.key), body))
    return keys, out


def _send_all(url: str, reports: list[tuple[str, str, bytes]], *, threads: int,
              kill: threading.Event | None = None) -> int:
    """Post every report from ``threads`` clients, each retrying until the collector
    answers 200 or 409; returns how many 409s (stored before the answer was lost)."""
    counter = itertools.count()
    lock = threading.Lock()
    acked = [0]
    resent = [0]

    def worker() -> None:
        with httpx.Client(timeout=10) as http:
            while (i := next(counter)) < len(reports):
                device, sig, body = reports[i]
                while True:
                    try:
                        r = http.post(url + "/v1/reports", content=body, headers={
                            DEVICE_HEADER: device, SIGNATURE_HEADER: sig,
                            "Content-Type": "application/json"})
                    except httpx.HTTPError:
                        time.sleep(0.05)
                        continue
                    if r.status_code in (200, 409):
                        break
                    if r.status_code != 503:
                        raise RuntimeError(f"collector refused a valid report: {r.text}")
                    time.sleep(0.05)
                with lock:
                    acked[0] += 1
                    resent[0] += r.status_code == 409
                    if kill is not None and acked[0] == len(reports) // 2:
                        kill.set()

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return resent[0]


def _kill_and_restart(kill: threading.Event, procs: list[ServerProcess], db: str,
                      port: int, restart_s: list[float]) -> None:
    """When ``kill`` is set: SIGKILL the collector, start a new one on the same port."""
    kill.wait()
    procs[0].kill()
    procs[0].stop()
    t = time.perf_counter()
    procs.append(ServerProcess.collector(db, port=port).start())
    restart_s[0] = time.perf_counter() - t


def _backend(name: str, db: str, keys: list[DeviceKey], reports: list[tuple[str, str, bytes]],
             threads: int) -> tuple[list[str], dict[str, bool]]:
    expected = {(d, parse_report(b).seq) for d, _, b in reports}
    lines, claims = [], {}
    for mode in ("clean", "killed"):
        store = TelemetryStore(db)
        with store.engine.begin() as conn:         # a fresh database for each run
            for table in ("telemetry_reports", "telemetry_devices"):
                conn.exec_driver_sql(f"DELETE FROM {table}")
        for key in keys:
            store.enroll(key)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        procs = [ServerProcess.collector(db, port=port).start()]
        kill = threading.Event() if mode == "killed" else None
        restart_s = [0.0]
        watcher = threading.Thread(target=_kill_and_restart,
                                   args=(kill, procs, db, port, restart_s)) if kill else None
        if watcher:
            watcher.start()
        t0 = time.perf_counter()
        resent = _send_all(url, reports, threads=threads, kill=kill)
        wall = time.perf_counter() - t0
        if watcher:
            watcher.join()
        procs[-1].stop()
        stored = store.seqs()
        rows = store.count()
        store.close()
        lost = len(expected - stored)
        extra = rows - len(expected)
        if mode == "clean":
            lines.append(f"| {name} | no restart | {len(reports)} | {len(reports) / wall:,.0f} "
                         f"| {rows} | {lost} | {extra} | - |")
            claims[f"{name}: every report stored exactly once"] = lost == 0 and extra == 0
        else:
            lines.append(f"| {name} | SIGKILL at 50%, restarted in {restart_s[0]:.1f} s | "
                         f"{len(reports)} | {len(reports) / wall:,.0f} | {rows} | {lost} | "
                         f"{extra} | {resent} |")
            claims[f"{name}: a collector killed halfway and restarted loses nothing and "
                   "stores nothing twice"] = lost == 0 and extra == 0
    return lines, claims


def collector_load(quick: bool) -> tuple[list[str], dict[str, bool]]:
    """Reports/s and zero loss through a SIGKILL and restart, on SQLite and PostgreSQL."""
    devices, per_device, threads = (100, 5, 8) if quick else (1000, 10, 8)
    keys, reports = _signed(devices, per_device)
    lines = [f"Collector: {devices} devices x {per_device} signed reports (ε 1 each), "
             f"{threads} client threads with keep-alive on the same 2-core machine, "
             "`edgeloop telemetry serve` in its own process; a report counts once the "
             "collector answers 200 (stored; SQLite: WAL, synchronous=FULL; the "
             "PostgreSQL server started here runs with fsync=off) or 409 (stored before "
             "its answer was lost).", "",
             "| database | run | reports | reports/s | rows stored | lost | duplicates | "
             "409 after restart |", "|---|---|---|---|---|---|---|---|"]
    claims: dict[str, bool] = {}
    with tempfile.TemporaryDirectory(prefix="edgeloop-collector-") as tmp:
        more, c = _backend("SQLite", str(Path(tmp) / "t.db"), keys, reports, threads)
        lines += more
        claims.update(c)
    bindir = pg_bin()
    if bindir is not None:
        major = subprocess.run([bindir / "pg_ctl", "--version"], capture_output=True,
                               text=True, check=True).stdout.split()[-1].split(".")[0]
        with postgres_server(bindir) as url:
            more, c = _backend(f"PostgreSQL {major}", url, keys, reports, threads)
            lines += more
            claims.update(c)
    else:
        lines.append("| PostgreSQL | not run: binaries absent | | | | | | |")
    return lines, claims


if __name__ == "__main__":
    full = "--full" in sys.argv[1:]
    for func in (fleet_estimates, collector_load):
        t = time.perf_counter()
        md, holds = func(quick=not full)
        print("\n".join(md))
        for claim, ok in holds.items():
            print(f"- [{'x' if ok else ' '}] {claim}")
        print(f"({func.__name__}: {time.perf_counter() - t:.0f} s)\n")
