"""Measurements of private federated rounds (issue 13), for ``bench_federated.py``.

Each function runs :func:`edgeloop.federated.simulate` on Flower's simulation engine (one
Ray actor) and returns JSON-ready figures:

- :func:`round_times`: SecAgg+ against plain FedAvg at the same size, per-round seconds
  (round 1 carries Ray's and the actors' cold start, so later rounds are the fair figure);
- :func:`dropout_rounds`: how many SecAgg+ rounds complete when a fraction of the sampled
  devices fails mid-round every round;

Run directly for all of them: ``python benchmarks/_federated_private.py [--clients 20]``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

os.environ.setdefault("EDGELOOP_QUIET", "1")

from edgeloop.federated.config import PrivateConfig, SimulationConfig
from edgeloop.federated.simulation import SimulationResult, simulate


def _run(clients: int, rounds: int, private: PrivateConfig, seed: int = 0
         ) -> SimulationResult:
    return simulate(SimulationConfig(clients=clients, rounds=rounds, seed=seed,
                                     private=private))


def _rounds(result: SimulationResult) -> list[dict[str, Any]]:
    return [{"round": r.round, "seconds": round(r.seconds, 2), "replies": r.replies,
             "failures": r.failures, "halted": r.halted, "accuracy": round(r.accuracy, 4),
             "epsilon": r.epsilon} for r in result.rounds]


def round_times(clients: int, rounds: int = 2) -> dict[str, Any]:
    """Per-round seconds of plain FedAvg and of SecAgg+ at ``clients`` devices."""
    out: dict[str, Any] = {"clients": clients}
    for name, private in (("fedavg", PrivateConfig()), ("secagg", PrivateConfig(secagg=True))):
        started = time.perf_counter()
        result = _run(clients, rounds, private)
        out[name] = {"rounds": _rounds(result),
                     "simulation_seconds": round(result.simulation_seconds, 1),
                     "wall_seconds": round(time.perf_counter() - started, 1)}
    return out


def dropout_rounds(clients: int, fractions: tuple[float, ...] = (0.1, 0.3), rounds: int = 2
                   ) -> dict[str, Any]:
    """SecAgg+ rounds completed (not halted) with each dropout fraction."""
    out: dict[str, Any] = {"clients": clients}
    for fraction in fractions:
        result = _run(clients, rounds, PrivateConfig(secagg=True, dropout=fraction))
        out[f"dropout {fraction:g}"] = {
            "completed": sum(not r.halted for r in result.rounds), "rounds": rounds,
            "per_round": _rounds(result)}
    return out


def main() -> None:
    """Both, printed as JSON lines as each finishes."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--only", choices=("times", "dropout"), default=None)
    args = parser.parse_args()
    jobs = {"times": lambda: round_times(args.clients),
            "dropout": lambda: dropout_rounds(args.clients)}
    for name, job in jobs.items():
        if args.only in (None, name):
            print(json.dumps({name: job()}), flush=True)


if __name__ == "__main__":
    main()
