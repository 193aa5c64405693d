"""Signed model bundles: a TUF repository on the build side, A/B slots on the device.

Build side (``tuf.api.metadata`` + securesystemslib signers): :func:`init_repo`,
:func:`build_manifest` + :func:`publish_bundle`, :func:`rotate_key`, :func:`refresh_repo`,
:func:`serve_repo`. Device side (``tuf.ngclient.Updater``): :class:`Device` (``init``,
``update``, ``rollback``, ``status``) and its :class:`Runtime`. The pure checks live in
``manifest``, ``health`` and ``slots``.
"""

from edgeloop.bundle.device import Device, Runtime, UpdateResult
from edgeloop.bundle.health import HealthConfig, Measured, Probation, Verdict, judge
from edgeloop.bundle.manifest import Floor, Manifest, Reference, TensorSpec
from edgeloop.bundle.publish import build_manifest
from edgeloop.bundle.repository import (
    RepoConfig,
    init_repo,
    publish_bundle,
    refresh_repo,
    rotate_key,
    serve_repo,
)
from edgeloop.bundle.slots import SlotState

__all__ = [
    "Device",
    "Floor",
    "HealthConfig",
    "Manifest",
    "Measured",
    "Probation",
    "Reference",
    "RepoConfig",
    "Runtime",
    "SlotState",
    "TensorSpec",
    "UpdateResult",
    "Verdict",
    "build_manifest",
    "init_repo",
    "judge",
    "publish_bundle",
    "refresh_repo",
    "rotate_key",
    "serve_repo",
]
