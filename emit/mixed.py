"""Emit FGMP mixed-precision weights as two complementary DequantizeLinear branches, summed.

Assumes the ``precision_assignment`` analysis (:mod:`lowbit.passes.precision`) and that the sites
it names are still linear sites with their float initializers (activation QDQ may already sit on
their inputs). Not function-preserving (it quantizes). For each assigned site:

    W = DQ_nvfp4(codes4 with FP8 blocks zeroed) + DQ_fp8(codes8 with NVFP4 blocks zeroed)

Each branch is :func:`lowbit.emit.qdq.weight_dq_nodes` (exact in ``qdq``: NVFP4 as int8
codes of 2v with half scales, FP8 as FLOAT8E4M3FN per-channel; FLOAT4E2M1 + FP8-scale chains in
``qdq-fp4``). In every element one branch decodes to +0, and ``v + 0 == v`` in float32, so the sum
equals :func:`lowbit.passes.precision.mixed_weight` bit for bit (a -0 becomes +0). A site with no
FP8 block (or only FP8 blocks) gets the single branch it needs. The per-block precision bitmap of
each tensor (scale layout of the NVFP4 blocks, ``np.packbits`` of the bool mask, C order) is
recorded for a deploy target in ``metadata_props["lowbit.fgmp.bitmap/<site>"]`` as
``"<d0>x<d1>:<base64>"``.
"""

from __future__ import annotations

import base64
import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from lowbit import formats
from lowbit.core.pass_base import LowbitPass
from lowbit.errors import LowbitError
from lowbit.emit.qdq import ensure_opset, weight_dq_nodes
from lowbit.core.linear_sites import LinearSite
from lowbit.passes.precision import BITMAP_BITS, FP8_BITS, NVFP4_BITS, PRECISION_ASSIGNMENT, SiteChoice

__all__ = ["BITMAP_KEY", "EmitMixedWeightsPass", "decode_bitmap", "encode_bitmap", "masked"]

logger = logging.getLogger(__name__)

BITMAP_KEY = "lowbit.fgmp.bitmap/"


def masked(enc: formats.Encoded, drop: np.ndarray) -> formats.Encoded:
    """``enc`` with the codes where ``drop`` (bool, the tensor's shape) set to the code of +0."""
    zero = enc.spec.element.encode(np.zeros(1, np.float32), narrow=True)[0]
    codes = np.where(drop, np.uint8(zero), enc.codes).astype(np.uint8)
    return dataclasses.replace(enc, codes=codes)


def encode_bitmap(mask: np.ndarray) -> str:
    shape = "x".join(str(d) for d in mask.shape)
    return f"{shape}:{base64.b64encode(np.packbits(mask.reshape(-1)).tobytes()).decode()}"


def decode_bitmap(text: str) -> np.ndarray:
    shape_text, data = text.split(":", 1)
    shape = tuple(int(d) for d in shape_text.split("x"))
    bits = np.unpackbits(np.frombuffer(base64.b64decode(data), np.uint8))
    return bits[: int(np.prod(shape))].astype(bool).reshape(shape)


class EmitMixedWeightsPass(LowbitPass):
    """Replace each assigned site's weight by the NVFP4 + FP8 branch sum (module doc)."""

    REQUIRES = (PRECISION_ASSIGNMENT,)
    PRESERVES_FUNCTION = False

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        assignment = self.ctx.analyses.get(PRECISION_ASSIGNMENT)
        target = self.ctx.recipe.target
        ensure_opset(model, 23 if target == "qdq-fp4" else 21)
        by_name = {s.name: s for s in self.ctx.sites}
        missing = sorted(set(assignment.sites) - set(by_name))
        if missing:
            raise LowbitError(f"FGMP emission: sites {missing[:3]} are no longer linear sites with float weights")
        for name, choice in assignment.sites.items():
            self._emit(model, by_name[name], choice, target)
        logger.info("emitted %d mixed NVFP4/FP8 weights", len(assignment.sites))
        return ir.passes.PassResult(model, modified=bool(assignment.sites))

    def _emit(self, model: ir.Model, site: LinearSite, choice: SiteChoice, target: str) -> None:
        graph = model.graph
        n8 = int(choice.fp8.sum())
        branches: list[ir.Value] = []
        nodes: list[ir.Node] = []
        in_fp8 = choice.q4.blocking.expand(choice.fp8)  # per element
        if n8 < choice.n_blocks:
            part, out = weight_dq_nodes(graph, site, masked(choice.q4, in_fp8), "nvfp4", target)
            nodes += part
            branches.append(out)
        if n8 > 0:
            fp8_site = dataclasses.replace(site, name=f"{site.name}.fp8")  # distinct initializer names
            part, out = weight_dq_nodes(graph, fp8_site, masked(choice.q8, ~in_fp8), "fp8_e4m3", target)
            nodes += part
            branches.append(out)
        weight = branches[0]
        if len(branches) == 2:
            add = ir.node("Add", branches, name=f"{site.name}.mixed")
            add.outputs[0].name = f"{site.name}.mixed_weight"
            add.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
            nodes.append(add)
            weight = add.outputs[0]
        consumer = site.weight_path[0] if site.weight_path else site.node
        graph.insert_before(consumer, nodes)
        consumer.replace_input_with(0 if site.weight_path else 1, weight)
        model.metadata_props[f"{BITMAP_KEY}{site.name}"] = encode_bitmap(choice.fp8)
        frac = n8 / choice.n_blocks
        self.ctx.report["sites"].setdefault(site.name, {}).update({
            "weights": "nvfp4+fp8_e4m3", "block_size": 16, "fp8_block_fraction": frac,
            "bits_per_weight": NVFP4_BITS + (FP8_BITS - NVFP4_BITS) * frac + BITMAP_BITS,
            "in_features": site.in_features})  # fmt: skip
