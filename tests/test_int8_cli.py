"""`edgeloop quantize --scheme int8 --max-error`: works, and rejects bad values with exit
code 2 and no output file."""

from __future__ import annotations

import sys

import numpy as np
import onnx
import pytest

from edgeloop.cli import main
from edgeloop.compress.mixed import read_plan
from edgeloop.data import Dataset, save_npz

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from test_int8_sensitivity import _outlier_mlp


@pytest.fixture()
def files(tmp_path):
    model = tmp_path / "model.onnx"
    onnx.save(_outlier_mlp(), model)
    calib = tmp_path / "calib.npz"
    x = np.random.default_rng(1).normal(size=(64, 16)).astype(np.float32)
    save_npz(calib, Dataset({"x": x}))
    return model, calib, tmp_path / "out.onnx"


def test_quantize_int8_with_max_error(files, capsys):
    model, calib, out = files
    main(["quantize", str(model), "--data", str(calib), "--scheme", "int8",
          "--max-error", "0.001", "--allow-slower", "--out", str(out)])
    plan = read_plan(onnx.load(out))
    assert plan is not None and plan["max_error"] == 0.001
    assert plan["error"] <= 0.001
    # the outlier channel is handled by smoothing it into the weights, or by float fallback
    assert "smooth" in plan["preparation"] or plan["float_nodes"][0] == "mm_outlier"
    assert "scheme int8" in capsys.readouterr().out


@pytest.mark.parametrize("args,message", [
    (["--scheme", "int8", "--max-error", "0"], "max-error"),
    (["--scheme", "int8", "--max-error", "1.5"], "max-error"),
    (["--scheme", "int8", "--max-error", "-0.01"], "max-error"),
    (["--scheme", "int8-static", "--max-error", "0.01"], "max-error"),
    (["--scheme", "int8", "--threads", "-1"], "threads"),
    (["--scheme", "int8-static", "--threads", "1"], "`--threads` does not apply"),
])
def test_bad_int8_option_exits_2_and_writes_nothing(files, capsys, args, message):
    model, calib, out = files
    with pytest.raises(SystemExit) as e:
        main(["quantize", str(model), "--data", str(calib), "--out", str(out), *args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_int8_without_calibration_data_exits_2(files, capsys):
    model, _, out = files
    with pytest.raises(SystemExit) as e:
        main(["quantize", str(model), "--scheme", "int8", "--out", str(out)])
    assert e.value.code == 2
    assert "calibration" in capsys.readouterr().err
    assert not out.exists()


def test_threads_are_the_ones_speed_is_judged_at(files, monkeypatch):
    """`--threads 1`: int8 times every variant and the float model with one intra-op
    thread (a device's setting; float gains more from extra cores than int8 does)."""
    import edgeloop.compress.mixed as mixed
    seen = []
    real = mixed.interleaved_latency

    def spy(*args, **kwargs):
        seen.append(kwargs.get("threads", 0))
        return real(*args, **kwargs)

    monkeypatch.setattr(mixed, "interleaved_latency", spy)
    model, calib, out = files
    main(["quantize", str(model), "--data", str(calib), "--scheme", "int8", "--threads", "1",
          "--allow-slower", "--out", str(out)])
    assert seen and set(seen) == {1}
    assert read_plan(onnx.load(out))["threads"] == 1


def test_int8_no_faster_than_float_says_where_the_time_goes(files, monkeypatch, capsys,
                                                            tmp_path):
    """When every int8 form times slower than float, the one-line refusal splits both
    models' batch-1 time by onnxruntime's profiler; its trace is not left behind."""
    import re

    import edgeloop.compress.mixed as mixed

    def float_fastest(models, *args, **kwargs):
        return [1.0] + [2.0] * (len(models) - 1)

    monkeypatch.setattr(mixed, "interleaved_latency", float_fastest)
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    model, calib, out = files
    with pytest.raises(SystemExit) as e:
        main(["quantize", str(model), "--data", str(calib), "--scheme", "int8",
              "--out", str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no int8 form" in err
    split = re.search(r"convolutions and matrix products ([\d.]+) vs ([\d.]+), Q/DQ "
                      r"conversions ([\d.]+), other operators ([\d.]+) vs ([\d.]+)", err)
    assert split, err
    int8_products, float_products = float(split[1]), float(split[2])
    assert int8_products > 0 and float_products > 0   # the MLP's MatMuls, both forms
    assert not out.exists() and not any(work.iterdir())
