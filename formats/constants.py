"""Bit-level constants of the number formats, named after their specs.

Only numbers live here; the codecs that use them are in the sibling modules. Each constant says
where it comes from so a reader can check it against the spec without running anything.
"""

__all__ = [
    "E4M3_EBITS", "E4M3_MBITS", "E4M3_BIAS", "E4M3_MAX",
    "E5M2_EBITS", "E5M2_MBITS", "E5M2_BIAS", "E5M2_MAX",
    "E2M1_EBITS", "E2M1_MBITS", "E2M1_BIAS", "E2M1_MAX",
    "E8M0_BIAS", "E8M0_EMIN", "E8M0_EMAX", "E8M0_NAN_CODE",
    "NVFP4_BLOCK", "NVFP4_GLOBAL_DIVISOR", "MX_BLOCK", "MX_E2M1_EMAX", "MX_E4M3_EMAX",
    "F32_MANT_BITS", "F32_BIAS",
]

# IEEE binary32, the carrier of every computation in lowbit.formats.
F32_MANT_BITS = 23
F32_BIAS = 127

# FP8 E4M3FN (OCP FP8 spec / ONNX FLOAT8E4M3FN): no Inf, only S.1111.111 is NaN, so the largest
# finite value is 1.110 x 2^8 = 448.
E4M3_EBITS, E4M3_MBITS, E4M3_BIAS = 4, 3, 7
E4M3_MAX = 448.0

# FP8 E5M2 (IEEE-like, has Inf): largest finite 1.11 x 2^15 = 57344. lowbit saturates, never Inf.
E5M2_EBITS, E5M2_MBITS, E5M2_BIAS = 5, 2, 15
E5M2_MAX = 57344.0

# FP4 E2M1 (OCP MX v1.0 / ONNX FLOAT4E2M1): no Inf/NaN, values {0, 0.5, 1, 1.5, 2, 3, 4, 6}.
E2M1_EBITS, E2M1_MBITS, E2M1_BIAS = 2, 1, 1
E2M1_MAX = 6.0

# E8M0 (OCP MX v1.0 shared scale / ONNX FLOAT8E8M0): unsigned biased exponent, 2^(code - 127),
# code 0xFF is NaN, no zero. So representable scales are 2^-127 .. 2^127.
E8M0_BIAS = 127
E8M0_EMIN = -127
E8M0_EMAX = 127
E8M0_NAN_CODE = 0xFF

# NVFP4 (NVIDIA ModelOpt): 16-element blocks, per-tensor FP32 scale = amax / (6 * 448), i.e. the
# largest E2M1 value times the largest E4M3 value, so every block scale fits in E4M3.
NVFP4_BLOCK = 16
NVFP4_GLOBAL_DIVISOR = E2M1_MAX * E4M3_MAX  # 2688, exact in float32

# OCP MX v1.0: 32-element blocks; shared exponent = floor(log2(amax)) - emax_elem, where emax_elem
# is the exponent of the element format's largest normal (6 = 1.5 x 2^2, 448 = 1.75 x 2^8).
MX_BLOCK = 32
MX_E2M1_EMAX = 2
MX_E4M3_EMAX = 8
