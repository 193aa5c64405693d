from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edgeloop import data as data_module
from edgeloop.data import (
    Dataset,
    InputSpec,
    cache_folder,
    check_against,
    load_builtin,
    load_npz,
    save_npz,
)
from edgeloop.errors import DataError, UsageError


@pytest.mark.parametrize("name,n_train,n_test", [("mnist1d", 3500, 1000), ("digits", 1258, 359)])
def test_builtin_splits_are_disjoint_and_sized(name: str, n_train: int, n_test: int) -> None:
    train, val = load_builtin(name, "train"), load_builtin(name, "val")
    calib, test = load_builtin(name, "calib"), load_builtin(name, "test")
    assert (len(train), len(test), len(calib)) == (n_train, n_test, 256)
    rows = lambda d: {r.tobytes() for r in d.inputs["x"].reshape(len(d), -1)}  # noqa: E731
    assert not rows(train) & rows(val)
    assert rows(calib) <= rows(train)
    assert train.inputs["x"].dtype == np.float32 and set(np.unique(train.labels)) == set(range(10))


def test_mnist1d_is_the_package_default_dataset() -> None:
    from mnist1d.data import get_dataset_args, make_dataset

    d = make_dataset(get_dataset_args())
    test = load_builtin("mnist1d", "test")
    np.testing.assert_allclose(test.inputs["x"], d["x_test"].astype(np.float32))
    n_train_val = len(load_builtin("mnist1d", "train")) + len(load_builtin("mnist1d", "val"))
    assert len(d["x"]) == n_train_val


@pytest.fixture
def fresh_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty system temp folder, and MNIST-1D not yet made in this process."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    data_module._mnist1d.cache_clear()
    yield tmp_path
    data_module._mnist1d.cache_clear()


def test_mnist1d_is_made_once_and_then_read_from_the_users_cache(
        fresh_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mnist1d.data

    made = data_module._mnist1d()
    folder = cache_folder()
    assert folder is not None and folder.parent == fresh_cache
    assert oct(folder.stat().st_mode & 0o777) == "0o700"
    (cached,) = folder.glob("mnist1d-*.npz")
    assert oct(cached.stat().st_mode & 0o777) == "0o600"
    data_module._mnist1d.cache_clear()

    def not_again(*_: object) -> None:
        raise AssertionError("MNIST-1D was made again")

    monkeypatch.setattr(mnist1d.data, "make_dataset", not_again)
    for a, b in zip(data_module._mnist1d(), made, strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)


def test_a_damaged_cache_file_is_made_again(fresh_cache: Path) -> None:
    made = data_module._mnist1d()
    (cached,) = cache_folder().glob("mnist1d-*.npz")
    cached.write_bytes(b"not an npz")
    data_module._mnist1d.cache_clear()
    np.testing.assert_array_equal(data_module._mnist1d()[2], made[2])
    with np.load(cached) as f:    # and written whole again
        np.testing.assert_array_equal(f["x_test"], made[2])


def test_a_cache_folder_others_can_write_is_never_used(fresh_cache: Path) -> None:
    import os

    folder = fresh_cache / f"edgeloop-cache-{os.getuid()}"
    folder.mkdir()
    folder.chmod(0o777)
    assert cache_folder() is None
    data_module._mnist1d()
    assert not list(folder.iterdir())


def test_unknown_dataset_and_split() -> None:
    with pytest.raises(UsageError,
                       match="`dataset` must be one of mnist1d, digits, digits-rgb; got 'cifar'"):
        load_builtin("cifar", "test")
    with pytest.raises(UsageError, match="`split`"):
        load_builtin("digits", "holdout")


def test_roundtrip(tmp_path: Path) -> None:
    d = Dataset({"x": np.ones((3, 4), np.float32)}, np.array([0, 1, 2]))
    save_npz(tmp_path / "d.npz", d)
    back = load_npz(tmp_path / "d.npz")
    np.testing.assert_array_equal(back.inputs["x"], d.inputs["x"])
    np.testing.assert_array_equal(back.labels, d.labels)
    assert [p.name for p in tmp_path.iterdir()] == ["d.npz"]


@pytest.mark.parametrize("arrays,message", [
    ({}, "holds no input arrays"),
    ({"x": np.zeros((0, 4), np.float32)}, "holds no samples"),
    ({"x": np.array([[1.0, np.nan]], np.float32)}, "1 NaN or Inf"),
    ({"x": np.array([[np.inf, 0.0]], np.float32)}, "NaN or Inf"),
    ({"x": np.zeros((2, 4), np.float32), "labels": np.zeros(3, np.int64)}, "`labels` must be"),
    ({"x": np.zeros((2, 4), np.float32), "y": np.zeros((3, 4), np.float32)}, "disagree"),
])
def test_bad_npz(tmp_path: Path, arrays: dict, message: str) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=message):
        load_npz(path)


def test_not_an_npz(tmp_path: Path) -> None:
    path = tmp_path / "x.npz"
    path.write_bytes(b"not a zip")
    with pytest.raises(DataError, match=r"not a readable \.npz"):
        load_npz(path)
    with pytest.raises(DataError, match="does not exist"):
        load_npz(tmp_path / "missing.npz")


def test_check_against_names_dtype_and_shape() -> None:
    spec = [InputSpec("x", np.dtype(np.float32), (None, 40))]
    check_against(Dataset({"x": np.zeros((2, 40), np.float32)}), spec)
    with pytest.raises(DataError, match="no array 'x'"):
        check_against(Dataset({"y": np.zeros((2, 40), np.float32)}), spec)
    with pytest.raises(DataError, match="is float64; the model expects float32"):
        check_against(Dataset({"x": np.zeros((2, 40))}), spec)
    with pytest.raises(DataError, match=r"shape \(2, 39\); the model expects \('N', 40\)"):
        check_against(Dataset({"x": np.zeros((2, 39), np.float32)}), spec)
