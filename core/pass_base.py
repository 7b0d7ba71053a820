"""The base class of lowbit's passes: an in-place ``onnx_ir`` pass over a compile context that
declares which analyses it requires and ensures (:mod:`lowbit.core.analyses`), checked by
``onnx_ir``'s ``requires``/``ensures`` hooks around every run."""

from __future__ import annotations

import onnx_ir as ir

from lowbit.core.analyses import Key
from lowbit.core.context import CompileContext

__all__ = ["LowbitPass"]


class LowbitPass(ir.passes.InPlacePass):
    """An in-place ``onnx_ir`` pass over a :class:`CompileContext` that declares its contract.

    ``REQUIRES``: analyses that must exist (or be buildable) before ``call``; ``ENSURES``: analyses
    it leaves; ``INVALIDATES``: value analyses it makes stale; ``PRESERVES_FUNCTION``: the model's
    outputs are unchanged (up to float reassociation), which ``--verify`` checks numerically.
    ``modified`` in the result must say whether the graph changed, not whether the pass ran.
    ``REBASES_CACHE``: the model's KV-cache outputs hold the same cache in another basis that only
    the model itself reads back (e.g. V rotated inside each head), so they are not compared.
    ``BLOCKWISE``: the pass reads and edits only what ``ctx.sites`` names (in a block-wise compile,
    one block's sites: ``ctx.scope``), and adds to its analyses and report entries rather than
    replacing them, so it may run once per block.
    """

    REQUIRES: tuple[Key, ...] = ()
    ENSURES: tuple[Key, ...] = ()
    INVALIDATES: tuple[Key, ...] = ()
    PRESERVES_FUNCTION: bool = False
    REBASES_CACHE: bool = False
    BLOCKWISE: bool = False

    def __init__(self, ctx: CompileContext) -> None:
        super().__init__()
        self.ctx = ctx

    def __call__(self, model_or_result: ir.Model | ir.passes.PassResult, /) -> ir.passes.PassResult:
        result = super().__call__(model_or_result)
        if result.modified:  # structural analyses describe the old graph: rebuilt on next read
            self.ctx.analyses.graph_edited()
        self.ctx.analyses.invalidate(*self.INVALIDATES)
        return result

    def requires(self, model: ir.Model) -> None:
        missing = [k.name for k in self.REQUIRES if not self.ctx.analyses.has(k)]
        if missing:
            raise ir.passes.PreconditionError(
                f"{type(self).__name__} needs analyses {missing} (available: {self.ctx.analyses.available()})")

    def ensures(self, model: ir.Model) -> None:
        missing = [k.name for k in self.ENSURES if not self.ctx.analyses.has(k)]
        if missing:
            raise ir.passes.PostconditionError(f"{type(self).__name__} did not produce analyses {missing}")
