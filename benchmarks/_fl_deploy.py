"""Flower's Deployment Engine on loopback with TLS and SuperNode authentication: a
SuperLink and 3 registered SuperNodes (real processes on 127.0.0.1) run the federated
shared model with private heads, and the ServerApp times each round (train + evaluate).

:func:`deployment_rounds` returns (markdown lines, {claim: holds}) for
``benchmarks/bench_federated.py``; ``python benchmarks/_fl_deploy.py [ROUNDS]`` prints
them. Every message starts a fresh ``flwr-clientapp`` process on its SuperNode (Python,
torch and edgeloop imported again), which is most of a round's time with this small model.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from edgeloop.federated.deploy import DeploymentConfig, local_fleet  # noqa: E402

NODES = 3


def deployment_rounds(rounds: int = 2) -> tuple[list[str], dict[str, bool]]:
    """A 3-SuperNode run of ``rounds`` rounds; its round times and the claims they back."""
    with tempfile.TemporaryDirectory(prefix="edgeloop-fl-deploy-") as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        with local_fleet(root, nodes=NODES) as fleet:
            up = time.perf_counter() - started
            config = DeploymentConfig(clients=NODES, rounds=rounds)
            result = fleet.run(config, results=root / "results")
        heads = sum((root / f"device-{i}" / "head.pt").is_file() for i in range(NODES))
    times = [r.seconds for r in result.rounds]
    lines = [
        f"Deployment Engine on 127.0.0.1, TLS + SuperNode authentication, {NODES} "
        f"registered SuperNodes, {rounds} rounds of {config.strategy} (train + evaluate), "
        f"`mnist1d-cnn` shared model, private heads:",
        "",
        "| round | seconds | accuracy (global body + own head) | devices |",
        "|---|---|---|---|",
        *(f"| {r.round} | {r.seconds:.1f} | {r.accuracy:.1%} | {r.replies} |"
          for r in result.rounds),
        "",
        f"SuperLink up and {NODES} SuperNodes registered and started in {up:.1f} s; "
        f"`flwr run` {result.seconds:.1f} s in all; mean round {sum(times) / len(times):.1f} s.",
    ]
    claims = {
        f"all {rounds} rounds completed with {NODES} devices each":
            len(result.rounds) == rounds and all(r.replies == NODES for r in result.rounds),
        "every device kept its head in its own state folder": heads == NODES,
    }
    return lines, claims


if __name__ == "__main__":
    lines, claims = deployment_rounds(int(sys.argv[1]) if sys.argv[1:] else 2)
    print("\n".join(lines))
    for claim, holds in claims.items():
        print(f"{'ok' if holds else 'FAILED'}: {claim}")
