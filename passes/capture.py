"""Capture what the smooth / OPTQ passes need beyond per-channel ranges: per input group, the
second moment ``X^T X`` (OPTQ's Hessian) and a random sample of activation rows (the scale
search's objective is evaluated on it). An accumulator of the observation run
(:mod:`lowbit.ort.observe`).

Assumes the linear-site map and calibration windows. The model is not modified; after the run
``ctx.analyses.get(SITE_CAPTURE)`` maps each site-input value name to a :class:`GroupCapture`. Memory is bounded by one K x K float64 and one K x K float32 matrix and
``sample_tokens`` x K float32 rows per input group, plus one window's tapped activations, however
many windows run; in a block-wise compile only the current block's groups are held (each group's
capture is published when its block has seen every window, and released after the block).

Later function-preserving passes that rescale or permute an input's channels keep every analysis
keyed by that input consistent through :func:`transform_channels` (exact: X/s and X[:, perm]
transform ``X^T X``, the sample and min/max/absmax/sq_sum in closed form), so calibration never
has to run twice.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir
from scipy.linalg import blas

from lowbit.core.context import CompileContext
from lowbit.core.statistics import SITE_CAPTURE, GroupCapture
from lowbit.ort.observe import Window

__all__ = ["CaptureAccumulator"]

logger = logging.getLogger(__name__)


class CaptureAccumulator:
    """Running ``X^T X`` and row sample of every linear-site input group, fed one calibration
    window's activations at a time by the observation run."""

    FLUSH_WINDOWS = 8  # float32 running sums go into the float64 totals this often
    probes = False
    provides = (SITE_CAPTURE,)

    def __init__(self, sample_tokens: int, seed: int = 0) -> None:
        self.sample_tokens = sample_tokens
        self.rng = np.random.default_rng(seed)
        self.hess: dict[str, np.ndarray] = {}  # float64 totals, upper triangle (filled in publish)
        self._window_sums: dict[str, np.ndarray] = {}  # float32 sums since the last flush, upper triangle
        self._pending: dict[str, int] = {}
        self.samples: dict[str, list[np.ndarray]] = {}
        self.tokens: dict[str, int] = {}
        self._draws: dict[int, dict[str, np.ndarray]] = {}  # window -> tap -> sampled rows, until used
        self.groups = self.done_tokens = 0  # for the report, across block-wise finishes

    def taps(self, ctx: CompileContext) -> dict[str, ir.Value]:
        taps: dict[str, ir.Value] = {}
        for i, group in enumerate(ctx.sites.input_groups()):
            x = group[0].input
            if x.name is None:
                x.name = f"lowbit_group_input_{i}"
            taps[x.name] = x
        self.per_window = -(-self.sample_tokens // len(ctx.calibration.windows))
        self.samples = {n: [] for n in taps}
        self.tokens = dict.fromkeys(taps, 0)
        self._pending = dict.fromkeys(taps, 0)
        return taps

    def add(self, window: Window, values: Mapping[str, np.ndarray]) -> None:
        """Some of one window's tapped values (a superset is fine: unknown names are ignored)."""
        for name in self.samples:
            if name not in values:
                continue
            x = values[name]
            x2 = np.asarray(x.reshape(-1, x.shape[-1]), dtype=np.float32)
            # symmetric rank-k update with beta = 1 accumulates the upper triangle of x^T x in
            # place: half a GEMM's flops, no K x K temporary (SmolLM2, 512 tokens, 1 thread:
            # 576 channels 2.1 vs 4.4 ms CPU, 1536 channels 12.9 vs 23.9 ms); x2.T is
            # Fortran-ordered, so BLAS copies nothing
            acc = self._window_sums.get(name)
            if acc is None:
                acc = np.zeros((x2.shape[1], x2.shape[1]), np.float32, order="F")
            self._window_sums[name] = blas.ssyrk(1.0, x2.T, beta=1.0, c=acc, trans=0, lower=0, overwrite_c=1)
            self.samples[name].append(x2[self._rows(window, name, x2.shape[0])])
            self.tokens[name] += x2.shape[0]
            self._pending[name] += 1
            if self._pending[name] == self.FLUSH_WINDOWS:
                self._flush(name)

    def _rows(self, window: Window, name: str, n: int) -> np.ndarray:
        """The rows of ``name`` sampled in ``window``. All taps of a window are drawn when its
        first one arrives, in tap order, so the sample does not depend on how the runner splits
        the model (every tap of a window has the window's tokens as rows)."""
        draws = self._draws.get(window.index)
        if draws is None:
            size = min(self.per_window, n)
            draws = self._draws[window.index] = {t: (n, self.rng.choice(n, size=size, replace=False)) for t in self.samples}
        drawn_from, rows = draws.pop(name)
        if not draws:
            del self._draws[window.index]
        if drawn_from != n:  # a tap with other rows than the window's tokens (e.g. a ViT's pooled head input)
            seed = [window.index, list(self.samples).index(name)]
            rows = np.random.default_rng(seed).choice(n, size=min(self.per_window, n), replace=False)
        return rows

    def _flush(self, name: str) -> None:
        """Float32 sums of a few windows (~5e-7 relative) go into the float64 totals."""
        acc = self._window_sums.get(name)
        if acc is None:
            return
        if name in self.hess:
            self.hess[name] += acc
        else:
            self.hess[name] = acc.astype(np.float64, order="C")
        acc[...] = 0.0
        self._pending[name] = 0

    def finish(self, ctx: CompileContext) -> None:
        """Put the ``site_capture`` analysis and its report entry into ``ctx``. A block-wise
        compile calls this after every block: each group's capture is built once, from its
        complete statistics, and handed over (this accumulator keeps no copy)."""
        capture = ctx.analyses.find(SITE_CAPTURE) or {}
        for name in [n for n in self.samples if self.tokens[n]]:
            self._flush(name)
            self._window_sums.pop(name, None)
            h = self.hess.pop(name)
            _mirror_upper(h)  # the rank-k updates filled the upper triangle only
            capture[name] = GroupCapture(h, np.concatenate(self.samples.pop(name))[: self.sample_tokens], self.tokens[name])
            self.done_tokens = max(self.done_tokens, self.tokens[name])
            self.groups += 1
        ctx.analyses.put(SITE_CAPTURE, capture)
        ctx.report["capture"] = {"groups": self.groups, "tokens": self.done_tokens, "sample_tokens": self.sample_tokens}
        logger.info("captured X^T X at %d input groups over %d tokens", self.groups, self.done_tokens)


def _mirror_upper(h: np.ndarray, rows: int = 512) -> None:
    """Copy the upper triangle of the square ``h`` onto its lower one, a band of rows at a time:
    ``tril_indices`` of a 14336-channel input (an 8B down_proj) would be 1.6 GB of indices."""
    k = len(h)
    for a in range(0, k, rows):
        b = min(a + rows, k)
        h[a:b, :a] = h[:a, a:b].T
        block = h[a:b, a:b]
        lower = np.tril_indices(b - a, -1)
        block[lower] = block.T[lower]
