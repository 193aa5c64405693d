"""A BERT-style encoder classifier, built from a ``transformers`` BertConfig (no download).

It exists so that transformer quantization is measured on a real encoder graph:
embeddings, multi-head self-attention with a padding mask, GELU feed-forward blocks,
LayerNorm, a pooler and a classifier head. Random weights cover the ops; a training run
on MNIST-1D turned into token sequences gives trained weights. How outlier-heavy the
activations really are is measured by :func:`activation_outliers` (after the default
two epochs: mild, far from a large pretrained BERT's).

MNIST-1D as tokens: each value of a 40-point signal is binned into one of ``bins``
tokens, a ``[CLS]`` token is put in front, and the sequence is padded with ``[PAD]`` to
``seq_len`` (``attention_mask`` 0 there), the way text batches reach a deployed BERT. The
model's inputs are ``input_ids`` and ``attention_mask`` (int64, shape ``(N, seq_len)``);
its output is ``logits`` (N, 10). Training runs on the unpadded 41 tokens: with the pads
masked out the ``[CLS]`` output is the same, and it is three times cheaper.

``transformers`` is the optional extra ``edgeloop[transformers]``.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from edgeloop._io import atomic_path
from edgeloop._torchvision import ensure_importable
from edgeloop.data import Dataset, load_builtin
from edgeloop.errors import ModelError, UsageError

__all__ = [
    "BertClassifier",
    "BertSpec",
    "OutlierStats",
    "activation_outliers",
    "export_bert",
    "load_bert",
    "mnist1d_tokens",
    "train_bert",
]

INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAME = "logits"
_SPECIAL = 2   # token 0 is [PAD], token 1 is [CLS]; value bins start at 2


@dataclass(frozen=True)
class BertSpec:
    """The encoder's shape. The defaults are a small BERT (4 layers, hidden 256)."""

    layers: int = 4
    hidden: int = 256
    heads: int = 4
    intermediate: int = 1024
    seq_len: int = 128        # tokens per sequence, [CLS] included
    bins: int = 64            # value bins, i.e. vocabulary size minus the special tokens
    num_labels: int = 10

    def __post_init__(self) -> None:
        if self.hidden % self.heads:
            raise UsageError(f"`hidden` ({self.hidden}) must be a multiple of `heads` "
                             f"({self.heads})")
        if self.seq_len < 2:
            raise UsageError(f"`seq_len` must be at least 2; got {self.seq_len}")


class BertClassifier(nn.Module):
    """``BertForSequenceClassification`` with positional ``(input_ids, attention_mask)``
    inputs and a plain ``logits`` tensor output, which is what an ONNX export needs."""

    def __init__(self, spec: BertSpec | None = None, **spec_fields: int) -> None:
        super().__init__()
        try:
            ensure_importable()   # transformers imports torchvision when it is installed
            from transformers import BertConfig, BertForSequenceClassification
        except ImportError:  # the optional extra is missing
            raise UsageError("the BERT encoder needs `transformers`: pip install "
                             "'edgeloop[transformers]'") from None
        self.spec = spec or BertSpec(**spec_fields)
        s = self.spec
        config = BertConfig(
            vocab_size=s.bins + _SPECIAL, hidden_size=s.hidden, num_hidden_layers=s.layers,
            num_attention_heads=s.heads, intermediate_size=s.intermediate,
            max_position_embeddings=s.seq_len, num_labels=s.num_labels, pad_token_id=0,
            hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
            attn_implementation="eager")
        self.bert = BertForSequenceClassification(config)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).logits


def mnist1d_tokens(split: str, *, seq_len: int = 128, bins: int = 64) -> Dataset:
    """MNIST-1D ``split`` as token sequences (see the module docstring) with labels."""
    data = load_builtin("mnist1d", split)
    x = data.inputs["x"]
    if seq_len < x.shape[1] + 1:
        raise UsageError(f"`seq_len` must be at least {x.shape[1] + 1} for MNIST-1D tokens; "
                         f"got {seq_len}")
    # Bin edges fixed from the signal's typical range, so every split uses the same tokens.
    edges = np.linspace(-3.0, 3.0, bins - 1)
    ids = np.zeros((len(x), seq_len), dtype=np.int64)
    ids[:, 0] = 1
    ids[:, 1:x.shape[1] + 1] = np.digitize(x, edges) + _SPECIAL
    mask = (ids > 0).astype(np.int64)
    return Dataset({"input_ids": ids, "attention_mask": mask}, data.labels)


def export_bert(model: BertClassifier, sample: Dataset, out: str | os.PathLike[str], *,
                opset: int = 17, atol: float = 1e-4) -> float:
    """Export ``model`` to ONNX at ``out`` (free batch axis, fixed sequence length).

    Uses the TorchScript exporter, whose attention and LayerNorm subgraphs are the ones
    onnxruntime's transformer fusions recognise. The export is run in onnxruntime on
    ``sample`` and compared with PyTorch; returns the max absolute difference and raises
    :class:`ModelError` (writing nothing) above ``atol``.
    """
    model = model.eval()
    args = tuple(torch.from_numpy(sample.inputs[n]) for n in INPUT_NAMES)
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model, args, buf, input_names=list(INPUT_NAMES), output_names=[OUTPUT_NAME],
                dynamic_axes={n: {0: "batch"} for n in (*INPUT_NAMES, OUTPUT_NAME)},
                opset_version=opset, dynamo=False)
    except Exception as e:
        raise ModelError(f"torch.onnx.export failed: {str(e).splitlines()[0][:300]}") from None
    from edgeloop.export import check_and_save

    with torch.no_grad():
        expected = model(*args).numpy()
    return check_and_save(onnx.load_from_string(buf.getvalue()),
                          {n: sample.inputs[n] for n in INPUT_NAMES}, expected, out, atol=atol)


@torch.no_grad()
def _accuracy(model: nn.Module, data: Dataset, batch: int = 256) -> float:
    model.eval()
    hits = 0
    for start in range(0, len(data), batch):
        args = [torch.from_numpy(data.inputs[n][start:start + batch]) for n in INPUT_NAMES]
        hits += int((model(*args).argmax(1).numpy()
                     == data.labels[start:start + batch]).sum())  # type: ignore[index]
    return hits / len(data)


def train_bert(out_dir: str | os.PathLike[str], *, spec: BertSpec | None = None,
               epochs: int = 2, batch_size: int = 64, lr: float = 1e-3,
               seed: int = 0) -> dict[str, float]:
    """Train a :class:`BertClassifier` on MNIST-1D tokens (AdamW, one-cycle schedule) and
    write ``out_dir/model.pt`` (``{"spec", "state_dict"}``) and ``out_dir/model.onnx``.

    A few epochs take a few minutes on a laptop CPU with the default :class:`BertSpec`.
    Returns validation and test accuracy.
    """
    from edgeloop._progress import progress

    spec = spec or BertSpec()
    torch.manual_seed(seed)
    model = BertClassifier(spec)
    train_data = mnist1d_tokens("train", seq_len=spec.seq_len, bins=spec.bins)
    used = int(train_data.inputs["attention_mask"].sum(1).max())
    ids = torch.from_numpy(train_data.inputs["input_ids"][:, :used])
    mask = torch.from_numpy(train_data.inputs["attention_mask"][:, :used])
    labels = torch.from_numpy(train_data.labels)  # type: ignore[arg-type]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    steps = epochs * -(-len(ids) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()
    order = [torch.randperm(len(ids), generator=gen) for _ in range(epochs)]
    batches = [idx for perm in order for idx in perm.split(batch_size)]
    model.train()
    for idx in progress(batches, "training bert", total=len(batches)):
        opt.zero_grad()
        loss_fn(model(ids[idx], mask[idx]), labels[idx]).backward()
        opt.step()
        sched.step()
    model.eval()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "model.pt") as tmp:
        torch.save({"spec": asdict(spec), "state_dict": model.state_dict()}, tmp)
    export_bert(model, train_data.take(slice(0, 2)), out / "model.onnx")
    val = mnist1d_tokens("val", seq_len=spec.seq_len, bins=spec.bins)
    test = mnist1d_tokens("test", seq_len=spec.seq_len, bins=spec.bins)
    return {"val_accuracy": _accuracy(model, val), "test_accuracy": _accuracy(model, test)}


def load_bert(path: str | os.PathLike[str]) -> BertClassifier:
    """Load a checkpoint written by :func:`train_bert` (weights only, no code runs)."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"torch model {str(path)!r} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        model = BertClassifier(BertSpec(**ckpt["spec"]))
        model.load_state_dict(ckpt["state_dict"])
    except (KeyError, TypeError, RuntimeError, OSError) as e:
        raise ModelError(f"{str(path)!r} is not a BERT checkpoint from train_bert "
                         f"({type(e).__name__})") from None
    return model.eval()


# Per layer, where activations are recorded: the FFN's GELU output (the input of its
# down-projection), the FFN output before the residual, and the two LayerNorm outputs.
_SITES = {"ffn-gelu": "intermediate", "ffn-out": "output.dense",
          "attn-layernorm": "attention.output.LayerNorm", "ffn-layernorm": "output.LayerNorm"}


@dataclass(frozen=True)
class OutlierStats:
    """How outlier-heavy one activation tensor is, over the real (unpadded) tokens.

    ``channel_ratio`` is the largest per-channel max ``|a|`` over the median per-channel
    max ``|a|``: a per-tensor int8 scale is set by the largest channel, so the typical
    channel gets ``256 / channel_ratio`` levels. ``kurtosis`` is Pearson's (3 for a
    normal distribution) over every value.
    """

    layer: int
    site: str
    channels: int
    max_abs: float
    channel_ratio: float
    kurtosis: float


@torch.no_grad()
def activation_outliers(model: BertClassifier, data: Dataset, *,
                        batch: int = 64) -> list[OutlierStats]:
    """:class:`OutlierStats` at each encoder layer's FFN and LayerNorm outputs on ``data``."""
    model = model.eval()
    recorded: dict[tuple[int, str], list[np.ndarray]] = {}
    layers = model.bert.bert.encoder.layer
    hooks = []
    current_mask: list[np.ndarray] = []

    def hook(key: tuple[int, str]):  # type: ignore[no-untyped-def]
        def record(module: nn.Module, args: object, out: torch.Tensor) -> None:
            recorded.setdefault(key, []).append(out.numpy()[current_mask[0]])
        return record

    for i, layer in enumerate(layers):
        for site, path in _SITES.items():
            hooks.append(layer.get_submodule(path).register_forward_hook(hook((i, site))))
    try:
        for start in range(0, len(data), batch):
            args = [torch.from_numpy(data.inputs[n][start:start + batch]) for n in INPUT_NAMES]
            current_mask[:] = [args[1].numpy().astype(bool)]
            model(*args)
    finally:
        for h in hooks:
            h.remove()
    stats = []
    for (i, site), chunks in recorded.items():
        a = np.concatenate(chunks).astype(np.float64)          # (tokens, channels)
        channel_max = np.abs(a).max(axis=0)
        centred = a - a.mean()
        kurt = float((centred ** 4).mean() / max((centred ** 2).mean() ** 2, 1e-30))
        stats.append(OutlierStats(i, site, a.shape[1], float(channel_max.max()),
                                  float(channel_max.max() / max(np.median(channel_max), 1e-30)),
                                  kurt))
    return stats
