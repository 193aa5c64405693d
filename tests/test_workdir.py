"""edgeloop writes nowhere but --out and the system temp folder, and leaves nothing in the
temp folder: on success, on error and on Ctrl-C, also for a model saved with external data.

Each command runs as a subprocess whose working directory is an empty folder and whose
TMPDIR is another one; afterwards the first holds only what --out names and the second
is empty. The transformer-like test model has an attention mask whose axes are named
apart from the token ids' (as ``torch.onnx.export`` names them), which makes onnxruntime's
symbolic shape inference give up and, before edgeloop ran it in a scratch folder, leave
``sym_shape_infer_temp.onnx`` and a ``.data`` file per attempt in the working directory.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeloop._onnx import load_model, run, session
from edgeloop.compress import Int4Weight, run_pass
from edgeloop.errors import ModelError

VOCAB, WIDTH, SEQ = 512, 64, 16


def _transformer(*, mask_axes: tuple[str, str]) -> onnx.ModelProto:
    """One attention block plus a feed-forward block over token embeddings, mean-pooled:
    inputs ``input_ids`` (batch, seq) and ``attention_mask`` (``mask_axes``)."""
    rng = np.random.default_rng(0)

    def weight(name: str, *shape: int, scale: float = 0.1) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32),
                                       name)

    inits = [weight("emb", VOCAB, WIDTH, scale=1.0), weight("wq", WIDTH, WIDTH),
             weight("wk", WIDTH, WIDTH), weight("wv", WIDTH, WIDTH), weight("wo", WIDTH, WIDTH),
             weight("w1", WIDTH, 4 * WIDTH), weight("w2", 4 * WIDTH, WIDTH),
             numpy_helper.from_array(np.ones(WIDTH, np.float32), "ln_scale"),
             numpy_helper.from_array(np.zeros(WIDTH, np.float32), "ln_bias"),
             numpy_helper.from_array(np.array(WIDTH ** -0.5, np.float32), "scale"),
             numpy_helper.from_array(np.array(-1e4, np.float32), "neg"),
             numpy_helper.from_array(np.array(1.0, np.float32), "one"),
             numpy_helper.from_array(np.array([1], np.int64), "axis1")]
    node = helper.make_node
    nodes = [
        node("Gather", ["emb", "input_ids"], ["h0"]),
        node("MatMul", ["h0", "wq"], ["q"]), node("MatMul", ["h0", "wk"], ["k"]),
        node("MatMul", ["h0", "wv"], ["v"]),
        node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
        node("MatMul", ["q", "kt"], ["s0"]), node("Mul", ["s0", "scale"], ["s1"]),
        node("Cast", ["attention_mask"], ["mf"], to=TensorProto.FLOAT),
        node("Sub", ["one", "mf"], ["mi"]), node("Mul", ["mi", "neg"], ["mb"]),
        node("Unsqueeze", ["mb", "axis1"], ["m3"]),
        node("Add", ["s1", "m3"], ["s2"]), node("Softmax", ["s2"], ["p"], axis=-1),
        node("MatMul", ["p", "v"], ["c"]), node("MatMul", ["c", "wo"], ["a"]),
        node("Add", ["h0", "a"], ["r1"]),
        node("LayerNormalization", ["r1", "ln_scale", "ln_bias"], ["h1"], axis=-1),
        node("MatMul", ["h1", "w1"], ["f1"]), node("Relu", ["f1"], ["f2"]),
        node("MatMul", ["f2", "w2"], ["f3"]), node("Add", ["h1", "f3"], ["r2"]),
        node("LayerNormalization", ["r2", "ln_scale", "ln_bias"], ["h2"], axis=-1),
        node("ReduceMean", ["h2"], ["pooled"], axes=[1], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes, "tiny-bert",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, list(mask_axes))],
        [helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["batch", WIDTH])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _tokens(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = np.ones((n, SEQ), np.int64)
    mask[:, SEQ - 4:] = rng.integers(0, 2, (n, 4))
    return {"input_ids": rng.integers(0, VOCAB, (n, SEQ)).astype(np.int64),
            "attention_mask": mask}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``plain.onnx`` (one mask axis naming, symbolic shape inference succeeds),
    ``external.onnx`` (+ its ``.data`` file; mask axes named apart), calib/val .npz."""
    root = tmp_path_factory.mktemp("inputs")
    onnx.save(_transformer(mask_axes=("batch", "seq")), root / "plain.onnx")
    onnx.save(_transformer(mask_axes=("mask_batch", "mask_seq")), root / "external.onnx",
              save_as_external_data=True, location="external.onnx.data")
    np.savez(root / "calib.npz", **_tokens(32, 1))
    np.savez(root / "val.npz", **_tokens(32, 2))
    np.savez(root / "calib_long.npz", **_tokens(2048, 4))   # keeps int8 busy for a while
    return {p.stem: p for p in root.iterdir()}


def _start(args: list[object], cwd: Path, tmpdir: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "TMPDIR": str(tmpdir), "EDGELOOP_QUIET": "1"}
    # SIGINT as a terminal delivers it, even when this test runs where it is ignored
    # (a background job), which the child would inherit
    return subprocess.Popen([sys.executable, "-m", "edgeloop", *map(str, args)], cwd=cwd,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _folders(tmp_path: Path) -> tuple[Path, Path]:
    cwd, tmpdir = tmp_path / "cwd", tmp_path / "tmp"
    cwd.mkdir()
    tmpdir.mkdir()
    return cwd, tmpdir


# onnxruntime (1.32 on Linux) keeps its telemetry session id in $TMPDIR/.ses, written on
# import and reused by every later run: not a leftover of one run (ORT_DISABLE_TELEMETRY=1
# turns it off).
_ORT_SESSION_FILE = ".ses"


def _left(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != _ORT_SESSION_FILE)


@pytest.mark.parametrize("model,scheme", [
    ("plain", "int8"), ("plain", "int8-static"),
    ("external", "int8"), ("external", "int4-weight"), ("external", "ort-dynamic"),
])
def test_quantize_writes_only_out(model: str, scheme: str, inputs: dict[str, Path],
                                  tmp_path: Path) -> None:
    cwd, tmpdir = _folders(tmp_path)
    # int8's refusal of a model no faster than float depends on timing: not tested here
    extra = ["--allow-slower"] if scheme == "int8" else []
    proc = _start(["quantize", inputs[model], "--scheme", scheme, "--data", inputs["calib"],
                   "--out", "q.onnx", *extra], cwd, tmpdir)
    _, stderr = proc.communicate(timeout=300)
    # onnxruntime's symbolic shape inference gives up on the external-data model (and
    # writes its files into the working directory); the preparation falls back
    assert proc.returncode == 0 and "Traceback" not in stderr, stderr
    assert _left(cwd) == ["q.onnx"], stderr
    assert _left(tmpdir) == []
    written = onnx.load(cwd / "q.onnx", load_external_data=False)
    assert not any(t.external_data for t in written.graph.initializer)  # self-contained


def test_optimize_writes_only_out(inputs: dict[str, Path], tmp_path: Path) -> None:
    cwd, tmpdir = _folders(tmp_path)
    proc = _start(["optimize", inputs["external"], "--data", inputs["calib"], "--val",
                   inputs["val"], "--metric", "cosine", "--max-drop", "0.01", "--time-budget",
                   "25s", "--out", "opt"], cwd, tmpdir)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert _left(cwd) == ["opt"]
    assert sorted(p.name for p in (cwd / "opt").iterdir()) == [
        "best.onnx", "pareto.png", "report.json", "report.md"]
    assert _left(tmpdir) == []


def test_bad_input_leaves_nothing(inputs: dict[str, Path], tmp_path: Path) -> None:
    cwd, tmpdir = _folders(tmp_path)
    np.savez(tmp_path / "wrong.npz", input_ids=np.zeros((4, SEQ), np.float32))
    proc = _start(["quantize", inputs["plain"], "--scheme", "int8-static", "--data",
                   tmp_path / "wrong.npz", "--out", "q.onnx"], cwd, tmpdir)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2 and stderr.count("\n") == 1, stderr
    assert _left(cwd) == [] and _left(tmpdir) == []


@pytest.mark.parametrize("command", ["quantize", "optimize"])
def test_ctrl_c_mid_run_leaves_nothing(command: str, inputs: dict[str, Path],
                                       tmp_path: Path) -> None:
    cwd, tmpdir = _folders(tmp_path)
    args: list[object] = (
        ["quantize", inputs["plain"], "--scheme", "int8", "--data", inputs["calib_long"],
         "--out", "q.onnx"] if command == "quantize" else
        ["optimize", inputs["plain"], "--data", inputs["calib"], "--val", inputs["val"],
         "--metric", "cosine", "--time-budget", "5m", "--out", "opt"])
    proc = _start(args, cwd, tmpdir)
    deadline = time.monotonic() + 120
    while not any(p.name.startswith("edgeloop-") for p in tmpdir.iterdir()):  # work began
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert "Traceback" not in stderr, stderr
    if command == "quantize":   # interrupted: nothing written, exit 130
        assert proc.returncode == 130 and _left(cwd) == [], stderr
    else:                       # optimize stops and writes what it found so far
        assert proc.returncode == 0 and _left(cwd) == ["opt"], stderr
        assert "stopped early (interrupted)" in stdout
    assert _left(tmpdir) == []


def test_external_data_model_reads_anywhere_and_writes_self_contained(
        inputs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)          # the .data file is found beside the model
    model = load_model(inputs["external"])
    feed = _tokens(4, 3)
    reference = run(session(_transformer(mask_axes=("mask_batch", "mask_seq"))), feed)
    np.testing.assert_array_equal(run(session(model), feed), reference)
    out = tmp_path / "out" / "int4.onnx"
    run_pass(Int4Weight(), inputs["external"], out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["int4.onnx"]
    written = onnx.load(out, load_external_data=False)
    assert not any(t.external_data for t in written.graph.initializer)
    cosine = np.sum(run(session(written), feed) * reference, -1) / (
        np.linalg.norm(run(session(written), feed), axis=-1) * np.linalg.norm(reference, axis=-1))
    assert cosine.min() > 0.99


def test_external_data_file_missing_is_one_line_error(inputs: dict[str, Path],
                                                      tmp_path: Path) -> None:
    lonely = tmp_path / "external.onnx"
    lonely.write_bytes(inputs["external"].read_bytes())   # without its .data file
    with pytest.raises(ModelError, match="is not a valid ONNX model") as err:
        load_model(lonely)
    assert "\n" not in str(err.value)
