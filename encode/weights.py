"""The exact weight encoding of every quantized linear site, before any emitter runs.

Assumes the linear-site map with float weights (smoothing/reordering already folded in) and,
optionally, the ``weight_encodings`` an earlier rounding pass stored (OPTQ). Analysis only: never
edits the graph. Guarantees: afterwards ``ctx.analyses.get(WEIGHT_ENCODINGS)[site.name]`` is a
:class:`lowbit.formats.Encoded` for every site :func:`~lowbit.core.linear_sites.selected_sites`
keeps, in the *stored* orientation of the site's initializer (``axis = site.reduction_axis``):

- sites an earlier pass rounded keep that encoding (OPTQ codes take precedence over RTN);
- the others are rounded to nearest with the recipe's scale chooser (``weights.scale_method``,
  ``weights.symmetric``) in blocks of ``get_format(fmt).block_size(weights.block_size)``;
- target ``npu``: one symmetric scale per output channel (no blocks), rounded to a power of two
  when ``npu.power_of_two_scales`` asks, chosen on the (K, N) matrix and stored transposed back.

Every emitter (``qdq``, ``qdq-fp4``, ``npu``, ``ort-cpu``) writes these codes and scales and
nothing else. FGMP mixed-precision sites are not encoded here: their per-block NVFP4/FP8 choice
and both encodings live in ``precision_assignment`` (:mod:`lowbit.passes.precision`).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from lowbit import formats
from lowbit.core.analyses import WEIGHT_ENCODINGS
from lowbit.core.context import CompileContext
from lowbit.core.pass_base import LowbitPass
from lowbit.core.folding import weight_kn
from lowbit.core.linear_sites import LinearSite, matches_any, selected_sites
from lowbit.core.weight_io import StoredSlices
from lowbit.errors import LowbitError

__all__ = ["EncodeWeightsPass", "encode_weights", "power_of_two", "transposed"]

logger = logging.getLogger(__name__)


def power_of_two(scale: np.ndarray, mode: str) -> np.ndarray:
    """``scale`` rounded to powers of two: ``ceil`` (up), ``nearest`` (in log2), ``none``."""
    if mode == "none":
        return scale
    exponent = np.log2(np.asarray(scale, np.float64))
    exponent = np.ceil(exponent) if mode == "ceil" else np.rint(exponent)
    return np.exp2(exponent).astype(np.float32)


def transposed(enc: formats.Encoded) -> formats.Encoded:
    """The same 2-D encoding of the transposed matrix: codes and scale layout swap axes (exact)."""
    if len(enc.shape) != 2 or enc.axis is None:
        raise LowbitError(f"transposed: needs a 2-D encoding along an axis, got {enc.shape} axis {enc.axis}")
    zp = None if enc.zero_point is None else np.ascontiguousarray(enc.zero_point.T)
    return formats.Encoded(enc.fmt, tuple(enc.shape[::-1]), 1 - enc.axis, enc.block_size,
                           np.ascontiguousarray(enc.codes.T), np.ascontiguousarray(enc.scale.T),
                           enc.global_scale, zp)


def _rtn(ctx: CompileContext, site: LinearSite) -> formats.Encoded:
    recipe = ctx.recipe
    wspec = recipe.weights
    # read a slice of output channels at a time: an 8B vocabulary head is 2.1 GB in float32
    w = StoredSlices(site)
    bad = sum(int((~np.isfinite(w.output_slice(cols))).sum()) for cols in w.output_slices())
    if bad:
        raise LowbitError(f"weight {site.name} has {bad} NaN/Inf values")
    if recipe.target == "npu":  # symmetric per output channel of the (K, N) matrix
        w_kn = weight_kn(site)
        scale = formats.choose_scale(w_kn, wspec.format, axis=0, scale_method=wspec.scale_method).scale
        scale = power_of_two(scale, recipe.npu.power_of_two_scales)
        enc = formats.encode(w_kn, wspec.format, axis=0, scale=scale)
        return enc if site.reduction_axis == 0 else transposed(enc)
    # a slice of output channels at a time (the same codes as one call)
    if matches_any(site, recipe.sites.int8_weights):  # one scale per output channel, as the w8 recipe
        return formats.encode_sliced(w, "int8", axis=site.reduction_axis, symmetric=True, scale_method="absmax")
    block = formats.get_format(wspec.format).block_size(wspec.block_size)
    return formats.encode_sliced(w, wspec.format, axis=site.reduction_axis, block_size=block,
                                 symmetric=wspec.symmetric, scale_method=wspec.scale_method)


def encode_weights(ctx: CompileContext) -> dict[str, formats.Encoded]:
    """Complete ``ctx``'s ``weight_encodings`` for every selected site (sites an earlier rounding
    pass encoded keep their encoding); returns it."""
    recipe = ctx.recipe
    encodings = ctx.analyses.find(WEIGHT_ENCODINGS) or {}
    if recipe.weights.format == "none" or recipe.precision.enabled:
        ctx.analyses.put(WEIGHT_ENCODINGS, encodings)
        return encodings
    for site in selected_sites(ctx.sites, recipe.sites.exclude):
        if site.name not in encodings:
            encodings[site.name] = _rtn(ctx, site)
    ctx.analyses.put(WEIGHT_ENCODINGS, encodings)
    return encodings


class EncodeWeightsPass(LowbitPass):
    """Analysis only: fill ``weight_encodings`` for every selected site (module docs)."""

    ENSURES = (WEIGHT_ENCODINGS,)
    PRESERVES_FUNCTION = True
    BLOCKWISE = True

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        before = len(self.ctx.analyses.find(WEIGHT_ENCODINGS) or {})
        encodings = encode_weights(self.ctx)
        logger.info("encoded %d weights (%d rounded earlier)", len(encodings), before)
        return ir.passes.PassResult(model, modified=False)
