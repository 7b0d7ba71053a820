"""Canonicalize: bring any exported model into the one form the quantization passes expect.

Assumes a float32 ONNX model (torch-dynamo opset-23, optimum opset-14/18 or torch legacy
opset-13..17 exports, or anything similar); float16 / bfloat16 weights stored and Cast to float32
before use are accepted, any other float16 / bfloat16 / float64 tensor is refused with one line
(``float_types``).
Guarantees, function-preserving (verified numerically in tests on both SmolLM2 export forms and
on tiny decoders in opset 13/14/17/18 forms; differences are float32 rounding of the fused
reciprocal only):

0. the default-domain opset is at least ``target_opset``, the opset lowbit's emitters write
   (``opset``: onnx's version converter converts the model; the number alone changes only where
   the converter changes no node; never downgraded);
1. large ``Constant`` nodes become initializers (weights are then visible as initializers);
2. types are inferred; float16 / bfloat16 weight storage is widened to float32 under the weight's
   name (exact, ``float_types``); then small constant subexpressions and no-op Casts are folded
   (onnxscript's folder; inputs above ``fold_size_limit`` elements are never folded, so weight
   Transposes, e.g. a tied lm_head, stay as they are and the initializer is not duplicated);
3. decomposed RMSNorm / LayerNorm chains become single norm nodes (``norm_fusion``), and a norm
   parameter or bias that deduplication shared between layers is copied per use (``unshare_params``);
4. dead nodes and initializers are removed; shapes and types are inferred where ONNX can.
KV-cache inputs/outputs and the model signature are untouched.
"""

from __future__ import annotations

from typing import Any

import onnx_ir as ir
from onnx_ir.passes.common import (
    LiftConstantsToInitializersPass,
    RemoveUnusedNodesPass,
    RemoveUnusedOpsetsPass,
    ShapeInferencePass,
)
from onnxscript import optimizer

from lowbit.core.float_types import FloatTypesPass
from lowbit.passes.simplify_shapes import SimplifyShapesPass
from lowbit.passes.norm_fusion import FuseNormsPass
from lowbit.passes.unshare_params import UnshareParamsPass
from lowbit.passes.opset import OUTPUT_OPSET, UpgradeOpsetPass

__all__ = ["FoldConstants", "canonicalize_passes"]


class FoldConstants(ir.passes.InPlacePass):
    """onnxscript's constant folder, bounded so that weights are never materialized twice."""

    def __init__(self, size_limit: int) -> None:
        super().__init__()
        self.size_limit = size_limit

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        result = optimizer.fold_constants(
            model, onnx_shape_inference=False, input_size_limit=self.size_limit, output_size_limit=self.size_limit
        )
        return ir.passes.PassResult(model, modified=bool(result.modified))


def canonicalize_passes(*, target_opset: int = OUTPUT_OPSET, report: dict[str, Any] | None = None,
                        fold_size_limit: int = 8192, shape_inference: bool = True) -> list[ir.passes.PassBase]:
    """The canonicalization sequence as separate passes (so each is timed and verified).
    ``target_opset``: the compile's output opset (``opset.output_opset(recipe.target)``);
    ``report``: the compile report, which gets ``opset`` and ``norm_fusion``."""
    passes: list[ir.passes.PassBase] = [
        # first: every later pass (and every emitter) reads and writes ops of this one opset
        UpgradeOpsetPass(target_opset, report),
        LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=16),
        # types first: the folder drops no-op Casts (optimum's float->float around norms) only
        # when it knows the input dtype
        ShapeInferencePass(strict_mode=False),
        # float16/bfloat16 weights Cast to float32 become float32 weights; other non-float32
        # floats are refused here, before the folder or calibration see them
        FloatTypesPass(),
        # needs the symbolic shapes inferred above: Reshape / Expand targets computed from Shape
        # ops become constants, and their shape chains dead code
        SimplifyShapesPass(),
        FoldConstants(fold_size_limit),
        RemoveUnusedNodesPass(),  # dead Identity left by folded Casts would block the fusion
        FuseNormsPass(report),
        UnshareParamsPass(report),  # per-layer folding needs each norm's gamma, each bias, to itself
        RemoveUnusedNodesPass(),
        RemoveUnusedOpsetsPass(),
    ]
    if shape_inference:
        passes.append(ShapeInferencePass(strict_mode=False))
    return passes
