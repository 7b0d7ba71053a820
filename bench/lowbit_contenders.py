"""lowbit's recipes as bench contenders, built from the same FP32 export and calibration data
as every other contender of the run (collected by ``bench/contenders.py``)."""

from __future__ import annotations

import time
from pathlib import Path

from lowbit.bench.contender import BuildContext, Contender, register, windows_cell

__all__ = ["DEPLOY_RECIPES", "NPU_RECIPES", "RECIPES", "lowbit_contender"]

# (recipe, weight grid as it ends up, model kinds). Order = table order.
RECIPES: tuple[tuple[str, str, frozenset[str]], ...] = (
    ("w8a8", "int8 per-channel symmetric; uint8 per-tensor activations", frozenset({"causal-lm", "encoder"})),
    ("w8a8-smooth", "SmoothQuant scales folded; int8 per-channel; uint8 per-tensor activations", frozenset({"causal-lm", "encoder"})),
    ("w8a8-rptq", "RPTQ 16 clusters; int8 per-channel, OPTQ; int8 activations, run-time scale per token and 32 channels", frozenset({"causal-lm", "encoder"})),
    ("w8", "int8 per-channel symmetric, weight-only", frozenset({"causal-lm", "encoder"})),
    ("w4a8-dint4", "Hadamard rotations (R1, R2, online before down_proj); dINT4 symmetric, blocks of 32, OPTQ, int8 LM head; AQAS + RPTQ 8 clusters; int8 activations, run-time scale per token and 64 channels", frozenset({"causal-lm", "encoder"})),
    ("w4a8-int4", "int4 symmetric, blocks of 32, OPTQ; AQAS + RPTQ 16 clusters, int8 activations", frozenset({"causal-lm"})),
    ("w4a4-rptq", "dINT4 blocks of 32, OPTQ; int4 activations per token and group of 16 after RPTQ, widest cluster int8", frozenset({"causal-lm"})),
    ("w4a4-rot", "w4a4-rptq + Hadamard rotations (R1, R2, online before down_proj)", frozenset({"causal-lm"})),
    ("w4a8-kv4", "w4a8-dint4 + int4 K/V, static per (head, channel), 99.9th-percentile clip", frozenset({"causal-lm"})),
    ("w4a8-rot-kv4", "w4a8-dint4 + Q/K rotated online + int4 K/V, per-channel normalised, run-time scale per token and head", frozenset({"causal-lm"})),
    ("fp8", "FP8 E4M3 per-channel scales; FP8 per-tensor activations", frozenset({"causal-lm"})),
    ("nvfp4", "NVFP4 (E2M1, blocks of 16, E4M3 + FP32 scales); FP8 activations", frozenset({"causal-lm"})),
    ("fgmp-nvfp4-fp8", "NVFP4 blocks of 16 + 30% Fisher-chosen FP8 blocks; FP8 activations", frozenset({"causal-lm"})),
)


# target-npu recipes: each registered twice, as emitted for the npu target (also run in OpenVINO)
# and with the same recipe emitted for the qdq target, so the two sit side by side.
NPU_RECIPES: tuple[tuple[str, str, frozenset[str]], ...] = (
    ("npu-w8a8", "int7 per-channel symmetric (zp 0); RPTQ 8 clusters, uint8 per-tensor per cluster", frozenset({"causal-lm", "encoder"})),
)


def _calibration(ctx: BuildContext, recipe: str) -> list:
    """The run's shared calibration windows, as many as the recipe asks for (its
    ``calibration.windows``); every contender draws from the same split in the same order."""
    if ctx.windows is not None:
        from lowbit.core.recipe import load_recipe

        return list(ctx.windows)[: load_recipe(recipe).calibration.windows]
    return [feed["input_ids"] for feed in ctx.feeds]  # encoders: the padded token batches


def lowbit_contender(recipe: str, grid: str, kinds: frozenset[str], target: str | None = None,
                     openvino: bool = False, with_past: bool = False) -> Contender:  # fmt: skip
    """``lowbit-RECIPE`` (the recipe's own target) or ``lowbit-RECIPE-TARGET`` (target overridden);
    ``with_past``: compiled from the KV-cache export of the same model (``-kv``), the deployable
    form whose decode speed the bench measures, run with lowbit's op library registered."""

    def build(fp32_dir: Path, ctx: BuildContext) -> tuple[Path, float]:
        from lowbit.compiler.api import compile
        from lowbit.models.export import export_model

        source = export_model("smollm2-135m", with_past=True) if with_past else fp32_dir
        start = time.perf_counter()
        result = compile(source, recipe, target=target, calibration=_calibration(ctx, recipe))
        out = result.save(ctx.work_dir / "model")
        return out / "model.onnx", time.perf_counter() - start

    name = f"lowbit-{recipe}" + (f"-{target}" if target else "") + ("-kv" if with_past else "")
    shown = f"--target {target}" if target else "(its own target)"
    shown += " on the KV-cache export" if with_past else ""
    def calibration(ctx: BuildContext) -> str:
        return windows_cell(len(_calibration(ctx, recipe)), ctx)

    options = None
    if with_past:
        from lowbit.runtime_ext import library

        options = library.session_options
    return Contender(name, f"lowbit compile --recipe {recipe} {shown}", grid, build, kinds, openvino=openvino,
                     calibration=calibration, session_options=options)


# The deployable forms (ort-cpu target, lowbit's native ops, KV cache): what decodes fast on a CPU.
DEPLOY_RECIPES: tuple[tuple[str, str | None, str], ...] = (
    ("w4-dint4-ortcpu", None, "dINT4 blocks of 32 weight-only (embedding packed too), MatMulLowbit/GatherLowbit; FP32 activations"),
    ("w4a8-dint4", "ort-cpu", "as lowbit-w4a8-dint4, its dINT4 sites emitted as MatMulLowbit ops (float mode, reading the run-time int8 activation groups; the int8 LM head stays QDQ)"),
)

for _recipe, _grid, _kinds in RECIPES:
    register(lowbit_contender(_recipe, _grid, _kinds))
for _recipe, _grid, _kinds in NPU_RECIPES:
    register(lowbit_contender(_recipe, _grid, _kinds, openvino=True))
    register(lowbit_contender(_recipe, _grid, _kinds, target="qdq", openvino=True))
for _recipe, _target, _grid in DEPLOY_RECIPES:
    register(lowbit_contender(_recipe, _grid, frozenset({"causal-lm"}), target=_target, with_past=True))
