"""Where edgeloop writes: atomic file output (a reader sees the old file or the whole new
one, never half of one), and the scratch folder third-party tools run in."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from edgeloop.errors import UsageError


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()   # read once at import: os.umask can only be read by setting it


def output_folder(path: str | os.PathLike[str], option: str) -> Path:
    """Create the folder ``path`` (given as ``option``) now, before a long run that would
    otherwise fail at its end on a path it cannot write."""
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"`{option}` {str(folder)!r} cannot be used as a folder "
                         f"({e.strerror}); give a new or writable folder") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"`{option}` {str(folder)!r} is not writable; give a new or "
                         "writable folder")
    return folder


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str], *, mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success fsync it and rename it over
    ``target`` with permissions ``mode`` (default: what a plain ``open()`` would give).
    On any exception the temporary file is removed and ``target`` is untouched."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        # mkstemp creates 0600; set the final mode before the file becomes visible.
        os.chmod(tmp_path, 0o666 & ~_UMASK if mode is None else mode)
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_bytes_atomic(target: str | os.PathLike[str], data: bytes, *,
                       mode: int | None = None) -> None:
    """Write ``data`` to ``target`` atomically (``mode``: see :func:`atomic_path`)."""
    with atomic_path(target, mode=mode) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(target: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``target`` atomically."""
    write_bytes_atomic(target, text.encode())


@contextlib.contextmanager
def scratch_dir(prefix: str = "edgeloop-") -> Iterator[Path]:
    """Run the block in a fresh folder inside the system temp folder, and remove it on
    exit, whether the block succeeds, fails or is interrupted (Ctrl-C).

    For the block, the folder is also the working directory and Python's temp folder
    (``tempfile.tempdir``): onnxruntime's tools write beside the working directory
    (symbolic shape inference leaves ``sym_shape_infer_temp.onnx`` and a ``.data`` file
    per failure there) and into temp folders they do not always remove, so whatever they
    leave goes with this folder. Both are process-wide settings: use it from one thread
    at a time, and resolve relative user paths before entering. Nesting is fine: an
    inner folder is made inside the outer one.
    """
    root = Path(tempfile.mkdtemp(prefix=prefix)).resolve()
    old_cwd, old_tempdir = os.getcwd(), tempfile.tempdir
    try:
        os.chdir(root)
        tempfile.tempdir = str(root)
        yield root
    finally:
        tempfile.tempdir = old_tempdir
        os.chdir(old_cwd)
        shutil.rmtree(root, ignore_errors=True)


def sha256_file(path: str | os.PathLike[str]) -> str:
    """The hex sha256 of a file's bytes, read in chunks."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@contextlib.contextmanager
def locked(path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold an exclusive ``flock`` on the file ``path`` (made if missing), across
    processes, for a read-modify-write; closing the file releases it. Not re-entrant."""
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def utc_now() -> str:
    """The time now, UTC, to the second, ISO 8601 (what state files and histories record)."""
    return datetime.now(UTC).isoformat(timespec="seconds")
