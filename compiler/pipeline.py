"""Build the pass pipeline from a recipe and run it with instrumentation.

Each pass is wrapped in :class:`Instrumented`, an ``onnx_ir`` pass that records wall time and
node counts, optionally dumps the model after the pass, and -- for passes declared
function-preserving -- optionally checks numerically that the model's outputs did not change
(``--verify``), failing with the pass's name. The wrapped passes run in an ``onnx_ir``
``PassManager``.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

import lowbit
from lowbit.core.context import CompileContext
from lowbit.ort.session import run_on_tokens
from lowbit.errors import LowbitError
from lowbit.core.recipe import Recipe
from lowbit.core.resume import ResumeStore, resume_store
from lowbit.core.tensor_spill import TensorSpill
from lowbit.files.scratch import run_dir
from lowbit.compiler.blockwise import BlockwisePass
from lowbit.ort import observe as observation
from lowbit.ort.observe import Accumulator, ObservePass
from lowbit.ort.segments import model_weight_bytes
from lowbit.passes.calibrate import CalibrationAccumulator
from lowbit.passes.capture import CaptureAccumulator
from lowbit.passes.canonicalize import canonicalize_passes
from lowbit.passes.opset import output_opset
from lowbit.emit.mixed import EmitMixedWeightsPass
from lowbit.emit.npu import EmitNpuPass
from lowbit.emit.qdq import EmitQDQPass
from lowbit.emit.fusion_barrier import FusionBarrierPass
from lowbit.emit.fgmp_act import FgmpActivationsPass, PerturbationAccumulator, observed_early
from lowbit.emit.fgmp_static_act import FgmpStaticActivationsPass
from lowbit.emit.kv import KvQuantPass
from lowbit.emit.attention import FuseAttentionPass
from lowbit.emit.merge_siblings import MergeSiblingMatMulsPass
from lowbit.emit.ort_cpu import FindEmbeddingsPass, LowerOrtCpuPass
from lowbit.emit.reorder_norm import FuseReorderNormPass
from lowbit.emit.share_embedding import ShareEmbeddingCodesPass
from lowbit.encode.weights import EncodeWeightsPass
from lowbit.encode.optq import OptqPass
from lowbit.passes.precision import AssignPrecisionPass
from lowbit.passes.quantize_embedding import QuantizeEmbeddingPass
from lowbit.passes.reorder import ReorderPass
from lowbit.passes.rotate_heads import RotateHeadsPass
from lowbit.passes.rotate_online import RotateOnlinePass
from lowbit.passes.rotate_residual import RotateResidualPass
from lowbit.passes.smooth import SmoothPass

__all__ = ["Instrumented", "PipelineOptions", "build_pipeline", "observers", "preserves_function", "run_pipeline"]

logger = logging.getLogger(__name__)

# Relative max-abs tolerance for function-preserving passes: float32 reassociation in fused norms
# and folded scales moves outputs by a few ulps of the largest logit (~1e-6 relative); 1e-4 leaves
# room for long reductions while still catching any real change (a wrong scale moves >1e-2).
VERIFY_RTOL = 1e-4


@dataclass(frozen=True)
class PipelineOptions:
    verify: bool = False
    dump_dir: Path | None = None  # an existing directory, or a new one in an existing directory
    verify_tokens: int = 32

    def __post_init__(self) -> None:
        if self.dump_dir is None:
            return
        path = Path(os.path.abspath(self.dump_dir))  # a str is fine too
        object.__setattr__(self, "dump_dir", path)
        where = path
        if os.path.lexists(path) and not path.is_dir():
            raise LowbitError(f"--dump-dir {path} is an existing file, not a directory")
        if not path.exists():
            where = path.parent
            if not where.is_dir():
                raise LowbitError(f"--dump-dir {path}: its parent directory {where} does not exist")
        if not os.access(where, os.W_OK | os.X_OK):
            raise LowbitError(f"--dump-dir {path}: directory {where} is not writable")


class _Verifier:
    """Reference outputs of the model on one fixed input, refreshed after each verified pass."""

    def __init__(self, ctx: CompileContext, tokens: int) -> None:
        if ctx.calibration is not None and ctx.calibration.windows:
            self.ids = np.asarray(ctx.calibration.windows[0][:tokens], np.int64)
        else:
            self.ids = np.arange(tokens, dtype=np.int64) % 50
        self.reference: list[np.ndarray] | None = None

    def outputs(self, model: ir.Model) -> list[np.ndarray]:
        return run_on_tokens(model, self.ids, as_written=True)  # the graph's function, not ORT's fusions

    def check(self, name: str, model: ir.Model, before: list[np.ndarray], *, cache_rebased: bool = False) -> float:
        """``cache_rebased``: the pass stores the KV cache in another basis that only the model
        reads back (a rotation inside each head), so its ``present*`` outputs are not compared."""
        after = self.outputs(model)
        worst = 0.0
        names = [v.name or "" for v in model.graph.outputs]
        for a, b, out in zip(before, after, names):
            if cache_rebased and out.startswith("present"):
                continue
            scale = max(float(np.abs(a).max()), 1e-12)
            worst = max(worst, float(np.abs(a.astype(np.float64) - b).max()) / scale)
        if worst > VERIFY_RTOL:
            raise LowbitError(f"--verify: pass {name} changed the model outputs (relative max diff {worst:.3g} > {VERIFY_RTOL})")
        self.reference = after
        return worst


class Instrumented(ir.passes.InPlacePass):
    """Time, count, dump and (optionally) verify one inner pass."""

    def __init__(self, inner: ir.passes.PassBase, ctx: CompileContext, index: int, *,
                 preserving: bool, options: PipelineOptions, verifier: _Verifier | None) -> None:  # fmt: skip
        super().__init__()
        self.inner, self.ctx, self.index = inner, ctx, index
        self.preserving, self.options, self.verifier = preserving, options, verifier
        self.name = type(inner).__name__

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        nodes_before = model.graph.num_nodes()
        verify = self.verifier is not None and self.preserving
        before = None
        if verify:
            before = self.verifier.reference or self.verifier.outputs(model)
        start = time.perf_counter()
        result = self.inner(model)
        seconds = time.perf_counter() - start
        if result.model is not model:
            raise LowbitError(f"pass {self.name} returned a new model; lowbit pipelines are in place")
        entry = {"pass": self.name, "seconds": round(seconds, 3), "modified": bool(result.modified),
                 "nodes_before": nodes_before, "nodes_after": model.graph.num_nodes()}  # fmt: skip
        if result.modified:
            self.ctx.analyses.graph_edited()  # structural analyses are rebuilt from the edited graph
            if self.verifier is not None and not verify:
                self.verifier.reference = None  # a quantizing pass: later checks compare to the new model
        if verify and result.modified:
            entry["verified_rel_diff"] = self.verifier.check(self.name, model, before,
                                                             cache_rebased=getattr(self.inner, "REBASES_CACHE", False))
        if self.options.dump_dir is not None:
            path = self.options.dump_dir / f"{self.index:02d}_{self.name}.onnx"
            ir.save(model, path, external_data=f"{path.name}.data")
            entry["dump"] = str(path)
        self.ctx.report["passes"].append(entry)
        logger.info("%s: %.2fs, %d -> %d nodes", self.name, seconds, nodes_before, entry["nodes_after"])
        return ir.passes.PassResult(model, modified=result.modified)


def observers(recipe: Recipe) -> list[Accumulator]:
    """The statistics the recipe's passes read, gathered in the compile's one observation run
    (none: no run). Whether calibration data is needed at all is ``recipe.needs_calibration``;
    this picks which analyses that data feeds."""
    if not recipe.needs_calibration:
        return []
    p = recipe.precision
    ranges = (recipe.activations.format != "none" or recipe.kv.format != "none" or recipe.smooth.method != "none"
              or (p.enabled and p.activations == "static")  # per-channel absmax
              or (p.enabled and (p.sensitivity == "proxy" or (p.sensitivity == "auto" and not p.fisher_file))))  # fmt: skip
    accumulators: list[Accumulator] = [CalibrationAccumulator()] if ranges else []
    if recipe.smooth.method != "none" or (recipe.rounding.method == "optq" and recipe.weights.format != "none"):
        accumulators.append(CaptureAccumulator(recipe.smooth.sample_tokens))  # X^T X, row samples
    if p.enabled and p.activations == "runtime" and observed_early(recipe):
        accumulators.append(PerturbationAccumulator())
    return accumulators


def build_pipeline(ctx: CompileContext) -> list[ir.passes.PassBase]:
    """The passes the recipe asks for, in order (the recipe was validated when it was loaded, so
    every combination reaching here is one the passes implement)."""
    recipe = ctx.recipe
    fgmp = recipe.precision.enabled
    # the output's default-domain opset, decided here once: canonicalization converts the model to
    # it before any pass reads an op, and every emitter writes its nodes in that opset
    steps: list[ir.passes.PassBase] = list(canonicalize_passes(target_opset=output_opset(recipe.target), report=ctx.report))
    rotate = recipe.rotate  # before observation: ranges are not carried through a rotation
    if rotate.residual:
        steps.append(RotateResidualPass(ctx))
    if rotate.heads:
        steps.append(RotateHeadsPass(ctx))
    if rotate.online:
        steps.append(RotateOnlinePass(ctx))
    ort_cpu = recipe.target == "ort-cpu"
    if ort_cpu:  # analysis only: embedding tables and their tied sites, before emission unties them
        steps.append(FindEmbeddingsPass(ctx))
    accumulators = observers(recipe)
    if accumulators:  # the one run over the calibration windows (lowbit.ort.observe)
        steps.append(ObservePass(ctx, accumulators))
    if recipe.smooth.method != "none":
        steps.append(SmoothPass(ctx))
    if recipe.reorder.clusters:
        steps.append(ReorderPass(ctx))
    if recipe.rounding.method == "optq" and recipe.weights.format != "none":
        steps.append(OptqPass(ctx))  # analysis only: codes that emission writes
    if recipe.kv.format != "none":
        steps.append(KvQuantPass(ctx))
    if fgmp:  # after smoothing (it changes the weights), before emission
        steps.append(AssignPrecisionPass(ctx))
        if recipe.precision.activations == "runtime":
            steps.append(FgmpActivationsPass(ctx))
        elif recipe.precision.activations == "static":
            steps.append(FgmpStaticActivationsPass(ctx))
    if recipe.weights.format != "none" and not fgmp:  # analysis only: every site's exact encoding
        steps.append(EncodeWeightsPass(ctx))
    if recipe.target == "npu":  # standard integer QDQ only, RPTQ clusters as split MatMuls
        steps.append(EmitNpuPass(ctx))
    else:
        steps.append(EmitQDQPass(ctx))  # with fgmp: activations only
    if fgmp:
        steps.append(EmitMixedWeightsPass(ctx))
    if ort_cpu:  # the encodings of the sites the kernels take -> lowbit custom ops, packed
        steps.append(LowerOrtCpuPass(ctx))
    # the whole-graph steps after emission (outside a block-wise run's per-block passes)
    finishing: list[ir.passes.PassBase] = []
    if ort_cpu:  # structural rewrites of the emitted graph
        if recipe.reorder.clusters:
            finishing.append(FuseReorderNormPass())  # RPTQ Gather + norm -> ReorderNorm
        if recipe.ort_cpu.fuse_attention:
            finishing.append(FuseAttentionPass(ctx))  # eager attention -> RotaryEmbedding + Attention (opset 23)
        if recipe.ort_cpu.merge_siblings:
            finishing.append(MergeSiblingMatMulsPass(ctx))  # q/k/v, gate/up: one MatMulLowbit per shared input
    if recipe.sites.embeddings == "int8":  # after observation and emission: calibration saw the float table
        finishing.append(QuantizeEmbeddingPass(ctx))
        finishing.append(ShareEmbeddingCodesPass(ctx))  # a tied table: one copy of its codes
    finishing.append(RemoveUnusedNodesPass())  # the float weights the codes replaced
    finishing.append(FusionBarrierPass(ctx))  # ORT at its default level computes the graph as written
    return _blockwise(ctx, steps, finishing)


def _blockwise(ctx: CompileContext, steps: list[ir.passes.PassBase],
               finishing: list[ir.passes.PassBase]) -> list[ir.passes.PassBase]:  # fmt: skip
    """A model too large to run whole (``WHOLE_MODEL_BYTES``) whose per-site passes all work
    block by block is compiled block by block (:mod:`lowbit.compiler.blockwise`), and so is any
    model under ``calibration.sequential``; otherwise the steps stay as they are (a recipe with a
    model-wide step, e.g. FGMP's global budget, then holds the whole model's statistics: logged)."""
    sequential = ctx.recipe.calibration.sequential
    observing = [i for i, p in enumerate(steps) if isinstance(p, ObservePass)]
    if not sequential and (not observing or model_weight_bytes(ctx.model) <= observation.WHOLE_MODEL_BYTES):
        return steps + finishing
    first = observing[0] if observing else len(steps)
    inner = steps[first + 1:]
    serial = [type(p).__name__ for p in inner if not getattr(p, "BLOCKWISE", False)]
    if sequential and (not inner or serial):  # refused now, before any calibration
        raise LowbitError(f"recipe {ctx.recipe.name}: calibration.sequential needs a recipe whose passes after observation all "
                          f"run block by block ({', '.join(serial) or 'it observes nothing'} cannot)")  # fmt: skip
    if not inner or serial:
        logger.warning("%s cannot run block by block (%s): its memory grows with the model", ctx.recipe.name, ", ".join(serial))
        return steps + finishing
    # sequential: every piece between two norms is its own block, so each half-layer sees the
    # quantized output of the one before
    segment_bytes = 0 if sequential else None
    return [*steps[:first], BlockwisePass(ctx, steps[first].accumulators, inner, segment_bytes, sequential=sequential),
            *finishing]  # fmt: skip


def preserves_function(p: ir.passes.PassBase) -> bool:
    """A lowbit pass says so (``PRESERVES_FUNCTION``); onnx_ir's and canonicalization's passes
    (folding, fusion, dead-code removal) all preserve the model's function."""
    return bool(getattr(p, "PRESERVES_FUNCTION", True))


def run_pipeline(ctx: CompileContext, options: PipelineOptions = PipelineOptions()) -> None:
    if options.dump_dir is not None:
        try:
            options.dump_dir.mkdir(exist_ok=True)  # the parent exists (PipelineOptions checked)
        except OSError as e:  # removed or replaced since the check
            raise LowbitError(f"--dump-dir {options.dump_dir}: cannot create it ({e.strerror})") from e
    if model_weight_bytes(ctx.model) > observation.WHOLE_MODEL_BYTES:
        # too large to hold twice: model-wide rewrites (rotations) and block-wise passes spill what
        # they rewrite to one scratch file (lowbit.core.tensor_spill)
        ctx.spill = TensorSpill(run_dir())
    verifier = _Verifier(ctx, options.verify_tokens) if options.verify else None
    steps = build_pipeline(ctx)
    if ctx.resume is None and any(isinstance(p, BlockwisePass) for p in steps):
        ctx.resume = _resume_store(ctx)  # a long compile: an interrupted one restarts where it stopped
    wrapped = [
        Instrumented(p, ctx, i, preserving=preserves_function(p), options=options, verifier=verifier)
        for i, p in enumerate(steps)
    ]
    try:
        ir.passes.PassManager(wrapped, steps=1)(ctx.model)
    except ir.passes.PassError as e:
        cause = e.__cause__
        while cause is not None and not isinstance(cause, LowbitError):
            cause = cause.__cause__
        if cause is not None:  # bad input found inside a pass: surface the user's message
            raise cause from e
        raise
    except KeyboardInterrupt:
        if ctx.resume is not None and ctx.resume.hits + ctx.resume.stored:
            logger.warning("interrupted: %d rounded site groups are kept in %s; the same command resumes from them",
                           ctx.resume.hits + ctx.resume.stored, ctx.resume.directory)  # fmt: skip
        raise
    if ctx.resume is not None:
        ctx.report["resume"] = {"reused": ctx.resume.hits, "computed": ctx.resume.stored}
        ctx.resume.finish()


def _resume_store(ctx: CompileContext) -> ResumeStore:
    """The store of this compile (lowbit.core.resume): its input, recipe and calibration windows."""
    data = ctx.calibration
    windows = [np.asarray(w) for w in data.windows] + [np.asarray(w) for _, ws in sorted(data.probes.items()) for w in ws] \
        if data is not None else []  # fmt: skip
    store = resume_store(lowbit.__version__, ctx.report.get("input"), repr(ctx.recipe), *windows)
    if store.found:
        logger.warning("resuming an interrupted compile: %d rounded site groups found in %s", store.found, store.directory)
    return store
