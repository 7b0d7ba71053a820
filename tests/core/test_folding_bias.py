"""Folding through biases: a scale or permutation folded into a producer whose output channels
carry a bias (Qwen's v_proj; up/gate biases) moves the bias with the columns, and the model's
function is unchanged -- checked numerically in ONNX Runtime on a Qwen-shaped decoder."""

from dataclasses import replace

import numpy as np
import onnx_ir as ir
import pytest

from lowbit.compiler.api import load_onnx
from lowbit.core.folding import fold_target
from lowbit.core.initializers import add_initializer
from lowbit.core.linear_sites import find_linear_sites, output_bias
from lowbit.models.synthetic_llm import SHAPES, write_decoder
from lowbit.ort.feeds import build_feeds
from lowbit.ort.session import ort_session
from lowbit.passes.canonicalize import canonicalize_passes

RTOL = 1e-5  # float32 reassociation only; a bias left behind moves logits by O(1e-1)


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    shape = replace(SHAPES["tiny"], name="tiny-qwen", family="qwen2", qkv_bias=True, tied=False)
    return write_decoder(shape, tmp_path_factory.mktemp("qwen"), progress=False)


def _model(path):
    model = load_onnx(path / "model.onnx")
    for p in canonicalize_passes():
        p(model)
    return model


def _biased(graph: ir.Graph, node: ir.Node, rng) -> None:
    """Add a random bias after ``node``'s output (what a biased up/gate projection exports)."""
    out = node.outputs[0]
    users = list(out.uses())
    n = int(node.inputs[1].const_value.shape[1])
    add = ir.node("Add", [out, add_initializer(graph, rng.normal(0, 0.5, n).astype(np.float32), f"{node.name}.bias")],
                  name=f"{node.name}.bias_add")  # fmt: skip
    add.outputs[0].type, add.outputs[0].shape = out.type, out.shape
    for user, index in users:
        user.replace_input_with(index, add.outputs[0])
    graph.insert_after(node, add)


def _logits(model, ids):
    session = ort_session(model)
    return session.run(None, build_feeds(session, ids))[0]


def test_scales_and_permutations_fold_through_biases(qwen_dir):
    rng = np.random.default_rng(0)
    model = _model(qwen_dir)
    for site in find_linear_sites(model.graph):
        if site.name.endswith(("up_proj", "gate_proj")):
            _biased(model.graph, site.node, rng)
    ids = rng.integers(5, 40000, (2, 16))
    before = _logits(model, ids)
    targets = {}
    for group in find_linear_sites(model.graph).input_groups():
        if group[0].feeder.kind in ("attention_v", "gated_linear"):
            target = fold_target(group, ("attention_v", "gated_linear"))
            assert not isinstance(target, str), target
            targets[group[0].name] = target
    assert len(targets) == 4  # o_proj and down_proj of both layers
    for name, target in targets.items():
        assert target.producer_bias is not None, name
        assert (target.gate_bias is not None) == (target.kind == "gated_linear")
        k = target.channels
        # one scale per producer channel (a V channel's query-head replicas share it under GQA)
        target.apply_scale(rng.uniform(0.25, 4.0, target.producer.out_features)[target.channel_map])
        if target.kind == "attention_v":  # inside each head, the same for the query heads sharing a V head
            hd, group = target.head_dim, k // target.producer.out_features
            inner = [rng.permutation(hd) for _ in range(target.producer.out_features // hd)]
            target.apply_permutation(np.concatenate([h * hd + inner[h // group] for h in range(k // hd)]))
        else:
            target.apply_permutation(rng.permutation(k))
    after = _logits(model, ids)
    assert np.abs(after - before).max() / np.abs(before).max() < RTOL


def test_a_bias_that_is_not_per_channel_stops_folding(qwen_dir):
    model = _model(qwen_dir)
    sites = {s.name: s for s in find_linear_sites(model.graph)}
    v = sites["model.layers.0.self_attn.v_proj"]
    bias = output_bias(v)
    assert isinstance(bias, ir.Value)
    # the same constant read by a second op is no longer v_proj's own bias
    extra = ir.node("Identity", [bias], name="second_reader")
    model.graph.append(extra)
    assert isinstance(output_bias(v), str)
    o = find_linear_sites(model.graph)
    assert o.by_node[id(sites["model.layers.0.self_attn.o_proj"].node)].feeder.kind == "other"
