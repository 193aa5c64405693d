"""The energy the runtime puts on each inference, and over a whole run.

Per answer, the figure is an **estimate**: the CPU time of the local inference times the
target profile's package power over its cores (:func:`edgeloop._energy.estimate_energy`,
the one ``edgeloop bench`` uses). RAPL is not read per call: it counts the whole package
(other processes too), its counters move about once a millisecond, coarser than a call
of tens of microseconds, and two sysfs reads would cost more than such a call. Over a run
(:class:`~edgeloop.device.runtime.RuntimeStats`) the runtime reads RAPL where it is
readable and labels the figure ``rapl``.

Which CPU clock: with one onnxruntime thread (the policy's default) the session runs the
graph on the calling thread (or the micro-batcher's), so that thread's CPU time is exact,
and other threads (an HTTP server, concurrent callers) do not leak into it. With more
threads onnxruntime works in its own pool, which a thread clock misses: the process's
CPU time over the call is then used, which is right while one call runs at a time and
counts other threads' work too when calls overlap.

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
    """Puts millijoules on CPU seconds: ``cpu_seconds x watts / cores``.

    ``cpu_clock`` is read around each local inference (:meth:`for_target` picks it from
    the thread count); ``source`` labels the figures (``"estimate"``). A meter of another
    kind (a power monitor on a development board, or a test's fake) gives the runtime its
    own clock, conversion and label.
    """

    watts: float                     # package power with every core busy (W)
    cores: int                       # cores that power is spread over
    cpu_clock: Callable[[], float] = time.process_time   # seconds of CPU time
    source: str = "estimate"
    profile: str = ""                # the target profile the watts come from

    @classmethod
    def for_target(cls, target: str = "auto", *, threads: int = 1) -> EnergyMeter:
        """The estimate for target profile ``target`` (``auto``: this machine's) on this
        machine's cores, its clock chosen for ``threads`` onnxruntime threads (see the
        module docstring)."""
        t = get_target(target)
        clock = time.thread_time if threads == 1 else time.process_time
        return cls(watts=t.watts, cores=os.cpu_count() or 1, cpu_clock=clock, profile=t.name)

    def millijoules(self, cpu_seconds: float) -> float:
        """The energy of ``cpu_seconds`` of CPU time, in millijoules."""
        return estimate_energy(cpu_seconds, watts=self.watts, cores=self.cores) * 1e3

    def describe(self) -> str:
        """One line saying how the figures are made."""
        return (f"{self.source}: CPU time x {self.watts:g} W ({self.profile or 'custom'}) / "
                f"{self.cores} cores")
