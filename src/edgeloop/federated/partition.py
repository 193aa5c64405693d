"""Non-IID federated data: a Dirichlet label split plus a per-client input shift.

Each client draws its class proportions from Dirichlet(alpha): small alpha gives each client a
few dominant classes, large alpha approaches the global mix (Hsu et al., "Measuring the
Effects of Non-Identical Data Distribution for Federated Visual Classification", 2019).
Clients get equal shares of the pool (the first ``n mod clients`` one more sample), filled
by drawing labels from their proportions among the samples still unassigned, so every
sample goes to exactly one client. Each client then applies its own input shift, a scale,
an offset and a circular time shift (the device's sensor calibration and placement), so a
personal model has more to learn than the label mix. Everything is fixed by the seed.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from edgeloop.data import Dataset, load_builtin
from edgeloop.errors import UsageError

__all__ = ["ClientShift", "Partition", "dirichlet_split", "label_skew", "mnist1d_partition",
           "public_set"]

TEST_FRACTION = 0.25   # of each client's samples, its own test set
MIN_SAMPLES = 8        # per client: at least a few to train on and a few to test


@dataclass(frozen=True)
class ClientShift:
    """One client's input transform: ``roll(x * scale + offset, shift)`` along time."""

    scale: float
    offset: float
    shift: int

    def apply(self, x: np.ndarray) -> np.ndarray:
        """The shifted copy of ``x`` (samples along the first axis, time along the last)."""
        return np.roll(x * self.scale + self.offset, self.shift, axis=-1).astype(x.dtype)

    @classmethod
    def draw(cls, rng: np.random.Generator) -> ClientShift:
        """A random shift: scale in [0.8, 1.2], offset ~ N(0, 0.3), time shift in ±3."""
        return cls(float(rng.uniform(0.8, 1.2)), float(rng.normal(0, 0.3)),
                   int(rng.integers(-3, 4)))


@dataclass(frozen=True)
class Partition:
    """One client's data: its own train and test sets (already shifted) and its shift."""

    train: Dataset
    test: Dataset
    shift: ClientShift


def dirichlet_split(labels: np.ndarray, clients: int, alpha: float, *, seed: int
                    ) -> list[np.ndarray]:
    """Indices into ``labels`` for each of ``clients`` clients, label mix ~ Dirichlet(alpha);
    every index appears in exactly one client's (sorted) array."""
    if clients < 2:
        raise UsageError(f"`clients` must be at least 2; got {clients}")
    if not alpha > 0:
        raise UsageError(f"`alpha` must be > 0; got {alpha}")
    if len(labels) < clients * MIN_SAMPLES:
        raise UsageError(f"{len(labels)} samples cannot give {clients} clients "
                         f"{MIN_SAMPLES} each; use at most {len(labels) // MIN_SAMPLES}")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    pools = [list(rng.permutation(np.flatnonzero(labels == c))) for c in classes]
    sizes = np.full(clients, len(labels) // clients)
    sizes[:len(labels) % clients] += 1
    mix = rng.dirichlet(np.full(len(classes), alpha), size=clients)
    parts: list[list[int]] = [[] for _ in range(clients)]
    # one sample at a time, clients in turn, so no client finds every pool it favours empty
    order = np.repeat(np.arange(clients), sizes)
    for client in rng.permutation(order):
        left = np.array([len(p) > 0 for p in pools])
        p = mix[client] * left
        p = p / p.sum() if p.sum() > 0 else left / left.sum()
        parts[client].append(pools[rng.choice(len(classes), p=p)].pop())
    return [np.sort(np.array(p, dtype=np.int64)) for p in parts]


def label_skew(labels: list[np.ndarray]) -> float:
    """Mean total-variation distance between each client's label mix (``labels``, one
    array per client) and the mix of all of them together: 0 when every client has the
    overall mix, near 1 when clients hold disjoint classes."""
    classes = np.unique(np.concatenate(labels))

    def mix(y: np.ndarray) -> np.ndarray:
        return np.array([(y == c).mean() for c in classes])

    overall = mix(np.concatenate(labels))
    return float(np.mean([0.5 * np.abs(mix(y) - overall).sum() for y in labels]))


@functools.cache
def _pool() -> Dataset:
    """MNIST-1D's train and test splits together (its ``val`` split is the server's)."""
    return Dataset.concat([load_builtin("mnist1d", "train"), load_builtin("mnist1d", "test")])


def mnist1d_partition(client: int, clients: int, alpha: float = 0.3, *, seed: int = 0
                      ) -> Partition:
    """Client ``client`` (0-based) of ``clients``: its Dirichlet(``alpha``) share of
    MNIST-1D, shifted by its own :class:`ClientShift`, split into train and test."""
    if not 0 <= client < clients:
        raise UsageError(f"client {client} is not one of 0..{clients - 1}")
    pool = _pool()
    index = _split(clients, alpha, seed)[client]
    rng = np.random.default_rng([seed, 1, client])
    shift = ClientShift.draw(rng)
    index = rng.permutation(index)
    n_test = max(2, round(len(index) * TEST_FRACTION))
    data = pool.take(index)
    shifted = Dataset({"x": shift.apply(data.inputs["x"])}, data.labels)
    return Partition(shifted.take(slice(n_test, None)), shifted.take(slice(0, n_test)), shift)


@functools.lru_cache(maxsize=4)
def _split(clients: int, alpha: float, seed: int) -> list[np.ndarray]:
    labels = _pool().labels
    assert labels is not None
    return dirichlet_split(labels, clients, alpha, seed=seed)


def public_set(*, seed: int = 0) -> Dataset:
    """The server's small labelled set: MNIST-1D's ``val`` split (no client holds it),
    each sample shifted by a fresh draw from the clients' shift distribution."""
    data = load_builtin("mnist1d", "val")
    rng = np.random.default_rng([seed, 0])
    x = np.stack([ClientShift.draw(rng).apply(row) for row in data.inputs["x"]])
    return Dataset({"x": x}, data.labels)
