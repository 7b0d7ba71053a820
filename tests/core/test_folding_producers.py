"""Folding into producers that are not one plain linear: a scale or permutation folded into a
producer whose output channels carry a bias (Qwen's v_proj; up/gate biases) moves the bias with
the columns, and a fused gate_up (Phi-3) takes them on its halves -- the model's function is
unchanged, checked numerically in ONNX Runtime."""

from dataclasses import replace

import numpy as np
import onnx_ir as ir
import pytest

from lowbit.compiler.api import load_onnx
from lowbit.core.folding import fold_target, weight_kn
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


def _fuse_gate_up(model) -> int:
    """Rewrite every gate_proj / up_proj pair as one MatMul of [gate | up] and a Split of its
    output, as Phi-3 exports its gate_up_proj; returns how many pairs."""
    graph = model.graph
    fused = 0
    for down in [s for s in find_linear_sites(graph) if s.feeder.kind == "gated_linear"]:
        up, gate = down.feeder.producer_site, down.feeder.producer_site.siblings[0]
        w = np.concatenate([gate.weight.const_value.numpy(), up.weight.const_value.numpy()], axis=1)
        n = up.out_features
        both = add_initializer(graph, w, f"{up.name}.gate_up")
        matmul = ir.node("MatMul", [up.node.inputs[0], both], name=f"{up.name}.gate_up_matmul")
        split = ir.node("Split", [matmul.outputs[0], add_initializer(graph, np.array([n, n], np.int64), f"{up.name}.sizes")],
                        attributes={"axis": -1}, num_outputs=2, name=f"{up.name}.split")  # fmt: skip
        matmul.outputs[0].shape = ir.Shape([*up.node.outputs[0].shape[:-1], 2 * n])
        matmul.outputs[0].type = up.node.outputs[0].type
        graph.insert_before(gate.node, [matmul, split])
        for old, new in ((gate.node, split.outputs[0]), (up.node, split.outputs[1])):
            new.shape, new.type = old.outputs[0].shape, old.outputs[0].type
            old.outputs[0].replace_all_uses_with(new)
            graph.remove(old, safe=True)
        fused += 1
    return fused


def _fused_tiny(fuse, consumer: str, rng):
    """The tiny decoder with ``fuse`` applied to both layers: (model, ids, logits before any
    folding, the input groups of the ``consumer`` sites)."""
    from lowbit.models.synthetic import tiny_decoder

    model = tiny_decoder(norm="rms", norm_form="fused", layers=2)
    for p in canonicalize_passes():
        p(model)
    assert fuse(model) == 2
    ids = rng.integers(1, 50, (2, 12))
    groups = [g for g in find_linear_sites(model.graph).input_groups() if g[0].name.endswith(consumer)]
    assert len(groups) == 2
    return model, ids, _logits(model, ids), groups


def test_a_fused_gate_up_takes_scales_and_permutations_on_its_halves():
    """Phi-3's gate_up_proj: down_proj's input is up * act(gate) with both halves of one weight's
    output; its scales go to the up half's columns, a permutation to both halves alike."""
    rng = np.random.default_rng(3)
    model, ids, before, groups = _fused_tiny(_fuse_gate_up, "down_proj", rng)
    for group in groups:
        feeder = group[0].feeder
        assert feeder.kind == "gated_linear" and feeder.producer_site.name.endswith("gate_up")
        target = fold_target(group, ("gated_linear",))
        assert not isinstance(target, str), target
        n = target.channels
        assert (target.producer_columns, target.gate_columns) == (slice(n, 2 * n), slice(0, n))
        target.apply_scale(rng.uniform(0.25, 4.0, n))
        target.apply_permutation(rng.permutation(n))
    after = _logits(model, ids)
    assert np.abs(after - before).max() / np.abs(before).max() < RTOL


def _fuse_qkv(model) -> int:
    """Rewrite every q/k/v_proj triple as one MatMul of [q | k | v] and a Split of its output,
    as Phi-3 exports its qkv_proj; returns how many triples."""
    graph = model.graph
    fused = 0
    for o in [s for s in find_linear_sites(graph) if s.feeder.kind == "attention_v"]:
        v = o.feeder.producer_site
        q, k = sorted(v.siblings, key=lambda s: s.name.endswith("k_proj"))
        parts = (q, k, v)
        w = np.concatenate([s.weight.const_value.numpy() for s in parts], axis=1)
        sizes = np.array([s.out_features for s in parts], np.int64)
        matmul = ir.node("MatMul", [v.node.inputs[0], add_initializer(graph, w, f"{v.name}.qkv")], name=f"{v.name}.qkv_matmul")
        split = ir.node("Split", [matmul.outputs[0], add_initializer(graph, sizes, f"{v.name}.qkv_sizes")],
                        attributes={"axis": -1}, num_outputs=3, name=f"{v.name}.qkv_split")  # fmt: skip
        matmul.outputs[0].shape = ir.Shape([*v.node.outputs[0].shape[:-1], int(sizes.sum())])
        matmul.outputs[0].type = v.node.outputs[0].type
        graph.insert_before(q.node, [matmul, split])
        for site, new in zip(parts, split.outputs):
            new.shape, new.type = site.node.outputs[0].shape, site.node.outputs[0].type
            site.node.outputs[0].replace_all_uses_with(new)
            graph.remove(site.node, safe=True)
        fused += 1
    return fused


def test_a_fused_qkv_takes_scales_permutations_and_head_rotations_on_its_v_columns():
    """Phi-3's qkv_proj: o_proj's input is linear in the V third of one weight's output; scales,
    permutations inside heads and R2's per-head rotation go to those columns only."""
    from lowbit.passes.rotate_heads import rotate_heads
    from lowbit.runtime_ext.hadamard import rotation

    rng = np.random.default_rng(4)
    model, ids, before, groups = _fused_tiny(_fuse_qkv, "o_proj", rng)
    for group in groups:
        target = fold_target(group, ("attention_v",))
        assert not isinstance(target, str), target
        cols, width = target.producer_columns, target.producer.out_features
        assert target.kind == "attention_v" and cols is not None and cols.stop == width and cols.start > 0
        hd, k = target.head_dim, target.channels
        group_size = k // (cols.stop - cols.start)
        target.apply_scale(rng.uniform(0.25, 4.0, cols.stop - cols.start)[target.channel_map])
        inner = [rng.permutation(hd) for _ in range((cols.stop - cols.start) // hd)]
        target.apply_permutation(np.concatenate([h * hd + inner[h // group_size] for h in range(k // hd)]))
        rotate_heads(target, rotation(hd, seed=5).matrix)
    after = _logits(model, ids)
    assert np.abs(after - before).max() / np.abs(before).max() < RTOL


def _relu_mlp(act: str, rng) -> ir.Model:
    """x -> fc1 (+ bias) -> act -> fc2, the MLP of OPT (ReLU) and T5 (ReLU, no bias)."""
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, 5, 8]))
    graph = ir.Graph([x], [], nodes=[], opset_imports={"": 18}, name="mlp")
    w1 = add_initializer(graph, rng.normal(0, 1, (8, 12)).astype(np.float32), "fc1.weight")
    b1 = add_initializer(graph, rng.normal(0, 1, 12).astype(np.float32), "fc1.bias")
    w2 = add_initializer(graph, rng.normal(0, 1, (12, 6)).astype(np.float32), "fc2.weight")
    fc1 = ir.node("MatMul", [x, w1], name="fc1")
    add = ir.node("Add", [fc1.outputs[0], b1], name="fc1.bias_add")
    relu = ir.node(act, [add.outputs[0]], name="act", attributes={"alpha": 0.1} if act == "LeakyRelu" else None)
    fc2 = ir.node("MatMul", [relu.outputs[0], w2], name="fc2")
    graph.extend([fc1, add, relu, fc2])
    fc2.outputs[0].name, fc2.outputs[0].type = "y", ir.TensorType(ir.DataType.FLOAT)
    graph.outputs.append(fc2.outputs[0])
    return ir.Model(graph, ir_version=10)


@pytest.mark.parametrize("act", ["Relu", "LeakyRelu"])
def test_scales_and_permutations_fold_through_a_relu_into_fc1(act):
    """OPT's fc2 input is ReLU(fc1 x + b): fc1's columns and bias absorb fc2's scale (positive)
    and permutation; the function is unchanged."""
    import onnxruntime as ort

    rng = np.random.default_rng(3)
    model = _relu_mlp(act, rng)
    x = rng.normal(0, 1, (2, 5, 8)).astype(np.float32)

    def run():
        proto = ir.serde.serialize_model(model)
        return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]

    before = run()
    group = next(g for g in find_linear_sites(model.graph).input_groups() if g[0].name == "fc2")
    assert group[0].feeder.kind == "activated_linear"
    assert isinstance(fold_target(group, ("norm", "gated_linear")), str)  # only where the recipe allows it
    target = fold_target(group, ("activated_linear",))
    assert not isinstance(target, str), target
    assert target.producer.name == "fc1" and target.producer_bias.name == "fc1.bias"
    target.apply_scale(rng.uniform(0.25, 4.0, 12))
    target.apply_permutation(rng.permutation(12))
    np.testing.assert_allclose(run(), before, rtol=RTOL, atol=1e-5)
    # a second reader of fc1's output would see its columns move: refused
    model.graph.outputs.append(group[0].feeder.node.inputs[0])
    assert "read elsewhere" in fold_target(find_linear_sites(model.graph).input_groups()[1], ("activated_linear",))


@pytest.fixture(scope="module")
def gpt2_export(tmp_path_factory):
    """A tiny random GPT-2 exported by torch dynamo: Conv1D c_attn is a Gemm with its bias as C,
    reshaped back to [batch, seq, 3 x hidden] and split into Q, K and V."""
    import os

    from lowbit.models.export import export_model
    from lowbit.models.tiny_hf import make_hf_dir

    root = tmp_path_factory.mktemp("gpt2")
    old = os.environ.get("LOWBIT_CACHE")
    os.environ["LOWBIT_CACHE"] = str(root / "cache")  # this test's export, not the user's cache
    try:
        return export_model(str(make_hf_dir(root / "hf", "gpt2")), with_past=False)
    finally:
        if old is None:
            del os.environ["LOWBIT_CACHE"]
        else:
            os.environ["LOWBIT_CACHE"] = old


def test_gpt2_c_proj_folds_into_c_attn_v_columns_behind_bias_and_reshape(gpt2_export):
    """c_proj's input is attention over V, and V is the last third of c_attn's output behind its
    Gemm bias and a Reshape: c_attn's V columns and its bias's take the scale and an in-head
    permutation; Q and K columns are left as they are; the function is unchanged."""
    rng = np.random.default_rng(5)
    model = _model(gpt2_export.parent if gpt2_export.is_file() else gpt2_export)
    ids = rng.integers(1, 96, (2, 12))  # the tiny vocabulary
    before = _logits(model, ids)
    folded = 0
    for group in find_linear_sites(model.graph).input_groups():
        if not group[0].name.endswith("attn.c_proj"):
            continue
        target = fold_target(group, ("attention_v",))
        assert not isinstance(target, str), target
        assert target.producer.name.endswith("attn.c_attn") and target.producer_columns == slice(64, 96)
        q_k = weight_kn(target.producer)[:, :64].copy()
        target.apply_scale(rng.uniform(0.25, 4.0, target.channels))
        hd = target.head_dim
        target.apply_permutation(np.concatenate([h * hd + rng.permutation(hd) for h in range(target.channels // hd)]))
        np.testing.assert_array_equal(weight_kn(target.producer)[:, :64], q_k)
        folded += 1
    assert folded == 2
    np.testing.assert_allclose(_logits(model, ids), before, rtol=RTOL, atol=1e-5)
