"""Signed model bundles: a TUF repository on the build side, A/B slots on the device.

Build side (``tuf.api.metadata`` + securesystemslib signers): :func:`init_repo`,
:func:`build_manifest` + :func:`publish_bundle`, :func:`rotate_key`, :func:`refresh_repo`,
:func:`serve_repo`. Device side (``tuf.ngclient.Updater``): :class:`Device` (``init``,
``update``, ``rollback``, ``status``; :meth:`Device.serve` is what a runtime starts from).
The runtime itself is :class:`edgeloop.device.Runtime`: it only reports to the updater.
The pure checks live in ``manifest``, ``health`` and ``slots``; ``served`` is how the
health check and the publisher run a bundle as a device serves it (a cascade bundle
as a whole, through the runner the device package provides).

Names are imported on first use, so reading a default such as
``HealthConfig.latency_margin`` (the CLI's ``--help``) loads neither TUF nor onnxruntime.
"""

from edgeloop._lazy import lazy_names

_SOURCES = {
    "Device": ".device", "UpdateResult": ".device",
    "HealthConfig": ".health", "Measured": ".health", "Probation": ".health",
    "Verdict": ".health", "judge": ".health",
    "BundleFile": ".manifest", "Floor": ".manifest", "Manifest": ".manifest",
    "Reference": ".manifest",
    "TensorSpec": ".manifest",
    "build_manifest": ".publish",
    "RepoConfig": ".repository", "init_repo": ".repository", "publish_bundle": ".repository",
    "refresh_repo": ".repository", "rotate_key": ".repository", "serve_repo": ".repository",
    "SlotState": ".slots",
}

__all__ = [
    "BundleFile",
    "Device",
    "Floor",
    "HealthConfig",
    "Manifest",
    "Measured",
    "Probation",
    "Reference",
    "RepoConfig",
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


__getattr__, __dir__ = lazy_names(__name__, _SOURCES)
