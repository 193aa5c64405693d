"""Data convention and built-in data sets.

Every command takes data as an ``.npz`` whose arrays are named after the model's inputs,
plus an optional ``labels`` array (integer class ids, one per sample). The first axis of
every array is the sample axis.

:func:`save_npz` writes uncompressed members (``np.savez``), and :func:`load_npz`
memory-maps uncompressed members instead of reading them (numpy's own ``np.load`` ignores
``mmap_mode`` for ``.npz``): a data set larger than the memory a device has to spare can
still be measured in batches, since the pages of the file are read as batches need them
and the system can drop them again. Members of a compressed ``.npz``
(``np.savez_compressed``) cannot be mapped and are read whole.

Built-in data sets are generated or shipped offline, never downloaded:

- ``mnist1d``: the ``mnist1d`` package's ``make_dataset`` with its default arguments
  (4000 train / 1000 test sequences of length 40, 10 classes); input ``x`` of shape (N, 40).
  Made once per user and kept in the system temp folder (:func:`cache_folder`).
- ``digits``: scikit-learn's 8x8 handwritten digits (1797 images, 10 classes); input ``x``
  of shape (N, 1, 8, 8) scaled to [0, 1].
- ``digits-rgb``: the same digits as 32x32 colour images for vision backbones
  (torchvision/timm CNNs): each digit is upscaled 3x and smoothed, placed at a random
  offset on a 32x32 canvas, painted in a random light colour on a random dark one, with
  pixel noise; input ``x`` of shape (N, 3, 32, 32), roughly zero mean and unit
  variance. Same images in each split as ``digits``; the training images are rendered four
  times (other colours and offsets). The renders are fixed by a seed.

Splits: ``test`` is the data set's own test set (digits: a fixed 20%); ``val`` is a fixed
held-out 500 samples of the training set (digits: 180) that ``train`` does not contain;
``calib`` is a fixed 256-sample subset of ``train`` for calibration.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import stat
import struct
import tempfile
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np

from edgeloop._io import atomic_path
from edgeloop.errors import DataError, one_of

__all__ = [
    "DATASETS",
    "LABELS",
    "SPLITS",
    "Dataset",
    "InputSpec",
    "batches",
    "cache_folder",
    "check_against",
    "load_builtin",
    "load_npz",
    "save_npz",
]

LABELS = "labels"
DATASETS = ("mnist1d", "digits", "digits-rgb")
SPLITS = ("train", "val", "calib", "test")
_CALIB_SIZE = 256
_SEED = 0


@dataclass(frozen=True)
class InputSpec:
    """One model input: its name, element type and shape (``None`` for a free axis)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...]


@dataclass
class Dataset:
    """Named input arrays plus optional labels, all sharing the first (sample) axis."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None = None

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    def take(self, index: slice | np.ndarray) -> Dataset:
        """The samples at ``index`` (a slice or an index array)."""
        labels = None if self.labels is None else self.labels[index]
        return Dataset({k: v[index] for k, v in self.inputs.items()}, labels)

    @staticmethod
    def concat(sets: Sequence[Dataset]) -> Dataset:
        """``sets`` one after another (same inputs; labels kept when every set has them)."""
        labels = [d.labels for d in sets]
        return Dataset({k: np.concatenate([d.inputs[k] for d in sets]) for k in sets[0].inputs},
                       None if any(y is None for y in labels)
                       else np.concatenate(labels))  # type: ignore[arg-type]

    def cycle(self, n: int) -> dict[str, np.ndarray]:
        """A feed of the first ``n`` samples, starting over from the first when there are
        fewer (contiguous, as onnxruntime wants them; reads only those samples)."""
        index = np.arange(n) % len(self)
        return {k: np.ascontiguousarray(v[index]) for k, v in self.inputs.items()}


def load_npz(path: str | os.PathLike[str]) -> Dataset:
    """Read an ``.npz`` in the data convention, with a one-line error for every defect."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist")
    try:
        arrays = _read_members(path)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise DataError(f"{str(path)!r} is not a readable .npz file ({e})") from None
    labels = arrays.pop(LABELS, None)
    if not arrays:
        raise DataError(f"{str(path)!r} holds no input arrays; expected arrays named after "
                        "the model's inputs")
    sizes = {k: len(v) if v.ndim else 0 for k, v in arrays.items()}
    n = next(iter(sizes.values()))
    if n == 0:
        raise DataError(f"{str(path)!r} holds no samples (first axis of length 0)")
    if len(set(sizes.values())) != 1:
        raise DataError(f"{str(path)!r}: arrays disagree on the number of samples: {sizes}")
    for name, a in arrays.items():
        if a.dtype.kind == "f" and (bad := _non_finite(a)):
            raise DataError(f"{str(path)!r}: array {name!r} contains {bad} NaN or Inf values")
    if labels is not None:
        if labels.shape != (n,) or labels.dtype.kind not in "iu":
            raise DataError(f"{str(path)!r}: `labels` must be integers of shape ({n},); got "
                            f"{labels.dtype} {labels.shape}")
        labels = labels.astype(np.int64)
    return Dataset(arrays, labels)


_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")   # a zip member's local file header


def _read_members(path: Path) -> dict[str, np.ndarray]:
    """Every array in the ``.npz`` at ``path``: uncompressed ``.npy`` members as
    copy-on-write memory maps (writable; the file never changes), the others read."""
    arrays: dict[str, np.ndarray] = {}
    with zipfile.ZipFile(path) as zf, open(path, "rb") as raw:
        for info in zf.infolist():
            name = info.filename.removesuffix(".npy")
            if info.compress_type == zipfile.ZIP_STORED:
                raw.seek(info.header_offset)
                fields = _LOCAL_HEADER.unpack(raw.read(_LOCAL_HEADER.size))
                raw.seek(info.header_offset + _LOCAL_HEADER.size + fields[-2] + fields[-1])
                version = np.lib.format.read_magic(raw)
                if version in ((1, 0), (2, 0)):
                    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                   else np.lib.format.read_array_header_2_0)
                    shape, fortran, dtype = read_header(raw)
                    if not dtype.hasobject and np.prod(shape) > 0:
                        arrays[name] = np.memmap(raw, dtype=dtype, mode="c", offset=raw.tell(),
                                                 shape=shape, order="F" if fortran else "C")
                        continue
            with zf.open(info) as member:
                arrays[name] = np.lib.format.read_array(member, allow_pickle=False)
    return arrays


def _non_finite(a: np.ndarray, chunk: int = 1 << 22) -> int:
    """How many NaN or Inf values ``a`` holds, counted a few MB at a time."""
    flat = a.reshape(-1)
    return sum(int((~np.isfinite(flat[i:i + chunk])).sum()) for i in range(0, len(flat), chunk))


def save_npz(path: str | os.PathLike[str], data: Dataset, *, mode: int | None = None
             ) -> None:
    """Write ``data`` atomically in the data convention (``mode``: the file's
    permissions, e.g. 0o600 for data that must stay private; default the umask's)."""
    arrays = dict(data.inputs)
    if data.labels is not None:
        arrays[LABELS] = data.labels
    with atomic_path(path, mode=mode) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def check_against(data: Dataset | Mapping[str, np.ndarray], specs: Sequence[InputSpec], *,
                  source: str = "data") -> None:
    """Raise :class:`DataError` unless ``data`` has every input in ``specs`` with a matching
    dtype and shape.

    A :class:`Dataset` holds any number of samples, so its first axis is not checked; a
    feed (a mapping of arrays for one inference call) must match every fixed axis.
    """
    arrays, first = (data.inputs, 1) if isinstance(data, Dataset) else (data, 0)
    # plain loops, no generators: a device runtime checks every call's feed, and this
    # costs under a microsecond per input (any() over a zip cost 2 us, as much as the
    # smallest models' whole run)
    for spec in specs:
        if spec.name not in arrays:
            raise DataError(f"{source} has no array {spec.name!r} for the model input of that "
                            f"name; it has {sorted(arrays)}")
        a = arrays[spec.name]
        if not isinstance(a, np.ndarray):
            raise DataError(f"{source}: {spec.name!r} is a {type(a).__name__}; the model "
                            "expects a numpy array")
        if a.dtype != spec.dtype:
            raise DataError(f"{source}: array {spec.name!r} is {a.dtype}; the model expects "
                            f"{spec.dtype}")
        got, want = a.shape, spec.shape
        fits = len(got) == len(want)
        if fits:
            for i in range(first, len(want)):
                if want[i] is not None and want[i] != got[i]:
                    fits = False
                    break
        if not fits:
            shown = tuple("N" if d is None else d for d in want)
            raise DataError(f"{source}: array {spec.name!r} has shape {got}; the model "
                            f"expects {shown}")


def batches(data: Dataset, size: int) -> Iterator[dict[str, np.ndarray]]:
    """Feed dictionaries of at most ``size`` samples, in order."""
    for start in range(0, len(data), size):
        yield {k: v[start:start + size] for k, v in data.inputs.items()}


def cache_folder() -> Path | None:
    """This user's cache folder in the system temp folder (``edgeloop-cache-UID``, mode
    0700), or None when it cannot be made or is not private to this user (then nothing
    is cached: a file another user could write is never read)."""
    folder = Path(tempfile.gettempdir()) / f"edgeloop-cache-{os.getuid()}"
    try:
        folder.mkdir(mode=0o700, exist_ok=True)
        st = folder.lstat()
    except OSError:
        return None
    private = (stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid()
               and not st.st_mode & 0o077)
    return folder if private else None


_MNIST1D_KEYS = ("x", "y", "x_test", "y_test")


@functools.cache
def _mnist1d() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """MNIST-1D as the package makes it with its default arguments. Making it takes ~5 s,
    in every process that needs it (a CLI call, a Flower ClientApp, a Ray actor), so the
    arrays are kept in :func:`cache_folder`, named by the package version and arguments."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    key = hashlib.sha256(json.dumps(
        [metadata.version("mnist1d"), vars(args)], sort_keys=True).encode()).hexdigest()
    folder = cache_folder()
    cached = folder / f"mnist1d-{key[:16]}.npz" if folder is not None else None
    if cached is not None and cached.is_file():
        with contextlib.suppress(OSError, ValueError, KeyError, zipfile.BadZipFile), \
                np.load(cached, allow_pickle=False) as f:
            x, y, x_test, y_test = (f[k] for k in _MNIST1D_KEYS)
            return x, y, x_test, y_test
    d = make_dataset(args)
    arrays = (d["x"].astype(np.float32), d["y"].astype(np.int64),
              d["x_test"].astype(np.float32), d["y_test"].astype(np.int64))
    if cached is not None:
        with contextlib.suppress(OSError), atomic_path(cached, mode=0o600) as tmp, \
                open(tmp, "wb") as out:
            np.savez(out, **dict(zip(_MNIST1D_KEYS, arrays, strict=True)))
    return arrays


@functools.cache
def _digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None, :, :]
    y = d.target.astype(np.int64)
    order = np.random.default_rng(_SEED).permutation(len(x))
    n_test = len(x) // 5
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


_RGB_COPIES = 4   # digits-rgb renders each training image this many times


def _render_rgb(x: np.ndarray, seed: int) -> np.ndarray:
    """``digits-rgb`` images of the (N, 1, 8, 8) digits ``x`` (module docstring)."""
    rng = np.random.default_rng(seed)
    big = x[:, 0].repeat(3, axis=1).repeat(3, axis=2)              # (N, 24, 24)
    padded = np.pad(big, ((0, 0), (1, 1), (1, 1)))
    smooth = sum(padded[:, i:i + 24, j:j + 24] for i in range(3) for j in range(3)) / 9
    n = len(x)
    canvas = np.zeros((n, 32, 32), np.float32)
    dy, dx = rng.integers(0, 9, n), rng.integers(0, 9, n)
    for k in range(n):
        canvas[k, dy[k]:dy[k] + 24, dx[k]:dx[k] + 24] = smooth[k]
    # a light digit on a dark background, both tinted at random
    bg, fg = rng.uniform(0, 0.35, (n, 3, 1, 1)), rng.uniform(0.65, 1, (n, 3, 1, 1))
    img = bg + (fg - bg) * canvas[:, None] + rng.normal(0, 0.05, (n, 3, 32, 32))
    return ((img - 0.5) / 0.3).astype(np.float32)


def _rgb_split(digits: Dataset, split: str) -> Dataset:
    """A ``digits-rgb`` split from the same split of ``digits``; training images are
    rendered several times (other colours and offsets), the other splits once."""
    copies = _RGB_COPIES if split == "train" else 1
    x, y = digits.inputs["x"], digits.labels
    assert y is not None
    seed = _SEED + 2 + SPLITS.index(split)
    renders = [_render_rgb(x, seed * 100 + c) for c in range(copies)]
    return Dataset({"x": np.concatenate(renders)}, np.tile(y, copies))


def load_builtin(name: str, split: str) -> Dataset:
    """A built-in data set split; see the module docstring for what each split holds."""
    if name not in DATASETS:
        raise one_of("dataset", DATASETS, name)
    if split not in SPLITS:
        raise one_of("split", SPLITS, split)
    if name == "digits-rgb":
        return _rgb_split(load_builtin("digits", split), split)
    loaders: Mapping[str, object] = {"mnist1d": _mnist1d, "digits": _digits}
    x_train, y_train, x_test, y_test = loaders[name]()  # type: ignore[operator]
    if split == "test":
        return Dataset({"x": x_test}, y_test)
    n_val = 500 if name == "mnist1d" else 180
    order = np.random.default_rng(_SEED).permutation(len(x_train))
    val_idx, train_idx = order[:n_val], np.sort(order[n_val:])
    if split == "val":
        return Dataset({"x": x_train[np.sort(val_idx)]}, y_train[np.sort(val_idx)])
    if split == "calib":
        train_idx = np.sort(np.random.default_rng(_SEED + 1).choice(
            train_idx, _CALIB_SIZE, replace=False))
    return Dataset({"x": x_train[train_idx]}, y_train[train_idx])
