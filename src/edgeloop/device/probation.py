"""Measuring what probation costs a device, and that a caller's mistakes do not count
against the model on probation (the updater's watch, :class:`edgeloop.bundle.Device`).

Shared by the tests and ``benchmarks/bench_runtime.py``: :func:`probation_cost_ratio` times
a runtime on probation against one after it, in turns; :func:`bad_input_calls` sends a
runtime malformed variants of a well-formed feed (:func:`malformed_feeds`), each of which
must be refused as the caller's :class:`~edgeloop.errors.DataError`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from edgeloop.bundle.device import Device
from edgeloop.data import InputSpec
from edgeloop.device.runtime import Runtime
from edgeloop.errors import DataError, UsageError
from edgeloop.measure import interleaved_times

__all__ = ["bad_input_calls", "malformed_feeds", "probation_cost_ratio"]


def probation_cost_ratio(on_probation: Device, after: Device, feed: Mapping[str, np.ndarray],
                         *, rounds: int = 15, runs: int = 200, block: int = 1) -> float:
    """Median time of :meth:`Runtime.infer` on ``feed`` while the model is on probation,
    over the same after probation (another device holding the same model, past it), the
    two runtimes timed in turns (:func:`~edgeloop.measure.interleaved_times`).

    Each timed call runs ``block`` inferences: with 1 the median hides the pointer saves
    probation makes every ``probation_save_inferences``; with a block at least that
    long, each block pays its share of them."""
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise UsageError(f"`block` must be an integer >= 1; got {block!r}")
    on, off = Runtime(on_probation), Runtime(after)

    def many(rt: Runtime) -> Callable[[], None]:
        if block == 1:
            return lambda: rt.infer(feed)

        def call() -> None:
            for _ in range(block):
                rt.infer(feed)
        return call

    try:
        if on._watch is None or off._watch is not None:
            raise UsageError("`on_probation` must serve a model on probation and `after` one "
                             "past it")
        t_on, t_off = interleaved_times([many(on), many(off)], rounds=rounds, runs=runs,
                                        warmup=max(1, 50 // block))
    finally:
        on.close()
        off.close()
    return t_on / t_off


def malformed_feeds(feed: Mapping[str, np.ndarray], specs: Sequence[InputSpec]
                    ) -> list[tuple[dict[str, object], str]]:
    """Variants of the well-formed ``feed`` (a batch) that a model with inputs ``specs``
    must refuse, each with words its refusal names: an input missing, one sample without
    its batch axis, a fixed axis cut short, the wrong dtype, a list instead of an array."""
    first = specs[0].name
    x = np.asarray(feed[first])
    alt = np.dtype(np.float32 if x.dtype == np.float64 else np.float64)
    others = {k: v for k, v in feed.items() if k != first}
    bad: list[tuple[dict[str, object], str]] = [
        ({**others, f"not_{first}": x}, f"has no array {first!r}"),
        ({**feed, first: x[0]}, f"has shape {x[0].shape}"),
        ({**feed, first: x.astype(alt)}, f"is {alt}; the model expects {x.dtype}"),
        ({**feed, first: x.tolist()}, "is a list; the model expects a numpy array"),
    ]
    fixed = [i for i, d in enumerate(specs[0].shape) if i > 0 and d is not None and d > 1]
    if fixed:
        cut = x[(slice(None),) * fixed[-1] + (slice(0, x.shape[fixed[-1]] - 1),)]
        bad.insert(2, ({**feed, first: cut}, f"has shape {cut.shape}"))
    return bad


def bad_input_calls(runtime: Runtime, feed: Mapping[str, np.ndarray], *,
                    calls: int = 1000) -> int:
    """Call ``runtime.infer`` ``calls`` times with :func:`malformed_feeds` of ``feed`` in
    turn; the number of calls refused as the caller's mistake (a :class:`DataError`
    naming the problem). Anything else (an answer, another error) is not counted."""
    bad = malformed_feeds(feed, runtime.inputs)
    refused = 0
    for i in range(calls):
        f, words = bad[i % len(bad)]
        try:
            runtime.infer(f)  # type: ignore[arg-type]
        except DataError as e:
            refused += words in str(e)
        except Exception:  # another error is not a refusal: not counted
            pass
    return refused
