"""Perplexity, embedding cosine, latency and footprint on tiny ONNX models with known answers."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import pytest

from lowbit.ort.feeds import build_feeds
from onnx import TensorProto, helper, numpy_helper

from lowbit.errors import LowbitError
from lowbit.models import evaluate, footprint

IR, OPSET = 10, 21  # IR 10 / opset 21: int4 DQ allowed, accepted by ORT 1.31


def _save(tmp_path: Path, name: str, nodes, inputs, outputs, inits) -> Path:
    graph = helper.make_graph(nodes, name, inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR
    onnx.checker.check_model(model)
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, path)
    return path


def _ids_input():
    return helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])


def constant_lm(tmp_path: Path, vocab: int) -> Path:
    """logits = 0 for every token: uniform prediction, so ppl = vocab exactly."""
    nodes = [
        helper.make_node("Shape", ["input_ids"], ["bt"]),
        helper.make_node("Concat", ["bt", "v"], ["shape"], axis=0),
        helper.make_node("ConstantOfShape", ["shape"], ["logits"],
                         value=numpy_helper.from_array(np.zeros(1, np.float32))),
    ]
    out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", vocab])
    return _save(tmp_path, "constant_lm", nodes, [_ids_input()], [out],
                 [numpy_helper.from_array(np.array([vocab], np.int64), "v")])


# Bigram table: row i = log of the next-token distribution after token i.
BIGRAM_P = np.array([[0.5, 0.25, 0.25], [0.25, 0.5, 0.25], [0.25, 0.25, 0.5]])


def bigram_lm(tmp_path: Path) -> Path:
    """logits[t] = log P(. | token t): a bigram model whose probabilities are powers of two."""
    table = numpy_helper.from_array(np.log(BIGRAM_P).astype(np.float32), "table")
    nodes = [helper.make_node("Gather", ["table", "input_ids"], ["logits"], axis=0)]
    out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", 3])
    return _save(tmp_path, "bigram_lm", nodes, [_ids_input()], [out], [table])


def test_constant_logits_give_vocab_size(tmp_path):
    model = constant_lm(tmp_path, vocab=50)
    windows = np.arange(3 * 16).reshape(3, 16) % 50
    r = evaluate.perplexity(model, windows, progress=False)
    assert r.windows == 3 and r.tokens == 3 * 15
    assert r.ppl == pytest.approx(50.0, rel=1e-12)
    assert r.nll == pytest.approx(math.log(50), rel=1e-12)


def test_bigram_perplexity_by_hand(tmp_path):
    # Window 1: 0->0 (p 1/2), 0->1 (1/4), 1->2 (1/4): NLL = ln2 + 2 ln4 = 5 ln2.
    # Window 2: 2->2 three times (p 1/2 each): NLL = 3 ln2.
    # Mean NLL = 8 ln2 / 6 tokens, so ppl = 2 ** (4/3).
    windows = np.array([[0, 0, 1, 2], [2, 2, 2, 2]])
    r = evaluate.perplexity(bigram_lm(tmp_path), windows, progress=False)
    assert r.tokens == 6
    assert r.ppl == pytest.approx(2 ** (4 / 3), rel=1e-6)  # float32 logits: ~1e-7 relative


def test_perplexity_rejects_bad_windows(tmp_path):
    with pytest.raises(LowbitError, match="windows must be"):
        evaluate.perplexity(constant_lm(tmp_path, 5), np.zeros((2, 1), np.int64), progress=False)


def test_perplexity_needs_logits(tmp_path):
    enc = embedding_encoder(tmp_path, "enc", np.eye(4, dtype=np.float32))
    with pytest.raises(LowbitError, match="no 'logits' output"):
        evaluate.perplexity(enc, np.zeros((1, 4), np.int64), progress=False)


def embedding_encoder(tmp_path: Path, name: str, table: np.ndarray) -> Path:
    """last_hidden_state = table[input_ids]; takes attention_mask like a real encoder."""
    mask = helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"])
    out = helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "seq", table.shape[1]])
    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["g"], axis=0),
        # the mask reaches the output only through a zero-weighted term: keeps it a used input
        helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["m", "zero"], ["mz"]),
        helper.make_node("Unsqueeze", ["mz", "axis"], ["mz3"]),
        helper.make_node("Add", ["g", "mz3"], ["last_hidden_state"]),
    ]
    inits = [numpy_helper.from_array(table, "table"), numpy_helper.from_array(np.float32(0), "zero"),
             numpy_helper.from_array(np.array([2], np.int64), "axis")]
    return _save(tmp_path, name, nodes, [_ids_input(), mask], [out], inits)


class PadTokenizer:
    """Whitespace tokens are integers; pads with 0 on the right, like a BERT tokenizer."""

    def __call__(self, texts, padding, truncation, max_length, return_tensors):
        rows = [[int(t) for t in s.split()][:max_length] for s in texts]
        width = max(map(len, rows))
        ids = np.array([r + [0] * (width - len(r)) for r in rows], np.int64)
        mask = np.array([[1] * len(r) + [0] * (width - len(r)) for r in rows], np.int64)
        return {"input_ids": ids, "attention_mask": mask}


def test_pooling_ignores_padding(tmp_path):
    table = np.array([[100, 100], [1, 0], [0, 1], [3, 4]], np.float32)  # row 0 = pad, must not count
    enc = embedding_encoder(tmp_path, "enc", table)
    pooled = evaluate.pooled_embeddings(enc, ["1 2", "3", "1 1 3"], PadTokenizer(), progress=False)
    expected = [[0.5, 0.5], [3, 4], [5 / 3, 4 / 3]]
    np.testing.assert_allclose(pooled, expected, rtol=1e-7)


def test_embedding_cosine_known_values(tmp_path):
    rng = np.random.default_rng(0)
    table = rng.normal(size=(10, 6)).astype(np.float32)
    ref = embedding_encoder(tmp_path, "ref", table)
    scaled = embedding_encoder(tmp_path, "scaled", 3 * table)  # same direction
    negated = embedding_encoder(tmp_path, "neg", -table)  # opposite direction
    texts = ["1 2 3", "4 5", "6 7 8 9", "2"]
    tok = PadTokenizer()
    assert evaluate.embedding_cosine(scaled, ref, texts, tokenizer=tok, progress=False) == pytest.approx(1.0, abs=1e-12)
    assert evaluate.embedding_cosine(negated, ref, texts, tokenizer=tok, progress=False) == pytest.approx(-1.0, abs=1e-12)


def test_latency_without_cache(tmp_path):
    r = evaluate.latency(bigram_lm(tmp_path), prefill_tokens=16, repeats=3)
    assert r.prefill_ms > 0 and r.decode_ms is None and r.prefill_tokens == 16 and r.repeats == 3


class FakeInput:
    def __init__(self, name, type_, shape):
        self.name, self.type, self.shape = name, type_, shape


class FakeSession:
    def __init__(self, inputs):
        self._inputs = inputs

    def get_inputs(self):
        return self._inputs


def test_feeds_for_kv_cache_models():
    sess = FakeSession([
        FakeInput("input_ids", "tensor(int64)", ["b", "s"]),
        FakeInput("attention_mask", "tensor(int64)", ["b", "t"]),
        FakeInput("position_ids", "tensor(int64)", ["b", "s"]),
        FakeInput("past_key_values.0.key", "tensor(float)", ["b", 3, "p", 64]),
    ])
    ids = np.array([[5, 6, 7]])
    empty = build_feeds(sess, ids)
    assert empty["past_key_values.0.key"].shape == (1, 3, 0, 64)
    assert empty["attention_mask"].tolist() == [[1, 1, 1]]
    assert empty["position_ids"].tolist() == [[0, 1, 2]]
    past = {"past_key_values.0.key": np.zeros((1, 3, 4, 64), np.float32)}
    step = build_feeds(sess, ids[:, -1:], past=past)
    assert step["position_ids"].tolist() == [[4]] and step["attention_mask"].shape == (1, 5)
    with pytest.raises(LowbitError, match="not one lowbit knows"):
        build_feeds(FakeSession([FakeInput("pixel_values", "tensor(float)", [1])]), ids)


def test_unloadable_model_is_a_lowbit_error(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not protobuf at all \x00\x01")
    with pytest.raises(LowbitError, match="bad.onnx"):
        evaluate.open_session(bad)


# ---- footprint: size on disk and bits per weight -------------------------------------------

def _x_input(k):
    return helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", k])


def _y_output(n):
    return helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", n])


def test_fp32_weight_is_32_bits_and_activation_matmul_is_ignored(tmp_path):
    w = numpy_helper.from_array(np.ones((4, 8), np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]),
             helper.make_node("Transpose", ["h"], ["ht"]),
             helper.make_node("MatMul", ["h", "ht"], ["y"])]  # activation x activation
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", "n"])
    path = _save(tmp_path, "fp32", nodes, [_x_input(4)], [out], [w])
    bits = footprint.linear_weight_bits(path)
    assert (bits.sites, bits.elements, bits.bytes) == (1, 32, 128)
    assert bits.bits_per_weight == 32.0
    assert footprint.size_on_disk(path) == path.stat().st_size


def test_int8_per_channel_dq_counts_codes_and_scales(tmp_path):
    inits = [numpy_helper.from_array(np.ones((4, 8), np.int8), "wq"),
             numpy_helper.from_array(np.ones(8, np.float32), "s")]
    nodes = [helper.make_node("DequantizeLinear", ["wq", "s"], ["w"], axis=1),
             helper.make_node("MatMul", ["x", "w"], ["y"])]
    bits = footprint.linear_weight_bits(_save(tmp_path, "int8", nodes, [_x_input(4)], [_y_output(8)], inits))
    # 32 int8 codes (32 B) + 8 fp32 scales (32 B) over 32 weights = 16 bits/weight
    assert (bits.elements, bits.bytes, bits.bits_per_weight) == (32, 64, 16.0)


def test_int4_blocked_dq_with_dq_scales_and_transpose(tmp_path):
    codes = helper.make_tensor("wq", TensorProto.INT4, [64, 8], np.zeros(64 * 8, np.int8).tolist())
    inits = [codes,
             numpy_helper.from_array(np.ones((2, 8), np.int8), "sq"),  # block scales as int8 codes
             numpy_helper.from_array(np.float32(0.5), "s2"),  # their fp32 scale
             numpy_helper.from_array(np.array([1, 0], np.int64), "perm_unused")]
    nodes = [helper.make_node("DequantizeLinear", ["sq", "s2"], ["s"]),
             helper.make_node("DequantizeLinear", ["wq", "s"], ["w"], axis=0, block_size=32),
             helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),
             helper.make_node("Transpose", ["wt"], ["w2"], perm=[1, 0]),
             helper.make_node("MatMul", ["x", "w2"], ["y"])]
    path = _save(tmp_path, "int4", nodes, [_x_input(64)], [_y_output(8)], inits)
    bits = footprint.linear_weight_bits(path)
    # 512 int4 codes = 256 B, 16 int8 scale codes = 16 B, one fp32 = 4 B -> 276 B / 512 weights
    assert (bits.elements, bits.bytes) == (512, 276)
    assert bits.bits_per_weight == pytest.approx(276 * 8 / 512)


def test_not_onnx_is_a_lowbit_error(tmp_path):
    f = tmp_path / "x.onnx"
    f.write_text("hello")
    with pytest.raises(LowbitError, match="not an ONNX model"):
        footprint.linear_weight_bits(f)


def test_weight_quantized_at_run_time_counts_as_stored(tmp_path):
    # Transpose(W) -> Q -> DQ -> MatMul (ORT quantize_static on a tied lm_head): W stays FP32.
    inits = [numpy_helper.from_array(np.ones((8, 4), np.float32), "w"),
             numpy_helper.from_array(np.float32(0.1), "s"),
             numpy_helper.from_array(np.uint8(128), "zp")]
    nodes = [helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),
             helper.make_node("QuantizeLinear", ["wt", "s", "zp"], ["wq"]),
             helper.make_node("DequantizeLinear", ["wq", "s", "zp"], ["wd"]),
             helper.make_node("MatMul", ["x", "wd"], ["y"])]
    bits = footprint.linear_weight_bits(_save(tmp_path, "qdq_rt", nodes, [_x_input(4)], [_y_output(8)], inits))
    assert (bits.sites, bits.elements, bits.bytes) == (1, 32, 128 + 4 + 1)


def test_agreement_of_a_bigram_model_with_a_uniform_reference_is_known(tmp_path):
    # KL(uniform || bigram) per prediction = sum_j 1/3 * (log 1/3 - log P(j|i)), the same for every
    # row of BIGRAM_P; top-1: the uniform reference's argmax is token 0 (first of the ties).
    windows = np.array([[0, 1, 2, 2, 1, 0, 0, 2], [2, 2, 1, 1, 0, 0, 1, 2]], np.int64)
    model, reference = bigram_lm(tmp_path), constant_lm(tmp_path, 3)
    mine, theirs, agree = evaluate.compare_to_reference(model, reference, windows, progress=False)
    assert theirs.ppl == pytest.approx(3.0)
    assert mine.ppl == pytest.approx(evaluate.perplexity(model, windows, progress=False).ppl)
    expected_kl = float(np.mean(np.log(1 / 3) - np.log(BIGRAM_P[0])))
    assert agree.kl == pytest.approx(expected_kl, rel=1e-6) and agree.tokens == 14
    assert agree.top1 == pytest.approx(np.mean(windows[:, :-1] == 0))


def test_next_token_scores_match_a_direct_float64_computation():
    rng = np.random.default_rng(0)
    t, v = 150, 40  # more rows than NextTokenScores.ROWS: blocks are stitched correctly
    logits = rng.normal(size=(t, v)).astype(np.float32) * 3
    reference = (logits + rng.normal(size=(t, v)).astype(np.float32)).astype(np.float32)
    ids = rng.integers(0, v, size=t)
    scores = evaluate.NextTokenScores()
    scores.add(logits, ids, reference)
    lp = logits[:-1].astype(np.float64) - np.log(np.exp(logits[:-1].astype(np.float64)).sum(-1, keepdims=True))
    lq = reference[:-1].astype(np.float64) - np.log(np.exp(reference[:-1].astype(np.float64)).sum(-1, keepdims=True))
    agree = scores.agreement()
    assert scores.perplexity().nll == pytest.approx(-lp[np.arange(t - 1), ids[1:]].mean(), rel=1e-12)
    assert agree.kl == pytest.approx((np.exp(lq) * (lq - lp)).sum(-1).mean(), rel=1e-12)
    assert agree.top1 == pytest.approx(np.mean(lp.argmax(-1) == lq.argmax(-1)))
    same = evaluate.NextTokenScores()
    same.add(logits, ids, logits)
    assert same.agreement().kl == pytest.approx(0.0, abs=1e-12) and same.agreement().top1 == 1.0
    with pytest.raises(LowbitError, match="do not match"):
        same.add(logits[:-1], ids)


def test_lowbit_matmul_ops_count_their_packed_codes_and_scales(tmp_path, token_windows):
    """A compiled ort-cpu model: every dINT4 site is one MatMulLowbit whose packed arrays give
    4 bits per weight plus one float32 scale per block of 32 and the site's global scale."""
    import lowbit
    from lowbit.models.synthetic import tiny_decoder
    from lowbit.runtime_ext.functions import DOMAIN

    assert footprint.LOWBIT_DOMAIN == DOMAIN
    out = lowbit.compile(tiny_decoder(ffn=64), "w4-dint4-ortcpu", calibration=token_windows)  # every K % 32 == 0
    path = tmp_path / "m.onnx"
    out.save(path)
    ops = [n.op_type for n in out.model.graph]
    bits = footprint.linear_weight_bits(path)
    assert bits.sites == ops.count("MatMulLowbit") > 0 and "DequantizeLinear" not in ops
    # 4-bit codes, a float32 scale per 32 weights and one float32 global scale per site
    assert bits.bits_per_weight == pytest.approx(4 + 32 / 32 + 32 * bits.sites / bits.elements)
