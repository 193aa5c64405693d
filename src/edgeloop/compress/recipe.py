"""Chains of training-time passes, from Python or from a TOML recipe.

A recipe (paths are relative to the recipe file)::

    model = "cnn/model.pt"        # a model in any form of edgeloop.models: a checkpoint,
                                  # a torch.save'd module, or "package.module:callable"
    # weights = "state.pt"        # a factory's state_dict
    # model_config = "cfg.json"   # a factory's keyword arguments (or HF config)
    data = "train.npz"            # training data with labels
    val = "val.npz"               # validation data with labels (report accuracy)
    out = "cnn-small"             # folder for model.onnx, model.pt, report.json
    # teacher = "big/model.pt"    # for distill and prune fine-tuning; default: the starting model

    [[passes]]
    pass = "prune"
    ratio = 0.5
    finetune_epochs = 12

    [[passes]]
    pass = "distill"              # recover accuracy from the original model
    epochs = 10

    [[passes]]
    pass = "qat"                  # last: writes an integer QDQ model
    bits = 8
    # target = "x86-avx2"         # hardware profile of the export; default: this machine

Every table loads into its pass's dataclass; an unknown pass, an unknown field or a value of
the wrong type is one error in the format "`field` must be one of ...; got 'x'".

Passes keep what earlier ones made: the zeros of ``prune-unstructured`` stay zero through
``distill`` and ``qat`` (:attr:`TrainContext.masks`); a ``prune`` after it would remove
channels under the masks, so that order is refused.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import tempfile
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from edgeloop._io import write_bytes_atomic
from edgeloop.compress.distill import Distill
from edgeloop.compress.prune import StructuredPrune, UnstructuredPrune, sparsity, zipped_size
from edgeloop.compress.qat import QAT, quantize_export
from edgeloop.compress.trainbase import (
    TorchPass,
    TrainContext,
    check_labels,
    figures,
    sample_of,
    write_report,
)
from edgeloop.data import Dataset, load_npz
from edgeloop.errors import UsageError, one_of
from edgeloop.export import to_onnx
from edgeloop.measure import LatencyConfig, graph_summary
from edgeloop.models import LoadedModel, load_model, model_bytes
from edgeloop.targets import Target, get_target

__all__ = ["PASSES", "Recipe", "compress_torch", "load_recipe", "make_pass", "run_recipe"]

PASSES: dict[str, type[TorchPass]] = {
    "prune": StructuredPrune,
    "prune-unstructured": UnstructuredPrune,
    "distill": Distill,
    "qat": QAT,
}
_TOP_FIELDS = ("model", "weights", "model_config", "data", "val", "out", "teacher",
               "passes")
_CALIB_SAMPLES = 1024


def make_pass(name: str, options: dict[str, Any], *, where: str = "pass") -> TorchPass:
    """The pass ``name`` configured from ``options``, each checked against its field's type.
    A hardware-profile field (``target``) takes a profile name or ``auto``."""
    if name not in PASSES:
        raise one_of(f"{where}.pass", list(PASSES), name)
    cls = PASSES[name]
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    given = dict(options)
    for key, value in options.items():
        if key not in fields:
            raise one_of(f"{where} field", sorted(fields), key)
        f = fields[key]
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
        if isinstance(default, Target):
            given[key] = value = get_target(value)
        ok = isinstance(value, type(default)) or (isinstance(default, float)
                                                  and isinstance(value, int))
        if not ok or (isinstance(value, bool) and not isinstance(default, bool)):
            raise UsageError(f"`{where}.{key}` must be a {type(default).__name__}; got {value!r}")
    return cls(**{k: float(v) if isinstance(fields[k].default, float) else v
                  for k, v in given.items()})


@dataclass
class Recipe:
    """A loaded recipe: where things are and the passes to run, in order."""

    model: str                  # a path or a factory (edgeloop.models)
    data: Path
    val: Path
    out: Path
    passes: list[TorchPass] = field(default_factory=list)
    teacher: str | None = None
    weights: Path | None = None
    model_config: Path | None = None

    def load(self) -> LoadedModel:
        """The recipe's starting model."""
        return load_model(self.model, weights=self.weights, config=self.model_config)


def load_recipe(path: str | os.PathLike[str]) -> Recipe:
    """Parse and validate a TOML recipe (nothing is loaded or trained yet)."""
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text())
    except OSError as e:
        raise UsageError(f"cannot read recipe {str(path)!r}: {e.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"recipe {str(path)!r} is not valid TOML: {e}") from None
    for key in doc:
        if key not in _TOP_FIELDS:
            raise one_of("recipe field", _TOP_FIELDS, key)
    for key in ("model", "data", "val", "out"):
        if not isinstance(doc.get(key), str):
            raise UsageError(f"recipe {str(path)!r} needs `{key}` (a path)")
    for key in ("weights", "model_config", "teacher"):
        if key in doc and not isinstance(doc[key], str):
            raise UsageError(f"recipe `{key}` must be a path; got {doc[key]!r}")
    tables = doc.get("passes", [])
    if not isinstance(tables, list) or not tables or not all(isinstance(t, dict) for t in tables):
        raise UsageError("a recipe needs at least one [[passes]] table")
    passes = []
    for i, table in enumerate(tables):
        options = dict(table)
        name = options.pop("pass", None)
        passes.append(make_pass(str(name), options, where=f"passes[{i}]"))
    check_order(passes)
    base = path.parent

    def resolve(p: str) -> Path:
        return base / p

    def model_at(p: str | None) -> str | None:
        # a path relative to the recipe, unless it names a factory
        return None if p is None else str(resolve(p)) if (resolve(p)).exists() else p

    def optional(key: str) -> Path | None:
        return resolve(doc[key]) if key in doc else None
    return Recipe(model=str(model_at(doc["model"])), data=resolve(doc["data"]),
                  val=resolve(doc["val"]), out=resolve(doc["out"]), passes=passes,
                  teacher=model_at(doc.get("teacher")), weights=optional("weights"),
                  model_config=optional("model_config"))


def check_order(passes: list[TorchPass]) -> None:
    """Refuse pass orders that would lose what an earlier pass made: ``qat`` not last (it
    produces the integer model), ``prune`` after ``prune-unstructured`` (removing channels
    would discard the sparsity masks)."""
    for i, p in enumerate(passes):
        if isinstance(p, QAT) and i != len(passes) - 1:
            raise UsageError("`qat` must be the last pass: it produces the integer model")
        if isinstance(p, StructuredPrune) and any(isinstance(q, UnstructuredPrune)
                                                  for q in passes[:i]):
            raise UsageError("`prune` after `prune-unstructured` would discard its sparsity "
                             "masks; put `prune` first")


def run_recipe(recipe: Recipe, *, latency_config: LatencyConfig | None = None) -> dict[str, Any]:
    """Load the recipe's files and run it (see :func:`compress_torch`)."""
    return compress_torch(recipe.load(), recipe.passes, train=load_npz(recipe.data),
                          val=load_npz(recipe.val), out=recipe.out,
                          teacher=load_model(recipe.teacher) if recipe.teacher else None,
                          latency_config=latency_config)


def compress_torch(start: LoadedModel, passes: list[TorchPass], *,
                   train: Dataset, val: Dataset, out: str | os.PathLike[str],
                   teacher: LoadedModel | None = None, student: LoadedModel | None = None,
                   latency_config: LatencyConfig | None = None) -> dict[str, Any]:
    """Run ``passes`` on ``start`` (see :func:`edgeloop.models.load_model`) and write
    ``out/model.onnx``, ``out/model.pt`` (unless the last pass is QAT: its model exists
    only as integer ONNX; see :func:`edgeloop.models.model_bytes` for its form) and
    ``out/report.json`` (before/after figures). Returns the report.

    With ``student``, the passes run on the student and ``start`` is the teacher and the
    "before" model. Everything is validated and computed before the first file is written.
    """
    check_order(passes)
    model = start.module
    check_labels(model, train, source="training data")
    check_labels(model, val, source="validation data")
    (name,) = val.inputs   # the exported model's input takes the data's name
    with tempfile.TemporaryDirectory(prefix="edgeloop-") as tmp:
        before_path = Path(tmp) / "before.onnx"
        before_diff = to_onnx(model, sample_of(val), before_path, input_name=name)
        before = figures(before_path, model, val, latency_config=latency_config,
                         export_max_abs_diff=before_diff)
        before_bytes = before_path.read_bytes()
    if teacher is not None:
        teacher_model = teacher.module
        check_labels(teacher_model, val, source="validation data")
    else:
        teacher_model = copy.deepcopy(model)
    if student is not None:
        check_labels(student.module, train, source="training data")
        start, model = student, student.module
    calib = train.take(slice(0, _CALIB_SAMPLES))
    ctx = TrainContext(train, val, teacher=teacher_model, calib=calib)
    for p in passes:
        model = p.apply(model, ctx)
    notes: list[str] = []
    last = passes[-1] if passes else None
    with tempfile.TemporaryDirectory(prefix="edgeloop-") as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        if isinstance(last, QAT):
            proto, diff = quantize_export(model, calib, bits=last.bits, target=last.target)
            onnx.save(proto, onnx_path)
            float_ops, int_ops, _ = graph_summary(proto)
            notes.append(f"QAT {last.bits}-bit weights: integer ops {dict(int_ops)}, float "
                         f"compute ops left {dict(float_ops) or 'none'}; export_max_abs_diff "
                         "is onnxruntime's integer model against the quantized torch graph")
        else:
            diff = to_onnx(model, sample_of(val), onnx_path, input_name=name)
        after = figures(onnx_path, model, val, latency_config=latency_config,
                        export_max_abs_diff=diff)
        onnx_bytes = onnx_path.read_bytes()
    if any(isinstance(p, UnstructuredPrune) for p in passes):
        after.nonzero_fraction = 1.0 - sparsity(model)
        after.zip_bytes = zipped_size(onnx_bytes)
        notes.append("onnxruntime's CPU kernels run sparse weights no faster than dense ones; "
                     "the gain is the compressed download (zip_bytes)")
        before.zip_bytes = zipped_size(before_bytes)
    checkpoint = None if isinstance(last, QAT) else model_bytes(
        LoadedModel(model, start.arch, start.config))
    out = Path(out)
    write_bytes_atomic(out / "model.onnx", onnx_bytes)
    if checkpoint is not None:
        write_bytes_atomic(out / "model.pt", checkpoint)
    return write_report(out / "report.json", before=before, after=after,
                        passes=[{"pass": p.name, **dataclasses.asdict(p)} for p in passes],
                        notes=notes)
