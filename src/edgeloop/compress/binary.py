"""1-bit weights: sign(W) times a per-output-channel scale, bit-packed in the file.

Each Conv, Gemm and MatMul weight ``W`` becomes ``alpha[o] * sign(W[o])``. The signs are
stored eight to a byte (``np.packbits``) in a uint8 initializer, followed by a small
unpacking subgraph (BitShift, BitwiseAnd, Cast, Mul) whose inputs are all constant, so
onnxruntime's constant folding expands it once when the session loads: the file shrinks
about 32x and inference runs the ordinary float kernels.

``alpha`` defaults to ``mean(|W[o]|)``, the L2-optimal scale for a sign approximation
(Rastegari et al., XNOR-Net, 2016). Given calibration data, each layer in turn gets the
per-channel affine (scale and bias) that best maps its binarized output onto the float
model's output for the same sample, correcting the error the earlier binarized layers
pass on (bias correction, Nagel et al., "Data-Free Quantization", 2019, fitted on data).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgeloop._onnx import name_nodes, session
from edgeloop.compress.base import Pass, PassContext
from edgeloop.data import Dataset, batches
from edgeloop.errors import ModelError
from edgeloop.measure import PREDICT_BATCH

_OPS = ("Conv", "Gemm", "MatMul")


@dataclass(frozen=True)
class _Layer:
    node: str
    op: str
    weight: str
    output: str
    channel_axis: int    # output channels axis in the weight
    out_axis: int        # output channels axis in the node's output (-1: last)


def _find_layers(model: onnx.ModelProto) -> list[_Layer]:
    inits = {i.name for i in model.graph.initializer}
    layers = []
    for n in model.graph.node:
        if n.op_type not in _OPS or len(n.input) < 2 or n.input[1] not in inits:
            continue
        if n.op_type == "Conv":
            axis, out_axis = 0, 1
        elif n.op_type == "Gemm":
            trans_b = next((a.i for a in n.attribute if a.name == "transB"), 0)
            axis, out_axis = (0 if trans_b else 1), -1
        else:
            axis, out_axis = 1, -1
        layers.append(_Layer(n.name, n.op_type, n.input[1], n.output[0], axis, out_axis))
    return layers


def _channels_first(w: np.ndarray, axis: int) -> np.ndarray:
    return np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)


_SHARED = "edgeloop_bin"   # prefix of the constants every unpacking subgraph shares


def _shared_constants() -> list[onnx.TensorProto]:
    c = lambda name, arr: numpy_helper.from_array(arr, f"{_SHARED}_{name}")  # noqa: E731
    return [
        c("shifts", np.arange(7, -1, -1, dtype=np.uint8)),
        c("one", np.array(1, np.uint8)),
        c("axis2", np.array([2], np.int64)),
        c("zero", np.array([0], np.int64)),
        c("axis1", np.array([1], np.int64)),
        c("two", np.array(2.0, np.float32)),
        c("fone", np.array(1.0, np.float32)),
    ]


def _unpack_nodes(prefix: str, w_shape: tuple[int, ...], axis: int, packed: np.ndarray,
                  alpha: np.ndarray) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto], str]:
    """Nodes that rebuild ``alpha * sign`` in the original weight layout from packed bits."""
    o = w_shape[axis]
    moved = (o, *[d for i, d in enumerate(w_shape) if i != axis])
    m = int(np.prod(moved[1:]))
    p = lambda name: f"{prefix}_{name}"  # noqa: E731
    s = lambda name: f"{_SHARED}_{name}"  # noqa: E731
    inits = [
        numpy_helper.from_array(packed, p("bits")),
        numpy_helper.from_array(np.array([o, -1], np.int64), p("flat")),
        numpy_helper.from_array(np.array([m], np.int64), p("ends")),
        numpy_helper.from_array(alpha.reshape(o, 1).astype(np.float32), p("alpha")),
        numpy_helper.from_array(np.array(moved, np.int64), p("shape")),
    ]
    nodes = [
        helper.make_node("Unsqueeze", [p("bits"), s("axis2")], [p("u")]),
        helper.make_node("BitShift", [p("u"), s("shifts")], [p("s")], direction="RIGHT"),
        helper.make_node("BitwiseAnd", [p("s"), s("one")], [p("b")]),
        helper.make_node("Reshape", [p("b"), p("flat")], [p("r")]),
        helper.make_node("Slice", [p("r"), s("zero"), p("ends"), s("axis1")], [p("t")]),
        helper.make_node("Cast", [p("t")], [p("f")], to=TensorProto.FLOAT),
        helper.make_node("Mul", [p("f"), s("two")], [p("f2")]),
        helper.make_node("Sub", [p("f2"), s("fone")], [p("sign")]),
        helper.make_node("Mul", [p("sign"), p("alpha")], [p("scaled")]),
        helper.make_node("Reshape", [p("scaled"), p("shape")], [p("w")]),
    ]
    result = p("w")
    if axis != 0:
        perm = list(range(1, len(w_shape)))
        perm.insert(axis, 0)
        nodes.append(helper.make_node("Transpose", [result], [p("wt")], perm=perm))
        result = p("wt")
    for i, n in enumerate(nodes):
        n.name = f"{prefix}_unpack{i}"
    return nodes, inits, result


def _outputs(model: onnx.ModelProto, names: list[str], data: Dataset) -> list[np.ndarray]:
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
                              for n in names)
    sess = session(probe)
    chunks = [sess.run(names, feed) for feed in batches(data, PREDICT_BATCH)]
    return [np.concatenate([c[i] for c in chunks]) for i in range(len(names))]


def _per_channel(y: np.ndarray, out_axis: int) -> np.ndarray:
    y = np.moveaxis(y, out_axis, -1)
    return y.reshape(-1, y.shape[-1]).astype(np.float64)


_UNPACK_OPSET = 18   # BitwiseAnd, which unpacks the sign bits, exists from opset 18


def _prepared(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` at an opset that has BitwiseAnd, in which every node has a name
    (layers are found by name; hand-built graphs often leave names empty)."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < _UNPACK_OPSET:
        out = onnx.version_converter.convert_version(model, _UNPACK_OPSET)
    else:
        out = onnx.ModelProto()
        out.CopyFrom(model)
    name_nodes(out.graph, "edgeloop_bin_node")
    return out


@dataclass
class Binary(Pass):
    """1-bit sign weights with a per-output-channel scale, bit-packed in the file.

    ``refit``: with calibration data, fit each layer's per-channel scale and bias to the
    float model's outputs (layer by layer); without it, scale = mean |W| per channel.
    """

    refit: bool = True
    name: ClassVar[str] = "binary"

    def apply(self, model: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto:
        model = _prepared(model)
        layers = _find_layers(model)
        if not layers:
            raise ModelError("binary found no Conv, Gemm or MatMul with constant weights")
        calib = ctx.calib if self.refit else None
        reference = (_outputs(model, [la.output for la in layers], calib)
                     if calib is not None else None)
        out = onnx.ModelProto()
        out.CopyFrom(model)
        out.graph.initializer.extend(_shared_constants())
        for k, layer in enumerate(layers):
            self._binarize(out, layer, None if reference is None else reference[k], calib)
        onnx.checker.check_model(out)
        return out

    def _binarize(self, model: onnx.ModelProto, layer: _Layer, target: np.ndarray | None,
                  calib: Dataset | None) -> None:
        graph = model.graph
        inits = {i.name: i for i in graph.initializer}
        node = next(n for n in graph.node if n.name == layer.node)
        w = numpy_helper.to_array(inits[layer.weight]).astype(np.float32)
        bias_name = (node.input[2] if node.op_type != "MatMul" and len(node.input) > 2
                     and node.input[2] in inits else None)
        bias = (np.zeros(w.shape[layer.channel_axis], np.float32) if bias_name is None
                else numpy_helper.to_array(inits[bias_name]).astype(np.float32))
        flat = _channels_first(w, layer.channel_axis)
        signs = flat >= 0
        alpha = np.abs(flat).mean(axis=1)
        if target is not None and calib is not None:
            alpha, bias = self._refit(model, layer, w, signs, bias_name, target, calib)
        nodes, new_inits, w_out = _unpack_nodes(
            f"{layer.node}_bin", w.shape, layer.channel_axis, np.packbits(signs, axis=1), alpha)
        node.input[1] = w_out
        graph.initializer.remove(inits[layer.weight])
        graph.initializer.extend(new_inits)
        if bias_name is not None:
            inits[bias_name].CopyFrom(numpy_helper.from_array(bias, bias_name))
        elif bias.any():
            self._add_bias(graph, node, layer, bias)
        pos = list(graph.node).index(node)
        for i, n in enumerate(nodes):
            graph.node.insert(pos + i, n)

    @staticmethod
    def _refit(model: onnx.ModelProto, layer: _Layer, w: np.ndarray, signs: np.ndarray,
               bias_name: str | None, target: np.ndarray,
               calib: Dataset) -> tuple[np.ndarray, np.ndarray]:
        """Least-squares per-channel scale and bias mapping the sign layer's output (on the
        inputs the earlier binarized layers produce) onto the float layer's output."""
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        inits = {i.name: i for i in probe.graph.initializer}
        unit = np.where(signs, 1.0, -1.0).astype(np.float32)
        unit = np.moveaxis(unit.reshape(np.moveaxis(w, layer.channel_axis, 0).shape), 0,
                           layer.channel_axis)
        inits[layer.weight].CopyFrom(numpy_helper.from_array(unit, layer.weight))
        if bias_name is not None:
            zero = np.zeros(w.shape[layer.channel_axis], np.float32)
            inits[bias_name].CopyFrom(numpy_helper.from_array(zero, bias_name))
        (s,) = _outputs(probe, [layer.output], calib)
        s, y = _per_channel(s, layer.out_axis), _per_channel(target, layer.out_axis)
        s_c, y_c = s - s.mean(0), y - y.mean(0)
        var = (s_c**2).mean(0)
        alpha = np.where(var > 0, (s_c * y_c).mean(0) / np.maximum(var, 1e-12),
                         np.abs(_channels_first(w, layer.channel_axis)).mean(axis=1))
        alpha = np.maximum(alpha, 0.0)
        bias = y.mean(0) - alpha * s.mean(0)
        return alpha.astype(np.float32), bias.astype(np.float32)

    @staticmethod
    def _add_bias(graph: onnx.GraphProto, node: onnx.NodeProto, layer: _Layer,
                  bias: np.ndarray) -> None:
        """Give a bias-less layer the fitted bias: Conv takes a third input; a MatMul gets
        an Add after it."""
        name = f"{layer.node}_bin_bias"
        graph.initializer.append(numpy_helper.from_array(bias, name))
        if node.op_type == "Conv":
            node.input.append(name)
            return
        raw = f"{layer.output}_bin_raw"
        node.output[0] = raw
        graph.node.insert(list(graph.node).index(node) + 1, helper.make_node(
            "Add", [raw, name], [layer.output], name=f"{layer.node}_bin_add"))
