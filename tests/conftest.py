"""Shared fixtures: small models trained once per session on the built-in data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from edgeloop.data import load_builtin, save_npz
from edgeloop.zoo import TrainConfig, train_zoo_model

os.environ.setdefault("EDGELOOP_QUIET", "1")


@pytest.fixture(scope="session")
def mnist_npz(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The MNIST-1D calib and test splits as .npz files."""
    root = tmp_path_factory.mktemp("data")
    paths = {}
    for split in ("calib", "test"):
        paths[split] = root / f"{split}.npz"
        save_npz(paths[split], load_builtin("mnist1d", split))
    return paths


@pytest.fixture(scope="session")
def cnn_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A briefly trained MNIST-1D CNN (model.onnx, model.pt)."""
    out = tmp_path_factory.mktemp("cnn")
    train_zoo_model("mnist1d-cnn", out, config=TrainConfig(epochs=4))
    return out


@pytest.fixture(scope="session")
def mlp_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A briefly trained MNIST-1D MLP (hidden 512)."""
    out = tmp_path_factory.mktemp("mlp")
    train_zoo_model("mnist1d-mlp", out, config=TrainConfig(epochs=4), hidden=512)
    return out


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the small corpus models are built, once per session for every test file."""
    return tmp_path_factory.mktemp("corpus")
