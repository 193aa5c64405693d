"""Export a torch model to ONNX, LiteRT (.tflite) or Core ML (.mlpackage), each checked
against PyTorch before anything is written.

- ONNX: torch's dynamo exporter, run in onnxruntime.
- LiteRT: litert-torch (optional extra ``[tflite]``), run in the LiteRT interpreter from
  ai-edge-litert. ``quantize="int8"`` quantizes weights and activations to int8 with
  litert-torch's PT2E quantizer (static, calibrated on sample inputs, int8 model I/O).
- Core ML: coremltools (optional extra ``[coreml]``), an ML program (``.mlpackage``).
  Core ML runs models only on Apple platforms: elsewhere the check is that the package
  converts, saves, and loads back as a valid ML program spec with the expected inputs
  and outputs; comparing its predictions with PyTorch needs macOS, where it is done.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import platform
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from edgeloop._io import atomic_path
from edgeloop._onnx import run, session
from edgeloop.errors import ModelError, UsageError, one_of
from edgeloop.measure import Fidelity, fidelity

__all__ = [
    "FORMATS",
    "CoreMLConfig",
    "ExportCheck",
    "TFLiteConfig",
    "check_coreml_spec",
    "export_checkpoint",
    "segments_to_onnx",
    "to_coreml",
    "to_onnx",
    "to_tflite",
]

FORMATS = ("onnx", "tflite", "coreml")

INPUT_NAME = "x"
OUTPUT_NAME = "logits"


def to_onnx(model: nn.Module, sample: torch.Tensor, out: str | os.PathLike[str], *,
            opset: int = 20, atol: float = 1e-4, input_name: str = INPUT_NAME) -> float:
    """Export ``model`` (one input, ``input_name``; one output ``logits``; free batch axis)
    to ``out``.

    The export is run in onnxruntime on ``sample`` and compared to PyTorch; returns the max
    absolute difference, and raises :class:`ModelError` (writing nothing) above ``atol``.
    """
    model = model.eval()
    proto = onnx_program(model, sample, opset=opset, input_name=input_name)
    with torch.no_grad():
        expected = model(sample).numpy()
    return check_and_save(proto, {input_name: sample.numpy()}, expected, out, atol=atol)


def segments_to_onnx(segments: list[nn.Module], sample: torch.Tensor,
                     out_dir: str | os.PathLike[str], *, stem: str = "segment",
                     opset: int = 20, atol: float = 1e-4) -> list[Path]:
    """Export an early-exit model's segments as ``out_dir/{stem}1.onnx``, ... (free batch
    axis): the first takes ``x``, segment ``i`` takes ``features_{i-1}``; each returns
    ``logits`` and, but the last, ``features_{i}``. Each file is run in onnxruntime on the
    previous one's features and compared with PyTorch (every output) before it is
    written; returns the paths."""
    out, paths, h = Path(out_dir), [], sample
    batch = torch.export.Dim("batch", min=1)
    for i, seg in enumerate(segments, start=1):
        seg = seg.eval()
        last = i == len(segments)
        name_in = INPUT_NAME if i == 1 else f"features_{i - 1}"
        names_out = [OUTPUT_NAME] if last else [OUTPUT_NAME, f"features_{i}"]
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                proto = torch.onnx.export(
                    seg, (h,), input_names=[name_in], output_names=names_out,
                    dynamic_shapes=({0: batch},), opset_version=opset, dynamo=True,
                    external_data=False).model_proto
        except Exception as e:
            raise ModelError(f"torch.onnx.export of segment {i} failed: "
                             f"{str(e).splitlines()[0][:300]}") from None
        with torch.no_grad():
            expected = seg(h)
        expected = [expected] if last else list(expected)
        onnx.checker.check_model(proto)
        got = session(proto).run(None, {name_in: h.numpy()})
        for name, e, g in zip(names_out, expected, got, strict=True):
            diff = float(np.max(np.abs(e.numpy() - g)))
            if diff > atol:
                raise ModelError(f"segment {i}'s ONNX export differs from PyTorch in "
                                 f"{name!r} by {diff:.2e} (> {atol:.0e})")
        path = out / f"{stem}{i}.onnx"
        with atomic_path(path) as tmp:
            onnx.save(proto, tmp)
        paths.append(path)
        if not last:
            h = expected[1]
    return paths


def onnx_program(model: nn.Module, sample: torch.Tensor, *, opset: int = 20,
                 input_name: str = INPUT_NAME) -> onnx.ModelProto:
    """``model`` (as it is: train/eval mode untouched) exported by
    ``torch.onnx.export(dynamo=True)`` with one input ``input_name``, one output ``logits``
    and a free batch axis, the exporter's chatter silenced; :class:`ModelError` if it
    fails."""
    batch = torch.export.Dim("batch", min=1)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                model, (sample,), input_names=[input_name], output_names=[OUTPUT_NAME],
                dynamic_shapes=({0: batch},), opset_version=opset, dynamo=True,
                external_data=False)
    except Exception as e:
        raise ModelError(f"torch.onnx.export failed: {str(e).splitlines()[0][:300]}") from None
    return program.model_proto


def check_and_save(proto: onnx.ModelProto, feed: dict[str, np.ndarray], expected: np.ndarray,
                   out: str | os.PathLike[str], *, atol: float) -> float:
    """Check ``proto``, run it on ``feed`` in onnxruntime, compare with PyTorch's
    ``expected`` output and write it atomically. Returns the max absolute difference;
    above ``atol`` raises :class:`ModelError` and writes nothing."""
    onnx.checker.check_model(proto)
    got = run(session(proto), feed)
    diff = float(np.max(np.abs(expected - got)))
    if diff > atol:
        raise ModelError(f"ONNX export differs from PyTorch by {diff:.2e} (> {atol:.0e})")
    with atomic_path(Path(out)) as tmp:
        onnx.save(proto, tmp)
    return diff


@dataclass(frozen=True)
class ExportCheck:
    """How an exported model compared with PyTorch on the check samples."""

    path: str
    format: str                  # onnx, tflite or coreml
    samples: int                 # samples compared (0 when the runtime is unavailable here)
    fidelity: Fidelity | None    # outputs vs PyTorch; None when not run (see ``note``)
    note: str = ""


@dataclass(frozen=True)
class TFLiteConfig:
    """How a model becomes a .tflite file."""

    quantize: str = "none"        # none (float32) or int8 (weights and activations)
    per_channel: bool = True      # int8: one weight scale per output channel
    batch: int = 1                # the .tflite's fixed batch size
    atol: float = 1e-4            # float: allowed max |tflite - torch|
    min_agreement: float = 0.9    # int8: required top-1 agreement with torch
    calibration_samples: int = 256  # int8: samples the activation ranges are observed on

    def __post_init__(self) -> None:
        if self.quantize not in ("none", "int8"):
            raise one_of("quantize", ["none", "int8"], self.quantize)
        if self.batch < 1:
            raise UsageError(f"`batch` must be >= 1; got {self.batch}")


@dataclass(frozen=True)
class CoreMLConfig:
    """How a model becomes a Core ML ML program."""

    precision: str = "float16"    # compute precision: float16 (Neural Engine) or float32
    batch: int = 1                # the package's fixed batch size
    atol: float = 5e-2            # allowed max |coreml - torch| where prediction runs (macOS)
    deployment_target: str = "iOS16"  # minimum OS the package targets (coremltools name)

    def __post_init__(self) -> None:
        if self.precision not in ("float16", "float32"):
            raise one_of("precision", ["float16", "float32"], self.precision)
        if self.batch < 1:
            raise UsageError(f"`batch` must be >= 1; got {self.batch}")


def _require(module: str, extra: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise UsageError(f"export to {extra} needs the optional extra: "
                         f"pip install 'edgeloop[{extra}]'") from None


@contextlib.contextmanager
def _quiet(*loggers: str) -> Iterator[None]:
    """Silence converters' progress prints and chatty loggers for the duration."""
    saved = {name: logging.getLogger(name).level for name in loggers}
    for name in loggers:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def _chunks(x: torch.Tensor, batch: int) -> list[torch.Tensor]:
    """``x`` cut into full batches of ``batch`` (the tail that does not fill one is dropped)."""
    n = len(x) // batch * batch
    if n == 0:
        raise UsageError(f"need at least {batch} sample(s) to export at batch {batch}; "
                         f"got {len(x)}")
    return list(x[:n].split(batch))


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:300]


def _pt2e_int8(model: nn.Module, example: torch.Tensor, calibration: torch.Tensor,
               config: TFLiteConfig) -> tuple[nn.Module, Any]:
    """PT2E static int8: export, insert observers, observe ``calibration``, convert."""
    from litert_torch.quantize import pt2e_quantizer as pq
    from litert_torch.quantize.quant_config import QuantConfig
    from torchao.quantization.pt2e import quantize_pt2e

    quantizer = pq.PT2EQuantizer().set_global(pq.get_symmetric_quantization_config(
        is_per_channel=config.per_channel, is_dynamic=False))
    graph = torch.export.export(model, (example,)).module()
    graph = quantize_pt2e.prepare_pt2e(graph, quantizer)
    with torch.no_grad():
        for chunk in _chunks(calibration[:config.calibration_samples], config.batch):
            graph(chunk)
    graph = quantize_pt2e.convert_pt2e(graph, fold_quantize=False)
    return graph, QuantConfig(pt2e_quantizer=quantizer)


def _run_tflite(path: Path, chunks: list[torch.Tensor]) -> np.ndarray:
    """Run every chunk through the LiteRT interpreter, (de)quantizing int8 model I/O."""
    from ai_edge_litert.interpreter import Interpreter

    runner = Interpreter(model_path=str(path)).get_signature_runner()
    (in_name, in_detail), = runner.get_input_details().items()
    (_, out_detail), = runner.get_output_details().items()
    outs = []
    for chunk in chunks:
        x = chunk.numpy()
        if in_detail["dtype"] == np.int8:
            scale, zero = in_detail["quantization"]
            x = np.clip(np.round(x / scale) + zero, -128, 127).astype(np.int8)
        (y,) = runner(**{in_name: x}).values()
        if out_detail["dtype"] == np.int8:
            scale, zero = out_detail["quantization"]
            y = (y.astype(np.float32) - zero) * scale
        outs.append(y)
    return np.concatenate(outs)


def to_tflite(model: nn.Module, samples: torch.Tensor, out: str | os.PathLike[str], *,
              config: TFLiteConfig | None = None) -> ExportCheck:
    """Convert ``model`` to a LiteRT flatbuffer at ``out`` with litert-torch.

    ``samples`` (float inputs, first axis = samples) calibrate int8 and are the check
    set: the file is run in the LiteRT interpreter batch by batch and compared with
    PyTorch; on a miss (``atol`` for float, ``min_agreement`` for int8) :class:`ModelError`
    is raised and nothing is written.
    """
    config = config or TFLiteConfig()
    litert_torch = _require("litert_torch", "tflite")
    _require("ai_edge_litert.interpreter", "tflite")
    model = model.eval()
    chunks = _chunks(samples, config.batch)
    example = chunks[0]
    try:
        with _quiet("litert_torch", "absl"):
            if config.quantize == "int8":
                graph, quant = _pt2e_int8(model, example, samples, config)
                converted = litert_torch.convert(graph, (example,), quant_config=quant)
            else:
                converted = litert_torch.convert(model, (example,))
    except Exception as e:  # torch.export, torchao and the MLIR converter raise many types
        raise ModelError(f"litert-torch conversion failed: {_first_line(e)}") from None
    with torch.no_grad():
        expected = torch.cat([model(c) for c in chunks]).numpy()
    with atomic_path(Path(out)) as tmp:
        converted.export(str(tmp))
        try:
            got = _run_tflite(tmp, chunks)
        except Exception as e:  # the interpreter's RuntimeError / ValueError
            raise ModelError(f"the LiteRT interpreter cannot run the export: "
                             f"{_first_line(e)}") from None
        fid = fidelity(got, expected)
        if config.quantize == "int8" and fid.top1_agreement < config.min_agreement:
            raise ModelError(f"int8 .tflite agrees with PyTorch on {fid.top1_agreement:.1%} "
                             f"of samples (< {config.min_agreement:.0%})")
        if config.quantize == "none" and fid.max_abs_diff > config.atol:
            raise ModelError(f".tflite differs from PyTorch by {fid.max_abs_diff:.2e} "
                             f"(> {config.atol:.0e})")
    return ExportCheck(path=str(out), format="tflite", samples=len(got), fidelity=fid,
                       note=f"LiteRT interpreter, {config.quantize}, batch {config.batch}")


def _replace_dir(tmp: Path, out: Path) -> None:
    """Put directory ``tmp`` at ``out``; an old ``out`` is kept until the new one is in place."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def check_coreml_spec(spec: Any, *, input_shape: tuple[int, ...]) -> None:
    """Raise :class:`ModelError` unless ``spec`` is an ML program with one input ``x`` of
    ``input_shape`` and one output ``logits`` (pure: works on the loaded protobuf)."""
    if spec.WhichOneof("Type") != "mlProgram":
        raise ModelError(f"Core ML package is a {spec.WhichOneof('Type')}, not an mlProgram")
    if "main" not in spec.mlProgram.functions:
        raise ModelError("Core ML program has no main function")
    inputs = [(i.name, tuple(i.type.multiArrayType.shape)) for i in spec.description.input]
    outputs = [o.name for o in spec.description.output]
    if inputs != [(INPUT_NAME, input_shape)] or outputs != [OUTPUT_NAME]:
        raise ModelError(f"Core ML package has inputs {inputs} and outputs {outputs}; expected "
                         f"[({INPUT_NAME!r}, {input_shape})] and [{OUTPUT_NAME!r}]")


def to_coreml(model: nn.Module, samples: torch.Tensor, out: str | os.PathLike[str], *,
              config: CoreMLConfig | None = None) -> ExportCheck:
    """Convert ``model`` to a Core ML ML program package at ``out`` (``.mlpackage``).

    The saved package is loaded back and its spec checked. On macOS the package is also
    run on ``samples`` and compared with PyTorch; elsewhere Core ML cannot predict, which
    the returned check says in its ``note``.
    """
    config = config or CoreMLConfig()
    ct = _require("coremltools", "coreml")
    out = Path(out)
    if out.suffix != ".mlpackage":
        raise UsageError(f"`out` must end in .mlpackage for an ML program; got {str(out)!r}")
    model = model.eval()
    chunks = _chunks(samples, config.batch)
    shape = tuple(chunks[0].shape)
    try:
        with _quiet("coremltools"):
            program = torch.export.export(model, (chunks[0],)).run_decompositions({})
            mlmodel = ct.convert(
                program, convert_to="mlprogram",
                inputs=[ct.TensorType(name=INPUT_NAME, shape=shape)],
                outputs=[ct.TensorType(name=OUTPUT_NAME)],
                compute_precision=(ct.precision.FLOAT16 if config.precision == "float16"
                                   else ct.precision.FLOAT32),
                minimum_deployment_target=getattr(ct.target, config.deployment_target))
    except Exception as e:  # torch.export and the MIL converter raise many types
        raise ModelError(f"coremltools conversion failed: {_first_line(e)}") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp_dir:
        tmp = Path(tmp_dir) / out.name
        mlmodel.save(str(tmp))
        try:
            spec = ct.utils.load_spec(str(tmp))
        except Exception as e:  # protobuf DecodeError, missing manifest ...
            raise ModelError(f"saved Core ML package does not load: {_first_line(e)}") from None
        check_coreml_spec(spec, input_shape=shape)
        fid, n, note = None, 0, ("spec checked; Core ML prediction needs macOS, so outputs "
                                 "were not compared with PyTorch on this machine")
        if platform.system() == "Darwin":
            loaded = ct.models.MLModel(str(tmp))
            got = np.concatenate([loaded.predict({INPUT_NAME: c.numpy()})[OUTPUT_NAME]
                                  for c in chunks])
            with torch.no_grad():
                expected = torch.cat([model(c) for c in chunks]).numpy()
            fid, n = fidelity(got, expected), len(got)
            if fid.max_abs_diff > config.atol:
                raise ModelError(f"Core ML output differs from PyTorch by "
                                 f"{fid.max_abs_diff:.2e} (> {config.atol:.0e})")
            note = f"Core ML prediction on macOS, {config.precision}"
        _replace_dir(tmp, out)
    return ExportCheck(path=str(out), format="coreml", samples=n, fidelity=fid, note=note)


def export_checkpoint(checkpoint: str | os.PathLike[str], *, to: str,
                      out: str | os.PathLike[str], samples: np.ndarray | None = None,
                      quantize: str = "none", batch: int = 1,
                      check_samples: int = 64) -> ExportCheck:
    """Export an edgeloop torch checkpoint to ``to`` (onnx, tflite or coreml) at ``out``.

    ``samples`` (the model's ``x`` inputs) calibrate int8 and check the export; by default
    they are the calibration split of the built-in data set the architecture trains on.
    """
    from edgeloop.data import load_builtin
    from edgeloop.zoo import ARCHS, load_torch

    if to not in FORMATS:
        raise one_of("to", FORMATS, to)
    if quantize != "none" and to != "tflite":
        raise UsageError(f"`quantize` {quantize!r} is available for --to tflite only")
    model, arch = load_torch(checkpoint)
    if samples is None:
        samples = load_builtin(ARCHS[arch].dataset, "calib").inputs[INPUT_NAME]
    expected = ARCHS[arch].sample_shape
    if tuple(samples.shape[1:]) != expected:
        raise UsageError(f"samples must have shape (N, {', '.join(map(str, expected))}) for "
                         f"{arch}; got {tuple(samples.shape)}")
    x = torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32))
    if to == "onnx":
        diff = to_onnx(model, x[:check_samples], out)
        return ExportCheck(path=str(out), format="onnx", samples=min(len(x), check_samples),
                           fidelity=None, note=f"onnxruntime, max |onnx - torch| {diff:.2e}")
    if to == "tflite":
        return to_tflite(model, x[:TFLiteConfig.calibration_samples], out,
                         config=TFLiteConfig(quantize=quantize, batch=batch))
    return to_coreml(model, x[:check_samples], out, config=CoreMLConfig(batch=batch))
