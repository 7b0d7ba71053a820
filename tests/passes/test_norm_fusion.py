"""Norm fusion: decomposed opset-18 chains become one norm node, outputs unchanged."""

from collections import Counter

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from lowbit.models.synthetic import tiny_decoder
from lowbit.passes.norm_fusion import FuseNormsPass
from lowbit.ort.session import run_on_tokens


def run_logits(model, ids):
    return run_on_tokens(model, ids)[0]

EXPECTED = {"rms": ("lowbit", "RMSNormalization"), "layer": ("", "LayerNormalization")}


@pytest.mark.parametrize("norm", ["rms", "layer"])
def test_decomposed_norms_fuse_to_one_node_each(norm, token_windows):
    model = tiny_decoder(norm=norm, norm_form="decomposed")
    ids = token_windows[0]
    before = run_logits(model, ids)
    result = FuseNormsPass()(model)
    ops = Counter((n.domain, n.op_type) for n in model.graph)
    assert result.modified
    assert ops[EXPECTED[norm]] == 5  # 2 layers x 2 norms + final norm
    assert ops[("", "Pow")] == 0 and ops[("", "Sqrt")] == 0
    after = run_logits(model, ids)
    np.testing.assert_allclose(after, before, rtol=0, atol=1e-5 * np.abs(before).max())
    onnx.checker.check_model(ir.to_proto(model), full_check=True)


def test_fused_form_matches_decomposed_form(token_windows):
    fused = tiny_decoder(norm="rms", norm_form="fused")
    decomposed = tiny_decoder(norm="rms", norm_form="decomposed")
    FuseNormsPass()(decomposed)
    ids = token_windows[1]
    np.testing.assert_allclose(run_logits(decomposed, ids), run_logits(fused, ids), rtol=1e-5, atol=1e-4)


def test_already_fused_model_is_untouched():
    model = tiny_decoder(norm="rms", norm_form="fused")
    assert not FuseNormsPass()(model).modified
