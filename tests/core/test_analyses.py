"""Typed analyses and the pass contract: structural analyses are rebuilt after a graph edit,
value analyses survive it, REQUIRES/ENSURES are checked around every pass, and every shipped
recipe's pipeline is consistent (each analysis a pass requires is ensured by an earlier pass)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from lowbit.compiler.pipeline import build_pipeline, preserves_function
from lowbit.core.analyses import Key
from lowbit.core.context import CalibrationData, CompileContext
from lowbit.core.linear_sites import LINEAR_SITES
from lowbit.core.pass_base import LowbitPass
from lowbit.core.recipe import available_recipes, load_recipe
from lowbit.models.synthetic import tiny_decoder

WINDOWS = [np.random.default_rng(7).integers(0, 64, 24) for _ in range(4)]
VALUE: Key[int] = Key("test_value", "a value analysis")
NEVER: Key[int] = Key("test_never", "an analysis nobody produces")


class _Edit(LowbitPass):
    """Renames nothing, but says it edited the graph when asked to."""

    def __init__(self, ctx, modified: bool, invalidates=()) -> None:
        super().__init__(ctx)
        self.modified, self.INVALIDATES = modified, tuple(invalidates)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        return ir.passes.PassResult(model, modified=self.modified)


def _ctx() -> CompileContext:
    return CompileContext(tiny_decoder(), load_recipe("w8"))


def test_structural_analyses_are_rebuilt_after_an_edit_and_values_survive():
    ctx = _ctx()
    sites = ctx.sites
    ctx.analyses.put(VALUE, 7)
    _Edit(ctx, modified=False)(ctx.model)
    assert ctx.sites is sites  # nothing edited: the same map
    _Edit(ctx, modified=True)(ctx.model)
    assert ctx.sites is not sites and [s.name for s in ctx.sites] == [s.name for s in sites]
    assert ctx.analyses.get(VALUE) == 7  # a value analysis is not structural
    _Edit(ctx, modified=False, invalidates=[VALUE])(ctx.model)
    assert not ctx.analyses.has(VALUE)


def test_requires_and_ensures_are_checked_around_the_pass():
    ctx = _ctx()

    class Needs(_Edit):
        REQUIRES = (NEVER,)

    class Promises(_Edit):
        ENSURES = (NEVER,)

    with pytest.raises(ir.passes.PreconditionError, match="test_never"):
        Needs(ctx, modified=False)(ctx.model)
    with pytest.raises(ir.passes.PostconditionError, match="test_never"):
        Promises(ctx, modified=False)(ctx.model)
    assert ctx.analyses.has(LINEAR_SITES)  # built on demand from the graph


def test_a_missing_analysis_is_named_with_its_meaning():
    with pytest.raises(KeyError, match="test_never.*an analysis nobody produces"):
        _ctx().analyses.get(NEVER)


@pytest.mark.parametrize("name", sorted(available_recipes()))
def test_every_shipped_pipeline_ensures_what_its_passes_require(name):
    ctx = CompileContext(tiny_decoder(), load_recipe(name), CalibrationData(WINDOWS))
    available = {LINEAR_SITES.name}  # the context builds it from the graph
    for p in build_pipeline(ctx):
        if isinstance(p, LowbitPass):
            missing = [k.name for k in p.REQUIRES if k.name not in available]
            assert not missing, f"{name}: {type(p).__name__} requires {missing}, ensured by no earlier pass"
            available |= {k.name for k in p.ENSURES}
        else:  # onnx_ir's own passes (folding, inference, dead code) preserve the function
            assert preserves_function(p)
