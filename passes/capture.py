"""Capture what the smooth / OPTQ passes need beyond per-channel ranges: per input group, the
second moment ``X^T X`` (OPTQ's Hessian) and a random sample of activation rows (the scale
search's objective is evaluated on it).

Assumes the linear-site map and calibration windows. An analysis pass: the model is not
modified; afterwards ``ctx.get("site_capture")`` maps each site-input value name to a
:class:`GroupCapture`. Memory is bounded by one K x K float64 matrix and ``sample_tokens`` x K
float32 rows per input group, plus one window's tapped activations, however many windows run.

Later function-preserving passes that rescale or permute an input's channels keep every analysis
keyed by that input consistent through :func:`transform_channels` (exact: X/s and X[:, perm]
transform ``X^T X``, the sample and min/max/absmax/sq_sum in closed form), so calibration never
has to run twice.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from tqdm.auto import tqdm

from lowbit.compiler.context import CompileContext
from lowbit.compiler.feeds import make_feed
from lowbit.compiler.ortrun import ort_session
from lowbit.errors import LowbitError

__all__ = ["CapturePass", "GroupCapture", "transform_channels"]

logger = logging.getLogger(__name__)


@dataclass
class GroupCapture:
    """Second moment and a row sample of one linear-site input (channels on the last axis)."""

    hessian: np.ndarray  # float64 [K, K], sum over tokens of x x^T
    sample: np.ndarray  # float32 [T, K], rows drawn uniformly from the calibration tokens
    tokens: int = 0

    def transform(self, scale: np.ndarray | None, perm: np.ndarray | None) -> None:
        """Channels become x / scale (then reordered by perm, new[i] = old[perm[i]])."""
        if scale is not None:
            inv = 1.0 / scale.astype(np.float64)
            self.hessian = self.hessian * inv[:, None] * inv[None, :]
            self.sample = (self.sample / scale.astype(np.float32)).astype(np.float32)
        if perm is not None:
            self.hessian = self.hessian[np.ix_(perm, perm)]
            self.sample = self.sample[:, perm]


def transform_channels(ctx: CompileContext, name: str, scale: np.ndarray | None = None,
                       perm: np.ndarray | None = None) -> None:  # fmt: skip
    """Keep ``activation_stats`` and ``site_capture`` of input ``name`` exact after its channels
    were divided by ``scale`` (> 0) and/or reordered by ``perm``."""
    if ctx.has("site_capture") and name in ctx.get("site_capture"):
        ctx.get("site_capture")[name].transform(scale, perm)
    stats = ctx.get("activation_stats").by_value.get(name) if ctx.has("activation_stats") else None
    if stats is None:
        return
    if scale is not None:
        s = scale.astype(np.float32)
        stats.min, stats.max, stats.absmax = stats.min / s, stats.max / s, stats.absmax / s
        if stats.sq_sum is not None:
            stats.sq_sum = stats.sq_sum / scale.astype(np.float64) ** 2
        if stats.percentile_sum is not None:
            stats.percentile_sum = stats.percentile_sum / scale.astype(np.float64)
    if perm is not None:
        for attr in ("min", "max", "absmax", "sq_sum", "percentile_sum"):
            value = getattr(stats, attr)
            if value is not None:
                setattr(stats, attr, value[perm])


class CapturePass(ir.passes.InPlacePass):
    """Accumulate ``X^T X`` and a row sample at every linear-site input group."""

    def __init__(self, ctx: CompileContext, sample_tokens: int, seed: int = 0) -> None:
        super().__init__()
        self.ctx, self.sample_tokens, self.seed = ctx, sample_tokens, seed

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        data = self.ctx.calibration
        if data is None or not data.windows:
            raise LowbitError("smoothing and OPTQ need calibration data (--calib-text or a model directory with a tokenizer)")
        taps: dict[str, ir.Value] = {}
        for i, group in enumerate(self.ctx.sites.input_groups()):
            x = group[0].input
            if x.name is None:
                x.name = f"lowbit_group_input_{i}"
            taps[x.name] = x
        session = ort_session(model, taps.values())
        names = list(taps)
        rng = np.random.default_rng(self.seed)
        per_window = -(-self.sample_tokens // len(data.windows))
        hess: dict[str, np.ndarray] = {}
        samples: dict[str, list[np.ndarray]] = {n: [] for n in names}
        tokens = 0
        for ids in tqdm(data.windows, desc="capturing X^T X", unit="window", leave=False):
            outs = session.run(names, make_feed(session.get_inputs(), ids))
            for name, x in zip(names, outs):
                x2 = x.reshape(-1, x.shape[-1]).astype(np.float32)
                # float32 product per window (2x faster than float64, ~1e-6 relative over one
                # window), float64 accumulation across windows
                hess[name] = hess.get(name, 0.0) + (x2.T @ x2).astype(np.float64)
                rows = rng.choice(x2.shape[0], size=min(per_window, x2.shape[0]), replace=False)
                samples[name].append(x2[rows].astype(np.float32))
            tokens += int(np.prod(np.shape(ids)))
        capture = {n: GroupCapture(hess[n], np.concatenate(samples[n])[: self.sample_tokens], tokens) for n in names}
        self.ctx.put("site_capture", capture)
        self.ctx.report["capture"] = {"groups": len(capture), "tokens": tokens, "sample_tokens": self.sample_tokens}
        logger.info("captured X^T X at %d input groups over %d tokens", len(capture), tokens)
        return ir.passes.PassResult(model, modified=False)
