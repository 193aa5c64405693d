"""The bundle manifest and the pure checks a device runs on it.

A manifest travels beside its ONNX file as a TUF target of its own, so its bytes are
covered by the same signatures as the model. Nothing here touches disk or network: every
function takes bytes or values that the caller has already read.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field

import numpy as np

from edgeloop.data import Dataset
from edgeloop.errors import UsageError, VerificationError

__all__ = [
    "BundleFile",
    "Floor",
    "Manifest",
    "Reference",
    "TensorSpec",
    "check_file_bytes",
    "check_model_bytes",
    "check_newer",
    "golden_digest",
    "parse_version",
]

FORMAT = 1
_VERSION = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)$")


def parse_version(text: str) -> tuple[int, int, int]:
    """``"X.Y.Z"`` as a tuple of three integers that compares the way versions do."""
    m = _VERSION.match(str(text))
    if not m:
        raise UsageError(f"`version` must look like X.Y.Z (three integers); got {text!r}")
    return int(m[1]), int(m[2]), int(m[3])


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output: name, ONNX Runtime type string, shape (None = free)."""

    name: str
    type: str
    shape: tuple[int | None, ...]


@dataclass(frozen=True)
class Floor:
    """What a device's health check must see on its golden set before committing.

    ``accuracy`` applies when the golden set has ``labels``; ``agreement`` (top-1
    agreement with the :class:`Reference` predictions) when it has none but matches the
    golden set the publisher recorded.
    """

    accuracy: float | None = None
    agreement: float = 0.99


@dataclass(frozen=True)
class Reference:
    """The publisher's own top-1 predictions on its golden set, identified by the inputs'
    digest (classes only: full outputs of a large-vocabulary model would bloat the
    manifest)."""

    golden_sha256: str
    top1: list[int]


@dataclass(frozen=True)
class BundleFile:
    """A file that ships beside the model in the same slot (a cascade's other stages and
    its cascade.json): its name in the slot, TUF target path, sha256 and size."""

    name: str
    target: str
    sha256: str
    size_bytes: int


_RESERVED = ("model.onnx", "candidate.onnx")


def check_file_name(name: str) -> None:
    """Raise :class:`UsageError` unless ``name`` can be a file of a bundle's slot."""
    if (not name or "/" in name or "\\" in name or name.startswith(".") or name in _RESERVED
            or name.startswith("candidate.")):
        raise UsageError(f"a bundle file needs a plain name other than model.onnx, not "
                         f"starting with '.' or 'candidate.'; got {name!r}")


@dataclass(frozen=True)
class Manifest:
    """What a device learns about a bundle before it trusts the model file."""

    name: str
    version: str
    model_target: str
    sha256: str
    size_bytes: int
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()
    figures: dict[str, float] = field(default_factory=dict)
    floor: Floor = field(default_factory=Floor)
    reference: Reference | None = None
    files: tuple[BundleFile, ...] = ()     # installed beside the model, verified alike

    def to_bytes(self) -> bytes:
        """Canonical JSON (sorted keys) of the manifest (``files`` only when there are
        any, so devices from before bundles had files still read one-model bundles)."""
        d = asdict(self)
        if not self.files:
            del d["files"]
        d["format"] = FORMAT
        return json.dumps(d, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        """Parse manifest bytes; raise :class:`VerificationError` if they are malformed."""
        try:
            d = json.loads(data)
            if d.pop("format") != FORMAT:
                raise ValueError("unknown format")
            parse_version(d["version"])
            ref = d.pop("reference")
            files = tuple(BundleFile(**f) for f in d.pop("files", []))
            for f in files:
                check_file_name(f.name)
            return cls(
                files=files,
                inputs=tuple(TensorSpec(s["name"], s["type"], tuple(s["shape"]))
                             for s in d.pop("inputs")),
                outputs=tuple(TensorSpec(s["name"], s["type"], tuple(s["shape"]))
                              for s in d.pop("outputs")),
                floor=Floor(**d.pop("floor")),
                reference=Reference(**ref) if ref else None,
                **d,
            )
        except (ValueError, KeyError, TypeError, AttributeError, UsageError) as e:
            raise VerificationError(f"bundle manifest is malformed ({e})") from None


def check_newer(current: str | None, candidate: str) -> bool:
    """True if ``candidate`` should be installed over ``current``; False if it is the same
    version. An older candidate is refused: a device never moves back by itself."""
    if current is None:
        return True
    cur, new = parse_version(current), parse_version(candidate)
    if new < cur:
        raise VerificationError(f"repository offers version {candidate}, older than the "
                                f"installed {current}; refusing to downgrade")
    return new > cur


def check_model_bytes(manifest: Manifest, digest: str, size: int) -> None:
    """Raise unless a model file's sha256 ``digest`` and ``size`` are the manifest's."""
    if digest != manifest.sha256 or size != manifest.size_bytes:
        raise VerificationError(
            f"model file of {manifest.name} {manifest.version} does not match its manifest "
            f"(sha256 {digest[:12]}..., {size} bytes; expected {manifest.sha256[:12]}..., "
            f"{manifest.size_bytes} bytes)")


def check_file_bytes(manifest: Manifest, file: BundleFile, digest: str, size: int) -> None:
    """Raise unless a bundle file's sha256 ``digest`` and ``size`` are the manifest's."""
    if digest != file.sha256 or size != file.size_bytes:
        raise VerificationError(
            f"file {file.name} of {manifest.name} {manifest.version} does not match its "
            f"manifest (sha256 {digest[:12]}..., {size} bytes; expected {file.sha256[:12]}..., "
            f"{file.size_bytes} bytes)")


def golden_digest(data: Dataset) -> str:
    """A digest of a golden set's inputs (names, dtypes, shapes, bytes), labels excluded."""
    h = hashlib.sha256()
    for name in sorted(data.inputs):
        a = np.ascontiguousarray(data.inputs[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()
