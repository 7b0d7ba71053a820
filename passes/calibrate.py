"""SLAC: sequence-length-aware calibration with ONNX Runtime.

Assumes the linear-site map is available in the context and calibration windows were given.
Guarantees: the model is not modified (an analysis pass); afterwards ``ctx.get("activation_stats")``
holds per-channel min / max / absmax (and a per-window percentile of |x| averaged over windows
when the recipe asks for it) at every linear-site input and at attention K/V, gathered on windows
of the *deploy* sequence length. K/V channels are (head, head_dim) pairs (layouts in
:mod:`lowbit.core.kv_sites`), with the per-window percentile ``kv.percentile`` when
``kv.range`` asks for it; ``links`` says which o_proj channel scale applies to each V channel, so
smoothing's closed-form updates keep V's ranges exact too. Memory is bounded by one window's
tapped activations plus the running per-channel reductions, however many windows are used. With ``capture_tokens`` it
also does :class:`lowbit.passes.capture.CapturePass`'s job (``site_capture``) on the same run
of the windows, which saves running the model over the calibration data a second time.

Why sequence length matters: outlier magnitudes grow with context (attention sinks, massive
activations appear at specific positions), so ranges calibrated on short windows under-estimate
the deploy-time range. The probe lengths in the recipe are run too, and the report gets a table
of per-tensor absmax at each length relative to the deploy length.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
from tqdm.auto import tqdm

from lowbit.core.context import CompileContext
from lowbit.ort.feeds import build_feeds
from lowbit.ort.session import ort_session
from lowbit.errors import LowbitError
from lowbit.passes.capture import CaptureAccumulator
from lowbit.core.kv_sites import attention_kv, kv_inputs, to_channels

__all__ = ["ActivationStats", "ChannelStats", "CalibratePass", "calibration_taps", "slac_table", "slac_tensor_rows"]

logger = logging.getLogger(__name__)


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

    def __getitem__(self, name: str) -> ChannelStats:
        return self.by_value[name]


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


class _TappedSession:
    """An ORT session over the model with the tapped values as extra outputs."""

    def __init__(self, model: ir.Model, taps: dict[str, ir.Value]) -> None:
        self.session = ort_session(model, taps.values())
        self.names = list(taps)

    def run(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        outs = self.session.run(self.names, build_feeds(self.session, ids))
        return dict(zip(self.names, outs))


class CalibratePass(ir.passes.InPlacePass):
    """Collect activation statistics (SLAC) into ``ctx`` as the ``activation_stats`` analysis."""

    def __init__(self, ctx: CompileContext, capture_tokens: int | None = None) -> None:
        super().__init__()
        self.ctx = ctx
        # also capture X^T X and row samples (what CapturePass does) from the same windows
        self.capture_tokens = capture_tokens

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        data = self.ctx.calibration
        if data is None or not data.windows:
            raise LowbitError("this recipe calibrates (activation ranges, smoothing or OPTQ) and needs calibration data (--calib-text or a model directory with a tokenizer)")
        spec = self.ctx.recipe.activations
        pct = spec.percentile if spec.range == "percentile" else None
        taps = calibration_taps(self.ctx)
        capture = None
        if self.capture_tokens is not None:
            capture = CaptureAccumulator(self.ctx, self.capture_tokens)
            taps.update((n, v) for n, v in capture.taps.items() if n not in taps)
        session = _TappedSession(model, taps)
        stats = ActivationStats(seq_len=int(np.shape(data.windows[0])[-1]))
        kv_taps = {kv.value.name: kv for kv in kv_inputs(self.ctx.sites) if kv.value.name in taps}
        kv_spec = self.ctx.recipe.kv
        kv_pct = kv_spec.percentile if kv_spec.format != "none" and kv_spec.range == "percentile" else None
        for ids in tqdm(data.windows, desc="calibrating", unit="window", leave=False, disable=None):
            outs = session.run(ids)
            if capture is not None:
                capture.add(outs, int(np.prod(np.shape(ids))))
            for name, x in outs.items():
                if x.dtype != np.float32 or x.ndim == 0:
                    continue
                p = pct
                if name in kv_taps:
                    stats.kv_shapes.setdefault(name, x.shape)
                    x, p = to_channels(x, kv_taps[name]), kv_pct
                if name not in stats.by_value:
                    stats.by_value[name] = ChannelStats.empty(x.shape[-1], p is not None)
                stats.by_value[name].update(x, p)
        for name, s in stats.by_value.items():
            stats.slac[name] = {stats.seq_len: float(s.absmax.max())}
        _link_v_channels(stats, kv_taps)
        for length, windows in sorted(data.probes.items()):
            for ids in tqdm(windows, desc=f"SLAC probe {length}", unit="window", leave=False, disable=None):
                for name, x in session.run(ids).items():
                    if name in stats.slac:
                        prev = stats.slac[name].get(length, 0.0)
                        stats.slac[name][length] = max(prev, float(np.abs(x).max()))
        self.ctx.put("activation_stats", stats)
        if capture is not None:
            capture.publish(self.ctx)
        self.ctx.report["slac"] = slac_table(stats)
        self.ctx.report["slac_tensors"] = slac_tensor_rows(stats, _tap_labels(self.ctx, taps))
        self.ctx.report["calibration"] = {"windows": len(data.windows), "seq_len": stats.seq_len,
                                          "taps": len(stats.by_value), "source": data.source}  # fmt: skip
        logger.info("calibrated %d tensors on %d windows of %d tokens", len(stats.by_value), len(data.windows), stats.seq_len)
        return ir.passes.PassResult(model, modified=False)


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
