"""The compilation context: the model being compiled, its recipe, its calibration data, the
typed analyses passes share (:mod:`lowbit.core.analyses`) and the report passes write.

Owns the checks that the model and its calibration data meet (external data inside its files,
float types ORT can run, token ids inside the vocabulary) before any pass reads a weight. Passes
receive the context in their constructor, read and write analyses through ``ctx.analyses`` and
record what they did in ``ctx.report`` (a plain dict that becomes report.json) -- which no pass
reads back.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx_ir as ir

from lowbit.core.analyses import Analyses
from lowbit.core.linear_sites import LINEAR_SITES, LinearSiteMap, find_linear_sites
from lowbit.core.model_checks import check_ir_external_data, check_token_ids, ir_vocab_limits
from lowbit.core.float_types import check_float_types
from lowbit.core.recipe import Recipe
from lowbit.core.resume import ResumeStore
from lowbit.core.tensor_spill import TensorSpill, unmap_external

__all__ = ["CalibrationData", "CompileContext"]

logger = logging.getLogger(__name__)


@dataclass
class CalibrationData:
    """Token windows for calibration: ``windows`` at the deploy length, ``probes`` at other
    lengths (SLAC). Each window is a 1-D int64 array of token ids."""

    windows: list[np.ndarray]
    probes: dict[int, list[np.ndarray]] = field(default_factory=dict)
    source: str = ""
    vocab_size: int | None = None  # the tokenizer's vocabulary, when known (named in id errors)


class CompileContext:
    def __init__(self, model: ir.Model, recipe: Recipe, calibration: CalibrationData | None = None, *,
                 fisher_provider: Callable[[], Path | None] | None = None) -> None:  # fmt: skip
        # The model and its calibration data meet here, before any pass reads a weight or runs
        # the model (--verify runs it on the first window before the first pass): external data
        # must lie inside its files, token ids inside the embedding table and the logits.
        check_ir_external_data(model)
        check_float_types(model)  # before --verify runs the input: ORT has no bfloat16 kernels
        if calibration is not None:
            limits = ir_vocab_limits(model)
            for windows in (calibration.windows, *calibration.probes.values()):
                if not all(np.issubdtype(np.asarray(w).dtype, np.integer) for w in windows):
                    continue  # pixel values of an image model, not token ids
                check_token_ids(windows, limits, what=f"calibration data ({calibration.source or 'given windows'})",
                                model="the model", vocab_size=calibration.vocab_size)  # fmt: skip
        self.model = model
        self.recipe = recipe
        self.calibration = calibration
        # the Fisher side file of this model when the recipe names none (the compiler knows where
        # the model came from; passes never load a torch model themselves)
        self.fisher_provider = fisher_provider
        self.report: dict[str, Any] = {"recipe": recipe.to_dict(), "passes": [], "sites": {}}
        self.analyses = Analyses()
        self.analyses.register(LINEAR_SITES, lambda: find_linear_sites(self.model.graph))
        # the nodes of the block a block-wise compile processes now (None: the whole model)
        self.scope: set[ir.Node] | None = None
        # a model too large to hold twice (set by the pipeline): what passes rewrite goes to one
        # scratch data file as they go, so memory is bounded by what a pass works on, not the model
        self.spill: TensorSpill | None = None
        # a long (block-wise) compile: results of its costly steps kept until it finishes, so an
        # interrupted compile restarts where it stopped (set by the pipeline; lowbit.core.resume)
        self.resume: ResumeStore | None = None

    @property
    def defer_rewrites(self) -> bool:
        """Whether model-wide weight rewrites (rotations) are deferred to the reads of the weights
        (:func:`lowbit.core.folding.rewrite_weight_kn`): for a model large enough to spill, whose
        rewritten float32 copies would otherwise fill the scratch disk (32 GB at 8B) before the
        block-wise passes replace them."""
        return self.spill is not None

    def release_rewritten(self) -> None:
        """Within a model-wide rewrite of a large model (rotations), after each piece of it (a
        layer, a group), and before a pass that reads weights a slice at a time (OPTQ): the
        weights rewritten so far go to the scratch file and the memory maps reading left open are
        closed. Does nothing when the model is held in memory (no ``spill``)."""
        if self.spill is not None:
            self.spill.spill(self.model.graph)
            unmap_external(self.model.graph)

    @property
    def sites(self) -> LinearSiteMap:
        """The linear sites of the model, or of the current block when ``scope`` is set."""
        sites = self.analyses.get(LINEAR_SITES)
        return sites if self.scope is None else sites.restricted(self.scope)
