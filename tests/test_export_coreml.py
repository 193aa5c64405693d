"""Core ML export: converts to an ML program, saves an .mlpackage that loads back as a valid
spec; prediction (compared with PyTorch) runs only on macOS, where Core ML exists."""

from __future__ import annotations

import platform
from pathlib import Path

import pytest
import torch
from test_cli import cli

ct = pytest.importorskip("coremltools", reason="the [coreml] extra is installed in CI")

from edgeloop.data import load_builtin  # noqa: E402
from edgeloop.errors import ModelError, UsageError  # noqa: E402
from edgeloop.export import CoreMLConfig, check_coreml_spec, to_coreml  # noqa: E402
from edgeloop.zoo import load_torch  # noqa: E402


@pytest.fixture(scope="module")
def package(cnn_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    model = load_torch(cnn_dir / "model.pt")[0]
    x = torch.from_numpy(load_builtin("mnist1d", "test").inputs["x"][:16])
    out = tmp_path_factory.mktemp("coreml") / "m.mlpackage"
    return out, to_coreml(model, x, out, config=CoreMLConfig(batch=2))


def test_package_loads_as_a_valid_ml_program(package: tuple[Path, object]) -> None:
    out, check = package
    assert out.is_dir() and (out / "Manifest.json").is_file()
    spec = ct.utils.load_spec(str(out))
    assert spec.WhichOneof("Type") == "mlProgram"
    assert [i.name for i in spec.description.input] == ["x"]
    assert list(spec.description.input[0].type.multiArrayType.shape) == [2, 40]
    ops = {op.type for block in spec.mlProgram.functions["main"].block_specializations.values()
           for op in block.operations}
    assert "conv" in ops and "linear" in ops  # the CNN's layers made it into the program
    if platform.system() == "Darwin":
        assert check.fidelity is not None and check.fidelity.top1_agreement >= 0.99
    else:
        assert check.fidelity is None and "needs macOS" in check.note


def test_spec_check_rejects_a_wrong_signature(package: tuple[Path, object]) -> None:
    spec = ct.utils.load_spec(str(package[0]))
    check_coreml_spec(spec, input_shape=(2, 40))
    with pytest.raises(ModelError, match="expected"):
        check_coreml_spec(spec, input_shape=(1, 40))
    spec.description.output[0].name = "probs"
    with pytest.raises(ModelError, match="outputs"):
        check_coreml_spec(spec, input_shape=(2, 40))


def test_wrong_suffix_and_precision(cnn_dir: Path, tmp_path: Path) -> None:
    model = load_torch(cnn_dir / "model.pt")[0]
    with pytest.raises(UsageError, match=r"\.mlpackage"):
        to_coreml(model, torch.zeros(2, 40), tmp_path / "m.mlmodel")
    with pytest.raises(UsageError, match="`precision` must be one of"):
        CoreMLConfig(precision="int3")


def test_cli_export_coreml_replaces_old_package(cnn_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.mlpackage"
    out.mkdir()
    (out / "stale").write_text("old")
    code, stdout, stderr = cli("export", cnn_dir / "model.pt", "--to", "coreml", "--out", out)
    assert code == 0, stderr
    assert "prediction needs macOS" in stdout or platform.system() == "Darwin"
    assert not (out / "stale").exists() and (out / "Manifest.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.mlpackage"]
