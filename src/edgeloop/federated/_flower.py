"""Flower and Ray settings edgeloop applies (the package's ``__init__`` runs
:func:`quiet_env` before any module here imports ``flwr``), and Flower's install line."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

# flwr and dp-accounting install without their pins: pyproject.toml's `federated` says why
INSTALL = ("pip install 'edgeloop[federated]' && "
           "pip install --no-deps flwr==1.42.0 dp-accounting==0.6.0")

# Flower's usage telemetry (read once, when flwr is imported; it posts events to Flower's
# servers), Ray's usage statistics, and a FutureWarning Ray prints at every start.
_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
}


def quiet_env() -> None:
    """Turn off what would reach the network or the terminal uninvited; a user's own
    setting of any of these variables wins."""
    for key, value in _ENV.items():
        os.environ.setdefault(key, value)


@contextlib.contextmanager
def quiet_flower(verbose: bool = False) -> Iterator[None]:
    """Silence Flower's log for the block, unless ``verbose``: its INFO lines per message,
    its deprecation banner for ``run_simulation``, and a full traceback per failed device
    (edgeloop counts failed devices per round and raises when a round has no update)."""
    logger = logging.getLogger("flwr")
    old = logger.level
    if not verbose:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(old)
