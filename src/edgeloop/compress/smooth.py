"""Activation smoothing: move activation outliers into the weights before int8.

Pretrained transformers carry a few hidden channels whose activations are tens of times
larger than the rest. One int8 scale per activation tensor must cover them, so every
other channel keeps only a handful of levels. SmoothQuant (Xiao et al. 2023) divides
each input channel ``j`` of a matrix product by ``s_j`` and multiplies row ``j`` of the
weight by the same ``s_j``: the product is unchanged, the activation's channels become
even, and the weight (quantized per output channel) absorbs the spread, where int8 has
room for it. ``s_j = max|X_j|**alpha / max|W_j|**(1 - alpha)``.

Where the activation feeds only matrix products and comes straight from a
LayerNormalization, the division folds into its scale and bias. Otherwise (BERT's
post-LN blocks also feed the LayerNorm output to the residual add) one ``Mul`` by
``1/s`` is inserted in front of the products that share the activation. That Mul is not
free: on the corpus MiniLM (``dynamo=True`` export, x86-avx512-vnni, dynamic int8) the
Muls in front of its two FFN-down products, whose inputs' largest channel was 4-4.3x
the median, cost about 4% of batch-1 latency and bought no fidelity (mean cosine 0.99951
with them, 0.99950 without). So an input that needs a Mul is smoothed only from a larger
spread (``mul_min_ratio``) than one whose division folds (``min_ratio``).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgeloop._onnx import probe_session, sort_nodes
from edgeloop.compress.base import Pass, PassContext
from edgeloop.data import Dataset, batches
from edgeloop.errors import UsageError

__all__ = ["Smooth", "channel_max", "smooth"]


def _constant_weights(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {i.name: i for i in model.graph.initializer if len(i.dims) == 2}


def _groups(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    """Activation tensor -> the MatMuls with a constant 2-D weight that read it."""
    weights = _constant_weights(model)
    groups: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in weights:
            groups[node.input[0]].append(node)
    return dict(groups)


def channel_max(model: onnx.ModelProto, data: Dataset, tensors: list[str], *,
                batch_size: int = 16) -> dict[str, np.ndarray]:
    """Largest ``|value|`` of each channel (last axis) of the named intermediate tensors,
    over every sample of ``data``, in batches of ``batch_size``."""
    sess = probe_session(model, tensors)
    names = [o.name for o in sess.get_outputs()]
    wanted = [names.index(t) for t in tensors]
    inputs = [i.name for i in sess.get_inputs()]
    out: dict[str, np.ndarray] = {}
    for feed in batches(data, batch_size):
        values = sess.run(None, {k: feed[k] for k in inputs})
        for t, i in zip(tensors, wanted, strict=True):
            v = np.abs(values[i]).reshape(-1, values[i].shape[-1]).max(0)
            out[t] = v if t not in out else np.maximum(out[t], v)
    return out


def smooth(model: onnx.ModelProto, data: Dataset, *, alpha: float = 0.5,
           min_ratio: float = 4.0, mul_min_ratio: float = 8.0,
           ) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of ``model`` with SmoothQuant scales migrated into the weights of every
    MatMul group whose input's largest channel is at least ``min_ratio`` times its median
    channel (``mul_min_ratio`` times where the division needs an inserted ``Mul``); also
    the smoothed activation names. Float outputs are unchanged up to rounding."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    groups = _groups(out)
    if not groups:
        return out, []
    stats = channel_max(model, data, list(groups))
    graph = out.graph
    inits = {i.name: i for i in graph.initializer}
    users: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    producer: dict[str, onnx.NodeProto] = {}
    for node in graph.node:
        for i in node.input:
            users[i].append(node)
        for o in node.output:
            producer[o] = node
    graph_outputs = {o.name for o in graph.output}
    smoothed = []
    for tensor, nodes in groups.items():
        x_max = stats[tensor].astype(np.float64)
        src = producer.get(tensor)
        folds = (len(users[tensor]) == len(nodes) and tensor not in graph_outputs
                 and src is not None and src.op_type == "LayerNormalization"
                 and all(i in inits for i in src.input[1:3]))
        ratio = min_ratio if folds else mul_min_ratio
        if x_max.size < 2 or x_max.max() < ratio * max(np.median(x_max), 1e-12):
            continue
        ws = [numpy_helper.to_array(inits[n.input[1]]).astype(np.float64) for n in nodes]
        if any(w.shape[0] != x_max.size for w in ws):
            continue
        w_max = np.max([np.abs(w).max(1) for w in ws], axis=0)
        s = np.where((x_max > 0) & (w_max > 0),
                     x_max ** alpha / np.maximum(w_max, 1e-12) ** (1 - alpha), 1.0)
        s = np.clip(s, 1e-4, 1e4)
        for n, w in zip(nodes, ws, strict=True):
            name = f"{n.input[1]}_smoothed"
            if name not in inits:   # a weight shared by two products is scaled once
                t = numpy_helper.from_array((w * s[:, None]).astype(np.float32), name)
                graph.initializer.append(t)
                inits[name] = t
            n.input[1] = name
        if folds and src is not None:
            for k in (1, 2):
                if k < len(src.input) and src.input[k]:
                    v = numpy_helper.to_array(inits[src.input[k]]).astype(np.float64) / s
                    name = f"{src.input[k]}_smoothed_{len(smoothed)}"
                    graph.initializer.append(numpy_helper.from_array(v.astype(np.float32),
                                                                     name))
                    src.input[k] = name
        else:
            scale = f"{tensor}_smooth_scale"
            graph.initializer.append(numpy_helper.from_array((1 / s).astype(np.float32),
                                                             scale))
            scaled = f"{tensor}_smoothed"
            graph.node.append(helper.make_node("Mul", [tensor, scale], [scaled],
                                               name=f"{tensor}_Smooth"))
            for n in nodes:
                n.input[0] = scaled
        smoothed.append(tensor)
    _drop_unused_initializers(graph)
    sort_nodes(out.graph)
    return out, smoothed


def _drop_unused_initializers(graph: onnx.GraphProto) -> None:
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    keep = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


@dataclass
class Smooth(Pass):
    """SmoothQuant scale migration as a pass (float in, float out); see the module
    docstring."""

    alpha: float = 0.5        # 0: all spread stays in the activations, 1: all in weights
    min_ratio: float = 4.0    # smooth only inputs whose max channel >= this x the median
    mul_min_ratio: float = 8.0  # the same where smoothing needs an inserted Mul
    name: ClassVar[str] = "smooth"
    needs_calib: ClassVar[bool] = True
    smoothed_: list[str] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise UsageError(f"`alpha` must be in [0, 1]; got {self.alpha}")

    def apply(self, model: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto:
        out, self.smoothed_ = smooth(model, ctx.require_calib(self.name), alpha=self.alpha,
                                     min_ratio=self.min_ratio,
                                     mul_min_ratio=self.mul_min_ratio)
        return out
