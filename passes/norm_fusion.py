"""Fuse decomposed RMSNorm / LayerNorm chains into one norm node (onnxscript rewrite rules).

Assumes float32 norms over the last axis, as transformers exports them (optimum, opset 18;
torch's legacy exporter, opset 13-17, once :mod:`lowbit.passes.opset` has upgraded it):
``gamma * (x / sqrt(mean(x^2) + eps))`` with the reciprocal written as ``Div(x, r)``,
``Mul(x, Div(1, r))`` (legacy ``rsqrt``) or ``Mul(x, Reciprocal(r))``, either multiplication
order, and ``gamma * ((x - mean) / sqrt(var + eps)) + beta`` for LayerNorm. The model's
default-domain opset is >= 18 (``ReduceMean`` takes ``axes`` as an input): the pass refuses older
models instead of silently matching nothing.

Guarantees: function-preserving up to float32 rounding of the reciprocal form (one ulp-level
difference per element; tests bound it). Every later pass then sees exactly one norm node whose
gamma/beta are initializers:

- RMSNorm, model opset >= 23: standard ``RMSNormalization``;
- RMSNorm, older opsets: ``lowbit.RMSNormalization``, a model-local function whose body is the
  standard decomposed ops, importing the model's opset -- ONNX Runtime inlines it at session
  creation (no runtime cost) and any ONNX runtime can execute it;
- LayerNorm: standard ``LayerNormalization``.

Given a report dict, records ``report["norm_fusion"] = {"rms": n, "layer": n, "rms_op": ...}``.
"""

from __future__ import annotations

import logging
from typing import Any

import onnx_ir as ir
from onnxscript.rewriter import pattern

from lowbit.passes.opset import default_opset

__all__ = ["FuseNormsPass", "rms_norm_function", "LOWBIT_DOMAIN"]

logger = logging.getLogger(__name__)

LOWBIT_DOMAIN = "lowbit"
MIN_OPSET = 18  # ReduceMean's axes is an input from opset 18 on (the form the rules match)


def _last_axis_only(axes: ir.Value | None, x: ir.Value) -> bool:
    if axes is None or axes.const_value is None:
        return False
    vals = [int(a) for a in axes.const_value.numpy().reshape(-1)]
    rank = x.shape.rank() if x.shape is not None else None
    return vals == [-1] or (rank is not None and vals == [rank - 1])


def _float_scalar(value: ir.Value, expected: float | None = None) -> float | None:
    if value is None or value.const_value is None or value.const_value.size != 1:
        return None
    v = float(value.const_value.numpy().reshape(-1)[0])
    return v if expected is None or v == expected else None


def _is_mean_centred(x: ir.Value) -> bool:
    node = x.producer()
    if node is None or node.op_type != "Sub":
        return False
    mean = node.inputs[1].producer()
    return mean is not None and mean.op_type == "ReduceMean" and mean.inputs[0] is node.inputs[0]


class RmsNormFusion(pattern.RewriteRuleClassBase):
    """gamma * x * rsqrt(mean(x^2) + eps) -> one RMSNormalization node."""

    def __init__(self, name: str, *, rsqrt: str, gamma_first: bool, fused_domain: str) -> None:
        super().__init__(name)
        self._rsqrt, self._gamma_first, self._domain = rsqrt, gamma_first, fused_domain

    def pattern(self, op, x, gamma, two, axes, eps, one):
        ms = op.ReduceMean(op.Pow(x, two), axes)
        rms = op.Sqrt(op.Add(ms, eps))
        if self._rsqrt == "div":
            normed = op.Div(x, rms)
        elif self._rsqrt == "div_one":
            normed = op.Mul(x, op.Div(one, rms))
        else:
            normed = op.Mul(x, op.Reciprocal(rms))
        return op.Mul(gamma, normed) if self._gamma_first else op.Mul(normed, gamma)

    def check(self, context, x, gamma, two, axes, eps, one=None, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        if _float_scalar(two, 2.0) is None:
            return result.fail("exponent is not the constant 2", two)
        if not _last_axis_only(axes, x):
            return result.fail("ReduceMean is not over the last axis only", axes)
        if _float_scalar(eps) is None:
            return result.fail("epsilon is not a constant float scalar", eps)
        if self._rsqrt == "div_one" and _float_scalar(one, 1.0) is None:
            return result.fail("numerator is not the constant 1", one)
        if gamma.const_value is None or len(gamma.const_value.shape) != 1:
            return result.fail("gamma is not a 1-D initializer", gamma)
        if x.dtype not in (None, ir.DataType.FLOAT):
            return result.fail("only float32 norms are fused", x)
        if _is_mean_centred(x):
            return result.fail("input is mean-centred: this is a LayerNorm", x)
        return result

    def rewrite(self, op, x, gamma, eps, **_):
        return op.RMSNormalization(x, gamma, axis=-1, epsilon=_float_scalar(eps), _domain=self._domain)


class LayerNormFusion(pattern.RewriteRuleClassBase):
    """gamma * (x - mean) / sqrt(var + eps) + beta -> LayerNormalization."""

    def __init__(self, name: str, *, gamma_first: bool) -> None:
        super().__init__(name)
        self._gamma_first = gamma_first

    def pattern(self, op, x, gamma, beta, two, axes1, axes2, eps):
        centered = op.Sub(x, op.ReduceMean(x, axes1))
        var = op.ReduceMean(op.Pow(centered, two), axes2)
        normed = op.Div(centered, op.Sqrt(op.Add(var, eps)))
        scaled = op.Mul(gamma, normed) if self._gamma_first else op.Mul(normed, gamma)
        return op.Add(scaled, beta)

    def check(self, context, x, gamma, beta, two, axes1, axes2, eps, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        if _float_scalar(two, 2.0) is None:
            return result.fail("exponent is not the constant 2", two)
        if not (_last_axis_only(axes1, x) and _last_axis_only(axes2, x)):
            return result.fail("reductions are not over the last axis", axes1)
        if _float_scalar(eps) is None:
            return result.fail("epsilon is not a constant float scalar", eps)
        for v in (gamma, beta):
            if v.const_value is None or len(v.const_value.shape) != 1:
                return result.fail("gamma/beta is not a 1-D initializer", v)
        return result

    def rewrite(self, op, x, gamma, beta, eps, **_):
        return op.LayerNormalization(x, gamma, beta, axis=-1, epsilon=_float_scalar(eps))


def rms_norm_function(opset: int = MIN_OPSET) -> ir.Function:
    """``lowbit.RMSNormalization(X, scale; epsilon)``: the standard decomposed ops, importing
    default-domain ``opset`` (>= 18; a model-local function imports its model's opset)."""
    x = ir.Value(name="X")
    scale = ir.Value(name="scale")
    tape = ir.tape.Tape()
    two = tape.op("Constant", [], {"value_float": 2.0})
    axes = tape.op("Constant", [], {"value_ints": [-1]})
    eps = tape.op("Constant", [], {"value_float": ir.RefAttr("value_float", "epsilon", ir.AttributeType.FLOAT)})
    ms = tape.op("ReduceMean", [tape.op("Pow", [x, two]), axes], {"keepdims": 1})
    normed = tape.op("Div", [x, tape.op("Sqrt", [tape.op("Add", [ms, eps])])])
    y = tape.op("Mul", [normed, scale])
    y.name = "Y"
    graph = ir.Graph([x, scale], [y], nodes=tape.nodes, opset_imports={"": opset}, name="RMSNormalization")
    return ir.Function(LOWBIT_DOMAIN, "RMSNormalization", graph=graph, attributes=[ir.Attr("epsilon", ir.AttributeType.FLOAT, 1e-5)])


class FuseNormsPass(ir.passes.InPlacePass):
    """Apply the norm fusion rules to the main graph; register the lowbit function if used."""

    def __init__(self, report: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.report = report

    def requires(self, model: ir.Model) -> None:
        opset = default_opset(model)
        if opset < MIN_OPSET:
            raise ir.passes.PreconditionError(
                f"norm fusion matches opset >= {MIN_OPSET} forms; the model has opset {opset}: "
                "upgrade it first (lowbit.passes.opset.UpgradeOpsetPass)")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        opset = default_opset(model)
        rms_domain = "" if opset >= 23 else LOWBIT_DOMAIN
        rms_rules = [
            RmsNormFusion.rule(f"RmsNorm_{form}_{'g' if gf else 'x'}", rsqrt=form, gamma_first=gf, fused_domain=rms_domain)
            for form in ("div", "div_one", "reciprocal")
            for gf in (True, False)
        ]
        # LayerNorm first: its centred core would otherwise match the RMS rule
        ln_rules = [LayerNormFusion.rule(f"LayerNorm_{gf}", gamma_first=gf) for gf in (True, False)]
        layer = pattern.RewriteRuleSet(ln_rules).apply_to_model(model)
        rms = pattern.RewriteRuleSet(rms_rules).apply_to_model(model)
        if rms and rms_domain == LOWBIT_DOMAIN and any(n.domain == LOWBIT_DOMAIN for n in model.graph):
            fn = rms_norm_function(opset)
            model.functions[fn.identifier()] = fn
            model.opset_imports[LOWBIT_DOMAIN] = 1
        if self.report is not None:
            self.report["norm_fusion"] = {"rms": rms, "layer": layer}
            if rms:
                self.report["norm_fusion"]["rms_op"] = f"{rms_domain}.RMSNormalization".lstrip(".")
        logger.info("fused %d RMSNorm and %d LayerNorm regions", rms, layer)
        return ir.passes.PassResult(model, modified=bool(rms + layer))
