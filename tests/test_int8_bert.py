"""The BERT-style zoo encoder: token data, ONNX export against PyTorch as the oracle, and
the `int8` pass on it (transformer fusion found, error bound met, embedding tables left
float)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from edgeloop._onnx import session
from edgeloop.compress import Int8, apply_pass
from edgeloop.compress.sensitivity import float_tables, output_error
from edgeloop.errors import UsageError
from edgeloop.measure import predict
from edgeloop.zoo.bert import BertClassifier, BertSpec, export_bert, mnist1d_tokens

TINY = BertSpec(layers=2, hidden=64, heads=2, intermediate=128, seq_len=48)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[BertClassifier, onnx.ModelProto]:
    torch.manual_seed(0)
    model = BertClassifier(TINY).eval()
    path = tmp_path_factory.mktemp("bert") / "model.onnx"
    export_bert(model, mnist1d_tokens("calib", seq_len=TINY.seq_len).take(slice(0, 2)), path)
    return model, onnx.load(path)


def test_tokens_follow_the_data_convention():
    data = mnist1d_tokens("calib", seq_len=48, bins=16)
    ids, mask = data.inputs["input_ids"], data.inputs["attention_mask"]
    assert ids.dtype == mask.dtype == np.int64
    assert ids.shape == mask.shape == (256, 48)
    assert (ids[:, 0] == 1).all()                       # [CLS]
    assert (ids[:, 41:] == 0).all() and (mask[:, 41:] == 0).all()   # padding, masked
    assert ids[:, 1:41].min() >= 2 and ids[:, 1:41].max() < 2 + 16
    assert data.labels is not None and len(data.labels) == 256
    with pytest.raises(UsageError, match="seq_len"):
        mnist1d_tokens("calib", seq_len=32)


def test_export_matches_pytorch_on_other_inputs(tiny):
    model, proto = tiny
    assert [i.name for i in proto.graph.input] == ["input_ids", "attention_mask"]
    assert all(i.type.tensor_type.elem_type == onnx.TensorProto.INT64 for i in proto.graph.input)
    data = mnist1d_tokens("test", seq_len=TINY.seq_len).take(slice(0, 16))
    mask = data.inputs["attention_mask"].copy()
    mask[::2, 30:] = 0                                  # shorter sequences in half the batch
    feed = {"input_ids": data.inputs["input_ids"], "attention_mask": mask}
    with torch.no_grad():
        expected = model(*(torch.from_numpy(feed[k]) for k in feed)).numpy()
    got = session(proto).run(None, feed)[0]
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)


def test_int8_on_bert_meets_bound_and_tries_fusion(tiny):
    _, proto = tiny
    calib = mnist1d_tokens("calib", seq_len=TINY.seq_len).take(slice(0, 32))
    p = Int8(max_error=0.002, compare="outputs", timing_rounds=1,
             faster_than_float=False)   # no timing verdict
    out = apply_pass(p, proto, calib)
    assert {"preprocess", "fused"} <= {v.preparation for v in p.plan_.variants}
    assert output_error(out, calib, predict(session(proto), calib)) <= 0.002
    # embedding tables go int8 only when the bound holds and onnxruntime's quantizer has an
    # int8 form of their lookup (static mode has none for a fused EmbedLayerNormalization);
    # the plan says which happened
    decided = [n for n in p.plan_.notes if n.startswith("embedding tables")]
    assert len(decided) == 1
    kept = len(float_tables(out)) == len(float_tables(proto)) == 3
    assert kept == ("kept float" in decided[0]), (decided, float_tables(out))
    if p.plan_.preparation == "fused":
        assert {n.op_type for n in out.graph.node} & {"QAttention", "Attention"}


def test_transformer_fusion_fuses_attention_and_keeps_outputs(tiny):
    from edgeloop.compress.mixed import TransformerFusion

    _, proto = tiny
    calib = mnist1d_tokens("calib", seq_len=TINY.seq_len).take(slice(0, 16))
    fused = apply_pass(TransformerFusion(), proto, calib)
    ops = {n.op_type for n in fused.graph.node}
    assert "Attention" in ops and "MatMul" in ops
    assert output_error(fused, calib, predict(session(proto), calib)) < 1e-4


def test_activation_outliers_sees_an_injected_outlier_channel():
    from edgeloop.zoo.bert import activation_outliers

    torch.manual_seed(0)
    model = BertClassifier(TINY).eval()
    data = mnist1d_tokens("test", seq_len=TINY.seq_len).take(slice(0, 16))
    before = {(s.layer, s.site): s for s in activation_outliers(model, data)}
    assert len(before) == TINY.layers * 4
    assert all(s.channels == (TINY.intermediate if s.site == "ffn-gelu" else TINY.hidden)
               for s in before.values())
    with torch.no_grad():
        model.bert.bert.encoder.layer[1].output.dense.bias[7] = 50.0   # one loud channel
    after = {(s.layer, s.site): s for s in activation_outliers(model, data)}
    loud = after[1, "ffn-out"]
    assert loud.max_abs >= 45.0
    assert loud.channel_ratio > 10 * before[1, "ffn-out"].channel_ratio
    assert loud.kurtosis > 10 * before[1, "ffn-out"].kurtosis
    assert after[0, "ffn-out"] == before[0, "ffn-out"]   # layers before it are untouched


@pytest.mark.parametrize("bare_faster", [True, False])
def test_shape_annotations_stay_only_when_they_make_it_faster(tiny, monkeypatch, bare_faster):
    """The same graph with and without its shape annotations (which decide what onnxruntime
    fuses at load) is timed; the faster is kept, with a note when they are dropped."""
    import edgeloop.compress.mixed as mixed
    annotated = onnx.shape_inference.infer_shapes(tiny[1])
    assert annotated.graph.value_info
    timed: list[list[int]] = []

    def fake_timing(models, *args, **kwargs):
        timed.append([len(m.graph.value_info) for m in models])
        return [1.0, 0.5 if bare_faster else 2.0]

    monkeypatch.setattr(mixed, "interleaved_latency", fake_timing)
    data = mnist1d_tokens("calib", seq_len=TINY.seq_len).take(slice(0, 8))
    notes: list[str] = []
    out = mixed.fastest_annotation(annotated, data, rounds=1, runs=1, threads=0, notes=notes)
    assert timed == [[len(annotated.graph.value_info), 0]] * mixed.TIMING_TRIALS
    assert (not out.graph.value_info) == bare_faster
    assert any("shape annotations dropped" in n for n in notes) == bare_faster
    np.testing.assert_allclose(predict(session(out), data), predict(session(annotated), data),
                               rtol=1e-5, atol=1e-5)
