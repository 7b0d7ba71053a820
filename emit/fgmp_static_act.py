"""FGMP for activations, static: each input channel of every linear-site input is FP8 E4M3 or
4-bit E2M1 (the NVFP4 element), chosen once from calibration and emitted with standard ONNX ops.

Assumes ``precision.activations = "static"``, ``activations.format = "none"`` (this pass is the
activation quantizer), the ``precision_assignment`` analysis (it names the sites whose inputs are
quantized), ``activation_stats`` from calibration (per-channel absmax) and calibration windows.
Channel counts must be multiples of 16. Not function-preserving (it quantizes).

Per input group (sites sharing one input x, channels c):

1. Static per-channel scales: FP8 ``s8 = absmax_c / 448``; E2M1 ``s4 = r_c * absmax_c / 6`` with
   the clip ratio r_c from CLIP_RATIOS minimising sum_t (x_tc - Q4(x_tc))^2 over the calibration
   tokens (per channel the sensitivity is a constant factor, so it does not move the argmin).
2. Channel impact ``g2_c * sum_t (Q4(x_tc) - Q8(x_tc))^2`` (float64), the FGMP block impact with
   one channel of calibration tokens as the "block". ``g2_c``: the activation Fisher
   (``act/<site>`` of the side file) or, for a bare ONNX model, the documented proxy
   ``sum over the group's weights of ||W[c, :]||^2`` -- the output-error second moment of an
   input error in channel c when channel errors are uncorrelated (the report names which).
3. Blocks that respect NVFP4's 16-channel blocks: each input's channels, sorted by decreasing
   impact, are cut into blocks of 16 (block impact = sum). One global choice across all inputs of
   exactly ``k = floor(f * total_blocks + 0.5)`` FP8 blocks (``precision.top_k_masks``, ties by
   position); because each input's blocks are sorted, an input keeps its top ``16 n`` channels in
   FP8, and both precisions come in whole blocks of 16 (a deploy kernel that makes them
   contiguous -- a stable partition by the recorded bitmap -- gets whole NVFP4 blocks).
   ``f`` is :func:`lowbit.passes.precision.activation_fp8_fraction` (the weights' budget unless
   ``precision.act_fp8_fraction`` is set); it counts channel blocks of each quantized tensor once.

Emission (guarantee: the graph computes :func:`static_act_quant` exactly -- equal float32 values,
a -0 may come out +0 -- checked in ORT in the tests), masks folded into constant scales:

    y = DQ_fp8(Q_fp8(x, s8), 1) * (s8 * m) + E2M1(x / s4) * (s4 * (1 - m))

(the unit-scale DQ then Mul is bit-identical to a DQ with scale ``s8 * m`` and keeps ONNX
Runtime's DQ -> MatMul fusion, which rejects FP8, away from an input with only FP8 channels)

``qdq`` (and ``ort-cpu``): the FP8 branch is QuantizeLinear/DequantizeLinear to FLOAT8E4M3FN
per axis; ONNX Runtime CPU has no FP4 Q/DQ, so E2M1 rounding is spelt with exact elementwise ops
(Div, Abs, Min, Less, Where, Round, Mul, Sign: ``a = min(|u|, 6)``, step 0.5 / 1 / 2 below 2 / 4
/ above, ``step * Round(a / step)`` -- Round ties to even like E2M1, every step but the division
by ``s4`` and the final scale product is exact). ``qdq-fp4``: the E2M1 branch is a standard
QuantizeLinear/DequantizeLinear pair to FLOAT4E2M1 (opset 23; ``onnx.reference`` runs it, ORT
CPU does not). The FP8-channel bitmap of each input is recorded in
``metadata_props["lowbit.fgmp.act_fp8/<input>"]`` (format of :func:`emit_mixed.encode_bitmap`).
Bits (report): the weights' accounting, NVFP4 4.5 / FP8 8.0 per element.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx_ir as ir

from lowbit.core.analyses import Key
from lowbit.core.context import CompileContext
from lowbit.core.pass_base import LowbitPass
from lowbit.core.statistics import ACTIVATION_STATS
from lowbit.ort.observe import Window, observe
from lowbit.errors import LowbitError
from lowbit.formats.minifloat import FP4_E2M1, FP8_E4M3
from lowbit.emit.mixed import encode_bitmap
from lowbit.emit.qdq import ensure_opset
from lowbit.core.initializers import add_initializer
from lowbit.core.linear_sites import LinearSite
from lowbit.passes.precision import BLOCK, FP8_BITS, NVFP4_BITS, PRECISION_ASSIGNMENT, activation_fp8_fraction, activation_groups, n_fp8_blocks, top_k_masks

__all__ = [
    "ACT_BITMAP_KEY", "CLIP_RATIOS", "ChannelPlan", "ChannelStatsAccumulator", "FgmpStaticActivationsPass",
    "channel_blocks", "choose_channels", "static_act_nodes", "static_act_quant", "weight_row_proxy",
]  # fmt: skip

logger = logging.getLogger(__name__)

ACT_BITMAP_KEY = "lowbit.fgmp.act_fp8/"
# Clip ratios 2^(-i/3): three per octave down to 1/5 of the calibrated absmax. Static 4-bit scales
# must cover every token, so the MSE-optimal clip of heavy-tailed channels sits well below 1.
CLIP_RATIOS = np.exp2(-np.arange(8) / 3).astype(np.float32)


@dataclass(frozen=True, eq=False)
class ChannelPlan:
    """One input's static precision per channel (all arrays [C])."""

    name: str  # the input value's name
    fp8: np.ndarray  # bool
    s8: np.ndarray  # float32 FP8 scale (used by the FP8 channels)
    s4: np.ndarray  # float32 E2M1 scale (used by the 4-bit channels)
    impact: np.ndarray  # float64 g2 * sum (Q4 - Q8)^2

    @property
    def n_fp8(self) -> int:
        return int(self.fp8.sum())


ACTIVATION_PLANS: Key[list[ChannelPlan]] = Key("activation_plans", "static FGMP: per input, which channels take FP8 and their scales")


def static_act_quant(x: np.ndarray, fp8: np.ndarray, s8: np.ndarray, s4: np.ndarray) -> np.ndarray:
    """The numpy reference: FP8 E4M3 ``x / s8`` in the ``fp8`` channels, E2M1 ``x / s4`` elsewhere
    (last axis = channels), each rounded to nearest even with saturation and scaled back."""
    x = np.asarray(x, np.float32)
    q8 = FP8_E4M3.round(x / s8) * s8
    q4 = FP4_E2M1.round(x / s4) * s4
    return np.where(fp8, q8, q4).astype(np.float32)


class _GroupChannelStats:
    """The observation accumulator: one :class:`ChannelStatsAccumulator` per input group."""

    probes = False
    provides = ()  # fills the per-group accumulators it was given

    def __init__(self, groups: list[list[LinearSite]], accs: dict[str, ChannelStatsAccumulator]) -> None:
        self.groups, self.accs = groups, accs

    def taps(self, ctx: CompileContext) -> dict[str, ir.Value]:
        return {g[0].input.name: g[0].input for g in self.groups}

    def add(self, window: Window, values: Mapping[str, np.ndarray]) -> None:
        for name, x in values.items():
            self.accs[name].update(x)

    def finish(self, ctx: CompileContext) -> None:
        pass


class ChannelStatsAccumulator:
    """Running per-channel sums over calibration tokens for every clip ratio: 4-bit error
    ``sum (x - Q4)^2`` and candidate gap ``sum (Q4 - Q8)^2`` (both [C, R], float64)."""

    def __init__(self, absmax: np.ndarray) -> None:
        amax = np.asarray(absmax, np.float32)
        self.s8 = np.where(amax > 0, amax / np.float32(FP8_E4M3.max_finite), np.float32(1)).astype(np.float32)
        base = np.where(amax > 0, amax / np.float32(FP4_E2M1.max_finite), np.float32(1)).astype(np.float32)
        self.s4_grid = (base[:, None] * CLIP_RATIOS[None, :]).astype(np.float32)  # [C, R]
        self.err4 = np.zeros(self.s4_grid.shape, np.float64)
        self.gap = np.zeros(self.s4_grid.shape, np.float64)
        self.tokens = 0

    def update(self, x: np.ndarray, token_chunk: int = 128) -> None:
        x2 = np.asarray(x, np.float32).reshape(-1, self.s8.size)
        for start in range(0, x2.shape[0], token_chunk):  # bounds the [T, C, R] temporaries
            xc = x2[start:start + token_chunk]
            q8 = FP8_E4M3.round(xc / self.s8) * self.s8
            q4 = FP4_E2M1.round(xc[:, :, None] / self.s4_grid) * self.s4_grid
            self.err4 += np.square(q4 - xc[:, :, None]).sum(0, dtype=np.float64)
            self.gap += np.square(q4 - q8[:, :, None]).sum(0, dtype=np.float64)
        self.tokens += x2.shape[0]

    def best(self) -> tuple[np.ndarray, np.ndarray]:
        """(E2M1 scale, candidate gap) per channel at the clip ratio of least 4-bit error (the
        largest ratio among equals)."""
        pick = np.argmin(self.err4, axis=1)
        rows = np.arange(pick.size)
        return self.s4_grid[rows, pick], self.gap[rows, pick]


def weight_row_proxy(group: list[LinearSite]) -> np.ndarray:
    """sum over the group's weights of ||W[c, :]||^2 per input channel c (float64)."""
    total = None
    for site in group:
        w = site.weight.const_value.numpy().astype(np.float64)
        rows = np.square(w).sum(axis=1 - site.reduction_axis)
        total = rows if total is None else total + rows
    return total


def channel_blocks(impact: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(channel order by decreasing impact, stable; impact of each consecutive block of 16)."""
    order = np.argsort(-np.asarray(impact, np.float64), kind="stable")
    return order, impact[order].reshape(-1, BLOCK).sum(axis=1)


def choose_channels(impacts: list[np.ndarray], fraction: float) -> tuple[list[np.ndarray], float]:
    """FP8 channel masks for exactly ``n_fp8_blocks(total blocks, fraction)`` blocks of 16 over all
    inputs (module doc, step 3), and the impact of the last block kept (nan when none)."""
    ordered = [channel_blocks(i) for i in impacts]
    total = sum(b.size for _, b in ordered)
    chosen, threshold = top_k_masks([b for _, b in ordered], n_fp8_blocks(total, fraction))
    masks = []
    for (order, _), keep in zip(ordered, chosen):
        mask = np.zeros(order.size, bool)
        mask[order[: BLOCK * int(keep.sum())]] = True  # sorted blocks: the kept ones are a prefix
        masks.append(mask)
    return masks, threshold


def _node(op: str, inputs: list[ir.Value], name: str, attrs: dict | None = None, dtype=ir.DataType.FLOAT) -> ir.Node:
    node = ir.node(op, inputs, attrs or {}, name=name)
    node.outputs[0].name = name
    node.outputs[0].type = ir.TensorType(dtype)
    return node


def static_act_nodes(graph: ir.Graph, x: ir.Value, plan: ChannelPlan, target: str) -> tuple[list[ir.Node], ir.Value]:
    """Nodes computing :func:`static_act_quant` of ``x`` (module doc: Emission) and their output."""
    base, axis = plan.name, {"axis": -1}
    keep8 = plan.fp8.astype(np.float32)
    nodes: list[ir.Node] = []
    branches: list[ir.Value] = []
    if plan.fp8.any():
        s8 = add_initializer(graph, plan.s8, f"{base}.fgmp_s8")
        z8 = add_initializer(graph, np.zeros(plan.s8.shape, ml_dtypes.float8_e4m3fn), f"{base}.fgmp_z8")
        ones = add_initializer(graph, np.ones(plan.s8.shape, np.float32), f"{base}.fgmp_unit_scale")
        s8m = add_initializer(graph, plan.s8 * keep8, f"{base}.fgmp_s8_masked")
        q = _node("QuantizeLinear", [x, s8, z8], f"{base}.fgmp_q8", axis, ir.DataType.FLOAT8E4M3FN)
        # DQ with unit scales, then the masked scales: bit-identical to DQ(q, s8m), and keeps ORT
        # from fusing DQ -> MatMul into MatMulIntegerToFloat (which rejects FP8) when no E2M1
        # branch follows
        dq = _node("DequantizeLinear", [q.outputs[0], ones, z8], f"{base}.fgmp_fp8_unscaled", axis)
        scaled = _node("Mul", [dq.outputs[0], s8m], f"{base}.fgmp_fp8")
        nodes += [q, dq, scaled]
        branches.append(scaled.outputs[0])
    if not plan.fp8.all():
        s4 = add_initializer(graph, plan.s4, f"{base}.fgmp_s4")
        s4m = add_initializer(graph, plan.s4 * (np.float32(1) - keep8), f"{base}.fgmp_s4_masked")
        part = _e2m1_fp4_qdq(graph, x, s4, s4m, base) if target == "qdq-fp4" else _e2m1_ops(graph, x, s4, s4m, base)
        nodes += part
        branches.append(part[-1].outputs[0])
    if len(branches) == 2:
        add = _node("Add", branches, f"{base}.fgmp_static")
        nodes.append(add)
        branches = [add.outputs[0]]
    out = branches[0]
    out.shape = x.shape
    return nodes, out


def _e2m1_fp4_qdq(graph: ir.Graph, x: ir.Value, s4: ir.Value, s4m: ir.Value, base: str) -> list[ir.Node]:
    z4 = add_initializer(graph, np.zeros(s4.shape[0], ml_dtypes.float4_e2m1fn), f"{base}.fgmp_z4")
    q = _node("QuantizeLinear", [x, s4, z4], f"{base}.fgmp_q4", {"axis": -1}, ir.DataType.FLOAT4E2M1)
    return [q, _node("DequantizeLinear", [q.outputs[0], s4m, z4], f"{base}.fgmp_fp4", {"axis": -1})]


def _e2m1_ops(graph: ir.Graph, x: ir.Value, s4: ir.Value, s4m: ir.Value, base: str) -> list[ir.Node]:
    """E2M1(x / s4) * s4m with exact elementwise ops (module doc)."""
    c = {k: add_initializer(graph, np.array(v, np.float32), f"{base}.fgmp_c_{k}")
         for k, v in (("max", FP4_E2M1.max_finite), ("half", 0.5), ("one", 1.0), ("two", 2.0), ("four", 4.0))}
    n = f"{base}.fgmp_e2m1"
    u = _node("Div", [x, s4], f"{n}_u")
    mag = _node("Abs", [u.outputs[0]], f"{n}_abs")
    a = _node("Min", [mag.outputs[0], c["max"]], f"{n}_sat")
    below2 = _node("Less", [a.outputs[0], c["two"]], f"{n}_lt2", dtype=ir.DataType.BOOL)
    below4 = _node("Less", [a.outputs[0], c["four"]], f"{n}_lt4", dtype=ir.DataType.BOOL)
    upper = _node("Where", [below4.outputs[0], c["one"], c["two"]], f"{n}_step_hi")
    step = _node("Where", [below2.outputs[0], c["half"], upper.outputs[0]], f"{n}_step")
    ratio = _node("Div", [a.outputs[0], step.outputs[0]], f"{n}_ratio")
    rounded = _node("Round", [ratio.outputs[0]], f"{n}_round")
    magnitude = _node("Mul", [rounded.outputs[0], step.outputs[0]], f"{n}_mag")
    sign = _node("Sign", [u.outputs[0]], f"{n}_sign")
    signed = _node("Mul", [magnitude.outputs[0], sign.outputs[0]], f"{n}_value")
    out = _node("Mul", [signed.outputs[0], s4m], f"{base}.fgmp_fp4")
    return [u, mag, a, below2, below4, upper, step, ratio, rounded, magnitude, sign, signed, out]


class FgmpStaticActivationsPass(LowbitPass):
    """Choose FP8 / E2M1 per input channel from calibration and emit it (module doc)."""

    REQUIRES = (ACTIVATION_STATS, PRECISION_ASSIGNMENT)
    ENSURES = (ACTIVATION_PLANS,)
    PRESERVES_FUNCTION = False

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        recipe = self.ctx.recipe
        groups = activation_groups(self.ctx, "static", assigned_sites_only=True)
        stats = self.ctx.analyses.get(ACTIVATION_STATS)
        accs = {}
        for g in groups:
            if g[0].input.name not in stats.by_value:
                raise LowbitError(f"no calibration statistics for the input of {g[0].name}")
            accs[g[0].input.name] = ChannelStatsAccumulator(stats[g[0].input.name].absmax)
        if groups:
            observe(self.ctx, model, [_GroupChannelStats(groups, accs)], desc="static FGMP activations",
                    why="static FGMP activations: per-channel 4-bit errors are summed on a scale grid "
                        "built from the final absmax of the first run")  # fmt: skip
        g2, kind = self._sensitivities(groups)
        plans, impacts = [], []
        for g, w in zip(groups, g2):
            acc = accs[g[0].input.name]
            s4, gap = acc.best()
            impacts.append(w * gap)
            plans.append((g[0].input.name, acc.s8, s4))
        fraction = activation_fp8_fraction(recipe.precision)
        masks, threshold = choose_channels(impacts, fraction)
        target = recipe.target
        ensure_opset(model, 23 if target == "qdq-fp4" else 21)
        result = []
        for g, (name, s8, s4), impact, mask in zip(groups, plans, impacts, masks):
            plan = ChannelPlan(name, mask, s8, s4, impact)
            nodes, out = static_act_nodes(model.graph, g[0].input, plan, target)
            model.graph.insert_before(g[0].node, nodes)
            for site in g:
                site.node.replace_input_with(0, out)
            model.metadata_props[f"{ACT_BITMAP_KEY}{name}"] = encode_bitmap(mask)
            result.append(plan)
        self.ctx.analyses.put(ACTIVATION_PLANS, result)
        self._report(result, fraction, threshold, kind)
        return ir.passes.PassResult(model, modified=bool(result))

    def _sensitivities(self, groups: list[list[LinearSite]]) -> tuple[list[np.ndarray], str]:
        from lowbit.passes.fisher import activation_fisher

        g2 = [activation_fisher(self.ctx, g[0]) for g in groups]
        if all(v is not None for v in g2):
            return [v.astype(np.float64) for v in g2], "activation Fisher (act/<site> of the Fisher side file)"
        return [weight_row_proxy(g) for g in groups], "proxy: sum of ||W[c, :]||^2 over the input's consumers"

    def _report(self, plans: list[ChannelPlan], fraction: float, threshold: float, kind: str) -> None:
        total = sum(p.fp8.size for p in plans)
        fp8 = sum(p.n_fp8 for p in plans)
        frac = fp8 / max(total, 1)
        self.ctx.report.setdefault("precision", {})["activations"] = {
            "mode": "static per-channel FP8 E4M3 / E2M1 (standard ops)", "sensitivity": kind,
            "requested_fp8_fraction": fraction, "fp8_channels": fp8, "channels": total, "fp8_fraction": frac,
            "avg_bits": NVFP4_BITS + (FP8_BITS - NVFP4_BITS) * frac, "threshold": threshold, "inputs": len(plans),
            "per_input_fp8_fraction": {p.name: p.n_fp8 / p.fp8.size for p in plans}}  # fmt: skip
        logger.info("static FGMP activations: %d / %d channels FP8 (%.4f) at %d inputs", fp8, total, frac, len(plans))
