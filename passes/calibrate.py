"""SLAC: sequence-length-aware calibration, an accumulator of the observation run
(:mod:`lowbit.ort.observe`).

Assumes the linear-site map is available in the context and calibration windows were given.
Guarantees: the model is not modified; after the run ``ctx.analyses.get(ACTIVATION_STATS)``
holds per-channel min / max / absmax / sum of x^2 (and a per-window percentile of |x| averaged
over windows when the recipe asks for it) at every linear-site input and at attention K/V,
gathered on windows of the *deploy* sequence length. K/V channels are (head, head_dim) pairs
(layouts in :mod:`lowbit.core.kv_sites`), with the per-window percentile ``kv.percentile`` when
``kv.range`` asks for it; ``links`` says which o_proj channel scale applies to each V channel, so
smoothing's closed-form updates keep V's ranges exact too. Memory is bounded by one window's
tapped activations plus the running per-channel reductions, however many windows are used.
:class:`lowbit.passes.capture.CaptureAccumulator` (``X^T X``, row samples) is fed by the same run.

Why sequence length matters: outlier magnitudes grow with context (attention sinks, massive
activations appear at specific positions), so ranges calibrated on short windows under-estimate
the deploy-time range. The probe lengths in the recipe are run too, and the report gets a table
of per-tensor absmax at each length relative to the deploy length.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from lowbit.core.context import CompileContext
from lowbit.core.statistics import ACTIVATION_STATS, ActivationStats, ChannelStats
from lowbit.core.kv_sites import attention_kv, kv_inputs, to_channels
from lowbit.core.linear_sites import selected_sites
from lowbit.encode.activations import dynamic_group_size
from lowbit.errors import LowbitError
from lowbit.ort.observe import Window

__all__ = ["CalibrationAccumulator", "calibration_taps", "slac_table", "slac_tensor_rows"]

logger = logging.getLogger(__name__)


def calibration_taps(ctx: CompileContext) -> dict[str, ir.Value]:
    """Values to observe: every linear-site input and attention K/V, by (possibly new) name."""
    taps: dict[str, ir.Value] = {}
    for i, site in enumerate(ctx.sites):
        values = [site.input]
        if site.feeder is not None and site.feeder.kind == "attention_v":
            values += attention_kv(site.feeder.node)
        for v in values:
            if v.name is None:
                v.name = f"lowbit_tap_{i}_{len(taps)}"
            taps.setdefault(v.name, v)
    return taps


def check_group_size(ctx: CompileContext) -> None:
    """Refuse, before the calibration run, a dynamic activation group size that fits no quantized
    input's channels (:func:`lowbit.encode.activations.dynamic_group_size`; emission would refuse
    it only after calibration)."""
    aspec = ctx.recipe.activations
    if aspec.format == "none" or aspec.granularity != "per_token_group" or not aspec.group_size:
        return
    for site in selected_sites(ctx.sites, ctx.recipe.sites.exclude):
        try:
            dynamic_group_size(site.in_features, aspec.group_size)
        except LowbitError as e:
            raise LowbitError(f"{e} ({site.input.name}, site {site.name})") from None


class CalibrationAccumulator:
    """Per-channel ranges at every linear-site input and attention K/V over the calibration
    windows, absmax per tensor over the probe windows: the ``activation_stats`` analysis and the
    report's ``slac``, ``slac_tensors`` and ``calibration`` entries (module doc)."""

    probes = True
    provides = (ACTIVATION_STATS,)

    def __init__(self) -> None:
        self.stats: ActivationStats | None = None
        self.kv_taps: dict = {}
        self.labels: dict[str, str] = {}
        self.probe_absmax: dict[str, dict[int, float]] = {}  # tap -> {probe length: absmax}
        self.finished: set[str] = set()

    def taps(self, ctx: CompileContext) -> dict[str, ir.Value]:
        taps = calibration_taps(ctx)
        recipe = ctx.recipe
        check_group_size(ctx)
        self.pct = recipe.activations.percentile if recipe.activations.range == "percentile" else None
        kv = recipe.kv
        self.kv_pct = kv.percentile if kv.format != "none" and kv.range == "percentile" else None
        self.kv_taps = {kv.value.name: kv for kv in kv_inputs(ctx.sites) if kv.value.name in taps}
        self.labels = _tap_labels(ctx, taps)
        self.stats = ActivationStats(seq_len=int(np.shape(ctx.calibration.windows[0])[-1]))
        self.source = ctx.calibration.source
        self.order = list(taps)
        return taps

    def add(self, window: Window, values: Mapping[str, np.ndarray]) -> None:
        stats = self.stats
        for name, x in values.items():
            if x.dtype != np.float32 or x.ndim == 0:
                continue
            if window.probe:
                per = self.probe_absmax.setdefault(name, {})
                per[window.length] = max(per.get(window.length, 0.0), float(max(x.max(), -x.min())))
                continue
            p = self.pct
            if name in self.kv_taps:
                stats.kv_shapes.setdefault(name, x.shape)
                x, p = to_channels(x, self.kv_taps[name]), self.kv_pct
            if name not in stats.by_value:
                stats.by_value[name] = ChannelStats.empty(x.shape[-1], p is not None)
            stats.by_value[name].update(x, p)

    def finish(self, ctx: CompileContext) -> None:
        stats = self.stats
        # tap order, however the runner split the model (later passes iterate this map)
        stats.by_value = {n: stats.by_value[n] for n in self.order if n in stats.by_value}
        # a block-wise compile finishes after every block: the taps seen since the last call
        # are complete, the earlier ones may have been transformed by passes since
        new = [n for n in stats.by_value if n not in self.finished]
        for name in new:
            stats.slac[name] = {stats.seq_len: float(stats.by_value[name].absmax.max())}
            for length, absmax in sorted(self.probe_absmax.get(name, {}).items()):
                stats.slac[name][length] = absmax
        stats.slac = {n: stats.slac[n] for n in stats.by_value}
        _link_v_channels(stats, {n: kv for n, kv in self.kv_taps.items() if n in new})
        self.finished.update(new)
        ctx.analyses.put(ACTIVATION_STATS, stats)
        windows = len(ctx.calibration.windows)
        ctx.report["slac"] = slac_table(stats)
        ctx.report["slac_tensors"] = slac_tensor_rows(stats, self.labels)
        ctx.report["calibration"] = {"windows": windows, "seq_len": stats.seq_len, "taps": len(stats.by_value),
                                     "source": self.source}  # fmt: skip
        logger.info("calibrated %d tensors on %d windows of %d tokens", len(stats.by_value), windows, stats.seq_len)


def _link_v_channels(stats: ActivationStats, kv_taps: dict) -> None:
    """V channel (h, d) of V head h reads o_proj channel (h * g + r) * head_dim + d for every
    replica r < g (GQA); smoothing keeps the scale equal on replicas, so r = 0 stands for all.
    Heads merged into the batch (no head axis) have no such map: left unlinked."""
    for name, kv in kv_taps.items():
        if kv.role != "v" or name not in stats.by_value or kv.o_input.name not in stats.by_value:
            continue
        channels, o_channels = stats[name].absmax.size, stats[kv.o_input.name].absmax.size
        heads = kv.heads(stats.kv_shapes[name])
        head_dim = channels // heads
        if heads * head_dim != channels or o_channels % channels or (heads == 1 and channels != o_channels):
            continue
        g = o_channels // channels
        j = np.arange(channels)
        stats.links.setdefault(kv.o_input.name, []).append((name, (j // head_dim) * g * head_dim + j % head_dim))


def _tap_labels(ctx: CompileContext, taps: dict[str, ir.Value]) -> dict[str, str]:
    """Readable tap names: the first site reading a value names it; attention K/V are named after
    the attention whose output feeds o_proj (the exporter's value name in brackets)."""
    labels = {}
    for site in ctx.sites:
        if site.input.name in taps:
            labels.setdefault(site.input.name, f"{site.name} input")
        if site.feeder is not None and site.feeder.kind == "attention_v":
            attention = site.name.rsplit(".", 1)[0]
            for v in attention_kv(site.feeder.node):
                if v.name in taps:
                    labels.setdefault(v.name, f"{attention} K/V ({v.name})")
    return labels


def slac_tensor_rows(stats: ActivationStats, labels: dict[str, str]) -> list[dict]:
    """Per observed tensor: its absmax at every calibrated length (the report's per-tensor table)."""
    return [{"tensor": labels.get(name, name), "absmax": {str(n): per[n] for n in sorted(per)}}
            for name, per in stats.slac.items()]  # fmt: skip


def slac_table(stats: ActivationStats) -> list[dict]:
    """Per probe length: median and max over tensors of absmax(length) / absmax(deploy length)."""
    lengths = sorted({n for per in stats.slac.values() for n in per})
    rows = []
    for n in lengths:
        ratios = [per[n] / per[stats.seq_len] for per in stats.slac.values() if n in per and per[stats.seq_len] > 0]
        if ratios:
            rows.append({"seq_len": n, "tensors": len(ratios), "median_ratio": float(np.median(ratios)),
                         "min_ratio": float(np.min(ratios)), "max_ratio": float(np.max(ratios))})  # fmt: skip
    return rows
