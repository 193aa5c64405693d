"""The command line imports torch (and the other training and export libraries) only in
the commands that need them.

Devices install edgeloop without torch and run ``edgeloop device ...`` and ``edgeloop
bench``. Each check starts a fresh interpreter whose import system refuses the heavy
libraries, then runs the real CLI there: an import that moved back to module level shows
up as a refused import, even where some code catches the ImportError.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_bundle_fixtures import GOLDEN, W_GOOD, X, matmul_model, repo

from edgeloop.data import Dataset, save_npz

__all__ = ["repo"]

SRC = Path(__file__).resolve().parent.parent / "src"
REFUSED = ("torch", "onnxruntime.quantization", "transformers", "litert_torch",
           "coremltools", "matplotlib", "flwr", "ray")
# Not needed to parse arguments or print help; importing them would slow every command.
SLOW = ("numpy", "onnx", "onnxruntime", "tuf", "securesystemslib")

_HARNESS = """
import json, sys

REFUSED = {refused!r}
refused = []


class Refuse:
    def find_spec(self, name, path=None, target=None):
        if any(name == r or name.startswith(r + ".") for r in REFUSED):
            refused.append(name)
            raise ImportError(f"{{name}} is not installed on this device")
        return None


sys.meta_path.insert(0, Refuse())
code = 0
if sys.argv[1:] == ["--import-only"]:
    import edgeloop.cli  # noqa: F401
else:
    from edgeloop.cli import main
    try:
        main(sys.argv[1:])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
loaded = sorted({{m.split(".")[0] for m in sys.modules}})
print("IMPORTS " + json.dumps({{"refused": refused, "loaded": loaded}}), file=sys.stderr)
sys.exit(code)
"""


def run(*args: object) -> tuple[int, str, str, dict[str, list[str]]]:
    """Run ``edgeloop ARGS`` without the refused libraries; returns (exit code, stdout,
    stderr without the harness line, {"refused": [...], "loaded": [top-level modules]})."""
    proc = subprocess.run(
        [sys.executable, "-c", _HARNESS.format(refused=REFUSED), *map(str, args)],
        capture_output=True, text=True, timeout=60, check=False,
        env={"PYTHONPATH": str(SRC), "EDGELOOP_QUIET": "1", "COLUMNS": "100"})
    head, marker, tail = proc.stderr.rpartition("IMPORTS ")
    assert marker, f"the command crashed: {proc.stderr[-2000:]}"
    return proc.returncode, proc.stdout, head, json.loads(tail)


def test_importing_the_cli_loads_nothing_heavy() -> None:
    code, _, err, imports = run("--import-only")
    assert code == 0, err
    assert imports["refused"] == []
    assert not set(imports["loaded"]) & {*SLOW, *(r.split(".")[0] for r in REFUSED)}
    assert {"edgeloop", "typer", "rich"} <= set(imports["loaded"])


@pytest.mark.parametrize("args", [[], ["device"], ["device", "status"], ["device", "update"],
                                  ["device", "rollback"], ["bench"], ["repo"], ["publish"],
                                  ["zoo", "train"], ["quantize"], ["optimize"], ["prune"],
                                  ["cascade"], ["device", "run"], ["federated"],
                                  ["federated", "simulate"]])
def test_help_needs_no_heavy_library(args: list[str]) -> None:
    code, out, err, imports = run(*args, "--help")
    assert code == 0, err
    assert "Usage:" in out
    assert imports["refused"] == []


def test_device_status_on_a_missing_folder_is_the_one_line_error(tmp_path: Path) -> None:
    code, _, err, imports = run("device", "status", tmp_path / "nowhere")
    assert code == 2
    assert err.strip().splitlines() == [
        f"error: '{tmp_path / 'nowhere'}' is not a device state folder (no device.json); "
        "create one with `edgeloop device init`"]
    assert imports["refused"] == [] and "torch" not in imports["loaded"]


def test_device_init_update_status_without_torch(repo, tmp_path: Path) -> None:
    save_npz(tmp_path / "golden.npz", GOLDEN)
    dev = tmp_path / "dev"
    for args in (["device", "init", dev, "--trusted-root", repo.root,
                  "--golden", tmp_path / "golden.npz"],
                 ["device", "update", dev, "--repo", repo.url, "--name", "kws"]):
        code, out, err, imports = run(*args)
        assert code == 0, err
        assert imports["refused"] == []
    assert "installed kws 1.0.0" in out
    code, out, err, imports = run("device", "status", dev, "--json")
    assert code == 0, err
    assert imports["refused"] == []
    status = json.loads(out)
    assert [s["version"] for s in status["slots"]] == ["1.0.0", None]
    assert status["history"][-1]["action"] == "commit"


def test_bench_runs_without_torch(tmp_path: Path) -> None:
    model = matmul_model(tmp_path / "m.onnx", W_GOOD)
    save_npz(tmp_path / "x.npz", Dataset({"x": X[:8]}))
    code, out, err, imports = run("bench", model, "--duration", "0.2", "--warmup", "0.05",
                                  "--batch", "1,4", "--data", tmp_path / "x.npz",
                                  "--no-plot", "--json")
    assert code == 0, err
    assert imports["refused"] == [] and "torch" not in imports["loaded"]
    report = json.loads(out)
    assert [r["batch"] for r in report["results"]] == [1, 4]
    assert all(r["runs"] > 0 and r["p50_ms"] > 0 for r in report["results"])


def _without_torch(*args: object) -> subprocess.CompletedProcess[str]:
    """Run ``edgeloop ARGS`` the way a device install sees it: ``torch`` is absent (an
    import raises ModuleNotFoundError and ``importlib.util.find_spec`` returns None)."""
    code = ("import sys; sys.modules['torch'] = None\n"
            "from edgeloop.cli import main; main(sys.argv[1:])")
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True,
                          text=True, timeout=120, check=False,
                          env={"PYTHONPATH": str(SRC), "EDGELOOP_QUIET": "1",
                               "COLUMNS": "200"})


def test_onnx_commands_run_without_torch(tmp_path: Path) -> None:
    model = matmul_model(tmp_path / "m.onnx", W_GOOD)
    save_npz(tmp_path / "x.npz", Dataset({"x": X[:64]}))
    quantized = _without_torch("quantize", model, "--scheme", "int8-static", "--data",
                               tmp_path / "x.npz", "--out", tmp_path / "q.onnx")
    assert quantized.returncode == 0, quantized.stderr
    evaluated = _without_torch("evaluate", tmp_path / "q.onnx", "--data", tmp_path / "x.npz",
                               "--reference", model, "--json")
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(evaluated.stdout)["fidelity"]["mean_cosine"] > 0.99


def test_a_training_command_without_torch_names_the_extra(tmp_path: Path) -> None:
    proc = _without_torch("zoo", "train", "mnist1d-cnn", "--out", tmp_path / "out")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: this command needs `torch`, which is not installed; install it with pip "
        "install 'edgeloop[train]'"]
    assert not (tmp_path / "out").exists()


def test_cascade_and_device_run_without_torch(tmp_path: Path) -> None:
    small = matmul_model(tmp_path / "small.onnx", W_GOOD * 0.5 + 0.3)
    large = matmul_model(tmp_path / "large.onnx", W_GOOD)
    save_npz(tmp_path / "val.npz", GOLDEN)
    code, out, err, imports = run("cascade", small, large, "--val", tmp_path / "val.npz",
                                  "--max-drop", 5, "--out", tmp_path / "cascade.json")
    assert code == 0, err
    assert imports["refused"] == [] and "torch" not in imports["loaded"]
    (tmp_path / "policy.toml").write_text('cascade = "cascade.json"\n')
    code, out, err, imports = run("device", "run", "--data", tmp_path / "val.npz",
                                  "--policy", tmp_path / "policy.toml")
    assert code == 0, err
    assert imports["refused"] == [] and "torch" not in imports["loaded"]
    assert "300 samples" in out
