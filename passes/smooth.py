"""Equivalent scale folding: x -> x / s at the producer, W -> diag(s) W at every consumer.

Assumes the linear-site map, ``activation_stats`` (calibration) and ``site_capture`` (X^T X and a
row sample per input group). Function-preserving in exact arithmetic (float32 moves outputs by a
few ulps); touches only input groups whose producer can absorb the scale exactly (see
:mod:`lowbit.core.folding`): norms (gamma, beta), v_proj columns for o_proj (one scale per v
channel under GQA), up_proj columns for down_proj. Every analysis keyed by a rescaled input is
updated in closed form (:func:`lowbit.passes.capture.transform_channels`).

Methods (``smooth.method``); each searches ``smooth.alpha_grid`` per input group and keeps the
candidate with the smallest output error ``sum_sites ||X W - Qa(X / s) Qw(diag(s) W)||^2`` on the
captured rows X, s = 1 (no scaling) always being a candidate:

- ``smoothquant``: s = amax_x^a / amax_w^(1-a) (Xiao et al.); objective with the recipe's
  *activation* quantizer only (weights float): it migrates activation outliers into weights.
- ``awq``: s = mean|x|^a (Lin et al.); objective with the recipe's *weight* quantizer only.
- ``aqas`` (activation-quantization-aware scaling): both candidate families, objective with
  *both* quantizers applied -- the scale that is best for the W and A formats actually deployed.

Quantizers in the objective: static activations use the calibrated range divided by s (what
emission will use), dynamic ones (``per_token_group``) their run-time group scales, with groups of
like-range channels where RPTQ will reorder the input (int4 outlier groups in int8 are not
modelled); weights use the recipe format with absmax scales (cheap, the ranking is what matters).
"""

from __future__ import annotations

import logging
import os
from types import SimpleNamespace

import numpy as np
import onnx_ir as ir
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

from lowbit import formats
from lowbit.core.pass_base import LowbitPass
from lowbit.formats.choosers import search_ratios
from lowbit.formats.dint import DintElement
from lowbit.formats.integer import IntElement
from lowbit.core.statistics import ACTIVATION_STATS, SITE_CAPTURE, transform_channels
from lowbit.encode.activations import activation_qparams, dynamic_fake_quant, dynamic_group_qmax, dynamic_group_size
from lowbit.core.folding import FoldTarget, fold_target
from lowbit.core.weight_io import column_sample_kn, row_absmax_kn
from lowbit.core.workers import worker_pool
from lowbit.core.linear_sites import matches_any
from lowbit.encode.optq_kernel import element_kind, rtn_round

__all__ = ["SmoothPass", "candidate_scales", "fake_quantize_activations"]

logger = logging.getLogger(__name__)

_OBJECTIVE_COLUMNS = 384  # output columns per input group on which candidates are compared
_S_RANGE = 1e4  # scales are clipped to [1/_S_RANGE, _S_RANGE] around their geometric centre
_THREADS = os.cpu_count() or 1  # candidates evaluated side by side, one BLAS thread each


def fake_quantize_activations(x: np.ndarray, lo: np.ndarray, hi: np.ndarray, aspec, sorted_groups: bool = False) -> np.ndarray:
    """The recipe's activation Q/DQ of ``x`` [rows, channels] given per-channel calibrated lo/hi:
    static scales from the ranges, or (``per_token_group``) run-time scales per row and group.
    ``sorted_groups``: the input will be reordered by RPTQ after smoothing, so its groups are
    modelled as channels of like range (sorted by max |range|; the K-means clusters come later)."""
    if aspec.format == "none":
        return x
    if aspec.granularity == "per_token_group":
        channels = x.shape[-1]
        group = dynamic_group_size(channels, aspec.group_size)
        order = np.argsort(np.maximum(-lo, hi), kind="stable") if sorted_groups else np.arange(channels)
        out = np.empty_like(x)
        out[:, order] = dynamic_fake_quant(x[:, order], group, dynamic_group_qmax(aspec.format, channels, group))
        return out
    stats = SimpleNamespace(min=lo, max=hi, percentile=np.maximum(-lo, hi))
    scale, zp, _ = activation_qparams(stats, aspec)
    if aspec.format == "fp8_e4m3":
        return formats.cast(x / scale, "fp8_e4m3") * scale
    q_lo, q_hi = formats.integer_codes(aspec.format, signed=aspec.symmetric)
    zp = zp.astype(np.float32)
    return (np.clip(np.rint(x / scale) + zp, q_lo, q_hi) - zp) * scale


def _fake_weights(w_kn: np.ndarray, wspec) -> np.ndarray:
    if wspec.format == "none":
        return w_kn
    block = formats.get_format(wspec.format).block_size(wspec.block_size)
    element = formats.get_format(wspec.format).element
    if wspec.symmetric and isinstance(element, (IntElement, DintElement)):
        # OPTQ's compiled round-to-nearest: equal to fake_quantize (tests/encode/test_optq.py),
        # 8x faster, and this runs once per candidate scale of every input group
        kind, vmax = element_kind(element)
        return rtn_round(np.ascontiguousarray(w_kn, dtype=np.float32), min(block or w_kn.shape[0], w_kn.shape[0]), search_ratios("absmax"),
                         np.float32(element.scale_max), kind, np.float32(vmax))  # fmt: skip
    return formats.fake_quantize(w_kn, wspec.format, axis=0, block_size=block, symmetric=wspec.symmetric)


def _reduce(values: np.ndarray, channel_map: np.ndarray) -> np.ndarray:
    """Max over replicas, broadcast back: a scale must agree on replicated channels."""
    out = np.zeros(channel_map.max() + 1, np.float64)
    np.maximum.at(out, channel_map, values)
    return out[channel_map]


def candidate_scales(method: str, alphas, amax_x, mean_x, amax_w, channel_map) -> list[tuple[str, np.ndarray]]:
    """(label, s) candidates; s is constant on channels that share a producer channel."""
    amax_x, mean_x, amax_w = (_reduce(np.maximum(v, 1e-8), channel_map) for v in (amax_x, mean_x, amax_w))
    out: list[tuple[str, np.ndarray]] = [("identity", np.ones_like(amax_x))]
    for a in alphas:
        if method in ("smoothquant", "aqas"):
            out.append((f"smoothquant:{a}", amax_x**a / amax_w ** (1.0 - a)))
        if method in ("awq", "aqas"):
            out.append((f"awq:{a}", mean_x**a))
    for i, (label, s) in enumerate(out):
        s = s / np.exp(np.mean(np.log(s)))  # geometric centre 1: keeps gamma and W magnitudes sane
        out[i] = (label, np.clip(s, 1.0 / _S_RANGE, _S_RANGE))
    return out


class SmoothPass(LowbitPass):
    """Search and fold per-channel scales at every foldable input group."""

    REQUIRES = (ACTIVATION_STATS, SITE_CAPTURE)
    PRESERVES_FUNCTION = True
    BLOCKWISE = True

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        spec = self.ctx.recipe.smooth
        report = self.ctx.report.setdefault("smooth", {"method": spec.method, "groups": {}})
        # one BLAS thread throughout: the candidates run on parallel threads (_search), and an
        # OpenBLAS worker left spinning after a two-thread product would take the second core
        with threadpool_limits(1, user_api="blas"):
            folded = self._search_all(report)
        report["folded_groups"] = sum(g["folded"] for g in report["groups"].values())  # every block so far
        logger.info("smooth (%s): folded scales into %d input groups", spec.method, folded)
        return ir.passes.PassResult(model, modified=bool(folded))

    def _search_all(self, report: dict) -> int:
        """Search and fold every input group; the number folded."""
        spec = self.ctx.recipe.smooth
        folded = 0
        for group in tqdm(self.ctx.sites.input_groups(), desc=f"smooth ({spec.method})", unit="group", leave=False, disable=None):
            target = fold_target(group, spec.feeders)
            key = group[0].name
            if isinstance(target, str):
                report["groups"][key] = {"folded": False, "reason": target}
                logger.debug("smooth: %s skipped: %s", key, target)
                continue
            label, s, err0, err = self._search(target)
            if label != "identity":
                target.apply_scale(s)
                transform_channels(self.ctx, target.input.name, scale=s)
                folded += 1
            report["groups"][key] = {"folded": label != "identity", "feeder": target.kind, "choice": label,
                                     "rel_error_before": err0, "rel_error_after": err,
                                     "s_min": float(s.min()), "s_max": float(s.max())}  # fmt: skip
        return folded

    def _search(self, target: FoldTarget) -> tuple[str, np.ndarray, float, float]:
        recipe, spec = self.ctx.recipe, self.ctx.recipe.smooth
        stats = self.ctx.analyses.get(ACTIVATION_STATS)[target.input.name]
        x = self.ctx.analyses.get(SITE_CAPTURE)[target.input.name].sample
        rng = np.random.default_rng(0)
        # the objective on a random subset of output columns: per-column weight scales make the
        # error a sum over columns, and quantizing every column of every candidate dominates cost.
        # Weights are streamed (no whole float32 copy: an 8B head is 2.1 GB)
        per_site = max(1, _OBJECTIVE_COLUMNS // len(target.group))
        weights = [column_sample_kn(s, np.sort(rng.choice(s.out_features, per_site, replace=False))
                                    if s.out_features > per_site else np.arange(s.out_features))
                   for s in target.group]  # fmt: skip
        amax_w = np.max([row_absmax_kn(s) for s in target.group], axis=0)
        # the group's sampled columns as one matrix: per-column weight blocks and per-column
        # products make quantizing and multiplying it whole equal to doing it site by site
        w_obj = np.concatenate(weights, axis=1)
        ref = x @ w_obj
        norm = float(np.sum(ref.astype(np.float64) ** 2)) or 1.0
        use_act = spec.method in ("smoothquant", "aqas")
        sorted_groups = recipe.reorder.clusters > 0 and target.kind in recipe.reorder.feeders
        wspec = recipe.weights
        if all(matches_any(site, recipe.sites.int8_weights) for site in target.group):
            wspec = SimpleNamespace(format="int8", block_size=0, symmetric=True, scale_method="absmax")
        use_w = spec.method in ("awq", "aqas")
        cands = candidate_scales(spec.method, spec.alpha_grid, stats.absmax.astype(np.float64),
                                 np.abs(x).mean(axis=0).astype(np.float64), amax_w.astype(np.float64),
                                 target.channel_map if target.channel_map is not None else np.arange(x.shape[1]))  # fmt: skip
        # the distinct candidates (e.g. awq:0.0 is the identity; the first of equal ones wins ties
        # anyway), evaluated side by side (the caller limits BLAS to one thread): on 2 cores SmolLM2's
        # search ran ~9 s with two BLAS threads per product, ~6 s with candidates in parallel
        distinct = [(label, s) for i, (label, s) in enumerate(cands)
                    if not any(np.array_equal(s, earlier) for _, earlier in cands[:i])]  # fmt: skip

        def error(s: np.ndarray) -> float:
            s32 = s.astype(np.float32)
            xs = x / s32
            if use_act:
                xs = fake_quantize_activations(xs, stats.min / s32, stats.max / s32, recipe.activations, sorted_groups)
            ws = w_obj * s32[:, None]
            out = xs @ (_fake_weights(ws, wspec) if use_w else ws)
            return float(np.sum((out - ref).astype(np.float64) ** 2)) / norm

        with worker_pool(_THREADS) as pool:
            errors = list(pool.map(error, [s for _, s in distinct]))
        best = 0
        for i in range(1, len(distinct)):
            if errors[i] < errors[best]:  # strictly: the first of equal errors wins
                best = i
        err0 = errors[0] if distinct[0][0] == "identity" else float("nan")
        return distinct[best][0], distinct[best][1], err0, errors[best]
