"""numpy reference semantics of the lowbit ops (what the native kernels and fallbacks compute).

Assumes: code tables from :mod:`lowbit.formats` are the truth; ``CODE_TABLES`` restates them as
integers over a multiplier so the int8 (W4A8) path and the native LUTs can be checked against
them (tests/runtime_ext compares both, bit for bit).
Guarantees: pure numpy, float32 where the kernels are float32; no ONNX or ORT here.
"""

from __future__ import annotations

__all__ = [
    "FORMATS", "INT_TABLES", "INT_MULTIPLIER", "value_table", "e4m3_to_float", "e8m0_to_float",
    "unpack_codes", "decode_weight", "matmul", "quantize_rows_int8", "reorder_norm",
    "fgmp_act_quant", "FGMP_BLOCK", "hadamard_transform",
]

import numpy as np

from lowbit.runtime_ext.hadamard import hadamard

FORMATS = ("dint4", "nvfp4", "int4", "mxfp4")

# value(code) == INT_TABLES[fmt][code] * INT_MULTIPLIER[fmt], exactly: doubled dINT4 / E2M1
# values are integers in [-12, 12]; int4 is two's complement.
_E2M1_X2 = [0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12]
INT_TABLES = {
    "dint4": np.array([0, 1, 2, 4, 6, 8, 10, 12, 0, -1, -2, -4, -6, -8, -10, -12], np.int8),
    "nvfp4": np.array(_E2M1_X2, np.int8),
    "mxfp4": np.array(_E2M1_X2, np.int8),
    "int4": np.array([0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1], np.int8),
}
INT_MULTIPLIER = {"dint4": 0.5, "nvfp4": 0.5, "mxfp4": 0.5, "int4": 1.0}


def value_table(fmt: str) -> np.ndarray:
    """float32[16]: code -> value."""
    return (INT_TABLES[fmt].astype(np.float32) * np.float32(INT_MULTIPLIER[fmt])).astype(np.float32)


def e4m3_to_float(bits: np.ndarray) -> np.ndarray:
    """FP8 E4M3FN bit patterns (uint8) -> float32, exactly."""
    import ml_dtypes

    return np.asarray(bits, np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)


def e8m0_to_float(bits: np.ndarray) -> np.ndarray:
    """E8M0 bytes -> float32 2^(b-127) (0xFF -> NaN)."""
    b = np.asarray(bits, np.uint8).astype(np.int32)
    out = np.ldexp(np.float32(1.0), np.minimum(b, 254) - 127).astype(np.float32)
    return np.where(b == 255, np.float32(np.nan), out).astype(np.float32)


def unpack_codes(packed: np.ndarray) -> np.ndarray:
    """[..., D/2] bytes -> [..., D] codes; low nibble = even element."""
    packed = np.asarray(packed, np.uint8)
    out = np.stack([packed & 0x0F, packed >> 4], axis=-1)
    return out.reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def _scales_f32(scales: np.ndarray, fmt: str) -> np.ndarray:
    if scales.dtype == np.uint8:
        return e4m3_to_float(scales) if fmt == "nvfp4" else e8m0_to_float(scales)
    return np.asarray(scales, np.float32)


def decode_weight(codes: np.ndarray, scales: np.ndarray, global_scale, fmt: str,
                  block_size: int) -> np.ndarray:
    """Packed [N, K/2] codes -> float32 [N, K]: value * fl(scale * global), as formats.decode."""
    vals = value_table(fmt)[unpack_codes(codes)]
    s = (_scales_f32(scales, fmt) * np.float32(np.asarray(global_scale).reshape(()))).astype(
        np.float32)
    n, k = vals.shape
    return (vals.reshape(n, k // block_size, block_size) * s[..., None]).reshape(n, k)


def quantize_rows_int8(a: np.ndarray, static_scale: float | None = None):
    """Symmetric int8 per row (dynamic: max|a|/127, 1 for zero rows) or one static scale."""
    a = np.asarray(a, np.float32)
    if static_scale is None:
        amax = np.abs(a).max(axis=-1, keepdims=True)
        s = np.where(amax > 0, amax / np.float32(127.0), np.float32(1.0)).astype(np.float32)
    else:
        s = np.full(a.shape[:-1] + (1,), static_scale, np.float32)
    q = np.clip(np.rint(a / s), -127, 127).astype(np.float32)
    return q, s


def matmul(a: np.ndarray, codes: np.ndarray, scales: np.ndarray, global_scale, fmt: str,
           block_size: int, act_mode: str = "float32", act_scale: float | None = None):
    """Y = A @ decode(W).T in float64 (the exact value the float32 kernels approximate)."""
    w = decode_weight(codes, scales, global_scale, fmt, block_size).astype(np.float64)
    a = np.asarray(a, np.float32)
    if act_mode != "float32":
        q, s = quantize_rows_int8(a, act_scale if act_mode == "int8_static" else None)
        return (q.astype(np.float64) @ w.T) * s.astype(np.float64)
    return a.astype(np.float64) @ w.T


def reorder_norm(x: np.ndarray, perm: np.ndarray, gamma: np.ndarray, beta=None,
                 kind: str = "rms", epsilon: float = 1e-5) -> np.ndarray:
    """norm(x)[..., perm] * gamma + beta, gamma/beta given in permuted order (float64)."""
    x = np.asarray(x, np.float64)
    if kind == "rms":
        y = x / np.sqrt((x * x).mean(-1, keepdims=True) + epsilon)
    else:
        mu = x.mean(-1, keepdims=True)
        y = (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + epsilon)
    y = y[..., np.asarray(perm)] * np.asarray(gamma, np.float64)
    return y if beta is None else y + np.asarray(beta, np.float64)


def hadamard_transform(x: np.ndarray) -> np.ndarray:
    """Hadamard(x) = x @ H_n / sqrt(n) over the last axis (float64; H from runtime_ext.hadamard)."""
    n = np.shape(x)[-1]
    return np.asarray(x, np.float64) @ (hadamard(n) / np.sqrt(n))


FGMP_BLOCK = 16


def fgmp_act_quant(x: np.ndarray, g2: np.ndarray, threshold: float,
                   global_scale: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """FgmpActQuant: per 16-block FP8 or NVFP4 fake-quantization; returns (y, fp8_mask).

    Uses lowbit.formats' element rounding and scale rules (formats/scales.py): with
    ``global_scale=None`` the two candidates equal ``fake_quantize(x, "nvfp4", -1, 16)`` and
    ``fake_quantize(x, "fp8_e4m3", -1, 16)``. A block takes FP8 when
    sum(g2 * (q_nvfp4 - q_fp8)^2) (float64) > threshold.
    """
    from lowbit.formats.minifloat import FP4_E2M1, FP8_E4M3

    x = np.asarray(x, np.float32)
    xb = x.reshape(*x.shape[:-1], -1, FGMP_BLOCK)
    amax = np.abs(xb).max(-1, keepdims=True)
    if global_scale is None:
        t = np.float32(np.abs(x).max()) if x.size else np.float32(0)
        g = t / np.float32(6 * 448)
        g = g if g > 0 else np.float32(1)
    else:
        g = np.float32(global_scale)
    raw = amax / (np.float32(6) * g)
    sb = FP8_E4M3.round(np.where(raw > 0, raw, np.float32(1)))
    sb = np.where(sb > 0, sb, np.float32(2.0 ** -9)).astype(np.float32)
    s4 = (sb * g).astype(np.float32)
    q4 = FP4_E2M1.round(xb / s4) * s4
    s8 = amax / np.float32(448)
    s8 = np.where(s8 > 0, s8, np.float32(1)).astype(np.float32)
    q8 = FP8_E4M3.round(xb / s8) * s8
    w = np.asarray(g2, np.float64).reshape(-1, FGMP_BLOCK)
    p = (w * (q4.astype(np.float64) - q8) ** 2).sum(-1, keepdims=True)
    mask = p > threshold
    y = np.where(mask, q8, q4).astype(np.float32)
    return y.reshape(x.shape), mask[..., 0]
