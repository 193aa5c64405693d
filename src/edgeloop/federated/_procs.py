"""Finding every process a Flower server started, to stop them all; and how many cores
the processes of one machine's devices may share (:func:`usable_cores`).

A signal to the server's own session does not reach all of them: ``flower-superlink``
and ``flower-supernode`` start ``flower-superexec`` in a session of its own, which starts
``flwr-serverapp`` / ``flwr-clientapp``; each exits when it sees its parent gone, but an
app busy in a long step can outlive that for a while. So the tree below a server is read
from ``/proc`` (Linux; elsewhere it is empty and only the server's session is signalled),
and each process is named by its pid and start time, so that a pid the system reuses
later is never signalled.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
from pathlib import Path

__all__ = ["ProcessKey", "alive", "die_with_parent", "kill", "tree", "usable_cores"]

ProcessKey = tuple[int, int]
"""(pid, start time in clock ticks since boot)."""

_PR_SET_PDEATHSIG = 1   # from <linux/prctl.h>


def usable_cores() -> int:
    """The cores this process may run on (``taskset`` limits them; where the system has no
    affinity, every core), at least 1."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, start time) of ``pid``, or None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()   # the name, in parentheses, may hold spaces
    return fields[0], int(fields[1]), int(fields[19])


def tree(root: int) -> set[ProcessKey]:
    """The live processes below ``root`` (not ``root`` itself)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        if (stat := _stat(int(entry.name))) is not None and stat[0] != "Z":
            parents[int(entry.name)] = stat[1]
    found: set[int] = set()
    frontier = {root}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return {(pid, stat[2]) for pid in found if (stat := _stat(pid)) is not None}


def alive(processes: set[ProcessKey]) -> set[ProcessKey]:
    """Those of ``processes`` still running (a zombie has finished; a reused pid is
    another process)."""
    return {(pid, start) for pid, start in processes
            if (stat := _stat(pid)) is not None and stat[2] == start and stat[0] != "Z"}


def kill(processes: set[ProcessKey], sig: signal.Signals) -> None:
    """Send ``sig`` to those of ``processes`` still running."""
    for pid, _ in alive(processes):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def die_with_parent(parent: int) -> None:
    """For ``Popen(preexec_fn=functools.partial(die_with_parent, os.getpid()))``, Linux:
    the child gets SIGINT when the thread that started it ends, however it ends (even by
    SIGKILL), so that a killed test or command leaves no server behind; elsewhere
    nothing."""
    if sys.platform != "linux":
        return
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGINT)
    if os.getppid() != parent:   # the parent ended before the call took effect
        os.kill(os.getpid(), signal.SIGINT)
