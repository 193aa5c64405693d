"""A device's bounded replay buffer of labelled feedback, on disk in its state folder.

Reservoir sampling (Vitter's Algorithm R, "Random Sampling with a Reservoir", ACM TOMS
1985): after ``seen`` samples have been offered, every one of them is in the buffer with
the same probability, so a head fine-tuned on the buffer keeps meeting old feedback
(what guards it against forgetting) while new feedback keeps arriving. The buffer holds at
most ``max_samples`` samples and ``max_bytes`` bytes of arrays, whichever is fewer
samples, across any number of calls and restarts: it is one ``.npz`` (inputs, labels and
the ``seen`` count) replaced atomically at every change. Draws are seeded by
``(seed, seen)``, so the same feedback in the same order gives the same buffer.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np

from edgeloop._io import atomic_path
from edgeloop.data import LABELS, Dataset
from edgeloop.errors import DataError, UsageError

__all__ = ["BUFFER_FILE", "ReplayBuffer"]

BUFFER_FILE = "personal-buffer.npz"
_SEEN = "__seen__"
_INPUT = "input:"


class ReplayBuffer:
    """The replay buffer at ``folder/personal-buffer.npz`` (module docstring).
    ``__init__`` only stores its arguments."""

    def __init__(self, folder: str | os.PathLike[str], *, max_samples: int = 2048,
                 max_bytes: int = 1 << 20, seed: int = 0) -> None:
        self.path = Path(folder) / BUFFER_FILE
        self.max_samples = max_samples   # samples
        self.max_bytes = max_bytes       # bytes of input and label arrays
        self.seed = seed

    def capacity(self, data: Dataset) -> int:
        """How many samples shaped like ``data``'s fit both caps."""
        per_sample = sum(a.itemsize * int(np.prod(a.shape[1:])) for a in data.inputs.values())
        per_sample += data.labels.itemsize if data.labels is not None else 0
        cap = min(self.max_samples, self.max_bytes // max(per_sample, 1))
        if cap < 1:
            raise UsageError(f"the replay buffer's caps ({self.max_samples} samples, "
                             f"{self.max_bytes} bytes) hold no sample of {per_sample} bytes")
        return cap

    def read(self) -> tuple[Dataset | None, int]:
        """The buffered samples (None when empty) and how many samples were ever offered."""
        if not self.path.is_file():
            return None, 0
        try:
            with np.load(self.path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            seen = int(arrays.pop(_SEEN))
            labels = arrays.pop(LABELS)
            inputs = {k.removeprefix(_INPUT): v for k, v in arrays.items()}
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
            raise DataError(f"replay buffer {str(self.path)!r} is unreadable ({e}); remove "
                            "it to start a new one") from None
        return Dataset(inputs, labels), seen

    def add(self, data: Dataset) -> Dataset:
        """Offer ``data``'s samples (labelled, in the order they came) to the reservoir;
        write the buffer atomically and return what it now holds."""
        if data.labels is None:
            raise DataError("the replay buffer takes labelled samples only")
        cap = self.capacity(data)
        held, seen = self.read()
        if held is not None:
            self._check_fits(held, data)
            held = held.take(slice(0, cap))      # the caps may have shrunk since
        rng = np.random.default_rng([self.seed, seen])
        taken = 0 if held is None else len(held)
        pool = data if held is None else _concat(held, data)
        rows = list(range(taken))                # buffer row -> index into held + data
        for i in range(len(data)):
            t = seen + i                         # samples offered before this one
            if len(rows) < cap:
                rows.append(taken + i)
            else:
                j = int(rng.integers(0, t + 1))
                if j < cap:
                    rows[j] = taken + i
        out = pool.take(np.asarray(rows, dtype=np.int64))
        with atomic_path(self.path, mode=0o600) as tmp, open(tmp, "wb") as f:
            np.savez(f, **{_INPUT + k: v for k, v in out.inputs.items()},
                     **{LABELS: out.labels, _SEEN: np.int64(seen + len(data))})
        return out

    @staticmethod
    def _check_fits(held: Dataset, data: Dataset) -> None:
        def spec(d: Dataset) -> dict[str, tuple[str, tuple[int, ...]]]:
            return {k: (v.dtype.str, v.shape[1:]) for k, v in d.inputs.items()}

        if spec(held) != spec(data):
            raise DataError(f"feedback arrays {spec(data)} do not match the replay buffer's "
                            f"{spec(held)}; remove the buffer to start a new one")


def _concat(a: Dataset, b: Dataset) -> Dataset:
    assert a.labels is not None and b.labels is not None
    return Dataset({k: np.concatenate([a.inputs[k], b.inputs[k]]) for k in a.inputs},
                   np.concatenate([a.labels, b.labels]).astype(b.labels.dtype))
