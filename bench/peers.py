"""The peers every lowbit recipe is compared with: FP32 (the export itself), ONNX Runtime
``quantize_static`` QDQ W8A8 and ONNX Runtime ``MatMulNBitsQuantizer`` 4-bit RTN."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from lowbit.bench.contender import BuildContext, Contender, register, windows_cell

__all__: list[str] = []


def _fp32(fp32_dir: Path, ctx: BuildContext) -> tuple[Path, float]:
    return fp32_dir / "model.onnx", 0.0


def _peer_feeds(ctx: BuildContext) -> tuple[dict[str, np.ndarray], ...]:
    return ctx.feeds if ctx.windows is None or ctx.peer_windows is None else ctx.feeds[: ctx.peer_windows]


def _ort_w8a8(fp32_dir: Path, ctx: BuildContext) -> tuple[Path, float]:
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                          QuantType, quantize_static)

    from lowbit.models.export import fix_ir_version

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = iter(_peer_feeds(ctx))

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._batches, None)

    out = ctx.work_dir / "model.onnx"
    t0 = time.perf_counter()
    # Linear layers only (MatMul/Gemm): the W8A8 that lowbit's recipes are compared with.
    quantize_static(
        str(fp32_dir / "model.onnx"), str(out), Reader(), quant_format=QuantFormat.QDQ,
        op_types_to_quantize=["MatMul", "Gemm"], per_channel=True,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
    )
    seconds = time.perf_counter() - t0
    fix_ir_version(out)
    return out, seconds


def _ort_w4_rtn(fp32_dir: Path, ctx: BuildContext) -> tuple[Path, float]:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from lowbit.models.export import fix_ir_version

    out = ctx.work_dir / "model.onnx"
    t0 = time.perf_counter()
    quantizer = MatMulNBitsQuantizer(
        onnx.load(str(fp32_dir / "model.onnx")), bits=4, block_size=32, is_symmetric=True,
        op_types_to_quantize=("MatMul",),
    )
    quantizer.process()
    quantizer.model.save_model_to_file(str(out), use_external_data_format=False)
    seconds = time.perf_counter() - t0
    fix_ir_version(out)
    return out, seconds


register(Contender("fp32", "FP32 export (torch dynamo, opset 23)", "FP32 as exported", _fp32))
register(Contender(
    "ort-w8a8",
    "ONNX Runtime quantize_static, QDQ, MatMul/Gemm, MinMax calibration",
    "int8 per-channel symmetric weights; uint8 per-tensor asymmetric activations",
    _ort_w8a8,
    calibration=lambda ctx: windows_cell(len(_peer_feeds(ctx)), ctx),
))
register(Contender(
    "ort-w4-rtn",
    "ONNX Runtime MatMulNBitsQuantizer (RTN, weight-only, MatMulNBits op)",
    "int4 symmetric, blocks of 32 along K; FP32 activations",
    _ort_w4_rtn,
    frozenset({"causal-lm"}),
))
