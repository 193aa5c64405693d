"""Shared by the bundle tests: tiny ONNX models, a golden set, a repository over HTTP."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeloop.bundle import Device, build_manifest, init_repo, publish_bundle, serve_repo
from edgeloop.data import Dataset, save_npz
from edgeloop.device import Runtime

FEATURES, CLASSES = 8, 4
_RNG = np.random.default_rng(0)
W_GOOD = _RNG.normal(size=(FEATURES, CLASSES)).astype(np.float32)
W_BAD = _RNG.normal(size=(FEATURES, CLASSES)).astype(np.float32)
X = _RNG.normal(size=(300, FEATURES)).astype(np.float32)
GOLDEN = Dataset({"x": X}, (X @ W_GOOD).argmax(1).astype(np.int64))


def matmul_model(path: Path, w: np.ndarray, *, pad_to_bytes: int = 0) -> Path:
    """``logits = x @ w`` (+ an unused initializer of ``pad_to_bytes`` to set its size)."""
    inits = [numpy_helper.from_array(w, "w")]
    if pad_to_bytes:
        inits.append(numpy_helper.from_array(
            np.random.default_rng(1).random(pad_to_bytes // 4, dtype=np.float32), "pad"))
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["logits"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", FEATURES])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 9
    onnx.save(m, path)
    return path


def failing_model(path: Path) -> Path:
    """Loads fine, raises at inference: reshapes (N, 8) to a fixed (7, 3)."""
    shape = numpy_helper.from_array(np.array([7, 3], np.int64), "shape")
    g = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["logits"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", FEATURES])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [7, 3])], [shape])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 9
    onnx.save(m, path)
    return path


def fragile_model(path: Path, w: np.ndarray) -> Path:
    """``x @ w`` plus a row of a zero table picked by ``int(x[:, 0])``: right on ordinary
    inputs, an onnxruntime error (index out of bounds) once ``|x[:, 0]| >= 16``."""
    inits = [numpy_helper.from_array(w, "w"),
             numpy_helper.from_array(np.zeros((16, CLASSES), np.float32), "table"),
             numpy_helper.from_array(np.array(0, np.int64), "col")]
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["mm"]),
         helper.make_node("Gather", ["x", "col"], ["first"], axis=1),
         helper.make_node("Cast", ["first"], ["idx"], to=TensorProto.INT64),
         helper.make_node("Gather", ["table", "idx"], ["row"], axis=0),
         helper.make_node("Add", ["mm", "row"], ["logits"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", FEATURES])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 9
    onnx.save(m, path)
    return path


@dataclass
class Repo:
    """A repository folder, its keys and the URL it is served at."""

    dir: Path
    keys: Path
    root: Path
    url: str
    work: Path

    def publish(self, version: str, w: np.ndarray = W_GOOD, *, golden: Dataset | None = GOLDEN,
                min_metric: float | None = None, model: Path | None = None,
                name: str = "kws") -> Path:
        path = model or matmul_model(self.work / f"{name}-{version}.onnx", w)
        manifest = build_manifest(path, name=name, version=version, golden=golden,
                                  min_metric=min_metric)
        publish_bundle(self.dir, path, keys=self.keys, manifest=manifest)
        return path


def make_repo(tmp: Path, **init: object) -> tuple[Repo, object]:
    """A new repository served over HTTP on a free 127.0.0.1 port."""
    keys = tmp / "keys"
    root = init_repo(tmp / "repo", keys=keys, **init)  # type: ignore[arg-type]
    server, _ = serve_repo(tmp / "repo", port=0)
    return Repo(tmp / "repo", keys, root, f"http://127.0.0.1:{server.server_address[1]}",
                tmp), server


@pytest.fixture
def repo(tmp_path: Path) -> Iterator[Repo]:
    """A served repository with kws 1.0.0 published."""
    r, server = make_repo(tmp_path)
    r.publish("1.0.0")
    yield r
    server.shutdown()  # type: ignore[attr-defined]
    server.server_close()  # type: ignore[attr-defined]


def new_device(r: Repo, *, golden: bool = True) -> Device:
    """A device provisioned with ``r``'s root and the golden set, updated once."""
    g = r.work / "golden.npz"
    if golden and not g.exists():
        save_npz(g, GOLDEN)
    d = r.work / f"device{len(list(r.work.glob('device*')))}"
    dev = Device.init(d, trusted_root=r.root, golden=g if golden else None)
    return dev


def assert_serving(dev: Device, version: str, w: np.ndarray = W_GOOD) -> None:
    """The device starts and serves ``version`` (verified sha256), with its outputs."""
    active = dev.active()
    assert active is not None and active[1].version == version
    out = Runtime(dev).infer({"x": X[:16]})
    np.testing.assert_allclose(out, X[:16] @ w, rtol=1e-5, atol=1e-5)


def pass_probation(dev: Device) -> None:
    """Run inferences until the active model's probation is over."""
    rt = Runtime(dev)
    while dev.state().probation is not None:
        rt.infer({"x": X[:1]})


def copy_device(dev: Device, dest: Path) -> Device:
    """A copy of a device folder (same trust, same slots)."""
    shutil.copytree(dev.dir, dest)
    return Device(dest)
