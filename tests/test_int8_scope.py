"""int8's narrower scopes: when no variant with every layer in int8 is faster than float
(onnxruntime's int8 depthwise and small pointwise convolutions on AVX2 without VNNI), the
depthwise convolutions, then every convolution, stay float, and the model that comes out
really has them in float. Speed is faked (timings never decide a test); the graphs, the
quantizer and the errors are real."""

from __future__ import annotations

import sys

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import edgeloop.compress.mixed as mixed
from edgeloop._onnx import attr, session
from edgeloop.compress import Int8, apply_pass
from edgeloop.errors import ModelError
from edgeloop.measure import predict

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from test_equalize import _images, _mobile_block

CALIB = _images(64, seed=1)
# between the block's all-int8 output error (1 - cosine, 6e-5 at best) and its error with
# only the Gemm in int8 (3e-5), on CALIB
ERROR_BETWEEN = 4.5e-5


def _int8_layers(model: onnx.ModelProto) -> dict[str, bool]:
    """Each Conv/Gemm of a QDQ model by name: whether its weight is int8 (read through a
    DequantizeLinear) rather than a float initializer."""
    producer = {o: n for n in model.graph.node for o in n.output}
    return {n.name: (w := producer.get(n.input[1])) is not None
            and w.op_type == "DequantizeLinear"
            for n in model.graph.node if n.op_type in ("Conv", "Gemm")}


def _depthwise(model: onnx.ModelProto) -> set[str]:
    return {n.name for n in model.graph.node
            if n.op_type == "Conv" and int(attr(n, "group", 1)) > 1}


def _fake_speed(slow: str):
    """A stand-in for interleaved_latency: float takes 1.0; an int8 model takes 2.0 if it
    has an int8 layer of the ``slow`` kind ("depthwise" or "conv"), else 0.8."""
    def latency(models, *args, **kwargs):
        out = []
        for m in models:
            layers = _int8_layers(m)
            if not any(layers.values()):
                out.append(1.0)
                continue
            kinds = _depthwise(m) if slow == "depthwise" else {
                n.name for n in m.graph.node if n.op_type == "Conv"}
            out.append(2.0 if any(layers.get(k) for k in kinds) else 0.8)
        return out
    return latency


@pytest.fixture(scope="module")
def block() -> onnx.ModelProto:
    return _mobile_block("relu6")


def _agreement(model: onnx.ModelProto, reference: onnx.ModelProto) -> float:
    got, want = predict(session(model), CALIB), predict(session(reference), CALIB)
    return float(np.mean(got.argmax(1) == want.argmax(1)))


@pytest.mark.parametrize("slow,scope", [("depthwise", "no-depthwise"),
                                        ("conv", "matmul-only")])
def test_int8_narrows_to_the_layers_whose_int8_kernels_are_faster(block, monkeypatch,
                                                                  slow, scope):
    monkeypatch.setattr(mixed, "interleaved_latency", _fake_speed(slow))
    p = Int8(timing_rounds=1)
    out = apply_pass(p, block, CALIB)
    assert p.plan_.scope == scope
    tried = [v.scope for v in p.plan_.variants]
    assert tried[0] == "all" and tried[-1] == scope
    if scope == "no-depthwise":   # narrowing stops at the first scope that is faster
        assert "matmul-only" not in tried
    layers = _int8_layers(out)
    dw = _depthwise(block)
    assert dw and not any(layers[n] for n in dw)           # depthwise convs float
    dense = [n for n in layers if n not in dw and n != "fc"]
    assert dense
    if scope == "no-depthwise":
        assert all(layers[n] for n in dense)                # the rest int8
    else:
        assert not any(layers[n] for n in dense)            # every conv float
    assert layers["fc"]                                     # the head is int8
    assert mixed.read_plan(out)["scope"] == scope
    assert any("no variant with more layers in int8 is faster" in n for n in p.plan_.notes)
    # the real integer model keeps the decisions it was chosen for
    assert _agreement(out, block) >= 1 - p.plan_.max_error


def test_refusal_names_the_narrower_scopes_it_tried(block, monkeypatch):
    monkeypatch.setattr(mixed, "interleaved_latency",
                        lambda models, *a, **k: [1.0] + [2.0] * (len(models) - 1))
    with pytest.raises(ModelError) as e:
        apply_pass(Int8(timing_rounds=1), block, CALIB)
    message = str(e.value)
    assert "no int8 form" in message and "\n" not in message
    assert "also with depthwise convolutions in float" in message
    assert "also with every convolution in float" in message


def _big_head(block: onnx.ModelProto) -> onnx.ModelProto:
    """The block with a 200-class head: most of its weights are in the Gemm."""
    model = onnx.ModelProto()
    model.CopyFrom(block)
    rng = np.random.default_rng(3)
    for i, init in enumerate(model.graph.initializer):
        if init.name in ("fc.w", "fc.b"):
            shape = (200, 8) if init.name == "fc.w" else (200,)
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(
                rng.normal(0, 1, shape).astype(np.float32), init.name))
    model.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 200
    onnx.checker.check_model(model)
    return model


def test_dynamic_variants_keep_convolutions_float(block, monkeypatch):
    """Dynamic activations would run the convolutions as ConvInteger (many times slower
    than float): their variants quantize the matrix products only."""
    model = _big_head(block)
    assert mixed._widest_scope(model, "dynamic") == "matmul-only"
    assert mixed._widest_scope(model, "static") == "all"
    monkeypatch.setattr(mixed, "interleaved_latency", _fake_speed("conv"))
    p = Int8(timing_rounds=1)
    out = apply_pass(p, model, CALIB)
    dynamic = [v for v in p.plan_.variants if v.mode == "dynamic"]
    assert dynamic and {v.scope for v in dynamic} == {"matmul-only"}
    assert not any(n.op_type == "ConvInteger" for n in out.graph.node)


def test_narrows_when_the_float_fallback_leaves_a_model_no_faster_than_float(block,
                                                                            monkeypatch):
    """All-int8 is faster but misses the bound; keeping its sensitive layers float mixes
    float and int8 convolutions, which (here) is slower than float: the narrower scope
    with every convolution float meets the bound and is faster."""
    def mixed_convs_slow(models, *args, **kwargs):
        out = []
        for m in models:
            layers = _int8_layers(m)
            convs = [layers[n.name] for n in m.graph.node if n.op_type == "Conv"]
            out.append(1.0 if not any(layers.values())
                       else 2.0 if any(convs) and not all(convs) else 0.8)
        return out

    monkeypatch.setattr(mixed, "interleaved_latency", mixed_convs_slow)
    p = Int8(timing_rounds=1, compare="outputs", max_error=ERROR_BETWEEN)
    out = apply_pass(p, block, CALIB)
    assert p.plan_.scope == "matmul-only", p.plan_.notes
    full = [v for v in p.plan_.variants if v.scope == "all"]
    assert full and min(v.error for v in full) > p.plan_.max_error   # all-int8 missed it
    assert p.plan_.error <= p.plan_.max_error
    layers = _int8_layers(out)
    assert layers["fc"] and not any(v for n, v in layers.items() if n != "fc")
