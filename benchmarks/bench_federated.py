"""Federated personalisation (issue 13): accuracy against centralised and local-only
training, with and without differential privacy; SecAgg+ against plain FedAvg; rounds
under dropouts; Flower's Deployment Engine with TLS and SuperNode authentication.

Every part runs Flower for real (the simulation engine with one Ray actor, or SuperLink and
SuperNode processes on 127.0.0.1). The parts run as separate processes, two at a time,
each pinned to one core: the accuracy runs first, side by side, then the timed parts one at
a time on an otherwise idle machine. Every part's figures are kept in
``results/federated.json``; ``--only NAME ...`` reruns those parts and rewrites the section
with the others' kept figures (``--only`` alone reruns nothing). ``--part NAME`` runs one
part and prints its JSON.

    python benchmarks/bench_federated.py [--rounds 200] [--dp-rounds 50] [--only accuracy]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

os.environ.setdefault("EDGELOOP_QUIET", "1")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

from _federated_private import dropout_rounds, round_times  # noqa: E402
from _report import RESULTS, claims_table, stamp, write_section  # noqa: E402

from edgeloop.federated.config import PrivateConfig, SimulationConfig  # noqa: E402
from edgeloop.federated.privacy import calibrate, noise_to_clip  # noqa: E402
from edgeloop.federated.simulation import simulate  # noqa: E402
from edgeloop.federated.split import split_model  # noqa: E402
from edgeloop.zoo import build  # noqa: E402

CLIENTS, FRACTION, LOCAL_EPOCHS, DELTA = 100, 0.2, 5, 1e-5
EPSILONS = (8.0, 2.0)


def accuracy(rounds: int, epsilon: float | None = None) -> dict[str, Any]:
    """One 100-device run (Dirichlet 0.3, 20 devices a round): without DP, FedAvgM with
    the centralised baseline; with DP, SecAgg+ and DP-FedAvg at the target ``epsilon``."""
    private = PrivateConfig() if epsilon is None else PrivateConfig(
        secagg=True, dp_epsilon=epsilon, delta=DELTA)
    result = simulate(SimulationConfig(
        clients=CLIENTS, rounds=rounds, fraction=FRACTION, local_epochs=LOCAL_EPOCHS,
        centralised=epsilon is None, private=private,
        strategy="fedavgm" if epsilon is None else "fedavg"))
    return {"rounds": rounds, "epsilon_target": epsilon,
            "epsilon_spent": result.rounds[-1].epsilon,
            "noise_multiplier": result.noise_multiplier,
            "global": result.global_accuracy, "personalised": result.personalised_accuracy,
            "local_only": result.local_only_accuracy,
            "centralised": result.centralised_accuracy, "label_skew": result.label_skew,
            "round_seconds": statistics.median(r.seconds for r in result.rounds[1:]),
            "simulation_seconds": result.simulation_seconds,
            "curve": [(r.round, r.global_accuracy) for r in result.rounds
                      if r.round % max(1, rounds // 10) == 0 or r.round == rounds]}


FLEETS = ((100, 20), (100, 100), (1_000, 100), (10_000, 1_000), (100_000, 5_000))


def dp_scale(rounds: int) -> dict[str, Any]:
    """Why DP costs so much at 100 devices, from the accountant alone (no training): for
    each target ε and fleet (devices, sampled per round), the noise multiplier z that
    reaches ε in ``rounds`` SecAgg+ rounds and the L2 norm of one round's noise over the
    shared model's d entries relative to the clip C of one device's update
    (:func:`~edgeloop.federated.privacy.noise_to_clip`)."""
    model = build("mnist1d-cnn")
    d = split_model(model).shared_entries(model)
    rows = []
    for eps in EPSILONS:
        for population, sampled in FLEETS:
            z = calibrate(eps, rounds=rounds, population=population, sampled=sampled,
                          secagg=True, delta=DELTA)
            rows.append({"epsilon": eps, "devices": population, "sampled": sampled, "z": z,
                         "noise_to_clip": noise_to_clip(z, sampled=sampled, entries=d)})
    return {"rounds": rounds, "entries": d, "rows": rows}


def _deployment() -> dict[str, Any]:
    from _fl_deploy import deployment_rounds

    lines, claims = deployment_rounds(3)
    return {"lines": lines, "claims": claims}


PARTS = {
    "secagg-20": lambda a: round_times(20, rounds=3),
    "secagg-100": lambda a: round_times(100, rounds=2),
    "dropout": lambda a: dropout_rounds(20),
    "deployment": lambda a: _deployment(),
    "accuracy": lambda a: accuracy(a.rounds),
    **{f"dp-{e:g}": (lambda a, e=e: accuracy(a.dp_rounds, e)) for e in EPSILONS},
    "dp-scale": lambda a: dp_scale(a.dp_rounds),
}


def _run_part(name: str, args: argparse.Namespace, core: int) -> dict[str, Any]:
    cmd = ["taskset", "-c", str(core), sys.executable, __file__, "--part", name,
           "--rounds", str(args.rounds), "--dp-rounds", str(args.dp_rounds)]
    print(f"   {name} ...", flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"part {name} failed:\n{done.stderr[-3000:]}")
    print(f"   {name} done", flush=True)
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "measured": stamp()}


def _seconds(run: dict[str, Any]) -> float:
    """The median seconds of a run's rounds after the first (Ray's cold start)."""
    return statistics.median(r["seconds"] for r in run["rounds"][1:])


def _section(r: dict[str, dict[str, Any]]) -> str:
    acc = r["accuracy"]
    lines = [
        f"MNIST-1D over {CLIENTS} simulated devices (Dirichlet alpha 0.3 label split, label skew "
        f"{acc['label_skew']:.2f}, each device its own input shift and test split), "
        f"`mnist1d-cnn`, {FRACTION:.0%} of the devices train each round "
        f"({LOCAL_EPOCHS} local epochs of SGD, cosine-decayed learning rate), the last "
        f"round evaluates every device, which fine-tunes its private head from the global "
        f"head. Flower's simulation engine, one Ray actor on one core.",
        "",
        "| run | rounds | global | personalised (own head, own data) | local only | "
        "centralised | ε spent (δ 1e-5) | noise z | median round |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    runs = [("FedAvgM, no DP", acc)] + [
        (f"SecAgg+ + DP-FedAvg, target ε {e:g}", r[f"dp-{e:g}"]) for e in EPSILONS]
    for name, x in runs:
        central = "" if x["centralised"] is None else f"{x['centralised']:.1%}"
        eps = "" if x["epsilon_spent"] is None else f"{x['epsilon_spent']:.2f}"
        z = "" if x["noise_multiplier"] is None else f"{x['noise_multiplier']:.2f}"
        lines.append(f"| {name} | {x['rounds']} | {x['global']:.1%} | "
                     f"{x['personalised']:.1%} | {x['local_only']:.1%} | {central} | {eps} | "
                     f"{z} | {x['round_seconds']:.1f} s |")
    lines += ["", "Global accuracy by round (no DP): " + ", ".join(
        f"{n}: {a:.1%}" for n, a in acc["curve"]), ""]
    scale = r["dp-scale"]
    lines += [f"Why DP costs so much here (the accountant alone, SecAgg+ accounting, "
              f"{scale['rounds']} rounds, δ {DELTA:g}): one round's noise over the shared "
              f"model's {scale['entries']:,} entries against the clip C of one device's "
              f"update. Above 1, the noise outweighs all of a round's signal; a fleet of "
              f"thousands of devices per round is what DP-FedAvg needs.", "",
              "| target ε | devices | sampled per round | noise z | noise norm / C |",
              "|---|---|---|---|---|"]
    lines += [f"| {x['epsilon']:g} | {x['devices']:,} | {x['sampled']:,} | {x['z']:.2f} | "
              f"{x['noise_to_clip']:.2f} |" for x in scale["rows"]]
    lines += [""]
    lines += ["SecAgg+ against plain aggregation, every device sampled, same settings "
              "(median of the rounds after the first):", "",
              "| devices | FedAvgM round | SecAgg+ round | ratio |", "|---|---|---|---|"]
    ratios = {}
    for n in (20, 100):
        x = r[f"secagg-{n}"]
        plain, secure = _seconds(x["fedavg"]), _seconds(x["secagg"])
        ratios[n] = secure / plain
        lines.append(f"| {n} | {plain:.1f} s | {secure:.1f} s | {ratios[n]:.2f}x |")
    drop = r["dropout"]
    lines += ["", f"SecAgg+ with devices failing mid-round ({drop['clients']} devices):", "",
              "| dropout | rounds completed | survivors per round |", "|---|---|---|"]
    for key in ("dropout 0.1", "dropout 0.3"):
        d = drop[key]
        lines.append(f"| {key.split()[1]} | {d['completed']} of {d['rounds']} | "
                     f"{', '.join(str(x['replies']) for x in d['per_round'])} |")
    lines += ["", *r["deployment"]["lines"], ""]
    dp = [r[f"dp-{e:g}"] for e in EPSILONS]
    verdict = {
        f"global {acc['global']:.1%} within 2 points of centralised "
        f"{acc['centralised']:.1%}": acc["global"] >= acc["centralised"] - 0.02,
        f"personalised {acc['personalised']:.1%} above global {acc['global']:.1%} on the "
        f"devices' own test data": acc["personalised"] > acc["global"],
        f"personalised {acc['personalised']:.1%} above local only "
        f"{acc['local_only']:.1%}": acc["personalised"] > acc["local_only"],
        **{f"the accountant's ε {x['epsilon_spent']:.2f} stays within the target "
           f"{x['epsilon_target']:g}": x["epsilon_spent"] <= x["epsilon_target"] for x in dp},
        **{f"SecAgg+ rounds at {n} devices measured ({ratios[n]:.2f}x plain)": ratios[n] > 0
           for n in ratios},
        **{f"SecAgg+ rounds complete with {k.split()[1]} of the devices dropping":
           drop[k]["completed"] == drop[k]["rounds"] for k in ("dropout 0.1", "dropout 0.3")},
        **r["deployment"]["claims"],
    }
    measured: dict[str, list[str]] = {}
    for name in sorted(r):
        measured.setdefault(r[name]["measured"], []).append(name)
    lines += ["Parts measured (each run keeps its figures in `results/federated.json`; "
              "`--only` reruns some): " + "; ".join(
                  f"{', '.join(names)}: {when}" for when, names in sorted(measured.items())), ""]
    return "\n".join(lines + claims_table(verdict))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=200, help="rounds of the no-DP run")
    parser.add_argument("--dp-rounds", type=int, default=50, help="rounds of each DP run")
    parser.add_argument("--part", choices=sorted(PARTS), default=None)
    parser.add_argument("--only", choices=sorted(PARTS), nargs="*", default=sorted(PARTS),
                        help="parts to rerun (none: rewrite the section from kept figures)")
    args = parser.parse_args()
    if args.part:
        print(json.dumps(PARTS[args.part](args)))
        return
    kept = RESULTS / "federated.json"
    results: dict[str, dict[str, Any]] = json.loads(kept.read_text()) if kept.is_file() else {}
    if missing := sorted(set(PARTS) - set(results) - set(args.only)):
        raise SystemExit(f"no kept figures for {', '.join(missing)}: run them too")
    lanes = [[p for p in ("accuracy",) if p in args.only],   # one core each, side by side
             [p for p in (f"dp-{e:g}" for e in EPSILONS) if p in args.only]]

    def lane(core: int) -> dict[str, dict[str, Any]]:
        return {p: _run_part(p, args, core) for p in lanes[core]}

    with ThreadPoolExecutor(2) as pool:
        for done in pool.map(lane, (0, 1)):
            results.update(done)
    if "dp-scale" in args.only:
        results["dp-scale"] = _run_part("dp-scale", args, 0)
    for name in ("secagg-20", "secagg-100", "dropout", "deployment"):   # timed: alone
        if name in args.only:
            results[name] = _run_part(name, args, 0)
    kept.write_text(json.dumps(results, indent=1) + "\n")
    body = _section(results)
    print(body)
    write_section("federated", "Federated personalisation: Flower, SecAgg+, DP, private "
                  "heads (issue 13)", body)


if __name__ == "__main__":
    main()
