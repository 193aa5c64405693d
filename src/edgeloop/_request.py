"""Turning a request body into a validated feed for the model, without any I/O.

Shared by the two HTTP servers edgeloop runs: the offload server
(:mod:`edgeloop.serve.offload`) and the device's local API (:mod:`edgeloop.device.http`);
it sits below both (device and serve are peers and never import each other). Each hands
every ``POST /v1/predict`` body to :func:`decode`, which either
returns arrays of exactly the model's dtypes and shapes or raises :class:`BadRequest`
with an HTTP status and one line saying what was wrong. Nothing a client sends reaches
onnxruntime unchecked: names, rank, fixed dimensions, element type (cast only where no
value changes meaning: integers to floats, floats to floats within range, 0/1 to bool),
finite values, a shared sample axis, and sizes (body and, for ``.npz``, what it unpacks to).

Two body formats:

- ``application/json``: ``{"inputs": {"x": [[...], ...]}}``, nested lists of numbers;
- ``application/x-npz``: an ``.npz`` (``np.savez``) whose arrays are named after the
  model's inputs (the data convention of :mod:`edgeloop.data`), never unpickled.
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from edgeloop.data import InputSpec, check_against
from edgeloop.errors import DataError

__all__ = ["JSON", "NPZ", "BadRequest", "Feed", "decode"]

JSON = "application/json"
NPZ = "application/x-npz"


class BadRequest(DataError):
    """A request the server refuses; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Feed:
    """A validated request: arrays in the model's input order, its sample count (``rows``;
    1 when the model has no free sample axis) and the shape of one sample of each input
    (only requests with equal ``sample_shape`` can share a batch)."""

    arrays: dict[str, np.ndarray]
    rows: int
    sample_shape: tuple[tuple[int, ...], ...]


def batchable(specs: Sequence[InputSpec]) -> bool:
    """Whether requests can be stacked along the first axis: every input has a free one."""
    return all(len(s.shape) >= 1 and s.shape[0] is None for s in specs)


def decode(body: bytes, content_type: str | None, specs: Sequence[InputSpec], *,
           max_bytes: int) -> Feed:
    """The validated feed in ``body``, or :class:`BadRequest` (400 malformed, 413 too
    large, 415 unknown format, 422 does not fit the model)."""
    if len(body) > max_bytes:
        raise BadRequest(413, f"body of {len(body)} bytes exceeds the limit of {max_bytes}")
    kind = (content_type or "").split(";")[0].strip().lower()
    if kind == JSON:
        raw = _from_json(body)
    elif kind == NPZ:
        raw = _from_npz(body, max_bytes)
    else:
        raise BadRequest(415, f"content type must be {JSON} or {NPZ}; got {kind or 'none'!r}")
    names = [s.name for s in specs]
    missing = [n for n in names if n not in raw]
    extra = sorted(set(raw) - set(names))
    if missing or extra:
        raise BadRequest(422, f"inputs must be exactly {names}; "
                              + (f"missing {missing}" if missing else f"unexpected {extra}"))
    arrays = {s.name: _cast(s, raw[s.name]) for s in specs}
    try:
        check_against(arrays, specs, source="request")
    except DataError as e:
        raise BadRequest(422, str(e)) from None
    if not batchable(specs):
        return Feed(arrays, 1, tuple(a.shape for a in arrays.values()))
    rows = {n: a.shape[0] for n, a in arrays.items()}
    if len(set(rows.values())) != 1:
        raise BadRequest(422, f"inputs disagree on the number of samples: {rows}")
    return Feed(arrays, next(iter(rows.values())), tuple(a.shape[1:] for a in arrays.values()))


def _from_json(body: bytes) -> dict[str, object]:
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as e:   # UnicodeDecodeError is a ValueError
        reason = str(e).splitlines()[0][:120] if isinstance(e, ValueError) else "nested too deep"
        raise BadRequest(400, f"body is not valid JSON ({reason})") from None
    if not isinstance(doc, dict) or set(doc) != {"inputs"} or not isinstance(doc["inputs"], dict):
        raise BadRequest(400, 'body must be a JSON object {"inputs": {name: nested list}}')
    return doc["inputs"]


def _from_npz(body: bytes, max_bytes: int) -> dict[str, object]:
    try:
        with zipfile.ZipFile(io.BytesIO(body)) as zf:
            unpacked = sum(i.file_size for i in zf.infolist())
            if unpacked > max_bytes:
                raise BadRequest(413, f".npz unpacks to {unpacked} bytes; the limit is "
                                      f"{max_bytes}")
            arrays = {}
            for info in zf.infolist():
                with zf.open(info) as member:
                    arrays[info.filename.removesuffix(".npy")] = np.lib.format.read_array(
                        member, allow_pickle=False)
            return arrays
    except BadRequest:
        raise
    except Exception as e:  # zipfile, numpy's header parser and zlib raise many kinds
        first = (str(e).splitlines() or [type(e).__name__])[0][:120]
        raise BadRequest(400, f"body is not a readable .npz ({first})") from None


def _cast(spec: InputSpec, value: object) -> np.ndarray:
    """``value`` as an array of ``spec.dtype``, refusing any cast that changes a value's
    meaning."""
    where = f"input {spec.name!r}"
    try:
        a = value if isinstance(value, np.ndarray) else np.asarray(value)
    except (ValueError, TypeError, OverflowError, RecursionError):
        raise BadRequest(422, f"{where} is not a rectangular array of numbers") from None
    if a.size == 0:
        raise BadRequest(422, f"{where} is empty (shape {a.shape})")
    want = spec.dtype
    kind = a.dtype.kind
    if kind not in "biuf":
        raise BadRequest(422, f"{where} must hold numbers; got {_kind_name(kind)}")
    if want.kind == "f":
        if kind == "b":
            raise BadRequest(422, f"{where} must hold numbers (the model expects {want}); "
                                  "got booleans")
        with np.errstate(over="ignore", invalid="ignore"):
            out = a.astype(want)
        if not np.isfinite(out).all():
            raise BadRequest(422, f"{where} holds NaN, Inf or values beyond {want}'s range")
        return out
    if want.kind in "iu":
        if kind not in "iu":
            raise BadRequest(422, f"{where} must hold integers (the model expects {want}); "
                                  f"got {_kind_name(kind)}")
        info = np.iinfo(want)
        if a.min() < info.min or a.max() > info.max:
            raise BadRequest(422, f"{where} holds values outside {want}'s range "
                                  f"[{info.min}, {info.max}]")
        return a.astype(want)
    if want.kind == "b":
        if kind == "b":
            return a
        if kind in "iu" and np.isin(a, (0, 1)).all():
            return a.astype(bool)
        raise BadRequest(422, f"{where} must hold booleans (or 0/1)")
    raise BadRequest(422, f"{where}: the model's type {want} is not served")


def _kind_name(kind: str) -> str:
    return {"b": "booleans", "i": "integers", "u": "integers", "f": "floats",
            "c": "complex numbers", "U": "strings", "S": "bytes"}.get(kind, "other values")
