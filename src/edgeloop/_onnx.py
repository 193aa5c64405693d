"""Loading ONNX models and creating onnxruntime sessions, with errors in edgeloop's words."""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from edgeloop.data import InputSpec
from edgeloop.errors import ModelError

_ORT_TYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_,
}


def load_model(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """Load and structurally check an ONNX file.

    A model saved with external data (weights in files beside it, as exporters write
    large models) is checked in its path form, which finds those files relative to the
    model and works past protobuf's 2 GB limit, then loaded whole into memory: what
    edgeloop writes from it is one self-contained ``.onnx``.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model file {str(path)!r} does not exist")
    try:
        onnx.checker.check_model(str(path))
        model = onnx.load(path)
    except Exception as e:  # onnx raises DecodeError, ValidationError, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"{str(path)!r} is not a valid ONNX model ({first[:200]})") from None
    if not model.graph.node:
        raise ModelError(f"{str(path)!r} is not a valid ONNX model (its graph has no nodes)")
    return model


def session(model: onnx.ModelProto | str | os.PathLike[str], *, threads: int = 0,
            level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
            optimized_path: str | None = None, spin: bool = True,
            profile: str | None = None) -> ort.InferenceSession:
    """An onnxruntime CPU session; ``threads=0`` lets onnxruntime choose. ``spin=False``
    turns the intra-op pool's spin-waiting off, for servers that run many small requests
    on cores their event loop needs. ``profile`` turns onnxruntime's profiler on, its
    trace written under that path prefix by ``end_profiling()``."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = level
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if optimized_path:
        opts.optimized_model_filepath = optimized_path
    if profile:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    try:
        return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime's Fail / InvalidGraph / NotImplemented ...
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        ir = re.search(r"Unsupported model IR version: (\d+), max supported IR version: (\d+)",
                       first)
        if ir:
            raise ModelError(
                f"the model is ONNX IR version {ir[1]} and onnxruntime {ort.__version__} reads "
                f"up to {ir[2]}: upgrade onnxruntime, or save the model with an onnx release "
                f"that writes IR version {ir[2]} or older") from None
        raise ModelError(f"onnxruntime cannot load the model: {first[:300]}") from None


def input_specs(sess: ort.InferenceSession) -> list[InputSpec]:
    """The session's inputs as :class:`InputSpec` (free axes as ``None``)."""
    specs = []
    for i in sess.get_inputs():
        if i.type not in _ORT_TYPES:
            raise ModelError(f"model input {i.name!r} has unsupported type {i.type}")
        shape = tuple(d if isinstance(d, int) else None for d in i.shape)
        specs.append(InputSpec(i.name, np.dtype(_ORT_TYPES[i.type]), shape))
    return specs


def run(sess: ort.InferenceSession, feed: Mapping[str, np.ndarray]) -> np.ndarray:
    """The first output of ``sess`` on ``feed`` (which may hold more arrays than its
    inputs)."""
    return runner(sess)({i.name: feed[i.name] for i in sess.get_inputs()})[0]


def runner(sess: ort.InferenceSession, what: str = "inference"
           ) -> Callable[[Mapping[str, np.ndarray]], list[np.ndarray]]:
    """A function running ``sess`` on a feed that is exactly its inputs, already checked
    by the caller, and returning every output; a failure is a :class:`ModelError`
    saying ``what`` failed.

    It calls onnxruntime's native session with the output names listed once:
    ``InferenceSession.run`` re-checks the feed's names and lists the outputs on every
    call, 1.5 us a call here, 6% of a small model's whole run. It passes one
    ``RunOptions`` made here: given none, onnxruntime builds a default one on every call
    (0.6-0.7 us here). onnxruntime only reads it during a run, so threads may share it.
    """
    names = [o.name for o in sess.get_outputs()]
    native = getattr(sess, "_sess", None)      # absent: a future onnxruntime; the public call
    call = native.run if native is not None else sess.run
    options = ort.RunOptions()

    def run_outputs(feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        try:
            return call(names, feed, options)  # type: ignore[no-any-return]
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ModelError(f"{what} failed: {first[:300]}") from None

    return run_outputs


def optimized_graph(model: onnx.ModelProto) -> onnx.ModelProto:
    """The graph onnxruntime actually runs on this CPU, after all its optimizations."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "optimized.onnx")
        session(model, optimized_path=out)
        return onnx.load(out)


def model_bytes(model: onnx.ModelProto) -> int:
    """Serialized size of ``model`` in bytes (what the file on disk holds)."""
    return model.ByteSize()


def probe_session(model: onnx.ModelProto, tensors: list[str]) -> ort.InferenceSession:
    """A session on a copy of ``model`` whose outputs also include the named intermediate
    tensors (to read activation statistics)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=t) for t in tensors if t not in known)
    return session(probe)


def sort_nodes(graph: onnx.GraphProto) -> None:
    """Order ``graph``'s nodes so that every input is produced before it is used (for
    graphs edited by appending nodes)."""
    ready = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending = list(graph.node)
    ordered: list[onnx.NodeProto] = []
    while pending:
        rest = []
        for node in pending:
            if all(i in ready for i in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):   # names from outer scopes (subgraphs): keep order
            ordered.extend(rest)
            break
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)


def name_nodes(graph: onnx.GraphProto, prefix: str) -> None:
    """Give every unnamed node of ``graph`` a unique name ``{prefix}{i}`` (layers are
    found and excluded by name; hand-built graphs often leave names empty)."""
    taken = {n.name for n in graph.node}
    for i, node in enumerate(graph.node):
        if not node.name:
            name, k = f"{prefix}{i}", 0
            while name in taken:
                k += 1
                name = f"{prefix}{i}_{k}"
            node.name = name
            taken.add(name)


def attr(node: onnx.NodeProto, name: str, default: object) -> object:
    """The value of ``node``'s attribute ``name``, or ``default`` when it has none."""
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def depthwise(node: onnx.NodeProto, weight_shape: Sequence[int]) -> bool:
    """Whether ``node`` (a Conv or QLinearConv with a weight of ``weight_shape``) is a
    depthwise convolution: grouped, one input channel per group."""
    return (node.op_type in ("Conv", "QLinearConv") and int(attr(node, "group", 1)) > 1
            and len(weight_shape) > 1 and weight_shape[1] == 1)
