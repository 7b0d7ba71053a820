"""A norm gamma or bias that deduplication shared between layers gets one copy per use, with the
same values: the function is unchanged and every norm can then take its own folded scales."""

import numpy as np
import onnx_ir as ir

from lowbit.core.linear_sites import NORM_OPS, find_linear_sites
from lowbit.models.synthetic import tiny_decoder
from lowbit.ort.session import run_on_tokens
from lowbit.passes.canonicalize import canonicalize_passes
from lowbit.passes.unshare_params import UnshareParamsPass


def _shared_model():
    """The tiny decoder with every norm reading the first norm's gamma (what an exporter's
    deduplication writes for a freshly initialised model, whose gammas are all ones)."""
    model = tiny_decoder(norm="rms", norm_form="fused", layers=2)
    for p in canonicalize_passes():
        p(model)
    norms = [n for n in model.graph if (n.domain, n.op_type) in NORM_OPS]
    gamma = norms[0].inputs[1]
    gamma.const_value = ir.tensor(np.ones(gamma.const_value.shape, np.float32), name=gamma.name)
    for norm in norms[1:]:
        norm.replace_input_with(1, gamma)
    return model, norms


def test_shared_gammas_get_a_copy_per_norm_and_the_function_is_kept():
    model, norms = _shared_model()
    ids = np.arange(3, 19)
    before = run_on_tokens(model, ids)[0]
    assert len({id(n.inputs[1]) for n in norms}) == 1
    report = {}
    assert UnshareParamsPass(report)(model).modified
    gammas = [n.inputs[1] for n in norms]
    assert len({id(g) for g in gammas}) == len(norms) == report["unshared_params"] + 1
    assert all(len(g.uses()) == 1 and np.array_equal(g.const_value.numpy(), np.ones_like(g.const_value.numpy()))
               for g in gammas)  # fmt: skip
    assert np.array_equal(run_on_tokens(model, ids)[0], before)
    # each group's norm is now a foldable target of its own
    from lowbit.core.folding import fold_target

    groups = [g for g in find_linear_sites(model.graph).input_groups() if g[0].feeder.kind == "norm"]
    assert groups and all(not isinstance(fold_target(g, ("norm",)), str) for g in groups)


def test_nothing_to_unshare_leaves_the_model_alone():
    model = tiny_decoder(norm="rms", norm_form="fused", layers=2)
    for p in canonicalize_passes():  # canonicalization runs the pass already: nothing is left shared
        p(model)
    report = {}
    assert not UnshareParamsPass(report)(model).modified and report["unshared_params"] == 0
