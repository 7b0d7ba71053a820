"""What the observation run measured, as analyses: per-channel ranges (SLAC) and second moments
(XᵀX, row samples), and how they stay exact through function-preserving rewrites.

Owns the statistics' data types, their analysis keys (:data:`ACTIVATION_STATS`,
:data:`SITE_CAPTURE`) and :func:`transform_channels`, the closed form that keeps every statistic of
an input exact after smoothing divides its channels by a scale or RPTQ permutes them -- which is
why the model is observed once per compile. The accumulators that fill them live with their
analyses (``lowbit.passes.calibrate``, ``lowbit.passes.capture``); this module runs nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from lowbit.core.analyses import Key
from lowbit.core.context import CompileContext

__all__ = ["ACTIVATION_STATS", "SITE_CAPTURE", "ActivationStats", "ChannelStats", "GroupCapture", "permute_symmetric",
           "transform_channels"]


@dataclass
class ChannelStats:
    """Running per-channel (last axis) statistics of one tensor."""

    min: np.ndarray
    max: np.ndarray
    absmax: np.ndarray
    percentile_sum: np.ndarray | None = None
    windows: int = 0
    sq_sum: np.ndarray | None = None  # sum of x^2 per channel: diag(X^T X) for sensitivity proxies
    tokens: int = 0

    @classmethod
    def empty(cls, channels: int, with_percentile: bool) -> ChannelStats:
        inf = np.full(channels, np.inf, np.float32)
        return cls(inf.copy(), -inf, np.zeros(channels, np.float32),
                   np.zeros(channels, np.float64) if with_percentile else None,
                   sq_sum=np.zeros(channels, np.float64))  # fmt: skip

    def update(self, x: np.ndarray, percentile: float | None) -> None:
        x2 = x.reshape(-1, x.shape[-1])
        np.minimum(self.min, x2.min(axis=0), out=self.min)
        np.maximum(self.max, x2.max(axis=0), out=self.max)
        self.absmax = np.maximum(self.min * -1, self.max)
        if self.percentile_sum is not None and percentile is not None:
            self.percentile_sum += np.percentile(np.abs(x2), percentile, axis=0)
        self.sq_sum += np.einsum("tc,tc->c", x2, x2, dtype=np.float64)
        self.windows += 1
        self.tokens += x2.shape[0]

    @property
    def percentile(self) -> np.ndarray:
        if self.percentile_sum is None or not self.windows:
            raise ValueError("percentile statistics were not collected")
        return (self.percentile_sum / self.windows).astype(np.float32)


@dataclass
class ActivationStats:
    seq_len: int
    by_value: dict[str, ChannelStats] = field(default_factory=dict)
    slac: dict[str, dict[int, float]] = field(default_factory=dict)  # tap -> {length: absmax}
    kv_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # K/V tap -> observed shape
    # o_proj input -> [(V tap, o_proj channel whose scale divides each V channel)]
    links: dict[str, list[tuple[str, np.ndarray]]] = field(default_factory=dict)
    rescaled: set[str] = field(default_factory=set)  # inputs whose channels a fold divided by a scale

    def __getitem__(self, name: str) -> ChannelStats:
        return self.by_value[name]


@dataclass
class GroupCapture:
    """Second moment and a row sample of one linear-site input (channels on the last axis)."""

    hessian: np.ndarray  # float64 [K, K], sum over tokens of x x^T (float32 once OPTQ, its last reader, factored it)
    sample: np.ndarray  # float32 [T, K], rows drawn uniformly from the calibration tokens
    tokens: int = 0

    def transform(self, scale: np.ndarray | None, perm: np.ndarray | None) -> None:
        """Channels become x / scale (then reordered by perm, new[i] = old[perm[i]]). X^T X is
        rewritten in place (an 8B down_proj's is 1.6 GB: no K x K temporary), with the same
        products as ``h * inv[:, None] * inv[None, :]`` and the same elements as
        ``h[np.ix_(perm, perm)]``."""
        if scale is not None:
            inv = 1.0 / scale.astype(np.float64)
            self.hessian *= inv[:, None]
            self.hessian *= inv[None, :]
            self.sample = (self.sample / scale.astype(np.float32)).astype(np.float32)
        if perm is not None:
            permute_symmetric(self.hessian, perm)
            self.sample = self.sample[:, perm]


def permute_symmetric(h: np.ndarray, perm: np.ndarray) -> None:
    """``h[...] = h[np.ix_(perm, perm)]`` with temporaries of a band of rows: columns band by band,
    then rows along perm's cycles."""
    step = max(1, (64 << 20) // (h.itemsize * len(h)))
    for r in range(0, len(h), step):
        h[r:r + step] = h[r:r + step][:, perm]
    moved = np.zeros(len(perm), bool)
    for start in np.flatnonzero(perm != np.arange(len(perm))):
        if moved[start]:
            continue
        first, i = h[start].copy(), start
        while perm[i] != start:  # new row i is old row perm[i]
            h[i] = h[perm[i]]
            moved[i] = True
            i = perm[i]
        h[i] = first
        moved[i] = True


ACTIVATION_STATS: Key[ActivationStats] = Key(
    "activation_stats", "per-channel ranges at every linear-site input and attention K/V (SLAC)")
SITE_CAPTURE: Key[dict[str, GroupCapture]] = Key(
    "site_capture", "XᵀX and a row sample per linear-site input group")


def transform_channels(ctx: CompileContext, name: str, scale: np.ndarray | None = None,
                       perm: np.ndarray | None = None) -> None:  # fmt: skip
    """Keep ``activation_stats`` and ``site_capture`` of input ``name`` exact after its channels
    were divided by ``scale`` (> 0) and/or reordered by ``perm``."""
    captures = ctx.analyses.find(SITE_CAPTURE)
    if captures is not None and name in captures:
        captures[name].transform(scale, perm)
    all_stats = ctx.analyses.find(ACTIVATION_STATS)
    stats = all_stats.by_value.get(name) if all_stats is not None else None
    if stats is None:
        return
    for linked, index in all_stats.links.get(name, ()):  # V channels transformed with o_proj's
        transform_channels(ctx, linked, scale=scale[index] if scale is not None else None,
                           perm=_linked_permutation(name, index, perm) if perm is not None else None)  # fmt: skip
    if scale is not None:
        all_stats.rescaled.add(name)
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


def _linked_permutation(name: str, index: np.ndarray, perm: np.ndarray) -> np.ndarray:
    """V's channel permutation from o_proj's: V channel j is read by o_proj channel index[j]
    (its first replica); a head-local o_proj permutation moves it to another first replica."""
    v_of = np.full(perm.size, -1, np.int64)
    v_of[index] = np.arange(index.size)
    vperm = v_of[perm[index]]
    if np.any(vperm < 0):
        raise ValueError(f"{name}: the permutation moves attention-output channels across V heads")
    return vperm
