"""Per-weight sensitivities (g^2) for FGMP, in the orientation of each site's stored initializer.

Two sources, chosen by ``precision.sensitivity`` (the report records which one was used):

- ``fisher``: the empirical Fisher diagonal (squared gradients of the LM loss), read from
  ``precision.fisher_file`` or from the file the compiler's ``ctx.fisher_provider`` gives (for a
  shipped model, :mod:`lowbit.models.fisher` computes it with torch and caches it; this module
  never loads a torch model). Side-file arrays are in torch orientation [out, in]; dynamo exports
  store MatMul weights as [in, out] (reduction axis 0), so those are transposed here.
- ``proxy`` (any bare ONNX model): g^2[i, j] = sum over calibration tokens of x_i^2, i.e.
  diag(X^T X) of the site's input along the reduction axis, broadcast over output channels. It is
  the second moment of the output error ``dW x`` when input channels are uncorrelated, and needs
  only ``ChannelStats.sq_sum`` from calibration.

``auto`` takes ``fisher`` when it is available (a side file, a shipped model, or a lowbit export
directory of one) and else ``proxy``.
Read-only: no graph edits. Values are float32, finite, >= 0.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lowbit.core.context import CompileContext
from lowbit.core.statistics import ACTIVATION_STATS
from lowbit.core.fisher_file import ACT_PREFIX, WEIGHT_PREFIX, check_fisher_file, load_fisher, reading
from lowbit.errors import LowbitError
from lowbit.core.linear_sites import LinearSite

__all__ = ["Sensitivity", "activation_fisher", "fisher_for_site", "proxy_for_site", "site_sensitivities"]

logger = logging.getLogger(__name__)



@dataclass(frozen=True)
class Sensitivity:
    kind: str  # "fisher" | "proxy"
    source: str  # where the values came from (file, model, or "diag(X^T X) from calibration")
    by_site: dict[str, np.ndarray]  # site name -> g^2 shaped like the stored initializer


def fisher_for_site(fisher: dict[str, np.ndarray], site: LinearSite) -> np.ndarray:
    """The site's Fisher array from a side-file dict, oriented like its stored initializer."""
    key = f"{WEIGHT_PREFIX}{site.name}"
    if key not in fisher:
        raise LowbitError(f"the Fisher side file has no entry for site {site.name!r} (key {key!r})")
    g2 = np.asarray(fisher[key], np.float32)
    shape = tuple(site.weight.const_value.shape)
    # torch orientation is [out, in]; the stored initializer is [out, in] iff reduction axis is 1
    oriented = g2 if site.reduction_axis == 1 else g2.T
    if oriented.shape != shape:
        raise LowbitError(f"Fisher for {site.name} has shape {g2.shape} (torch [out, in]); the ONNX "
                          f"weight is {shape} with reduction axis {site.reduction_axis}")
    return np.ascontiguousarray(oriented)


def proxy_for_site(sq_sum: np.ndarray, site: LinearSite) -> np.ndarray:
    """diag(X^T X) of the input, broadcast along the output axis of the stored weight."""
    shape = tuple(site.weight.const_value.shape)
    sq = np.asarray(sq_sum, np.float32)
    if sq.shape != (shape[site.reduction_axis],):
        raise LowbitError(f"calibration statistics of {site.name} have {sq.shape} channels, weight is {shape}")
    view = sq[:, None] if site.reduction_axis == 0 else sq[None, :]
    return np.ascontiguousarray(np.broadcast_to(view, shape))


def site_sensitivities(ctx: CompileContext, sites: list[LinearSite]) -> Sensitivity:
    """g^2 for every site in ``sites`` from the source the recipe asks for (module doc)."""
    spec = ctx.recipe.precision
    fisher, source = None, ""
    if spec.sensitivity in ("auto", "fisher"):
        fisher, source = _fisher_dict(ctx)
        if fisher is None and spec.sensitivity == "fisher":
            raise LowbitError("precision.sensitivity = 'fisher' needs precision.fisher_file or a shipped "
                              "model as input (its torch weights give the gradients)")
    if fisher is not None:
        return Sensitivity("fisher", source, {s.name: fisher_for_site(fisher, s) for s in sites})
    stats = ctx.analyses.find(ACTIVATION_STATS)
    if stats is None:
        raise LowbitError("the diag(X^T X) sensitivity proxy needs calibration statistics: give calibration "
                          "data, or a Fisher file (precision.fisher_file)")
    by_site = {}
    for s in sites:
        channel = stats.by_value.get(s.input.name)
        if channel is None or channel.sq_sum is None:
            raise LowbitError(f"no calibration statistics for the input of {s.name}; the proxy needs them")
        by_site[s.name] = proxy_for_site(channel.sq_sum, s)
    return Sensitivity("proxy", "diag(X^T X) of each site input over the calibration windows", by_site)


def _fisher_dict(ctx: CompileContext) -> tuple[dict[str, np.ndarray] | None, str]:
    path = _fisher_path(ctx)
    if path is None:
        return None, ""
    label = "recipe key 'precision.fisher_file'" if ctx.recipe.precision.fisher_file else "cached Fisher file"
    check_fisher_file(path, label)  # also when the file changed since the recipe was loaded
    with reading(path, label):
        return load_fisher(path)


def _fisher_path(ctx: CompileContext) -> Path | None:
    """The side file to use: the recipe's, else the one the compiler's Fisher provider gives
    (a shipped model's, computed with torch on first use); None when neither applies."""
    spec = ctx.recipe.precision
    if spec.fisher_file:
        return Path(spec.fisher_file)
    return ctx.fisher_provider() if ctx.fisher_provider is not None else None


def activation_fisher(ctx: CompileContext, site: LinearSite) -> np.ndarray | None:
    """The Fisher of the site's input channels (``act/<site>``, shape [in]) when the recipe's
    sensitivity is a Fisher side file; None for the proxy (no gradients known)."""
    if ctx.recipe.precision.sensitivity == "proxy":
        return None
    path = _fisher_path(ctx)
    if path is None:
        return None
    key = f"{ACT_PREFIX}{site.name}"
    with reading(path, "Fisher side file"), np.load(path, allow_pickle=False) as data:  # lazy: reads only this array
        if key not in data.files:
            raise LowbitError(f"the Fisher side file {path} has no activation entry {key!r}")
        g2 = np.asarray(data[key], np.float32)
    if g2.shape != (site.in_features,):
        raise LowbitError(f"activation Fisher of {site.name} has shape {g2.shape}, expected ({site.in_features},)")
    if not np.isfinite(g2).all() or (g2 < 0).any():
        raise LowbitError(f"the Fisher side file {path}: non-finite or negative values in {key!r}")
    return g2
