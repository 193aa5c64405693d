"""Named points where a power-loss test may have the update process killed.

``EDGELOOP_CRASH_AT=NAME`` makes the process SIGKILL itself when it reaches point NAME.
The variable is read once at import; unset, a point costs one comparison with None.
"""

from __future__ import annotations

import os
import signal

POINTS = ("slot-write", "slot-written", "verify", "pointer-switch", "committed")
_AT = os.environ.get("EDGELOOP_CRASH_AT")


def crash_point(name: str) -> None:
    """Die here, as on power loss, if the environment asks for it."""
    if _AT is not None and name == _AT:
        os.kill(os.getpid(), signal.SIGKILL)
