"""``sites.embeddings = "int8"``: the lookup is exactly the table's int8 row encoding, R1 keeps a
tied int8 head on the table behind a float bridge (function-preserving), and every target stores
the tied table's codes once, the lookup reading the head's own array."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

import lowbit
from lowbit import formats
from lowbit.compiler.api import load_onnx
from lowbit.compiler.report import render_markdown
from lowbit.core.context import CompileContext
from lowbit.core.initializers import add_initializer
from lowbit.core.recipe import load_recipe
from lowbit.errors import LowbitError
from lowbit.models.synthetic_llm import write_decoder
from lowbit.ort.feeds import build_feeds
from lowbit.ort.session import ort_session, run_on_tokens
from lowbit.passes.canonicalize import canonicalize_passes
from lowbit.passes.quantize_embedding import QuantizeEmbeddingPass
from lowbit.passes.rotate_residual import TIED_BRIDGE_REASON, RotateResidualPass

SMALL = ["calibration.windows=2", "calibration.seq_len=32", "calibration.slac_windows=1"]
TABLE = "model.embed_tokens.weight"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_decoder("tiny", tmp_path_factory.mktemp("embedding") / "llama", progress=False)


def _canonical(path):
    model = load_onnx(path / "model.onnx")
    for p in canonicalize_passes():
        p(model)
    return model


def _run(model, ids):
    session = ort_session(model)
    return session.run(None, build_feeds(session, ids))


def test_lookup_equals_the_int8_row_encoding_bit_for_bit(tiny_dir):
    """The quantized model is the float model whose lookup reads decode(int8 rows) (the tied head
    still reads the float table): same outputs, exactly."""
    ids = np.random.default_rng(0).integers(5, 40000, (2, 16))
    reference = _canonical(tiny_dir)
    table = reference.graph.initializers[TABLE]
    enc = formats.encode(table.const_value.numpy(), "int8", axis=1, symmetric=True, scale_method="absmax")
    decoded = add_initializer(reference.graph, formats.decode(enc), "decoded")  # the whole table at once
    next(n for n, _ in table.uses() if n.op_type == "Gather").replace_input_with(0, decoded)
    model = _canonical(tiny_dir)
    ctx = CompileContext(model, load_recipe("w4a8-dint4", ["sites.embeddings=int8"]))
    QuantizeEmbeddingPass(ctx)(model)
    for a, b in zip(_run(reference, ids), _run(model, ids)):
        np.testing.assert_array_equal(a, b)
    entry = ctx.report["embeddings"][0]
    assert entry["shape"] == [49152, 64] and entry["bits_per_weight"] == 8.5
    assert TABLE in model.graph.initializers  # the tied head still reads the float table
    codes = model.graph.initializers[f"{TABLE}.int8"].const_value.numpy()
    assert codes.dtype == np.int8 and codes.shape == (49152, 64)


def test_r1_keeps_an_int8_head_tied_behind_a_float_bridge(tiny_dir):
    ids = np.random.default_rng(1).integers(5, 40000, (2, 16))
    model = _canonical(tiny_dir)
    before = _run(model, ids)
    ctx = CompileContext(model, load_recipe("w4a8-dint4", ["sites.embeddings=int8"]))
    RotateResidualPass(ctx)(model)
    for a, b in zip(before, _run(model, ids)):
        assert np.abs(a.astype(np.float64) - b).max() / np.abs(a).max() < 1e-4
    r1 = ctx.report["rotate"]["residual"]
    assert r1["rotated"] and r1["tied_head_bridge"] and not r1["untied_head"]
    head = next(s for s in ctx.sites if s.weight.name == TABLE)  # the site map, rebuilt: still the table
    bridge = head.node.inputs[0].producer()
    assert bridge.op_type == "MatMul" and ctx.sites.skipped[bridge.inputs[1].name] == TIED_BRIDGE_REASON
    # without the int8 head the tie is not worth a bridge: the head gets its own weight, as before
    model = _canonical(tiny_dir)
    ctx = CompileContext(model, load_recipe("w4a8-dint4", ["sites.embeddings=int8", "sites.int8_weights=[]"]))
    RotateResidualPass(ctx)(model)
    assert ctx.report["rotate"]["residual"]["untied_head"]


@pytest.mark.parametrize("target", ["qdq", "ort-cpu"])
def test_the_tied_table_is_stored_once_and_read_from_the_head(tiny_dir, target):
    plain = lowbit.compile(tiny_dir, "w4a8-dint4", target=target, overrides=["sites.embeddings=float", *SMALL])
    out = lowbit.compile(tiny_dir, "w4a8-dint4", target=target, verify=target == "qdq",
                         overrides=["sites.embeddings=int8", *SMALL])  # fmt: skip
    big = [v for v in out.model.graph.initializers.values() if v.const_value.size >= 49152 * 64]
    assert len(big) == 1 and big[0].const_value.dtype in (ir.DataType.INT8, ir.DataType.UINT8)  # the head's codes, nothing else
    shared = out.report["embedding_codes_shared_with"][TABLE]
    assert shared == ("lm_head.dq (DequantizeLinear codes)" if target == "qdq" else "lm_head.nbits (MatMulNBits B)")
    size = sum(v.const_value.nbytes for v in out.model.graph.initializers.values())
    plain_size = sum(v.const_value.nbytes for v in plain.model.graph.initializers.values())
    assert size < plain_size - 49152 * 64 * 3  # the float32 table is gone
    if target == "qdq":  # --verify ran the sharing pass and found the outputs unchanged
        share = next(p for p in out.report["passes"] if p["pass"] == "ShareEmbeddingCodesPass")
        assert share["modified"] and share["verified_rel_diff"] == 0.0
    md = render_markdown(out.report)
    assert "LM head kept tied behind a float hidden x hidden MatMul" in md
    assert "- embedding model.embed_tokens.weight: int8 per row (8.50 bits per weight), reads the codes of lm_head" in md


def test_ort_cpu_lookup_equals_the_qdq_lookup(tiny_dir):
    """The MatMulNBits form of the lookup (uint8 codes + 128, reshaped) gives the same floats."""
    ids = np.arange(5, 37)
    qdq = lowbit.compile(tiny_dir, "w4a8-dint4", overrides=["sites.embeddings=int8", *SMALL])
    cpu = lowbit.compile(tiny_dir, "w4a8-dint4", target="ort-cpu", overrides=["sites.embeddings=int8", *SMALL])
    a, b = run_on_tokens(qdq.model, ids)[0], run_on_tokens(cpu.model, ids)[0]
    assert np.abs(a - b).max() < 1e-4 * np.abs(a).max()  # float32 summation order only


def test_embeddings_key_is_checked_and_nan_tables_refused(tiny_dir):
    with pytest.raises(LowbitError, match="sites.embeddings"):
        load_recipe("w4a8-dint4", ["sites.embeddings=int4"])
    with pytest.raises(LowbitError, match="sites.embeddings"):
        load_recipe("w4-dint4-ortcpu", ["sites.embeddings=int8"])  # ort_cpu.embeddings packs it already
    model = _canonical(tiny_dir)
    table = model.graph.initializers[TABLE]
    values = table.const_value.numpy().copy()
    values[3, 5] = np.nan
    table.const_value = ir.tensor(values, name=TABLE)
    with pytest.raises(LowbitError, match=rf"embedding table {TABLE} has NaN/Inf values \(rows 0-4095: 1\)"):
        QuantizeEmbeddingPass(CompileContext(model, load_recipe("w4a8-dint4", ["sites.embeddings=int8"])))(model)
