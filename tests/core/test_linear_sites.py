"""Linear-site map on tiny graphs: every site, its reduction axis, siblings and feeder."""

import pytest

from lowbit.models.synthetic import tiny_decoder
from lowbit.core.linear_sites import find_linear_sites
from lowbit.passes.norm_fusion import FuseNormsPass


@pytest.mark.parametrize("form", ["fused", "decomposed"])
def test_sites_feeders_and_siblings(form):
    model = tiny_decoder(norm="rms", norm_form=form, layers=2)
    FuseNormsPass()(model)
    sites = {s.name: s for s in find_linear_sites(model.graph)}
    assert len(sites) == 7 * 2 + 1
    q = sites["layers.1.self_attn.q_proj"]
    assert q.feeder.kind == "norm" and q.reduction_axis == 0
    assert sorted(s.name for s in q.siblings) == ["layers.1.self_attn.k_proj", "layers.1.self_attn.v_proj"]
    o = sites["layers.0.self_attn.o_proj"]
    assert o.feeder.kind == "attention_v" and o.feeder.producer_site.name == "layers.0.self_attn.v_proj"
    down = sites["layers.0.mlp.down_proj"]
    assert down.feeder.kind == "gated_linear" and down.feeder.producer_site.name == "layers.0.mlp.up_proj"
    assert (down.in_features, down.out_features) == (48, 32)
    head = sites["embed_tokens"]  # tied lm_head: MatMul(h, Transpose(embed_tokens.weight))
    assert head.reduction_axis == 1 and head.weight_path[0].op_type == "Transpose"
    assert head.feeder.kind == "norm" and not head.siblings


def test_constant_weight_matmul_that_cannot_be_quantized_is_reported(tmp_path):
    import numpy as np
    import onnx_ir as ir

    import lowbit

    model = tiny_decoder(norm="rms", norm_form="fused")
    graph = model.graph
    logits = graph.outputs[0]
    w3 = ir.Value(name="w3d", const_value=ir.tensor(np.ones((2, 64, 4), np.float32), name="w3d"))
    graph.register_initializer(w3)
    node = ir.node("MatMul", [logits, w3], name="/odd_head/MatMul")  # batched 3-D weight
    graph.append(node)
    node.outputs[0].name = "odd"
    graph.outputs.append(node.outputs[0])
    result = lowbit.compile(model, "w8")
    assert result.report["sites"]["odd_head"] == {"quantized": False, "reason": "weight is not a 2-D matrix (or is reshaped)"}
    assert sum(s["quantized"] for s in result.report["sites"].values()) == 15
