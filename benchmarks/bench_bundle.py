"""Signed updates: power-loss survival under SIGKILL, and the time to verify and install.

1. Power loss: ``Device.update`` runs in a subprocess that is SIGKILLed at random delays
   and at every named point of the install (``EDGELOOP_CRASH_AT``: slot write, after the
   slot is written, verification, pointer switch, after commit). After each kill the
   device must start and serve a verified model whose outputs are the old or the new
   model's, never a mix or nothing; then an update without a kill must reach the new one.
2. Install time: ``Device.update`` of a 25 MB model from a repository served over HTTP on
   127.0.0.1 (TUF refresh, download, hash, slot write, health check on the golden set
   for both models, pointer switch); the median of repeated runs.

Usage: ``python benchmarks/bench_bundle.py [--kills 100] [--runs 5]``. The power-loss
harness (:func:`prepare`, :func:`trial`) is also used by ``tests/test_bundle_powerloss.py``.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from edgeloop.bundle import (  # noqa: E402
    Device,
    build_manifest,
    init_repo,
    publish_bundle,
    serve_repo,
)
from edgeloop.bundle._crash import POINTS  # noqa: E402
from edgeloop.data import Dataset, save_npz  # noqa: E402
from edgeloop.device import Runtime  # noqa: E402

_WORKER = """
import sys
from edgeloop.bundle import Device
from edgeloop.errors import EdgeloopError
try:
    Device(sys.argv[1]).update(sys.argv[2], "model")
except EdgeloopError as e:
    print(e, file=sys.stderr)
    sys.exit(2)
"""


def two_layer(path: Path, a: np.ndarray, b: np.ndarray) -> Path:
    """``logits = relu(x @ a) @ b``, an ONNX file of about ``4 * (a.size + b.size)`` bytes."""
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "a"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "b"], ["logits"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", a.shape[0]])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", b.shape[1]])],
        [numpy_helper.from_array(a, "a"), numpy_helper.from_array(b, "b")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 9
    onnx.save(m, path)
    return path


@dataclass
class Setup:
    """A served repository holding ``model`` 1.0.0 and 1.1.0, and a device at 1.0.0."""

    work: Path
    url: str
    device: Path          # pristine device folder serving 1.0.0; copy it per trial
    x: np.ndarray
    expected: dict[str, np.ndarray]
    server: object

    def close(self) -> None:
        self.server.shutdown()  # type: ignore[attr-defined]
        self.server.server_close()  # type: ignore[attr-defined]


def prepare(work: Path, *, megabytes: float) -> Setup:
    """Build the repository, the two versions and the pristine device."""
    rng = np.random.default_rng(0)
    hidden = 512
    classes = max(10, int(megabytes * 2**20 / 4 / hidden))
    a = rng.normal(size=(16, hidden)).astype(np.float32)
    b = (rng.normal(size=(hidden, classes)) / np.sqrt(hidden)).astype(np.float32)
    x = rng.normal(size=(64, 16)).astype(np.float32)
    outs = {"1.0.0": np.maximum(x @ a, 0) @ b, "1.1.0": np.maximum(x @ a, 0) @ (b * 1.5)}
    golden = Dataset({"x": x}, outs["1.0.0"].argmax(1).astype(np.int64))
    save_npz(work / "golden.npz", golden)
    root = init_repo(work / "repo", keys=work / "keys")
    server, _ = serve_repo(work / "repo", port=0)
    url = f"http://127.0.0.1:{server.server_address[1]}"
    m1 = two_layer(work / "v1.onnx", a, b)
    publish_bundle(work / "repo", m1, keys=work / "keys",
                   manifest=build_manifest(m1, name="model", version="1.0.0", golden=golden))
    dev = Device.init(work / "pristine", trusted_root=root, golden=work / "golden.npz")
    dev.update(url, "model")
    m2 = two_layer(work / "v2.onnx", a, b * 1.5)
    publish_bundle(work / "repo", m2, keys=work / "keys",
                   manifest=build_manifest(m2, name="model", version="1.1.0", golden=golden))
    return Setup(work, url, dev.dir, x, outs, server)


def _run(setup: Setup, device: Path, *, delay: float | None = None,
         point: str | None = None) -> int:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "EDGELOOP_QUIET": "1"}
    env.pop("EDGELOOP_CRASH_AT", None)
    if point:
        env["EDGELOOP_CRASH_AT"] = point
    p = subprocess.Popen([sys.executable, "-c", _WORKER, str(device), setup.url], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if delay is not None:
        try:
            p.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGKILL)
    _, err = p.communicate()
    if p.returncode not in (0, -signal.SIGKILL):
        raise RuntimeError(f"update failed without a kill: {err.decode()[-500:]}")
    return p.returncode


def serving(setup: Setup, device: Path) -> str:
    """Start the device and return the version it serves; raise unless the model file is
    verified and its outputs are exactly that version's."""
    dev = Device(device)
    active = dev.active()
    if active is None:
        raise AssertionError("device serves nothing")
    version = active[1].version
    out = Runtime(dev).infer({"x": setup.x})
    np.testing.assert_allclose(out, setup.expected[version], rtol=1e-4, atol=1e-4)
    return version


def phase(device: Path) -> str:
    """Where an update was when it died, read from what it left in the state folder."""
    state = Device(device).state()
    inactive = "b" if state.active == "a" else "a"
    slot = device / "slots" / inactive
    if state.current() is not None and state.current().version == "1.1.0":
        return "after the pointer switch"
    if (slot / "candidate.onnx").exists():
        return "verification / health check"
    if (slot / ".candidate.onnx.part").exists():
        return "download into the slot"
    if (slot / "model.onnx").exists():
        return "pointer switch (slot written, pointer not yet)"
    return "before the download (start-up, metadata refresh)"


def trial(setup: Setup, *, delay: float | None = None, point: str | None = None,
          recover: bool = True) -> tuple[bool, str, str]:
    """One kill on a fresh copy of the pristine device: (was it killed, where, version
    served afterwards). With ``recover``, a following update must reach 1.1.0."""
    device = setup.work / "trial"
    shutil.rmtree(device, ignore_errors=True)
    shutil.copytree(setup.device, device)
    killed = _run(setup, device, delay=delay, point=point) == -signal.SIGKILL
    where = phase(device) if killed else "finished before the kill"
    version = serving(setup, device)
    if recover:
        _run(setup, device)
        if serving(setup, device) != "1.1.0":
            raise AssertionError("device did not reach 1.1.0 after recovering")
    return killed, where, version


def full_duration(setup: Setup) -> float:
    """Seconds an update subprocess takes without a kill (median of three)."""
    times = []
    for _ in range(3):
        device = setup.work / "timing"
        shutil.rmtree(device, ignore_errors=True)
        shutil.copytree(setup.device, device)
        t0 = time.perf_counter()
        _run(setup, device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _install_times(work: Path, runs: int) -> tuple[list[float], int]:
    setup = prepare(work, megabytes=25)
    try:
        size = (setup.work / "v2.onnx").stat().st_size
        times = []
        for i in range(runs):
            device = work / f"install{i}"
            shutil.copytree(setup.device, device)
            dev = Device(device)
            t0 = time.perf_counter()
            result = dev.update(setup.url, "model")
            times.append(time.perf_counter() - t0)
            assert result.installed and serving(setup, device) == "1.1.0"
            shutil.rmtree(device)
        return times, size
    finally:
        setup.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=100)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "kill").mkdir()
        setup = prepare(work / "kill", megabytes=8)
        outcomes: Counter[str] = Counter()
        try:
            total = full_duration(setup)
            rng = random.Random(0)
            plan = [("point", p) for p in POINTS] * 4
            killed = trials = 0
            while killed < args.kills and trials < 3 * args.kills:
                kind, value = plan[trials] if trials < len(plan) else (
                    "delay", rng.uniform(0, total))
                was_killed, where, version = trial(
                    setup, delay=value if kind == "delay" else None,
                    point=value if kind == "point" else None)
                trials += 1
                killed += was_killed
                label = f"point `{value}`" if kind == "point" else "random delay"
                outcomes[(label, where, version)] += 1
                print(f"{label}: {where}, serving {version}", flush=True)
        finally:
            setup.close()
        (work / "install").mkdir()
        times, size = _install_times(work / "install", args.runs)
    rows = "\n".join(f"| {label} | {where} | {version} | {n} |"
                     for (label, where, version), n in sorted(outcomes.items()))
    median = statistics.median(times)
    body = (
        f"### Power loss (SIGKILL during `Device.update`)\n\n"
        f"{trials} trials on an 8 MB model, **{killed} of them killed mid-update** "
        f"({len(POINTS) * 4} at named points via `EDGELOOP_CRASH_AT`, the rest after a random "
        f"delay in [0, {total:.2f} s], the median unkilled update; a trial whose update "
        f"finished first is listed but not counted as a kill). After every trial the device "
        f"started and served a verified model with exactly the old (1.0.0) or new (1.1.0) "
        f"outputs, never a mix or nothing, and a following update reached 1.1.0: "
        f"**{trials}/{trials} survived**.\n\n"
        f"| kill | phase the update died in | serving after | trials |\n"
        f"|---|---|---|---|\n{rows}\n\n"
        f"### Verify and install a {size / 2**20:.1f} MB model\n\n"
        f"`Device.update` from a repository served on 127.0.0.1 (TUF refresh, download, "
        f"sha256, slot write, health check of both models on a 64-sample golden set, pointer "
        f"switch): median **{median:.3f} s** over {len(times)} runs "
        f"(min {min(times):.3f}, max {max(times):.3f}); target <= 2 s: "
        f"{'met' if median <= 2 else 'NOT met'}.\n")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from _report import write_section

    print(body)
    write_section("bundle", "Signed updates: power loss and install time", body)


if __name__ == "__main__":
    main()
