"""Block-wise compilation: a model too large to hold twice is observed, transformed, rounded and
emitted one residual-stream segment at a time, so memory is bounded by a block, not the model.

The observation run goes segment by segment (:class:`lowbit.ort.segments.Segmented`); after each
segment has seen every window, its statistics are complete, and the recipe's per-site passes
(those declaring ``BLOCKWISE``: smoothing, reordering, OPTQ, weight encoding, QDQ emission) run on
that segment's sites only (``ctx.scope``). Then the segment's heavy analyses are released (X^T X
and row samples, weight encodings), the float weights its codes replaced are dropped and what it
wrote is spilled to a scratch data file (:mod:`lowbit.core.tensor_spill`).

Assumes the passes' folding stays inside a segment (segments are cut at norm inputs: every fold
target -- the norm, v_proj for o_proj, up_proj for down_proj -- lies in the segment of the sites it
serves) and that later segments are observed on the float model's values (cached before any edit),
as the whole-model pipeline observes them, and that the accumulators tap every site's input (a
segment with no tap is not run, so its sites would get no block). Guarantees: the compiled model is the one the
whole-model pipeline writes (tests compare them byte for byte on a model small enough for both).
``--verify`` does not check the passes inside a block-wise run (it would run the whole model).

Sequential (``calibration.sequential``, GPTQ-style): each segment, once compiled, is run again as
compiled and the later segments are observed on its quantized outputs
(:class:`lowbit.ort.segments.Segmented`, ``requantized``); the output then differs from the
whole-model pipeline's by design.
"""

from __future__ import annotations

import logging
import os
import time
from collections import defaultdict
from collections.abc import Sequence

import onnx_ir as ir

from lowbit.core.analyses import WEIGHT_ENCODINGS
from lowbit.core.context import CompileContext
from lowbit.core.folding import materialize_deferred
from lowbit.core.pass_base import LowbitPass
from lowbit.core.statistics import SITE_CAPTURE
from lowbit.core.tensor_spill import TensorSpill, drop_unused_initializers, unmap_external
from lowbit.files.scratch import run_dir
from lowbit.ort import observe as observation
from lowbit.ort.observe import Accumulator, SubgraphRun, observe
from lowbit.ort.segments import Segmented

__all__ = ["BlockwisePass"]

logger = logging.getLogger(__name__)


class BlockwisePass(LowbitPass):
    """Observe the model segment by segment and run ``inner`` on each segment's sites (module doc)."""

    PRESERVES_FUNCTION = False

    def __init__(self, ctx: CompileContext, accumulators: Sequence[Accumulator], inner: Sequence[LowbitPass],
                 segment_bytes: int | None = None, *, sequential: bool = False) -> None:  # fmt: skip
        super().__init__(ctx)
        self.sequential = sequential
        if not all(p.BLOCKWISE for p in inner):
            raise ValueError(f"not block-wise passes: {[type(p).__name__ for p in inner if not p.BLOCKWISE]}")
        self.accumulators, self.inner = list(accumulators), list(inner)
        self.segment_bytes = observation.SEGMENT_BYTES if segment_bytes is None else segment_bytes
        self.ENSURES = tuple(k for acc in self.accumulators for k in acc.provides)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        seconds: dict[str, float] = defaultdict(float)
        spill = self.ctx.spill or TensorSpill(run_dir())
        blocks = {"segments": 0, "dropped_initializers": 0, "peak_block_sites": 0, "materialized_bytes": 0}
        rss: list[int] = []  # resident memory after each block, MB: flat when memory is bounded

        def each(run: SubgraphRun) -> None:
            self.ctx.scope = set(run.nodes)
            try:
                # names now: a site reads its node's current input, which emission replaces
                sites = [(site.name, site.input.name) for site in self.ctx.sites]
                # deferred rotations computed once for the block's several reads; OPTQ spills
                # them before its own (lowbit.encode.optq), so they do not add to its peak
                start = time.perf_counter()
                made = materialize_deferred(list(self.ctx.sites))
                if made:  # timed apart from the observation it would otherwise be counted in
                    blocks["materialized_bytes"] += made
                    seconds["MaterializeDeferred"] += time.perf_counter() - start
                for p in self.inner:
                    start = time.perf_counter()
                    p(model)  # a LowbitPass: marks the structural analyses stale when it edits
                    seconds[type(p).__name__] += time.perf_counter() - start
            finally:
                self.ctx.scope = None
            self._release(sites)
            blocks["dropped_initializers"] += drop_unused_initializers(model.graph)
            spill.spill(model.graph)
            unmap_external(model.graph)
            blocks["segments"] += 1
            rss.append(_resident_mb())
            blocks["peak_block_sites"] = max(blocks["peak_block_sites"], len(sites))

        runner = Segmented(self.segment_bytes, requantized=self.sequential)
        observe(self.ctx, model, self.accumulators, runner=runner, after_each=each)
        self.ctx.report["blockwise"] = {**blocks, "segment_bytes": self.segment_bytes, "spilled_bytes": spill.bytes, "reclaimed_bytes": spill.reclaimed,
                                        "sequential": self.sequential, "sessions": runner.sessions,
                                        "passes": {k: round(v, 3) for k, v in seconds.items()}, "resident_mb": rss}  # fmt: skip
        logger.info("block-wise: %d segments, %.0f MB spilled", blocks["segments"], spill.bytes / 2**20)
        return ir.passes.PassResult(model, modified=True)

    def _release(self, sites: list[tuple[str, str]]) -> None:
        """Drop the block's X^T X, row samples and weight encodings (by site and input name): its
        codes are in the graph."""
        captures = self.ctx.analyses.find(SITE_CAPTURE) or {}
        encodings = self.ctx.analyses.find(WEIGHT_ENCODINGS) or {}
        for site, source in sites:
            captures.pop(source, None)
            encodings.pop(site, None)


def _resident_mb() -> int:
    """This process's resident memory now (Linux; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") >> 20
    except (OSError, ValueError, IndexError):
        return 0
