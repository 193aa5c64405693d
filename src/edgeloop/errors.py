"""Every error edgeloop raises on purpose.

The tree::

    EdgeloopError                  root; the CLI prints its message on one line, exit code 2
    ├── UsageError                 an option, argument or recipe field is invalid
    ├── DataError                  an .npz is missing, malformed, or does not fit the model
    ├── ModelError                 a file is not a loadable model, or a pass cannot handle it
    ├── VerificationError          a signature, hash, health check or metadata check failed
    └── TransportError             a network, HTTP or SSH peer could not be reached or refused

Third-party errors (onnx, onnxruntime, torch, tuf, flwr) are wrapped where they enter,
so a user sees edgeloop's words, never a library traceback for their own mistake.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

__all__ = [
    "DataError",
    "EdgeloopError",
    "ModelError",
    "TransportError",
    "UsageError",
    "VerificationError",
]


class EdgeloopError(Exception):
    """Root of every error edgeloop raises for a problem the user can fix."""


class UsageError(EdgeloopError):
    """An option, argument or configuration value is invalid."""


class DataError(EdgeloopError):
    """A data file is missing, malformed, or does not match the model's inputs."""


class ModelError(EdgeloopError):
    """A model file cannot be loaded, or a pass does not support it."""


class VerificationError(EdgeloopError):
    """A signature, checksum, metadata or health check did not pass."""


class TransportError(EdgeloopError):
    """A remote peer (HTTP repository, SSH host, server) was unreachable or refused."""


def check_table(d: object, known: Sequence[str], *, name: str, shown: str) -> None:
    """Raise the one-line :class:`UsageError` unless ``d`` is a mapping (a TOML/JSON
    table; ``name`` says which, as "`name` must be a table") whose keys are all in
    ``known`` (``shown`` names the table in that message: "[stream] has no key 'k'")."""
    if not isinstance(d, Mapping):
        raise UsageError(f"`{name}` must be a table of keys; got {type(d).__name__}")
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise UsageError(f"{shown} has no key {unknown[0]!r}; keys: {', '.join(known)}")


def one_of(field: str, allowed: list[str] | tuple[str, ...], got: object) -> UsageError:
    """The one message format for an invalid choice: "`f` must be one of a, b; got 'x'"."""
    return UsageError(f"`{field}` must be one of {', '.join(allowed)}; got {got!r}")
