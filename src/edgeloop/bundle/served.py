"""A bundle as it is served: what the health check and the publisher measure.

A slot serves its ``model.onnx`` alone in onnxruntime, unless its bundle ships a file for
which a *loader* is registered (:func:`register`): a cascade ships ``cascade.json`` and
answers as a cascade, each input from the first stage sure of it. The device's health
check (:meth:`~edgeloop.bundle.Device.measure`) and the publisher
(:func:`~edgeloop.bundle.build_manifest`) both go through :func:`served`, so a bundle is
judged on the answers it will give, not on its last model alone.

The cascade's loader lives in the device package, above this one, which therefore never
imports it: ``edgeloop/__init__.py``, which every import of edgeloop runs first,
registers it. So whether a cascade is checked whole never depends on whether the caller
happened to import :mod:`edgeloop.device` before updating.

Imports numpy and onnxruntime only when used: registering costs nothing.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

    from edgeloop.data import Dataset, InputSpec

__all__ = ["Loader", "Served", "register", "served", "served_latency"]

MODEL_FILE = "model.onnx"     # the bundle's model in a slot


@dataclass(frozen=True)
class Served:
    """A bundle ready to answer: its inputs, and its first output for a batch."""

    inputs: tuple[InputSpec, ...]
    answer: Callable[[Mapping[str, np.ndarray]], np.ndarray]


Loader = Callable[[Path], Served]   # from the slot's model.onnx, its files beside it

_LOADERS: dict[str, Loader] = {}


def register(marker: str, loader: Loader) -> None:
    """Serve a bundle that ships a file named ``marker`` with ``loader``."""
    _LOADERS[marker] = loader


@contextlib.contextmanager
def served(model: str | os.PathLike[str], files: Mapping[str, str | os.PathLike[str]], *,
           workdir: str | os.PathLike[str] | None = None) -> Iterator[Served]:
    """The bundle of ``model`` and ``files`` (name in the slot -> path) as a slot serves
    it. The files are linked under their slot names in a temporary folder (in
    ``workdir`` when given) for as long as the context lasts, so a bundle is served the
    same way before it is installed (a candidate, a publisher's files) and after."""
    marker = next((name for name in files if name in _LOADERS), None)
    if marker is None:
        from edgeloop._onnx import input_specs, run, session

        sess = session(Path(model), threads=1)
        yield Served(tuple(input_specs(sess)), lambda feed: run(sess, feed))
        return
    with tempfile.TemporaryDirectory(prefix=".served-", dir=workdir) as tmp:
        slot = Path(tmp)
        for name, path in {MODEL_FILE: model, **files}.items():
            (slot / name).symlink_to(Path(path).resolve())
        yield _LOADERS[marker](slot / MODEL_FILE)


def served_latency(bundles: Sequence[Served], data: Dataset, *, rounds: int, runs: int,
                   warmup: int) -> list[float]:
    """Median batch-1 latency (ms) of each bundle as served, timed in turns
    (:func:`~edgeloop.measure.interleaved_times`), every bundle answering the samples of
    ``data`` in the same order: a cascade's time depends on which stages a sample needs."""
    from edgeloop.measure import interleaved_times

    n = min(len(data), warmup + rounds * runs)
    feeds = [{k: v[i:i + 1] for k, v in data.inputs.items()} for i in range(n)]

    def call(bundle: Served) -> Callable[[], object]:
        samples = itertools.cycle(feeds)
        return lambda: bundle.answer(next(samples))

    return interleaved_times([call(b) for b in bundles], rounds=rounds, runs=runs,
                             warmup=warmup)
