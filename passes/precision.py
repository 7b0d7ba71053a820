"""FGMP: which weight blocks of 16 stay in FP8 E4M3 and which go to NVFP4 (an analysis pass).

For every selected linear site (recipe ``precision``, ``weights.format = nvfp4``):

1. g^2 per weight from :mod:`lowbit.passes.fisher` (empirical Fisher or the diag(X^T X) proxy).
2. Both candidates: NVFP4 (blocks of 16 along the reduction axis; block scales chosen by
   ``precision.clip``: ``fisher`` = the clip ratio minimising sum g^2 (v - Q(v))^2 per block, the
   ``weighted_mse`` chooser of lowbit.formats, over CLIP_GRID ratios in [0.5, 1]) and FP8 E4M3
   with one scale per output channel.
3. Block impact ``sum_{block} g^2 (Q_nvfp4(v) - Q_fp8(v))^2`` (float64).
4. One *global* choice across all sites of exactly ``k = floor(fraction * total_blocks + 0.5)``
   FP8 blocks: ``fgmp`` takes the k highest impacts; ties are broken by position (site order of
   the linear-site map, then row-major block index), so the count is always exactly k and the
   reported threshold is the k-th highest impact (blocks above it are all FP8, blocks equal to it
   are FP8 only up to k). Baselines at the same k: ``random`` (k uniformly random blocks, seeded) and
   ``per_layer`` (whole sites, greedily by impact per block, while they fit into k; the achieved
   count is <= k and reported).

Bit accounting (documented once, here): an NVFP4 block costs 4.5 bits per weight (4-bit E2M1 +
one 8-bit E4M3 scale per 16), an FP8 block 8.0 (its per-output-channel FP32 scale and the NVFP4
per-tensor FP32 scale are amortised to ~0 and not counted); the 1-bit-per-block precision bitmap
adds 1/16 bit per weight, reported separately. ``precision.avg_bits = b`` means
``fraction = (b - 4.5) / 3.5``.

Read-only (function-preserving): the result is the ``precision_assignment`` analysis that
:mod:`lowbit.emit.mixed` turns into two complementary DequantizeLinear branches.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from lowbit import formats
from lowbit.core.analyses import Key
from lowbit.core.context import CompileContext
from lowbit.core.pass_base import LowbitPass
from lowbit.errors import LowbitError
from lowbit.formats.blocking import Blocking
from lowbit.passes.fisher import site_sensitivities
from lowbit.core.linear_sites import LinearSite, selected_sites

__all__ = [
    "BITMAP_BITS", "BLOCK", "FP8_BITS", "NVFP4_BITS", "PRECISION_ASSIGNMENT", "AssignPrecisionPass", "Assignment",
    "SiteChoice", "activation_fp8_fraction", "activation_groups", "block_impact", "candidates", "choose_blocks",
    "fraction_for_bits", "mixed_weight", "n_fp8_blocks", "per_layer_masks", "random_masks",
    "top_k_masks", "weight_fp8_fraction",
]  # fmt: skip

logger = logging.getLogger(__name__)

_NVFP4, _FP8 = formats.get_format("nvfp4"), formats.get_format("fp8_e4m3")
BLOCK = _NVFP4.default_block_size  # 16
NVFP4_BITS = _NVFP4.bits + 8 / BLOCK  # 4.5: 4-bit E2M1 element + 8-bit E4M3 block scale / 16
FP8_BITS = float(_FP8.bits)  # 8-bit E4M3 element; the per-channel FP32 scale is amortised over the channel
BITMAP_BITS = 1.0 / BLOCK  # one precision bit per block of 16
# Clip ratios linspace(1, 0.5, 9): steps of 1/16, about the E4M3 block-scale spacing (8 values per
# octave), so a finer grid mostly revisits the same rounded scale; 9 instead of the chooser's
# default 26 makes the Fisher-weighted search ~3x cheaper (SmolLM2: ~1.5 s per 576 x 1536 weight).
CLIP_GRID = 9


@dataclass(frozen=True, eq=False)
class SiteChoice:
    """Both quantizations of one weight and which blocks take FP8 (scale layout of ``q4``)."""

    name: str
    q4: formats.Encoded  # nvfp4, blocks of BLOCK along the reduction axis
    q8: formats.Encoded  # fp8_e4m3, one scale per output channel
    impact: np.ndarray  # float64, per block, scale layout of q4
    fp8: np.ndarray  # bool, per block, scale layout of q4

    @property
    def n_blocks(self) -> int:
        return int(self.impact.size)


@dataclass(frozen=True, eq=False)
class Assignment:
    sites: dict[str, SiteChoice]
    strategy: str
    threshold: float  # impact of the k-th chosen block (fgmp); nan for the baselines
    fp8_blocks: int
    total_blocks: int
    sensitivity: str  # "fisher" | "proxy"
    sensitivity_source: str

    @property
    def fp8_fraction(self) -> float:
        return self.fp8_blocks / max(self.total_blocks, 1)

    @property
    def avg_bits(self) -> float:
        return NVFP4_BITS + (FP8_BITS - NVFP4_BITS) * self.fp8_fraction


PRECISION_ASSIGNMENT: Key[Assignment] = Key(
    "precision_assignment", "FGMP: both encodings of every mixed site and which blocks take FP8")


def fraction_for_bits(avg_bits: float) -> float:
    if not NVFP4_BITS <= avg_bits <= FP8_BITS:
        raise LowbitError(f"average bits {avg_bits} is outside [{NVFP4_BITS}, {FP8_BITS}]")
    return (avg_bits - NVFP4_BITS) / (FP8_BITS - NVFP4_BITS)


def weight_fp8_fraction(spec) -> float:
    """The weights' FP8 block fraction a ``PrecisionSpec`` asks for (``avg_bits`` wins when set)."""
    return fraction_for_bits(spec.avg_bits) if spec.avg_bits > 0 else spec.fp8_fraction


def activation_fp8_fraction(spec) -> float:
    """The activations' FP8 fraction: ``act_fp8_fraction`` when set (>= 0), else the weights' budget."""
    return spec.act_fp8_fraction if spec.act_fp8_fraction >= 0 else weight_fp8_fraction(spec)


def activation_groups(ctx: CompileContext, mode: str, *, assigned_sites_only: bool) -> list[list[LinearSite]]:
    """The input groups an FGMP activation quantizer (``precision.activations = mode``) covers,
    after the checks both modes share. A group is covered when any of its sites has an assignment;
    ``assigned_sites_only`` also drops the group's unassigned sites (the static mode's per-site
    channel choice), otherwise the whole group is kept (one runtime quantizer feeds every site)."""
    data = ctx.calibration
    if data is None or not data.windows:
        raise LowbitError(f"{mode} FGMP activations need calibration windows")
    assigned = ctx.analyses.get(PRECISION_ASSIGNMENT).sites
    groups = ctx.sites.input_groups()
    if assigned_sites_only:
        groups = [[s for s in g if s.name in assigned] for g in groups]
    groups = [g for g in groups if any(s.name in assigned for s in g)]
    for g in groups:
        if g[0].in_features % BLOCK:
            raise LowbitError(f"{mode} FGMP activations need channels divisible by {BLOCK}; {g[0].name} has {g[0].in_features}")
    return groups


def n_fp8_blocks(total: int, fraction: float) -> int:
    """The exact FP8 block count for a fraction: round half up of fraction * total."""
    return int(np.floor(fraction * total + 0.5))


def candidates(w: np.ndarray, g2: np.ndarray, axis: int, clip: str) -> tuple[formats.Encoded, formats.Encoded]:
    """(NVFP4 encoding with the chosen clipping, per-output-channel FP8 encoding) of ``w``."""
    if clip == "fisher":
        mean = float(np.mean(g2, dtype=np.float64))
        # only relative weights matter within a block; normalising keeps float32 away from underflow
        weights = (g2 / mean).astype(np.float32) if mean > 0 else np.ones_like(w, np.float32)
        q4 = formats.encode(w, "nvfp4", axis=axis, block_size=BLOCK, scale_method="weighted_mse", weights=weights,
                            n_grid=CLIP_GRID, min_ratio=0.5)
    else:
        q4 = formats.encode(w, "nvfp4", axis=axis, block_size=BLOCK, scale_method=clip)
    q8 = formats.encode(w, "fp8_e4m3", axis=axis, block_size=None)
    return q4, q8


def block_impact(q4: np.ndarray, q8: np.ndarray, g2: np.ndarray, axis: int) -> np.ndarray:
    """sum over each block of 16 along ``axis`` of g2 * (q4 - q8)^2, float64, scale layout."""
    b = Blocking.make(q4.shape, axis, BLOCK)
    d = q4.astype(np.float64) - q8.astype(np.float64)
    return b.scale_from_blocks(b.to_blocks(np.asarray(g2, np.float64) * d * d).sum(axis=2))


def mixed_weight(choice: SiteChoice) -> np.ndarray:
    """The mixed fake-quantized weight: FP8 values in FP8 blocks, NVFP4 values elsewhere."""
    b = choice.q4.blocking
    return np.where(b.expand(choice.fp8), formats.decode(choice.q8), formats.decode(choice.q4))


def top_k_masks(scores: list[np.ndarray], k: int) -> tuple[list[np.ndarray], float]:
    """Exactly ``k`` highest scores across all arrays (ties: earlier array, then earlier flat
    index first) as bool masks; and the k-th highest score (nan when k = 0)."""
    flat = np.concatenate([s.reshape(-1) for s in scores]) if scores else np.zeros(0)
    if not 0 <= k <= flat.size:
        raise LowbitError(f"cannot keep {k} FP8 blocks out of {flat.size}")
    order = np.argsort(-flat, kind="stable")[:k]  # stable: equal scores keep positional order
    chosen = np.zeros(flat.size, bool)
    chosen[order] = True
    threshold = float(flat[order[-1]]) if k else float("nan")
    return _split(chosen, scores), threshold


def random_masks(shapes: list[np.ndarray], k: int, seed: int) -> list[np.ndarray]:
    """``k`` blocks chosen uniformly at random (without replacement) across all arrays."""
    total = sum(s.size for s in shapes)
    chosen = np.zeros(total, bool)
    chosen[np.random.default_rng(seed).choice(total, size=k, replace=False)] = True
    return _split(chosen, shapes)


def per_layer_masks(scores: list[np.ndarray], k: int) -> list[np.ndarray]:
    """Whole arrays (sites) in FP8, by decreasing mean impact per block, while they fit in ``k``."""
    density = [float(s.mean()) if s.size else 0.0 for s in scores]
    left, masks = k, [np.zeros(s.shape, bool) for s in scores]
    for i in sorted(range(len(scores)), key=lambda j: -density[j]):
        if scores[i].size <= left:
            masks[i][...] = True
            left -= scores[i].size
    return masks


def _split(chosen: np.ndarray, like: list[np.ndarray]) -> list[np.ndarray]:
    out, start = [], 0
    for s in like:
        out.append(chosen[start:start + s.size].reshape(s.shape))
        start += s.size
    return out


def choose_blocks(strategy: str, impacts: list[np.ndarray], k: int, seed: int = 0) -> tuple[list[np.ndarray], float]:
    """FP8 masks for ``strategy`` (fgmp | random | per_layer) and the fgmp threshold (else nan)."""
    if strategy == "fgmp":
        return top_k_masks(impacts, k)
    if strategy == "random":
        return random_masks(impacts, k, seed), float("nan")
    if strategy == "per_layer":
        return per_layer_masks(impacts, k), float("nan")
    raise LowbitError(f"unknown precision assignment {strategy!r}")


class AssignPrecisionPass(LowbitPass):
    """Compute the ``precision_assignment`` analysis (see module doc); never edits the graph."""

    ENSURES = (PRECISION_ASSIGNMENT,)
    PRESERVES_FUNCTION = True

    def _selected(self) -> list[LinearSite]:
        return selected_sites(self.ctx.sites, self.ctx.recipe.sites.exclude)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        recipe = self.ctx.recipe
        spec = recipe.precision
        sites = self._selected()
        sens = site_sensitivities(self.ctx, sites)
        pending = []
        for site in sites:
            w = site.weight.const_value.numpy()
            if not np.isfinite(w).all():
                raise LowbitError(f"weight {site.name} has NaN/Inf values")
            g2 = sens.by_site.pop(site.name)  # free each g^2 once used
            q4, q8 = candidates(w, g2, site.reduction_axis, spec.clip)
            impact = block_impact(formats.decode(q4), formats.decode(q8), g2, site.reduction_axis)
            pending.append((site.name, q4, q8, impact))
        total = sum(p[3].size for p in pending)
        fraction = weight_fp8_fraction(spec)
        k = n_fp8_blocks(total, fraction)
        masks, threshold = choose_blocks(spec.assignment, [p[3] for p in pending], k, spec.seed)
        choices = {name: SiteChoice(name, q4, q8, impact, m) for (name, q4, q8, impact), m in zip(pending, masks)}
        result = Assignment(choices, spec.assignment, threshold, int(sum(int(m.sum()) for m in masks)), total,
                            sens.kind, sens.source)  # fmt: skip
        self.ctx.analyses.put(PRECISION_ASSIGNMENT, result)
        self.ctx.report["precision"] = _summary(result, fraction)
        logger.info("%s: %d / %d blocks FP8 (%.4f), %.3f bits/weight, sensitivity %s", spec.assignment,
                    result.fp8_blocks, total, result.fp8_fraction, result.avg_bits, sens.kind)  # fmt: skip
        return ir.passes.PassResult(model, modified=False)


def _summary(a: Assignment, requested: float) -> dict:
    return {
        "strategy": a.strategy, "requested_fp8_fraction": requested, "fp8_blocks": a.fp8_blocks,
        "total_blocks": a.total_blocks, "fp8_fraction": a.fp8_fraction, "avg_bits": a.avg_bits,
        "avg_bits_with_bitmap": a.avg_bits + BITMAP_BITS, "threshold": a.threshold,
        "sensitivity": a.sensitivity, "sensitivity_source": a.sensitivity_source,
        "bit_accounting": f"NVFP4 block {NVFP4_BITS}, FP8 block {FP8_BITS} bits/weight; bitmap {BITMAP_BITS}",
        "per_site_fp8_fraction": {n: float(c.fp8.mean()) for n, c in a.sites.items()},
    }  # fmt: skip
