"""RPTQ reorder: cluster each site input's channels by calibrated (min, max), make every cluster
contiguous, and give each cluster its own activation quantization range.

Assumes the linear-site map and ``activation_stats``. Function-preserving (a permutation is exact
in float32; the norm reduces over the same set of channels in another order, a few-ulp change).
Per foldable input group (:mod:`lowbit.core.folding`):

- ``norm`` feeder: a ``Gather(axis=-1)`` reorders the *norm input* on its own branch, gamma/beta
  are permuted, consumer weight rows are permuted; the residual stream keeps its order. The Gather
  sits on the norm input rather than after the norm so that the tensor being quantized is born
  contiguous (the Gather + norm pair is exactly the runtime's fused ReorderNorm op) and no extra
  pass over the quantized tensor is needed.
- ``gated_linear`` feeder (down_proj): gate_proj and up_proj output columns and down_proj rows are
  permuted together -- no Gather at all.
- ``attention_v`` feeder (o_proj): channels are sorted by cluster *inside each head* (a channel
  cannot leave its head), with one order per v head shared by the query heads that read it (GQA);
  v_proj output columns and o_proj rows are permuted -- no Gather. Clusters stay interleaved
  across heads, which per-cluster QDQ scale vectors do not mind; what the order buys is weight
  blocks along o_proj's reduction axis (and run-time activation groups) of like-ranged channels.
- any other input (a tied lm_head, post-LN BERT norms that also feed the residual, feeders not
  in ``reorder.feeders``): clustered and given per-cluster ranges, but not reordered -- a QDQ scale
  vector needs no contiguity; only a kernel that splits the matmul by cluster would.

Guarantees: ``ctx.analyses.get(ACT_CLUSTERS)[input name]`` is the cluster label of every channel (after
reordering; non-decreasing for norm and gated_linear inputs, within each head for attention
outputs); QDQ emission then uses one range per cluster
(a per-channel scale vector constant within each cluster). ``activation_stats`` and
``site_capture`` are permuted along. The report gets a PNG (base64) of per-channel ranges before
and after reordering at the input with the widest range spread, with cluster boundaries.
"""

from __future__ import annotations

import base64
import io
import logging

import numpy as np
import onnx_ir as ir
from scipy.cluster.vq import kmeans2

from lowbit.core.context import CompileContext
from lowbit.core.pass_base import LowbitPass
from lowbit.core.analyses import Key
from lowbit.core.statistics import ACTIVATION_STATS, transform_channels
from lowbit.core.folding import FoldTarget, fold_target

__all__ = ["ACT_CLUSTERS", "ReorderPass", "cluster_channels", "head_local_order", "range_plot_png"]

logger = logging.getLogger(__name__)

ACT_CLUSTERS: Key[dict[str, np.ndarray]] = Key(
    "act_clusters", "RPTQ cluster label of every channel of each clustered input (after reordering)")


def cluster_channels(lo: np.ndarray, hi: np.ndarray, clusters: int, seed: int = 0) -> np.ndarray:
    """K-means labels over (min, max) points, relabelled so label order = increasing range."""
    points = np.stack([lo, hi], axis=1).astype(np.float64)
    k = min(clusters, len(np.unique(points, axis=0)))
    if k <= 1:
        return np.zeros(len(lo), np.int64)
    _, labels = kmeans2(points, k, minit="++", seed=seed)
    used = np.unique(labels)
    spread = np.array([np.max(hi[labels == c] - lo[labels == c]) for c in used])
    rank = np.empty(labels.max() + 1, np.int64)
    rank[used[np.argsort(spread, kind="stable")]] = np.arange(len(used))
    return rank[labels]


def head_local_order(labels: np.ndarray, channel_map: np.ndarray, head_dim: int) -> np.ndarray:
    """o_proj input permutation sorting each head's channels by cluster; a v channel read by
    several query heads (GQA) takes its largest label among them, so all its readers agree."""
    v_labels = np.zeros(int(channel_map.max()) + 1, labels.dtype)
    np.maximum.at(v_labels, channel_map, labels)
    heads = v_labels.reshape(-1, head_dim)
    local = np.argsort(heads, axis=1, kind="stable")
    v_perm = (local + np.arange(heads.shape[0])[:, None] * head_dim).reshape(-1)
    c = np.arange(labels.size)
    return c - channel_map + v_perm[channel_map]  # new channel (head j, i) = old (head j, v_perm's i)


def _insert_gather(graph: ir.Graph, norm: ir.Node, perm: np.ndarray, name: str) -> None:
    tensor = ir.tensor(perm.astype(np.int64), name=f"{name}.reorder_perm")
    indices = ir.Value(name=tensor.name, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
    graph.register_initializer(indices)
    x = norm.inputs[0]
    gather = ir.node("Gather", [x, indices], {"axis": -1}, name=f"{name}.reorder")
    gather.outputs[0].name = f"{name}.reordered"
    gather.outputs[0].type = x.type
    gather.outputs[0].shape = x.shape
    graph.insert_before(norm, gather)
    norm.replace_input_with(0, gather.outputs[0])


class ReorderPass(LowbitPass):
    """Cluster, permute and record per-cluster ranges at every foldable input group."""

    REQUIRES = (ACTIVATION_STATS,)
    ENSURES = (ACT_CLUSTERS,)
    PRESERVES_FUNCTION = True
    BLOCKWISE = True

    def __init__(self, ctx: CompileContext) -> None:
        super().__init__(ctx)
        self._widest: tuple = (-1.0, None)  # the plotted input so far (a block-wise compile calls once per block)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        spec = self.ctx.recipe.reorder
        stats = self.ctx.analyses.get(ACTIVATION_STATS)
        clusters: dict[str, np.ndarray] = self.ctx.analyses.find(ACT_CLUSTERS) or {}  # earlier blocks'
        report = self.ctx.report.setdefault("reorder", {"clusters": spec.clusters, "groups": {}})
        gathers, permuted = 0, 0
        earlier = widest = self._widest
        for group in self.ctx.sites.input_groups():
            target = fold_target(group, spec.feeders)
            key, name = group[0].name, group[0].input.name
            if name not in stats.by_value:
                report["groups"][key] = {"reordered": False, "reason": "no calibrated range"}
                continue
            lo, hi = stats[name].min.copy(), stats[name].max.copy()
            labels = cluster_channels(lo, hi, spec.clusters)
            entry = {"feeder": group[0].feeder.kind if group[0].feeder else "other", "clusters": int(labels.max() + 1)}
            if not isinstance(target, str) and target.kind == "attention_v" and target.head_dim is None:
                target = "attention head layout unknown"
            reordered = False
            if isinstance(target, str):
                entry["reason"] = f"per-cluster ranges only, not reordered: {target}"
                clusters[name] = labels
            else:
                perm = self._permute(model, target, labels, key)
                reordered = perm is not None
                if reordered:
                    gathers += target.kind == "norm"
                    permuted += 1
                else:  # clusters already contiguous: nothing to permute, the graph stays as it is
                    perm = np.arange(len(labels))
                clusters[name] = labels[perm]
                width = hi - lo  # the plotted input: the one whose widest channel stands out most
                spread = float(width.max() / max(float(np.median(width)), 1e-12))
                if spread > widest[0] and target.kind != "attention_v":  # plotted: contiguous clusters
                    widest = (spread, (key, lo, hi, labels, perm))
            entry["reordered"] = reordered
            report["groups"][key] = entry
        self.ctx.analyses.put(ACT_CLUSTERS, clusters)
        self._widest = widest
        report.update({"gathers": report.get("gathers", 0) + gathers, "clustered_groups": len(clusters),
                       "permuted_groups": report.get("permuted_groups", 0) + permuted})  # fmt: skip
        if widest[1] is not None and widest is not earlier:
            report["plot"] = {"site": widest[1][0], "png_base64": range_plot_png(*widest[1])}
        logger.info("reorder: %d inputs clustered, %d permuted (%d Gathers)", len(clusters), permuted, gathers)
        # modified only when a permutation was applied: cluster labels alone change no graph value
        return ir.passes.PassResult(model, modified=bool(permuted))

    def _permute(self, model: ir.Model, target: FoldTarget, labels: np.ndarray, key: str) -> np.ndarray | None:
        """Make each cluster contiguous (within heads for attention outputs); returns the perm,
        or None (nothing edited) when the clusters are contiguous already."""
        if target.kind == "attention_v":
            perm = head_local_order(labels, target.channel_map, target.head_dim)
        else:
            perm = np.argsort(labels, kind="stable")
        if np.array_equal(perm, np.arange(len(perm))):
            return None
        if target.kind == "norm":
            _insert_gather(model.graph, target.norm, perm, key)
        target.apply_permutation(perm)
        transform_channels(self.ctx, target.input.name, perm=perm)
        return perm


def range_plot_png(site: str, lo: np.ndarray, hi: np.ndarray, labels: np.ndarray, perm: np.ndarray) -> str:
    """Base64 PNG: per-channel [min, max] before and after reordering, cluster boundaries."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 1, figsize=(10, 6), sharey=True)
    ch = np.arange(len(lo))
    axes[0].vlines(ch, lo, hi, linewidth=0.6, color="tab:blue")
    axes[0].set_title(f"{site} input: per-channel range before reordering")
    axes[1].vlines(ch, lo[perm], hi[perm], linewidth=0.6, color="tab:orange")
    bounds = np.flatnonzero(np.diff(labels[perm])) + 0.5
    for b in bounds:
        axes[1].axvline(b, color="k", linewidth=0.8, linestyle="--")
    axes[1].set_title(f"after RPTQ reordering ({len(bounds) + 1} clusters, dashed = boundaries)")
    axes[1].set_xlabel("channel")
    for ax in axes:
        ax.set_ylabel("activation")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")
