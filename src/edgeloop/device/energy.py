"""The energy the runtime puts on each inference, and over a whole run.

Per answer, the figure is an **estimate**: the time the local inference kept the session's
cores busy times the target profile's package power over its cores
(:func:`edgeloop._energy.estimate_energy`, the one ``edgeloop bench`` uses). RAPL is not
read per call: it counts the whole package (other processes too), its counters move about
once a millisecond, coarser than a call of tens of microseconds, and two sysfs reads would
cost more than such a call. Over a run (:class:`~edgeloop.device.runtime.RuntimeStats`)
the runtime reads RAPL where it is readable and labels the figure ``rapl``.

Which clock: the wall time of the local run (``time.perf_counter``) times the session's
threads, each taken as one busy core. A CPU-time clock (``time.thread_time``,
``time.process_time``) is a system call: two of them per inference cost ~2-4 us, more
than 5% of a 26 us model at batch 1 (the runtime's overhead budget), where
``perf_counter`` costs 0.15 us. With one onnxruntime thread (the policy's default) the
graph runs on the calling thread (or the micro-batcher's), busy for the whole run, so the
two agree unless the OS takes the core away mid-run, which the estimate then counts; with
more threads, onnxruntime's pool spins while it waits, so a busy core per thread is the
right picture too.

Not counted: the offload client's work and the radio (an offloaded answer carries only
the local energy spent on it), and the change test of a stream's skipped windows.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from edgeloop._energy import estimate_energy
from edgeloop.targets import get_target

__all__ = ["EnergyMeter"]


@dataclass(frozen=True, kw_only=True)
class EnergyMeter:
    """Puts millijoules on busy seconds: ``seconds x threads x watts / cores``.

    ``clock`` is read around each local inference (see the module docstring); ``source``
    labels the figures (``"estimate"``). A meter of another kind (a power monitor on a
    development board, or a test's fake) gives the runtime its own clock, conversion and
    label.
    """

    watts: float                     # package power with every core busy (W)
    cores: int                       # cores that power is spread over
    threads: int = 1                 # the session's threads, each a busy core while it runs
    clock: Callable[[], float] = time.perf_counter   # seconds
    source: str = "estimate"
    profile: str = ""                # the target profile the watts come from

    @classmethod
    def for_target(cls, target: str = "auto", *, threads: int = 1) -> EnergyMeter:
        """The estimate for target profile ``target`` (``auto``: this machine's) on this
        machine's cores, for a session of ``threads`` onnxruntime threads."""
        t = get_target(target)
        return cls(watts=t.watts, cores=os.cpu_count() or 1, threads=threads,
                   profile=t.name)

    def __post_init__(self) -> None:     # millijoules per busy second, made once
        object.__setattr__(self, "_mj_per_s", estimate_energy(
            self.threads, watts=self.watts, cores=self.cores) * 1e3)

    def millijoules(self, seconds: float) -> float:
        """The energy of an inference that kept the session busy ``seconds`` (by
        :attr:`clock`), in millijoules."""
        return seconds * self._mj_per_s  # type: ignore[attr-defined,no-any-return]

    def describe(self) -> str:
        """One line saying how the figures are made."""
        return (f"{self.source}: inference time x {self.threads} thread(s) x {self.watts:g} W "
                f"({self.profile or 'custom'}) / {self.cores} cores")
