"""Usage errors from the real console script: one line on stderr, exit code 2, no
traceback, for every kind typer reports (its own exceptions since it vendors click);
``--help`` still exits 0."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def _edgeloop(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).parent / "edgeloop"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "edgeloop"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "EDGELOOP_QUIET": "1"}, timeout=120)


@pytest.mark.parametrize("args,message", [
    (["quantise", "m.onnx"], "No such command 'quantise'"),
    (["quantize", "m.onnx", "--out", "q.onnx", "--schema", "int8"], "No such option: --schema"),
    (["quantize", "--out", "q.onnx", "--scheme", "int8"], "Missing argument 'model'"),
    (["quantize", "m.onnx", "--scheme", "int8"], "Missing option '--out'"),
    (["bench", "m.onnx", "--threads", "abc"], "Invalid value for '--threads'"),
    (["evaluate", "m.onnx", "--data", "d.npz", "--runs", "0"], "Invalid value for '--runs'"),
    (["quantize", "m.onnx", "--out", "q.onnx", "--scheme", "int9"],
     "`scheme` must be one of int8, "),
    (["optimize", "m.onnx", "--data", "d.npz", "--val", "d.npz", "--out", "o",
      "--metric", "f1"], "`metric` must be one of accuracy, agreement, cosine; got 'f1'"),
], ids=["unknown command", "unknown option", "missing argument", "missing option",
        "bad option value", "value out of range", "bad choice", "bad metric choice"])
def test_usage_error_is_one_line_exit_2(args: list[str], message: str,
                                        tmp_path: Path) -> None:
    r = _edgeloop(*args, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error:") and r.stderr.count("\n") == 1, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr
    assert r.stdout == "" and list(tmp_path.iterdir()) == []


def test_usage_error_names_the_help_of_its_command(tmp_path: Path) -> None:
    r = _edgeloop("zoo", "train", "--bogus", cwd=tmp_path)
    assert r.returncode == 2 and "(see `edgeloop zoo train --help`)" in r.stderr


@pytest.mark.parametrize("args", [["--help"], ["quantize", "--help"], ["zoo", "--help"]])
def test_help_exits_0(args: list[str], tmp_path: Path) -> None:
    r = _edgeloop(*args, cwd=tmp_path)
    assert r.returncode == 0 and "Usage" in r.stdout and r.stderr == ""


def test_group_without_command_shows_its_help(tmp_path: Path) -> None:
    r = _edgeloop("zoo", cwd=tmp_path)
    assert r.returncode == 2 and "train" in r.stdout + r.stderr
    assert "Traceback" not in r.stderr
