"""Models the way users bring them, built offline by code: the test and benchmark corpus.

Every entry is an fp32 ``model.onnx`` plus two ``.npz`` files in the data convention:
``calib.npz`` (calibration) and ``val.npz`` (held out, never overlapping ``calib``).
Nothing is downloaded: architectures come from ``transformers`` config classes and
``torchvision.models`` constructors with random initialisation, and the weights are then
given the properties of pretrained ones that make post-training quantization hard.

Transformers (inputs int64 ``input_ids``, ``attention_mask`` and, where named,
``token_type_ids``; free batch and sequence axes). ``-ts`` entries are exported with the
TorchScript exporter (``torch.onnx.export(dynamo=False)``, opset 17), ``-dynamo`` ones
with ``torch.onnx.export(dynamo=True)`` (its default opset):

- ``bert-ts``, ``bert-dynamo``: ``BertModel`` at BERT-base width (hidden 768, 12 heads,
  FFN 3072) with 4 layers instead of 12 (enough to show every layer type and how errors
  compound, at a third of the cost), with ``token_type_ids``; output ``last_hidden_state``.
  ``bert-notypes-ts``: the same without ``token_type_ids``.
- ``distilbert-ts``, ``distilbert-dynamo``: ``DistilBertModel`` (dim 768, 12 heads,
  hidden_dim 3072, 6 layers), which has no token types; output ``last_hidden_state``.
- ``minilm-ts``, ``minilm-dynamo``: a ``BertModel`` in the shape of all-MiniLM-L6
  (hidden 384, 6 layers, 12 heads, FFN 1536) with a mean-pooling head (the
  attention-mask-weighted mean of the last hidden state, as sentence-transformers
  computes it), so the output is ``sentence_embedding``; no ``token_type_ids``.

*Outlier channels.* Pretrained BERTs carry a few hidden dimensions (BERT-base: 308 and
381 among them) whose LayerNorm outputs are tens of times larger than the rest, in every
layer; a per-tensor int8 scale set by them leaves the other dimensions a few levels.
The corpus plants three such dimensions (at the same relative positions in every width):
every LayerNorm but the last adds a large bias of alternating sign there, so its output
carries them; the linear layers reading that output (query/key/value, FFN input) get
those input columns divided by the same magnitude, with the constant they would then add
taken out of their bias; and the projection writing back into the residual stream
(attention output, FFN output) subtracts it again, so the next LayerNorm's statistics are
undisturbed. The FFN outputs thus carry the outliers with the opposite sign, as in
pretrained models, and the network computes nearly what it did before. The last LayerNorm
is left alone so the model's output is informative in every dimension. :func:`stats`
measures the effect at every LayerNorm output of the exported model. Weights are drawn
with standard deviation 0.05 instead of transformers' 0.02, so that attention is not
near-uniform as it is at initialisation. ``benchmarks/corpus_stats.py`` shows what this
does to onnxruntime's stock quantizers.

CNNs (input ``input``, N x 3 x 224 x 224 float, free batch axis; output ``logits``),
exported with the TorchScript exporter at opset 17, which folds BatchNorm into the
convolutions: ``mobilenet_v2``, ``mobilenet_v3_small``, ``resnet18`` and
``efficientnet_b0`` from ``torchvision.models``. Weights: every BatchNorm gets log-normal
per-channel gains and a few near-dead channels (so the folded depthwise weights spread
over a hundredfold range or more per layer, as in pretrained MobileNets); then the
network is trained (1200 steps of 32 crops at 96 px) to tell which photograph and
which cell of a 4 x 4 grid over it a crop comes from (32 classes, written to the first
rows of the 1000-way classifier; the other rows learn to stay low); finally the running
statistics are re-estimated at the export resolution. Training matters: a randomly
initialised depthwise network amplifies any perturbation from layer to layer, so that
int8 rounding of its weights alone would flip most top-1 decisions, which no pretrained
network does. Training long enough matters too: pretrained ImageNet classifiers are
roughly calibrated, so their mean top-1 probability sits near their top-1 accuracy
(about 0.68-0.78 for these four), and a network trained less is torn between classes on
far more inputs than they are, which makes top-1 agreement with fp32 an unrealistically
hard measure. After 1200 steps the mean top-1 probability on the validation crops is
0.57-0.76 (300 steps: 0.38-0.64); the classifier is confident on most crops and torn
between neighbouring cells on some, as ImageNet classifiers are on natural crops.

Images: scikit-learn's two sample photographs (shipped with it, no download): random
square crops (side 64-256 px), horizontal flips, resized to the model's input with
antialiasing and normalised with ImageNet's mean and standard deviation. The training
crops, the crops BatchNorm statistics are estimated on, the calibration crops and the
validation crops are different random draws over the whole photographs (disjoint
regions were tried: with two photographs the validation crops then fell mostly into one
or two of the classes, which makes top-1 agreement a weak measure).

Text: "sentences" of token ids with a Zipf-like distribution (BERT's vocabulary size,
words from id 1000 on), each drawn from one of 16 topics that prefer different words,
real lengths between an eighth of the sequence and all of it, ``[CLS]``/``[SEP]``
markers, padding (id 0) with ``attention_mask`` 0, and for ``token_type_ids`` a sentence
pair (type 1 on the second). Sequence length 128; calibration and validation are
independent draws.

``mnist1d-cnn``: edgeloop's own zoo model trained by :func:`edgeloop.zoo.train_zoo_model`,
with the MNIST-1D ``calib`` and ``val`` splits of :mod:`edgeloop.data` (disjoint).

``small=True`` builds the same architecture, exporter and inputs at a much smaller size
(hidden 64 and 2 layers, a 2000-token vocabulary and sequence 32; CNNs at 64 x 64 with
10 outputs, 40 training steps of 16 crops on a 2 x 2 grid and, where the constructor has
one, a smaller width; 2 training epochs for the zoo model) in seconds, for tests.
torch, transformers and torchvision are imported only inside the functions that need
them.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from edgeloop._io import write_text_atomic
from edgeloop._progress import progress, status
from edgeloop._torchvision import import_torchvision
from edgeloop.data import Dataset, load_npz, save_npz
from edgeloop.errors import ModelError, UsageError, one_of

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["CLASSIFIERS", "CORPUS", "CorpusModel", "build", "import_torchvision", "stats"]

RECIPE = "corpus.json"
# Bump a family's number whenever a change here changes what build() writes for it.
_RECIPE_VERSIONS = {"text": 6, "cnn": 8, "zoo": 6}
_VERSIONED = ("torch", "transformers", "torchvision", "onnx", "numpy", "scikit-learn",
              "mnist1d")


@dataclass(frozen=True)
class CorpusModel:
    """One built corpus entry. ``kind`` is "classifier" (output: logits), "embedder"
    (a sentence embedding) or "encoder" (the last hidden state)."""

    name: str
    kind: str
    metric: str    # "agreement" for classifiers, "cosine" otherwise
    model: Path    # model.onnx (fp32)
    calib: Path    # calibration npz (arrays named after the model inputs)
    val: Path      # held-out npz (never overlaps calib)


@dataclass(frozen=True)
class _Source:
    """A corpus entry before export: the torch model, how to export it, and its data."""

    module: nn.Module
    names: list[str]          # input names, in the order of the module's arguments
    output: str
    axes: dict[int, str]      # free axes of every input
    dynamo: bool
    calib: Dataset
    val: Dataset


# ---------------------------------------------------------------- transformers

@dataclass(frozen=True)
class _Text:
    family: str          # "bert" | "distilbert"
    kind: str            # "encoder" | "embedder"
    token_types: bool
    dynamo: bool
    hidden: int
    layers: int
    heads: int
    ffn: int


_BERT = {"hidden": 768, "layers": 4, "heads": 12, "ffn": 3072}
_DISTILBERT = {"hidden": 768, "layers": 6, "heads": 12, "ffn": 3072}
_MINILM = {"hidden": 384, "layers": 6, "heads": 12, "ffn": 1536}
_SMALL_TEXT = {"hidden": 64, "layers": 2, "heads": 4, "ffn": 256}

_TEXT = {
    "bert-ts": _Text("bert", "encoder", True, False, **_BERT),
    "bert-dynamo": _Text("bert", "encoder", True, True, **_BERT),
    "bert-notypes-ts": _Text("bert", "encoder", False, False, **_BERT),
    "distilbert-ts": _Text("distilbert", "encoder", False, False, **_DISTILBERT),
    "distilbert-dynamo": _Text("distilbert", "encoder", False, True, **_DISTILBERT),
    "minilm-ts": _Text("bert", "embedder", False, False, **_MINILM),
    "minilm-dynamo": _Text("bert", "embedder", False, True, **_MINILM),
}
_CNNS = ("mobilenet_v2", "mobilenet_v3_small", "resnet18", "efficientnet_b0")
_ZOO = ("mnist1d-cnn",)

CORPUS: tuple[str, ...] = (*_TEXT, *_CNNS, *_ZOO)
CLASSIFIERS: tuple[str, ...] = (*_CNNS, *_ZOO)   # the corpus entries whose output is logits

_VOCAB, _SMALL_VOCAB = 30522, 2000      # BERT's WordPiece vocabulary size
_PAD, _CLS, _SEP, _FIRST_WORD = 0, 101, 102, 1000   # BERT's special ids; words after them
_TOPICS = 16
_INIT = 0.05        # weight initialisation scale (transformers' default: 0.02)
_OUTLIER_AT = (308 / 768, 381 / 768, 588 / 768)   # relative positions of the planted dims
_OUTLIER_SIZE = 60.0   # their bias at LayerNorm outputs (typical channels are ~N(0, 1))


def _sentences(n: int, *, seq_len: int, vocab: int, token_types: bool,
               rng: np.random.Generator) -> Dataset:
    """``n`` padded token sequences; see the module docstring."""
    words = vocab - _FIRST_WORD
    zipf = 1.0 / np.arange(1, words + 1) ** 1.1
    zipf /= zipf.sum()
    # Each topic prefers its own words: half of a sentence's tokens follow the global
    # Zipf ranking, half a topic-specific permutation of it.
    topic_rank = np.random.default_rng(12345).permuted(
        np.tile(np.arange(words), (_TOPICS, 1)), axis=1)
    ids = np.full((n, seq_len), _PAD, dtype=np.int64)
    types = np.zeros((n, seq_len), dtype=np.int64)
    for i in range(n):
        length = int(rng.integers(max(seq_len // 8, 5), seq_len + 1))
        body = length - (3 if token_types else 2)
        ranks = rng.choice(words, size=body, p=zipf)
        topical = rng.random(body) < 0.5
        ranks[topical] = topic_rank[rng.integers(_TOPICS), ranks[topical]]
        tokens = list(ranks + _FIRST_WORD)
        if token_types:
            cut = int(rng.integers(1, body))
            seq = [_CLS, *tokens[:cut], _SEP, *tokens[cut:], _SEP]
            types[i, cut + 2:length] = 1
        else:
            seq = [_CLS, *tokens, _SEP]
        ids[i, :length] = seq
    inputs = {"input_ids": ids, "attention_mask": (ids != _PAD).astype(np.int64)}
    if token_types:
        inputs["token_type_ids"] = types
    return Dataset(inputs)


def _text_names(spec: _Text) -> list[str]:
    return ["input_ids", "attention_mask"] + (["token_type_ids"] if spec.token_types else [])


def _text_module(spec: _Text, *, vocab: int, seq_len: int) -> nn.Module:
    """The torch model that is exported: encoder plus (for embedders) mean pooling."""
    from torch import nn

    from edgeloop._torchvision import ensure_importable

    ensure_importable()   # transformers imports torchvision when it is installed
    import transformers

    if spec.family == "bert":
        encoder = transformers.BertModel(transformers.BertConfig(
            vocab_size=vocab, hidden_size=spec.hidden, num_hidden_layers=spec.layers,
            num_attention_heads=spec.heads, intermediate_size=spec.ffn,
            max_position_embeddings=max(512, seq_len), initializer_range=_INIT),
            add_pooling_layer=False)
    else:
        encoder = transformers.DistilBertModel(transformers.DistilBertConfig(
            vocab_size=vocab, dim=spec.hidden, n_layers=spec.layers, n_heads=spec.heads,
            hidden_dim=spec.ffn, max_position_embeddings=max(512, seq_len),
            initializer_range=_INIT))

    class TextModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = encoder

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
            extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                                  **extra).last_hidden_state
            if spec.kind == "encoder":
                return hidden
            weight = attention_mask.unsqueeze(-1).to(hidden.dtype)
            return (hidden * weight).sum(1) / weight.sum(1).clamp(min=1e-9)

    return TextModel().eval()


def _residual_blocks(spec: _Text, encoder: nn.Module) -> tuple[nn.Module, list[tuple[
        list[nn.Module], nn.Module, nn.Module]]]:
    """The embedding LayerNorm, and per sub-layer (attention, FFN) in order: the linear
    layers reading the residual stream, the one writing back to it, and the LayerNorm
    after the residual add."""
    blocks = []
    if spec.family == "bert":
        for layer in encoder.encoder.layer:
            att = layer.attention
            blocks.append(([att.self.query, att.self.key, att.self.value], att.output.dense,
                           att.output.LayerNorm))
            blocks.append(([layer.intermediate.dense], layer.output.dense,
                           layer.output.LayerNorm))
    else:
        for layer in encoder.transformer.layer:
            att = layer.attention
            blocks.append(([att.q_lin, att.k_lin, att.v_lin], att.out_lin, layer.sa_layer_norm))
            blocks.append(([layer.ffn.lin1], layer.ffn.lin2, layer.output_layer_norm))
    return encoder.embeddings.LayerNorm, blocks


def _plant_outliers(spec: _Text, encoder: nn.Module) -> None:
    """Give the residual stream pretrained-like outlier dimensions (module docstring)."""
    import torch

    dims = torch.tensor([int(p * spec.hidden) for p in _OUTLIER_AT])
    offset = _OUTLIER_SIZE * torch.tensor([-1.0, 1.0, -1.0])
    first, blocks = _residual_blocks(spec, encoder)
    with torch.no_grad():
        first.bias[dims] += offset
        for i, (readers, writer, norm) in enumerate(blocks):
            for lin in readers:
                lin.weight[:, dims] /= _OUTLIER_SIZE
                lin.bias -= lin.weight[:, dims] @ offset
            writer.bias[dims] -= offset
            if i < len(blocks) - 1:
                norm.bias[dims] += offset


def _export(module: nn.Module, args: tuple[torch.Tensor, ...], names: list[str],
            output: str, *, dynamo: bool, axes: dict[int, str]) -> onnx.ModelProto:
    """``module`` as ONNX with the given free axes on every input, by either exporter;
    nothing is written to disk."""
    import io
    import warnings

    import torch

    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            if dynamo:
                dims = {i: torch.export.Dim(name, min=2) for i, name in axes.items()}
                program = torch.onnx.export(
                    module, args, input_names=names, output_names=[output],
                    dynamic_shapes={n: dims for n in names}, dynamo=True,
                    external_data=False, report=False, verbose=False)
                return program.model_proto
            buf = io.BytesIO()
            torch.onnx.export(
                module, args, buf, input_names=names, output_names=[output],
                dynamic_axes={n: axes for n in names}, opset_version=17, dynamo=False)
            return onnx.load_from_string(buf.getvalue())
    except Exception as e:  # the exporters raise many unrelated types
        raise ModelError(f"torch.onnx.export failed: {str(e).strip().splitlines()[0][:300]}"
                         ) from None


def _text_source(spec: _Text, *, small: bool, seed: int, realistic: bool) -> _Source:
    import torch

    vocab, seq_len = (_SMALL_VOCAB, 32) if small else (_VOCAB, 128)
    if small:
        spec = _Text(spec.family, spec.kind, spec.token_types, spec.dynamo, **_SMALL_TEXT)
    rng = np.random.default_rng(seed)
    calib = _sentences(32 if small else 64, seq_len=seq_len, vocab=vocab,
                       token_types=spec.token_types, rng=rng)
    val = _sentences(64 if small else 256, seq_len=seq_len, vocab=vocab,
                     token_types=spec.token_types, rng=rng)
    torch.manual_seed(seed)
    module = _text_module(spec, vocab=vocab, seq_len=seq_len)
    if realistic:
        _plant_outliers(spec, module.encoder)
    output = "last_hidden_state" if spec.kind == "encoder" else "sentence_embedding"
    return _Source(module, _text_names(spec), output, {0: "batch", 1: "sequence"},
                   spec.dynamo, calib, val)


# ------------------------------------------------------------------------ CNNs

_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)[:, None, None]
_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)[:, None, None]


def _crops(images: list[np.ndarray], n: int, *, size: int, rng: np.random.Generator,
           grid: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """``n`` normalised crops (N, 3, size, size) of ``images`` (H x W x 3 uint8) and their
    region labels: which image and which cell of a ``grid`` x ``grid`` division of it
    holds the crop's centre (``image * grid**2 + row * grid + column``)."""
    import torch

    out = np.empty((n, 3, size, size), dtype=np.float32)
    labels = np.empty(n, dtype=np.int64)
    for i in range(n):
        k = int(rng.integers(len(images)))
        img = images[k]
        h, w = img.shape[:2]
        side = int(rng.integers(64, min(256, h, w) + 1))
        y = int(rng.integers(0, h - side + 1))
        x = int(rng.integers(0, w - side + 1))
        crop = img[y:y + side, x:x + side]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        t = torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1)[None].float()
        t = torch.nn.functional.interpolate(t, size=(size, size), mode="bilinear",
                                            antialias=True, align_corners=False)
        out[i] = (t[0].numpy() / 255.0 - _MEAN) / _STD
        row, col = int(grid * (y + side / 2) / h), int(grid * (x + side / 2) / w)
        labels[i] = k * grid * grid + row * grid + col
    return out, labels


def _cnn_module(name: str, *, small: bool) -> nn.Module:
    tv = import_torchvision()
    classes = 10 if small else 1000
    width = {"mobilenet_v2": 0.5, "mobilenet_v3_small": 0.5} if small else {}
    kwargs: dict[str, Any] = {"weights": None, "num_classes": classes}
    if name in width:
        kwargs["width_mult"] = width[name]
    return getattr(tv.models, name)(**kwargs)


def _spread_batchnorm(model: nn.Module, rng: np.random.Generator) -> None:
    """Log-normal per-channel gains and a few near-dead channels in every BatchNorm."""
    import torch
    from torch import nn

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                gain = rng.lognormal(0.0, 0.8, c)
                dead = rng.random(c) < 0.03
                gain[dead] = rng.uniform(1e-3, 1e-2, int(dead.sum()))
                m.weight.copy_(torch.from_numpy(gain.astype(np.float32)))
                m.bias.copy_(torch.from_numpy(rng.normal(0.0, 0.25, c).astype(np.float32)))


def _reestimate_batchnorm(model: nn.Module, images: np.ndarray, batch: int = 64) -> None:
    """Running statistics recomputed over ``images`` (cumulative average), the rest of
    the model in eval mode (no dropout, no stochastic depth)."""
    import torch
    from torch import nn

    model.eval()
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    with torch.no_grad():
        for start in range(0, len(images), batch):
            model(torch.from_numpy(images[start:start + batch]))
    model.eval()


@dataclass(frozen=True)
class _Training:
    """The short supervised training that makes a CNN behave like a trained one."""

    size: int     # crop side while training (pixels)
    grid: int     # region labels: 2 images x grid x grid cells
    steps: int
    batch: int = 32
    lr: float = 2e-3


# Full size: 1200 steps at 96 px take 4-21 minutes per CNN on one core (x86-avx512-vnni).
# Mean top-1 probability on the validation crops after 300 / 1200 steps: mobilenet_v2
# 0.38 / 0.57, mobilenet_v3_small 0.45 / 0.63, efficientnet_b0 0.40 / 0.65, resnet18
# 0.64 / 0.76; the median top-1/top-2 logit gap of mobilenet_v2 goes from 0.32 to 0.91.
# After 300 steps, int8 needed 33 layers of mobilenet_v2 in float to keep 0.98 agreement
# (slower than float); after 1200, 6 (1.5x faster than float). Fewer steps or 64 px also
# leave the features more sensitive to weight rounding. The small size is only for tests.
_TRAINING = _Training(size=96, grid=4, steps=1200)
_TRAINING_SMALL = _Training(size=64, grid=2, steps=40, batch=16)


def _train_on_regions(model: nn.Module, images: list[np.ndarray], plan: _Training,
                      rng: np.random.Generator) -> None:
    """Train ``model`` briefly (AdamW, one-cycle learning rate) to tell which photograph
    and which grid cell of it a random crop comes from: a real task on natural-image
    statistics, so the weights take the shape training gives them. A randomly
    initialised depthwise network whose BatchNorm statistics are merely re-estimated
    amplifies any perturbation layer after layer (each random 3x3 depthwise filter passes
    little of a smooth image, and BatchNorm scales that back up, noise with it): int8
    rounding of the weights alone then moves its features by 3%, where a trained
    network's move by a few hundredths of a percent."""
    import torch
    from torch import nn

    opt = torch.optim.AdamW(model.parameters(), lr=plan.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=plan.lr,
                                                   total_steps=plan.steps)
    model.train()
    for _ in progress(range(plan.steps), "training on crop regions", total=plan.steps):
        x, y = _crops(images, plan.batch, size=plan.size, rng=rng, grid=plan.grid)
        loss = nn.functional.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y))
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
    model.eval()


def _cnn_source(name: str, *, small: bool, seed: int, realistic: bool) -> _Source:
    import torch
    from sklearn.datasets import load_sample_images

    size = 64 if small else 224
    rng = np.random.default_rng(seed)
    status("cutting image crops")
    images = load_sample_images().images
    fit, _ = _crops(images, 128 if small else 384, size=size, rng=rng)
    calib, _ = _crops(images, 64 if small else 128, size=size, rng=rng)
    val, _ = _crops(images, 64 if small else 300, size=size, rng=rng)
    torch.manual_seed(seed)
    model = _cnn_module(name, small=small)
    if realistic:
        _spread_batchnorm(model, rng)
        _train_on_regions(model, images, _TRAINING_SMALL if small else _TRAINING, rng)
    status("re-estimating BatchNorm statistics on the crops")
    _reestimate_batchnorm(model, fit)
    return _Source(model, ["input"], "logits", {0: "batch"}, False,
                   Dataset({"input": calib}), Dataset({"input": val}))


# ------------------------------------------------------------------- edgeloop zoo

def _build_zoo(name: str, out: Path, *, small: bool, seed: int) -> None:
    from edgeloop.data import load_builtin
    from edgeloop.zoo.train import TrainConfig, train_zoo_model

    train_zoo_model(name, out, config=TrainConfig(epochs=2 if small else 40, seed=seed))
    save_npz(out / "calib.npz", load_builtin("mnist1d", "calib"))
    save_npz(out / "val.npz", load_builtin("mnist1d", "val"))


# ------------------------------------------------------------------------ build

def _family(name: str) -> str:
    return "text" if name in _TEXT else "zoo" if name in _ZOO else "cnn"


def _kind(name: str) -> str:
    return _TEXT[name].kind if name in _TEXT else "classifier"


def _entry(name: str, out: Path) -> CorpusModel:
    kind = _kind(name)
    return CorpusModel(name, kind, "agreement" if kind == "classifier" else "cosine",
                       out / "model.onnx", out / "calib.npz", out / "val.npz")


def _recipe(name: str, small: bool, seed: int) -> dict[str, Any]:
    versions = {}
    for package in _VERSIONED:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {"name": name, "small": small, "seed": seed, "recipe": _RECIPE_VERSIONS[_family(name)],
            "versions": versions}


def _source(name: str, *, small: bool, seed: int, realistic: bool = True) -> _Source:
    """The torch model and data of a transformer or CNN entry; ``realistic=False`` skips
    the weight changes that make it behave like a pretrained model (tests compare)."""
    if name in _TEXT:
        return _text_source(_TEXT[name], small=small, seed=seed, realistic=realistic)
    return _cnn_source(name, small=small, seed=seed, realistic=realistic)


def _build_exported(name: str, out: Path, *, small: bool, seed: int) -> None:
    import torch

    from edgeloop.export import check_and_save

    src = _source(name, small=small, seed=seed)
    example = tuple(torch.from_numpy(src.calib.inputs[n][:2]) for n in src.names)
    status(f"exporting with torch.onnx.export(dynamo={src.dynamo})")
    proto = _export(src.module, example, src.names, src.output, dynamo=src.dynamo,
                    axes=src.axes)
    proto.producer_name = "edgeloop.zoo.corpus"
    feed = {n: src.val.inputs[n][:4] for n in src.names}
    with torch.no_grad():
        expected = src.module(*(torch.from_numpy(feed[n]) for n in src.names)).numpy()
    # Relative to the output's scale: logits of a decisive classifier are large.
    check_and_save(proto, feed, expected, out / "model.onnx",
                   atol=1e-3 * max(1.0, float(np.abs(expected).max())))
    save_npz(out / "calib.npz", src.calib)
    save_npz(out / "val.npz", src.val)


def build(name: str, out_dir: str | os.PathLike[str], *, small: bool = False,
          seed: int = 0) -> CorpusModel:
    """Build corpus entry ``name`` into ``out_dir`` (or reuse it) and describe it.

    ``out_dir`` is reused when its ``corpus.json`` records the same name, size, seed,
    corpus recipe and library versions. Otherwise the entry is built in a scratch folder
    inside ``out_dir`` and moved into place only when complete: on an error, ``out_dir``
    keeps what it held before. Nothing is written outside ``out_dir`` and the system temp
    folder. Raises :class:`UsageError` for an unknown name.
    """
    if name not in CORPUS:
        raise one_of("name", CORPUS, name)
    if not isinstance(seed, int) or seed < 0:
        raise UsageError(f"`seed` must be a non-negative integer; got {seed!r}")
    out = Path(out_dir)
    recipe = _recipe(name, small, seed)
    entry = _entry(name, out)
    if _reusable(out, recipe, entry):
        return entry
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".building-", dir=out))
    try:
        status(f"building corpus model {name}{' (small)' if small else ''}")
        start = time.perf_counter()
        build_entry = _build_zoo if name in _ZOO else _build_exported
        build_entry(name, stage, small=small, seed=seed)
        recipe["build_seconds"] = round(time.perf_counter() - start, 1)
        (out / RECIPE).unlink(missing_ok=True)
        for f in stage.iterdir():
            os.replace(f, out / f.name)
        write_text_atomic(out / RECIPE, json.dumps(recipe, indent=2) + "\n")
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        if created and not (out / RECIPE).exists():
            shutil.rmtree(out, ignore_errors=True)
    return entry


def _reusable(out: Path, recipe: dict[str, Any], entry: CorpusModel) -> bool:
    try:
        recorded = json.loads((out / RECIPE).read_text())
    except (OSError, ValueError):
        return False
    recorded.pop("build_seconds", None)
    return (recorded == recipe
            and all(p.is_file() for p in (entry.model, entry.calib, entry.val)))


# ----------------------------------------------------------------------- stats

def stats(entry: CorpusModel, *, samples: int = 64) -> dict[str, float]:
    """What makes ``entry`` realistic, measured on its exported model and ``samples``
    validation inputs (onnxruntime; no torch needed):

    - ``params``, ``size_mb``, and ``build_seconds`` from its recipe;
    - transformers: ``layernorm_channel_ratio`` (median over LayerNormalization outputs,
      and ``layernorm_channel_ratio_max``): per channel the largest ``|x|`` over the real
      (unpadded) tokens, largest channel over median channel, the measure
      :class:`edgeloop.zoo.bert.OutlierStats` uses; ``output_finite`` (1.0 when every
      output is finite); embedders: ``mean_pairwise_cosine`` between different inputs'
      embeddings (1.0 would mean all identical);
    - classifiers: ``median_top1_prob`` (median top-1 softmax probability);
      ``depthwise_range_ratio`` (median over depthwise convolutions, and ``_max``): per
      output channel the largest ``|w|`` of the folded weights, largest over smallest;
      ``weight_rounding_agreement``: top-1 agreement with itself once every Conv and Gemm
      weight is rounded to int8 per output channel (trained networks shrug this off;
      randomly initialised depthwise ones amplify it).
    """
    from edgeloop._onnx import session
    from edgeloop.measure import predict

    model = onnx.load(entry.model)
    val = load_npz(entry.val).take(slice(0, samples))
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    out: dict[str, float] = {
        "params": float(sum(a.size for a in inits.values())),
        "size_mb": entry.model.stat().st_size / 1e6,
    }
    with contextlib.suppress(OSError, ValueError, KeyError):
        out["build_seconds"] = float(json.loads(
            (entry.model.parent / RECIPE).read_text())["build_seconds"])
    if entry.kind == "classifier":
        logits = predict(session(model), val).astype(np.float64)
        p = np.exp(logits - logits.max(1, keepdims=True))
        out["median_top1_prob"] = float(np.median(p.max(1) / p.sum(1)))
        rounded = _round_weights_int8(model, inits)
        out["weight_rounding_agreement"] = float(
            (predict(session(rounded), val).argmax(1) == logits.argmax(1)).mean())
        ratios = _depthwise_ratios(model, inits)
        if ratios:
            out["depthwise_range_ratio"] = float(np.median(ratios))
            out["depthwise_range_ratio_max"] = float(np.max(ratios))
        return out
    norms = [n.output[0] for n in model.graph.node if n.op_type == "LayerNormalization"]
    if not norms:
        raise ModelError(f"{entry.model}: no LayerNormalization nodes to measure")
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT,
                                                                 None) for n in norms)
    sess = session(probe)
    peaks: list[np.ndarray] = []
    outputs = []
    for start in range(0, len(val), 16):
        feed = {k: v[start:start + 16] for k, v in val.inputs.items()}
        result = sess.run(None, feed)
        outputs.append(result[0])
        real = feed["attention_mask"].astype(bool)
        batch_peaks = [np.abs(a[real]).max(0) for a in result[1:]]
        peaks = batch_peaks if not peaks else [np.maximum(a, b) for a, b in
                                               zip(peaks, batch_peaks, strict=True)]
    ratios = np.array([p.max() / max(float(np.median(p)), 1e-30) for p in peaks])
    out["layernorm_channel_ratio"] = float(np.median(ratios))
    out["layernorm_channel_ratio_max"] = float(ratios.max())
    y = np.concatenate(outputs)
    out["output_finite"] = float(np.isfinite(y).all())
    if entry.kind == "embedder":
        e = y / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-30)
        sim = e @ e.T
        out["mean_pairwise_cosine"] = float(sim[~np.eye(len(e), dtype=bool)].mean())
    return out


def _round_weights_int8(model: onnx.ModelProto,
                        inits: dict[str, np.ndarray]) -> onnx.ModelProto:
    """``model`` with every Conv and Gemm weight rounded to int8 per output channel."""
    from edgeloop.compress.equalize import quantize_weight, weight_axis

    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes = {n.input[1]: n for n in out.graph.node
             if n.op_type in ("Conv", "Gemm") and len(n.input) > 1 and n.input[1] in inits}
    for init in out.graph.initializer:
        if init.name in nodes:
            w, _ = quantize_weight(inits[init.name], axis=weight_axis(nodes[init.name]),
                                   per_channel=True, reduce_range=False)
            init.CopyFrom(onnx.numpy_helper.from_array(w.astype(np.float32), init.name))
    return out


def _depthwise_ratios(model: onnx.ModelProto, inits: dict[str, np.ndarray]) -> list[float]:
    """Per depthwise Conv: largest over smallest per-channel max ``|w|``."""
    ratios = []
    for node in model.graph.node:
        if node.op_type != "Conv" or node.input[1] not in inits:
            continue
        w = inits[node.input[1]]
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        if group > 1 and group == w.shape[0] and w.shape[1] == 1:
            peak = np.abs(w.reshape(len(w), -1)).max(1)
            ratios.append(float(peak.max() / max(float(peak.min()), 1e-30)))
    return ratios
