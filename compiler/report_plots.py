"""Charts for the compile report, drawn with matplotlib from ``report.json`` data.

Each function returns a base64 PNG (for a ``data:`` URI) or None when the report holds nothing to
draw, so ``lowbit report OUT`` can redraw them from the stored JSON alone. The reorder range plot
is drawn by the reorder pass itself (it needs the per-channel ranges, which the JSON does not keep).
"""

from __future__ import annotations

import base64
import io
import re
from collections import defaultdict
from typing import Any

import numpy as np

__all__ = ["fgmp_per_layer_png", "layer_index", "slac_png"]

_LAYER = re.compile(r"(?:^|\.)layers?\.(\d+)\.")


def layer_index(site: str) -> int | None:
    """The block index in a site name (``model.layers.3.mlp.up_proj``, ``encoder.layer.0...``)."""
    m = _LAYER.search(site)
    return int(m.group(1)) if m else None


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display: render to memory
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> str:
    plt = _pyplot()
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def fgmp_per_layer_png(per_site: dict[str, float]) -> str | None:
    """Bars of the FP8 block fraction per layer (one bar per projection kind), dashed lines for
    sites outside the layer stack (a tied lm_head)."""
    if not per_site:
        return None
    by_layer: dict[str, dict[int, float]] = defaultdict(dict)
    outside = {}
    for name, frac in per_site.items():
        layer = layer_index(name)
        if layer is None:
            outside[name] = frac
        else:
            by_layer[name.rsplit(".", 1)[-1]][layer] = frac
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(11, 4.0))
    kinds = list(by_layer)  # site order within a layer (q, k, v, o, gate, up, down)
    width = 0.8 / max(len(kinds), 1)
    for i, kind in enumerate(kinds):
        layers = np.array(sorted(by_layer[kind]))
        ax.bar(layers + (i - (len(kinds) - 1) / 2) * width, [by_layer[kind][l] for l in layers], width, label=kind)
    for name, frac in outside.items():
        ax.axhline(frac, color="black", ls="--", lw=1, label=f"{name} ({frac:.2f})")
    total = sum(per_site.values()) / len(per_site)
    layers = sorted({l for per in by_layer.values() for l in per})
    ax.set_xticks(layers if len(layers) <= 40 else layers[:: len(layers) // 20 + 1])
    ax.set_ylim(0, 1.05)  # a site at 1.0 (all FP8) stays visible
    ax.set_title(f"FGMP: fraction of weight blocks kept in FP8 per layer (mean over sites {total:.2f})")
    ax.set_xlabel("layer")
    ax.set_ylabel("FP8 block fraction")
    ax.legend(ncol=min(9, len(kinds) + len(outside)), fontsize=8, loc="upper center",
              bbox_to_anchor=(0.5, -0.2), frameon=False)  # below the axes: never over the bars
    return _png(fig)


def slac_png(rows: list[dict]) -> str | None:
    """Activation absmax at each calibration length relative to the deploy length: the median
    tensor and the min-max band over tensors."""
    if len(rows) < 2:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    lengths = [r["seq_len"] for r in rows]
    ax.fill_between(lengths, [r["min_ratio"] for r in rows], [r["max_ratio"] for r in rows], alpha=0.25,
                    label="min-max over tensors")  # fmt: skip
    ax.plot(lengths, [r["median_ratio"] for r in rows], marker="o", label="median tensor")
    ax.axhline(1.0, color="gray", lw=0.8, ls=":")
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.set_xlabel("calibration window length (tokens)")
    ax.set_ylabel("absmax / absmax at deploy length")
    ax.set_title("SLAC: activation range vs context length")
    ax.legend(fontsize=8, loc="lower right")
    return _png(fig)
