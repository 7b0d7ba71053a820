"""The observation run: the calibration windows (and the SLAC probe windows) go through ONNX
Runtime once, and every statistic a compile needs is gathered from that one run.

An analysis that needs statistics of inner values registers an :class:`Accumulator` (the values it
taps, ``add`` per window, ``finish``) before the run; the accumulators live with the analysis
that owns them (calibration ranges in ``passes.calibrate``, ``X^T X`` in ``passes.capture``,
FGMP activation statistics in ``emit.fgmp_*``). The compiler's pipeline collects the ones a recipe
needs into one :class:`ObservePass`. Statistics are then carried through later
function-preserving passes in closed form (``passes.capture.transform_channels``), so the model
is not run again.

A second run is allowed only where a statistic cannot be carried (e.g. one that needs the final
absmax of the same run before it can accumulate); its caller must say why (``why``), and every
run is counted in ``report["observation"]``: ``runs``, ``sessions`` (ORT sessions built),
``windows`` (window runs, probes included) and ``why_extra`` (one reason per run after the
first).

Runners: observation consumes a sequence of *subgraph runs* (:class:`WindowRunner`), not one
whole-model session, so that a model too large for one session can later be run block by block
(each block's session fed the previous block's outputs, cached per window). Each subgraph run is
called for every window before the next is built, and yields the taps it computes; accumulators
key their state by tap name and must not assume that all their taps of one window arrive in one
call. :class:`WholeModel` (one session, the taps as its only outputs, so ORT skips every node that
feeds only the logits, e.g. a tied lm_head) runs a model whose weights fit :data:`WHOLE_MODEL_BYTES`;
a larger one is run by :class:`lowbit.ort.segments.Segmented`, one residual-stream segment of at
most :data:`SEGMENT_BYTES` of weights at a time, so ONNX Runtime never holds the whole model. Both
give every accumulator the same values (tests compare them).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import onnx_ir as ir
from tqdm.auto import tqdm

from lowbit.core.analyses import Key
from lowbit.core.context import CompileContext
from lowbit.core.pass_base import LowbitPass
from lowbit.errors import LowbitError
from lowbit.ort.feeds import build_feeds
from lowbit.ort.segments import Segmented, model_weight_bytes
from lowbit.ort.session import ort_session

__all__ = ["OBSERVATION_LOG", "SEGMENT_BYTES", "WHOLE_MODEL_BYTES", "Accumulator", "ObservePass", "SubgraphRun",
           "WholeModel", "Window", "WindowRunner", "default_runner", "observe"]

logger = logging.getLogger(__name__)

WHOLE_MODEL_BYTES = 1 << 30  # weights up to this run in one session (SmolLM2: 540 MB)
SEGMENT_BYTES = 256 << 20  # weights per segment of a larger model (a 1B decoder layer: 240 MB)

OBSERVATION_LOG: Key[dict] = Key("observation_log", "observation runs, sessions and window runs so far, and why each extra run was needed")


@dataclass(frozen=True, eq=False)
class Window:
    """One run of the model: a calibration window, or a SLAC probe window of another length."""

    index: int  # position among the windows of this run (probes after the calibration windows)
    ids: np.ndarray  # token ids, [T] or [B, T]
    probe: bool = False

    @property
    def length(self) -> int:
        return int(np.shape(self.ids)[-1])

    @property
    def tokens(self) -> int:
        return int(np.prod(np.shape(self.ids)))


class Accumulator(Protocol):
    """Statistics of some inner values over the observed windows."""

    probes: bool  # also fed the SLAC probe windows (``window.probe``); else calibration windows only
    provides: tuple[Key, ...]  # the analyses ``finish`` puts into the context

    def taps(self, ctx: CompileContext) -> dict[str, ir.Value]:
        """The values to observe, by name (called once, right before the run; may name values)."""
        ...

    def add(self, window: Window, values: Mapping[str, np.ndarray]) -> None:
        """Some of this accumulator's taps of one window (a subset: see the module doc)."""
        ...

    def finish(self, ctx: CompileContext) -> None:
        """Publish the result into ``ctx`` (analyses, report)."""
        ...


class SubgraphRun(Protocol):
    """One piece of the model: the tapped values it computes for a window."""

    nodes: list[ir.Node]  # the model's nodes this piece computes

    def __call__(self, window: Window) -> dict[str, np.ndarray]: ...

    def close(self) -> None:
        """Free the session: every window has run."""
        ...


class WindowRunner(Protocol):
    """How the model is run: the subgraph runs, in order, that together compute every tap."""

    sessions: int  # ORT sessions built by the last ``subgraphs`` call

    def subgraphs(self, model: ir.Model, taps: dict[str, ir.Value]) -> Iterator[SubgraphRun]: ...


class _SessionRun:
    def __init__(self, model: ir.Model, taps: dict[str, ir.Value]) -> None:
        self.session = ort_session(model, taps.values(), outputs_only=True)
        self.names = list(taps)
        self.nodes = list(model.graph)

    def __call__(self, window: Window) -> dict[str, np.ndarray]:
        return dict(zip(self.names, self.session.run(self.names, build_feeds(self.session, window.ids))))

    def close(self) -> None:
        self.session = None


class WholeModel:
    """One ORT session over the whole model whose only outputs are the taps."""

    sessions = 0

    def subgraphs(self, model: ir.Model, taps: dict[str, ir.Value]) -> Iterator[SubgraphRun]:
        self.sessions = 1
        yield _SessionRun(model, taps)


def default_runner(model: ir.Model) -> WindowRunner:
    """One session for a model whose weights fit :data:`WHOLE_MODEL_BYTES`, else segments."""
    if model_weight_bytes(model) <= WHOLE_MODEL_BYTES:
        return WholeModel()
    return Segmented(SEGMENT_BYTES)


def observe(ctx: CompileContext, model: ir.Model, accumulators: Sequence[Accumulator], *,
            why: str | None = None, runner: WindowRunner | None = None, desc: str = "observing",
            after_each: Callable[[SubgraphRun], None] | None = None) -> None:  # fmt: skip
    """Run the calibration windows (and, when an accumulator wants them, the probe windows) once
    through ``model``, feed every accumulator, finish them and count the run. ``why`` is required
    for every run after the first of a compile (module doc).

    ``after_each`` (a block-wise compile): called after each subgraph run has seen every window,
    once every accumulator has been finished on what it has seen so far -- the statistics of
    every tap that run computed are complete then. The callback may edit the nodes of the run it
    is given, never those of later runs."""
    data = ctx.calibration
    if data is None or not data.windows:
        raise LowbitError("this recipe calibrates (activation ranges, K/V ranges, smoothing, OPTQ or FGMP) and needs "
                          "calibration data (--calib-text or a model directory with a tokenizer)")  # fmt: skip
    record = ctx.analyses.find(OBSERVATION_LOG)
    if record is None:
        record = {"runs": 0, "sessions": 0, "windows": 0, "why_extra": []}
        ctx.analyses.put(OBSERVATION_LOG, record)
    if record["runs"] and not why:
        raise ValueError("a second observation run must say why its statistics could not be carried")
    wanted = [acc.taps(ctx) for acc in accumulators]
    taps: dict[str, ir.Value] = {}
    for t in wanted:
        for name, value in t.items():
            taps.setdefault(name, value)
    windows = [Window(i, ids) for i, ids in enumerate(data.windows)]
    if any(acc.probes for acc in accumulators):
        for _, probe in sorted(data.probes.items()):
            windows += [Window(len(windows), ids, probe=True) for ids in probe]
    runner = runner or default_runner(model)
    # The accumulators' BLAS work (XᵀX) runs between ORT runs with BLAS's own threads: on an
    # otherwise idle 2-core machine (SmolLM2, 512 tokens, 121 input groups) XᵀX takes 0.35 s per
    # window with 2 threads and 0.76 s with 1. (On a machine shared with other jobs, 1 thread
    # measured faster: 0.94 vs 2.9 s; a compile is expected to have the machine to itself.)
    blocks = None
    for run in runner.subgraphs(model, taps):
        if blocks is None and getattr(runner, "segments", 0) > 1:  # known once the runner has split the model
            blocks = tqdm(total=runner.segments, desc="blocks", unit="block", disable=None)
        for window in tqdm(windows, desc=desc, unit="window", leave=False, disable=None):
            values = run(window)
            for acc, names in zip(accumulators, wanted):
                if window.probe and not acc.probes:
                    continue
                mine = {n: values[n] for n in names if n in values}
                if mine:
                    acc.add(window, mine)
        run.close()  # before the block's passes: its session and borrowed weights are not needed again
        if after_each is not None:
            for acc in accumulators:
                acc.finish(ctx)
            after_each(run)
        if blocks is not None:
            blocks.update()
    if blocks is not None:
        blocks.close()
    for acc in accumulators:
        acc.finish(ctx)
    record["runs"] += 1
    record["sessions"] += runner.sessions
    record["windows"] += len(windows)
    if record["runs"] > 1:
        record["why_extra"].append(why)
    ctx.report["observation"] = dict(record)  # written, never read back
    logger.info("observation run %d: %d taps, %d windows (%s)", record["runs"], len(taps), len(windows), why or "first")


class ObservePass(LowbitPass):
    """The one observation run of a compile, feeding the given accumulators (module doc).
    An analysis pass: the model is not modified."""

    PRESERVES_FUNCTION = True

    def __init__(self, ctx: CompileContext, accumulators: Sequence[Accumulator]) -> None:
        super().__init__(ctx)
        self.accumulators = list(accumulators)
        self.ENSURES = tuple(k for acc in self.accumulators for k in acc.provides)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        observe(self.ctx, model, self.accumulators)
        return ir.passes.PassResult(model, modified=False)
