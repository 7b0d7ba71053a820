"""R2: rotate every attention head's V channels by an orthogonal matrix R of the head size
(QuaRot's and SpinQuant's R2), in the weights only.

Assumes the linear-site map. For each o_proj input group that is an attention output linear in
v_proj's output channels (:func:`lowbit.core.folding.fold_target`, kind ``attention_v``, head
size known): v_proj's output columns of every KV head -> ``W_v[:, head] R`` (and its bias), and
o_proj's input rows of every query head -> ``R^T W_o[head, :]``. Attention mixes tokens, never
channels, inside a head, so the head's output is rotated by the same R and o_proj undoes it;
under GQA every query head reading one V head gets the same R. With a KV cache, the cache holds
rotated V, which only this model reads back.

R is a randomized Hadamard matrix of the head size (``rotate.seed``). Guarantees:
function-preserving in exact arithmetic (tested on SmolLM2 with and without KV cache, and on a
Qwen-shaped decoder with v_proj biases); groups it cannot rotate (an attention whose V is not traced
to one v_proj -- a fused QKV --, a v_proj constant that is not a bias per channel, unknown head
size) are listed in ``report["rotate"]["heads"]["skipped"]`` with the reason.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from lowbit.core.folding import FoldTarget, fold_target, rewrite_weight_kn
from lowbit.core.pass_base import LowbitPass
from lowbit.runtime_ext.hadamard import rotation

__all__ = ["RotateHeadsPass", "rotate_heads"]

logger = logging.getLogger(__name__)


def rotate_heads(target: FoldTarget, r: np.ndarray, *, defer: bool = False) -> None:
    """V columns of every head -> V R, o_proj rows of every head -> R^T W (module doc); ``defer``:
    the weights' rewrites are deferred to their reads (:func:`lowbit.core.folding.rewrite_weight_kn`)."""
    hd = r.shape[0]
    cols = target.producer_columns or slice(None)  # a fused QKV: its V columns only

    def rotate_v(w: np.ndarray) -> np.ndarray:
        v = w.astype(np.float64)
        part = v[:, cols]
        v[:, cols] = (part.reshape(part.shape[0], -1, hd) @ r).reshape(part.shape)
        return v

    def rotate_o(w: np.ndarray) -> np.ndarray:
        w = w.astype(np.float64)
        return np.einsum("ji,hjn->hin", r, w.reshape(-1, hd, w.shape[1])).reshape(w.shape)

    rewrite_weight_kn(target.producer, rotate_v, defer=defer)
    if target.producer_bias is not None:  # v_proj's bias (Qwen, BERT) is rotated with its columns
        b = target.producer_bias.const_value.numpy().astype(np.float64).copy()
        flat = b.reshape(-1)
        flat[cols] = (flat[cols].reshape(-1, hd) @ r).reshape(-1)
        target.producer_bias.const_value = ir.tensor(b.astype(np.float32), name=target.producer_bias.name)
    for site in target.group:
        rewrite_weight_kn(site, rotate_o, defer=defer)


class RotateHeadsPass(LowbitPass):
    """R2 (module doc)."""

    PRESERVES_FUNCTION = True
    REBASES_CACHE = True  # with a KV cache, present.* V holds rotated heads

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        report = self.ctx.report.setdefault("rotate", {})
        rotated, skipped, kind = 0, {}, None
        for group in self.ctx.sites.input_groups():
            if group[0].feeder is None or group[0].feeder.kind != "attention_v":
                continue
            target = fold_target(group, ("attention_v",), cache_follows=True)
            if isinstance(target, str) or target.head_dim is None:
                skipped[group[0].name] = target if isinstance(target, str) else "head size unknown"
                continue
            c = np.arange(target.channels)
            if np.any(target.channel_map % target.head_dim != c % target.head_dim):
                skipped[group[0].name] = "o_proj channels do not map head to head"
                continue
            rot = rotation(target.head_dim, self.ctx.recipe.rotate.seed)
            rotate_heads(target, rot.matrix, defer=self.ctx.defer_rewrites)
            self.ctx.release_rewritten()
            rotated, kind = rotated + 1, rot.kind
        report["heads"] = {"rotated_groups": rotated, "matrix": kind, "skipped": skipped}
        logger.info("R2: %d attention output groups rotated per head (%s), %d skipped", rotated, kind, len(skipped))
        return ir.passes.PassResult(model, modified=rotated > 0)
