"""KV quantization: Q/DQ on every attention K/V input with per-head scales, runs in ORT."""

from collections import Counter

import numpy as np
import pytest

import lowbit
from lowbit.compiler.context import CalibrationData
from lowbit.compiler.ortrun import run_on_tokens
from lowbit.models.synthetic import tiny_decoder

IDS = np.arange(20, dtype=np.int64) * 7 % 64


@pytest.mark.parametrize("fmt,bits_err", [("int8", 0.02), ("int4", 0.3)])
@pytest.mark.parametrize("form", ["fused", "decomposed"])
def test_kv_qdq_per_head(fmt, bits_err, form, token_windows):
    reference = run_on_tokens(tiny_decoder(norm_form=form), IDS)[0]
    compiled = lowbit.compile(tiny_decoder(norm_form=form), "w8", calibration=CalibrationData(token_windows),
                              overrides=["weights.format=none", f"kv.format={fmt}"])  # fmt: skip
    model = compiled.model
    qs = [n for n in model.graph if n.op_type == "QuantizeLinear"]
    assert len(qs) == 2 * 2  # K and V of 2 layers
    for q in qs:
        scale = q.inputs[1].const_value.numpy()
        assert scale.shape == (4,) and q.attributes.get_int("axis") == 1  # one scale per head
        assert q.outputs[0].type.dtype == (ir_dtype := q.inputs[2].const_value.dtype)
        assert ir_dtype.name == ("INT8" if fmt == "int8" else "INT4")
    assert Counter(n.op_type for n in model.graph)["DequantizeLinear"] == 4
    out = run_on_tokens(model, IDS)[0]
    rel = np.abs(out - reference).max() / np.abs(reference).max()
    assert 0 < rel < bits_err
    assert compiled.report["kv"] == {"format": fmt, "granularity": "per_head", "tensors": 4}
