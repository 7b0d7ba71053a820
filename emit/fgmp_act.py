"""FGMP for activations: the runtime per-block FP8/NVFP4 choice (``lowbit.FgmpActQuant``) at every
linear-site input, with one global threshold calibrated to a target FP8 block fraction.

Assumes ``precision.activations = "runtime"`` and ``activations.format = "none"`` (this pass is
then the activation quantizer). For each input group (sites sharing an input) it inserts
``FgmpActQuant(x, g2, threshold)`` (dynamic NVFP4 global scale = amax(x) / 2688) in front of the
sites: per block of 16 channels of each token, the block is fake-quantized to FP8 E4M3 when
``sum g2 (Q_nvfp4(x) - Q_fp8(x))^2 > threshold`` and to NVFP4 otherwise (see
:func:`lowbit.runtime_ext.reference.fgmp_act_quant`). ``g2`` is the activation Fisher
(``act/<site>`` of the side file) or, for the proxy, ones (plain perturbation energy).

Threshold: the perturbations of every token-block of every group over the calibration windows are
pooled (across all layers); with k = round(fraction * count), the threshold is the (k+1)-th largest
value, so exactly the k largest blocks exceed it on calibration data unless values tie there (the
achieved calibration fraction is reported). The perturbations come from the compile's one
observation run (:class:`PerturbationAccumulator`, registered by the pipeline when
:func:`observed_early` holds); otherwise this pass runs the windows itself, a second, counted
observation run (``report["observation"]``): the perturbation is non-linear in x (dynamic block
scales), so it cannot be carried in closed form through smoothing (x / s) or K/V quantization,
which change this pass's inputs after the first run. The fallback FunctionProto from ``runtime_ext`` is
attached, so any ORT runs the model; the native kernel is used when its library is registered.
Not function-preserving (it quantizes).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from lowbit import formats
from lowbit.core.analyses import Key
from lowbit.core.context import CompileContext
from lowbit.core.pass_base import LowbitPass
from lowbit.core.linear_sites import LinearSite
from lowbit.core.recipe import Recipe
from lowbit.ort.observe import Window, observe
from lowbit.emit.qdq import ensure_opset
from lowbit.passes.precision import BLOCK, PRECISION_ASSIGNMENT, activation_fp8_fraction, activation_groups, n_fp8_blocks

__all__ = ["FgmpActivationsPass", "PerturbationAccumulator", "activation_perturbation", "calibrated_threshold",
           "observed_early"]  # fmt: skip

PERTURBATIONS: Key[dict[str, list[np.ndarray]]] = Key(
    "fgmp_act_perturbations", "FGMP runtime activations: per input, per-window token-block perturbations")

logger = logging.getLogger(__name__)


def activation_perturbation(x: np.ndarray, g2: np.ndarray) -> np.ndarray:
    """Per token-block sum g2 (Q_nvfp4(x) - Q_fp8(x))^2 as FgmpActQuant computes it (float64),
    candidates with the op's dynamic scales: blocks of 16 on the last axis, amax(x) / 2688 global."""
    x = np.asarray(x, np.float32)
    d = formats.fake_quantize(x, "nvfp4", -1, BLOCK).astype(np.float64) - formats.fake_quantize(x, "fp8_e4m3", -1, BLOCK)
    w = np.asarray(g2, np.float64)
    return (w * d * d).reshape(*x.shape[:-1], -1, BLOCK).sum(-1)


def calibrated_threshold(perturbations: np.ndarray, fraction: float) -> float:
    """The threshold leaving exactly the k = round(fraction * n) largest values above it (no ties)."""
    p = np.sort(np.asarray(perturbations, np.float64).reshape(-1))[::-1]
    k = n_fp8_blocks(p.size, fraction)
    if k >= p.size:
        return -1.0  # perturbations are >= 0: every block FP8
    return float(p[k])


def observed_early(recipe: Recipe) -> bool:
    """Whether the compile's first observation run sees this pass's inputs as they will be: no
    smoothing (it divides inputs by scales) and no K/V quantization (it changes what attention
    feeds o_proj and every later layer) runs between the two. Reordering needs quantized
    activations, which this mode excludes."""
    return recipe.smooth.method == "none" and recipe.kv.format == "none"


def _g2(ctx: CompileContext, site: LinearSite) -> np.ndarray:
    from lowbit.passes.fisher import activation_fisher

    g2 = activation_fisher(ctx, site)
    return np.ones(site.in_features, np.float32) if g2 is None else g2


class PerturbationAccumulator:
    """Per token-block perturbations (:func:`activation_perturbation`) of every input group over
    the calibration windows: the ``fgmp_act_perturbations`` analysis. Without ``groups``, every
    input group whose channels come in blocks of 16 (the precision assignment, which selects the
    covered groups, is made after the run)."""

    probes = False
    provides = (PERTURBATIONS,)

    def __init__(self, groups: list[list[LinearSite]] | None = None) -> None:
        self.groups = groups
        self.g2: dict[str, np.ndarray] = {}
        self.pooled: dict[str, list[np.ndarray]] = {}

    def taps(self, ctx: CompileContext) -> dict[str, ir.Value]:
        groups = self.groups
        if groups is None:
            groups = [g for g in ctx.sites.input_groups() if g[0].in_features % BLOCK == 0]
        taps = {}
        for i, g in enumerate(groups):
            x = g[0].input
            if x.name is None:
                x.name = f"lowbit_group_input_{i}"
            taps[x.name] = x
            self.g2[x.name] = _g2(ctx, g[0])
        self.pooled = {n: [] for n in taps}
        return taps

    def add(self, window: Window, values: Mapping[str, np.ndarray]) -> None:
        for name, x in values.items():
            self.pooled[name].append(activation_perturbation(x, self.g2[name]).reshape(-1))

    def finish(self, ctx: CompileContext) -> None:
        ctx.analyses.put(PERTURBATIONS, self.pooled)


class FgmpActivationsPass(LowbitPass):
    """Insert calibrated FgmpActQuant nodes at every linear-site input group (module doc)."""

    REQUIRES = (PRECISION_ASSIGNMENT,)
    PRESERVES_FUNCTION = False

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        recipe = self.ctx.recipe
        groups = activation_groups(self.ctx, "runtime", assigned_sites_only=False)
        g2 = {id(g[0]): _g2(self.ctx, g[0]) for g in groups}
        observed = self.ctx.analyses.find(PERTURBATIONS) or {}
        if groups and any(g[0].input.name not in observed for g in groups):
            observe(self.ctx, model, [PerturbationAccumulator(groups)], desc="FGMP activations",
                    why="FGMP runtime activations: smoothing or K/V quantization changed the inputs whose "
                        "(non-linear) block perturbations set the threshold")  # fmt: skip
            observed = self.ctx.analyses.get(PERTURBATIONS)
        # the threshold depends on the pooled values only, not on their order
        pooled = np.concatenate([p for g in groups for p in observed[g[0].input.name]] or [np.zeros(0)])
        self.ctx.analyses.invalidate(PERTURBATIONS)  # used once; it holds every calibration token-block
        fraction = activation_fp8_fraction(recipe.precision)
        threshold = calibrated_threshold(pooled, fraction)
        for g in groups:
            self._insert(model, g, g2[id(g[0])], threshold)
        self._attach_function(model)
        self.ctx.report.setdefault("precision", {})["activations"] = {
            "mode": "runtime FgmpActQuant", "threshold": threshold, "groups": len(groups),
            "calibration_fp8_fraction": float((pooled > threshold).mean()),
            "requested_fp8_fraction": fraction}  # fmt: skip
        logger.info("FgmpActQuant at %d inputs, threshold %.4g", len(groups), threshold)
        return ir.passes.PassResult(model, modified=bool(groups))

    def _insert(self, model: ir.Model, group, g2: np.ndarray, threshold: float) -> None:
        graph, x = model.graph, group[0].input
        base = x.name or group[0].name
        consts = []
        for suffix, arr in ((".fgmp_g2", g2.astype(np.float32)), (".fgmp_threshold", np.array(threshold, np.float32))):
            t = ir.tensor(arr, name=f"{base}{suffix}")
            v = ir.Value(name=t.name, shape=ir.Shape(t.shape), type=ir.TensorType(t.dtype), const_value=t)
            graph.register_initializer(v)
            consts.append(v)
        node = ir.node("FgmpActQuant", [x, *consts], domain="lowbit", overload="dynamic", name=f"{base}.fgmp")
        node.outputs[0].name = f"{base}.fgmp_quantized"
        node.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
        node.outputs[0].shape = x.shape
        graph.insert_before(group[0].node, [node])
        for site in group:
            site.node.replace_input_with(0, node.outputs[0])

    @staticmethod
    def _attach_function(model: ir.Model) -> None:
        from lowbit.runtime_ext.functions import fgmp_function
        from lowbit.runtime_ext.specs import FgmpSpec

        ensure_opset(model, 21)
        model.opset_imports.setdefault("lowbit", 1)
        model.graph.opset_imports.setdefault("lowbit", 1)
        func = ir.serde.deserialize_function(fgmp_function(FgmpSpec(False), model.opset_imports[""]))
        model.functions[func.identifier()] = func
