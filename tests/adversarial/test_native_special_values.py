"""Native lowbit ops agree with their ONNX function fallbacks on special values, on every kernel path.

Inputs hold NaN, +-Inf, -0.0, huge values (up to FLT_MAX), denormals and tiny normals in the
activations, and NaN / Inf / zero / negative / denormal / huge block scales, NaN FP8 codes and
special global scales in the weights. MatMulLowbit runs every batch size M = 1..17 (one-row GEMV,
2-3 row GEMV, blocked GEMM with a 16-row tail) on N = 52 output rows (several GEMV/GEMM thread
tasks) and K with a 16-element tail where the block allows it.

Every ISA path the CPU supports (LOWBIT_ORT_ISA=scalar, LOWBIT_ORT_ISA=avx2 when the CPU has AVX2+FMA,
and the default selection's AVX-512 VNNI int8_group kernels when it has those too) runs in its own
child process: a native crash fails the test instead of killing pytest. The child writes the native outputs; the fallback (plain ONNX Runtime, no library) runs
here, once.

What "agree" means:
- decodes (GatherLowbit), FgmpActQuant: bit for bit (NaN positions equal, every other float
  equal including the sign of zero), also against the numpy reference (reference.py);
- sums (MatMulLowbit, ReorderNorm's statistics): same NaN / +Inf / -Inf positions, finite values
  within the float32 error bound of any summation order. For MatMulLowbit an oracle derives, from
  the exact (float64) products of the fallback's decoded weights and activations, the result
  every float32 summation order gives (NaN when a product is NaN or +Inf meets -Inf; +-Inf when an
  infinite product meets a sum that cannot overflow; the value within
  (2K + 16) * 2^-24 * sum|a w| + (2K + 16) * 2^-149 otherwise), and leaves the elements whose
  partial sums may overflow in some orders unchecked (asserted to be rare). Both the native op
  and the fallback are checked against it.

Run as a script (``python test_native_special_values.py OUT.npz``) it is the child.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

F32 = np.float32
FMAX = float(np.finfo(np.float32).max)
U = 2.0 ** -24
TINY = 2.0 ** -149  # smallest float32 denormal
N_OUT = 52  # MatMul output rows: > 48 (two GEMM tasks), > 16 (several GEMV tasks), % 6 != 0


VNNI_FLAGS = {"avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512vbmi"}


def _isa_paths() -> list[str]:
    """Kernel sets this CPU runs: "avx512vnni" (the default selection, LOWBIT_ORT_ISA unset),
    "avx2" and "scalar" (LOWBIT_ORT_ISA caps the choice)."""
    flags = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags.update(line.split(":", 1)[1].split())
    except OSError:
        pass
    avx2 = {"avx2", "fma"} <= flags
    return (["avx512vnni"] if avx2 and VNNI_FLAGS <= flags else []) + (["avx2"] if avx2 else []) + ["scalar"]


ISAS = _isa_paths()


# ---- inputs -------------------------------------------------------------------------------------

KINDS = ["normal", "nan", "pinf", "ninf", "pninf", "nan_inf", "zeros", "negzero", "huge1",
         "huge_row", "maxval", "denorm_row", "denorm_mix", "tiny", "big", "huge_tiny"]


def act_row(kind: str, k: int, rng: np.random.Generator) -> np.ndarray:
    """One activation row of length k of the given special kind."""
    r = rng.standard_normal(k).astype(F32)
    j = rng.permutation(k)[:4]
    if kind == "nan":
        r[j[0]] = np.nan
    elif kind == "pinf":
        r[j[0]] = np.inf
    elif kind == "ninf":
        r[j[0]] = -np.inf
    elif kind == "pninf":
        r[j[0]], r[j[1]] = np.inf, -np.inf
    elif kind == "nan_inf":
        r[j[0]], r[j[1]] = np.nan, np.inf
    elif kind == "zeros":
        r = np.where(np.arange(k) % 2 == 0, F32(0.0), F32(-0.0)).astype(F32)
    elif kind == "negzero":
        r[j] = -0.0
    elif kind == "huge1":  # one value whose products overflow float32 unless the weight is small
        r[j[0]] = 3e38 * (1 if rng.random() < 0.5 else -1)
    elif kind == "huge_row":
        r *= F32(1e30)
    elif kind == "maxval":
        r[j[0]] = FMAX * (1 if rng.random() < 0.5 else -1)
    elif kind == "denorm_row":
        r *= F32(1e-40)
    elif kind == "denorm_mix":
        r[::2] *= F32(1e-42)
    elif kind == "tiny":  # normal, below the kernels' 2^-96 "tame" bound
        r *= F32(1e-31)
    elif kind == "big":  # just above 2^96
        r *= F32(2.0 ** 97)
    elif kind == "huge_tiny":
        r *= F32(1e-41)
        r[j[0]] = 2e38
    return r.astype(F32)


def batches() -> list[list[str]]:
    """Row kinds of each MatMul batch: M = 1 once per kind, then every M = 2..17."""
    out = [[k] for k in KINDS]
    for m in range(2, 18):
        out.append([KINDS[(3 * m + i) % len(KINDS)] for i in range(m)])
    return out


F32_SPECIAL_SCALES = [0.0, -0.0, np.nan, np.inf, -np.inf, 1e-40, 1e-45, 1e38, FMAX, 2.0 ** -100,
                      2.0 ** 100, -1.5, 2.0 ** -97]
NVFP4_SPECIAL_BYTES = [0x7F, 0xFF, 0x00, 0x80, 0x01, 0x7E, 0xFE, 0x87, 0x81]  # E4M3 NaN, 0, ...
MXFP4_SPECIAL_BYTES = [0xFF, 0x00, 0x01, 0xFE, 0xE0, 0x1F, 0x20]  # E8M0 NaN, 2^-127, 2^127, ...
GLOBAL_VARIANTS = [1e-30, 1e30, 0.0, np.nan, np.inf, -2.0]

MM_CONFIGS = {  # id: (fmt, block, scale_dtype, act_mode, fp8 blocks, K)
    "dint4_b32_f32": ("dint4", 32, "float32", "float32", False, 288),
    "dint4_b16_f32": ("dint4", 16, "float32", "float32", False, 272),
    "nvfp4_b16_u8": ("nvfp4", 16, "uint8", "float32", False, 272),
    "nvfp4_b16_f32": ("nvfp4", 16, "float32", "float32", False, 80),
    "int4_b64_f32": ("int4", 64, "float32", "float32", False, 320),
    "mxfp4_b32_u8": ("mxfp4", 32, "uint8", "float32", False, 288),
    "mixed_u8": ("nvfp4", 16, "uint8", "float32", True, 272),
    "mixed_f32": ("nvfp4", 16, "float32", "float32", True, 80),
    "dint4_b32_f32_i8dyn": ("dint4", 32, "float32", "int8_dynamic", False, 288),
    "dint4_b16_f32_i8dyn": ("dint4", 16, "float32", "int8_dynamic", False, 112),
    "nvfp4_b16_u8_i8dyn": ("nvfp4", 16, "uint8", "int8_dynamic", False, 272),
    "mxfp4_b32_u8_i8dyn": ("mxfp4", 32, "uint8", "int8_dynamic", False, 96),
    "int4_b64_f32_i8static": ("int4", 64, "float32", "int8_static", False, 128),
    "nvfp4_b16_u8_i8static": ("nvfp4", 16, "uint8", "int8_static", False, 80),
    "dint4_b32_f32_i8g32": ("dint4", 32, "float32", "int8_group", False, 288),
    "dint4_b16_f32_i8g64": ("dint4", 16, "float32", "int8_group", False, 320),
    "int4_b64_f32_i8g64": ("int4", 64, "float32", "int8_group", False, 192),
    "nvfp4_b16_u8_i8g32": ("nvfp4", 16, "uint8", "int8_group", False, 288),
    "mxfp4_b32_u8_i8g128": ("mxfp4", 32, "uint8", "int8_group", False, 384),
}
I8G_GROUPS = {cfg: int(cfg.rsplit("i8g", 1)[1]) for cfg, v in MM_CONFIGS.items() if v[3] == "int8_group"}


def _weights(cfg: str, special: bool, seed: int) -> dict[str, np.ndarray]:
    """Random packed weights for MM_CONFIGS[cfg]; `special`: rows 0.. carry special scales (and
    NaN FP8 codes / special FP8 scales for mixed weights), one per row, the rest stay plain."""
    fmt, block, sd, _, fp8, k = MM_CONFIGS[cfg]
    rng = np.random.default_rng(seed)
    n, nb = N_OUT, k // block
    codes = rng.integers(0, 256, (n, k // 2), dtype=np.uint8)  # every nibble, +-0 included
    if sd == "uint8":
        lo, hi = (0x08, 0x78) if fmt == "nvfp4" else (117, 138)
        scales = rng.integers(lo, hi, (n, nb), dtype=np.uint8)
        specials = NVFP4_SPECIAL_BYTES if fmt == "nvfp4" else MXFP4_SPECIAL_BYTES
    else:
        scales = (np.exp2(rng.uniform(-8, 4, (n, nb))) * rng.choice([1, 1, 1, -1], (n, nb))).astype(F32)
        specials = F32_SPECIAL_SCALES
    if special:
        for i, v in enumerate(specials):
            scales[i, rng.integers(nb)] = v
    out = {"codes": codes, "scales": scales,
           "global_scale": np.array(0.37 if sd == "float32" else 0.011, F32)}
    if fp8:
        mask = rng.random((n, nb)) < 0.3
        mask[:, 0] = True  # every row has an FP8 block (special FP8 scales go there)
        mask[1] = True  # an all-FP8 row
        mask[2, 1:] = False  # a row with a single FP8 block
        count = int(mask.sum())
        fp8_codes = rng.integers(0, 256, (count, 16), dtype=np.uint8)
        fp8_codes[(fp8_codes & 0x7F) == 0x7F] ^= 0x01  # no NaN code unless asked for below
        fp8_scales = np.exp2(rng.uniform(-12, 0, count)).astype(F32)
        first = np.concatenate([[0], np.cumsum(mask.sum(1))[:-1]])
        if special:
            base = len(specials)
            fp8_codes[first[base], 3] = 0x7F  # NaN codes (E4M3FN S.1111.111)
            fp8_codes[first[base + 1] + 1 if mask[base + 1].sum() > 1 else first[base + 1], 9] = 0xFF
            for i, v in enumerate(F32_SPECIAL_SCALES):
                fp8_scales[first[base + 2 + i]] = v
        out.update(fp8_mask=np.packbits(mask, axis=1, bitorder="little"),
                   fp8_codes=fp8_codes, fp8_scales=fp8_scales)
    return out


def matmul_cases(cfg: str) -> list[tuple[str, dict[str, np.ndarray]]]:
    """(case id, feeds) of one config: plain and special weights over every batch, special
    global (and static activation) scales over a few batches."""
    _, _, _, act, _, k = MM_CONFIGS[cfg]
    rng = np.random.default_rng(sum(map(ord, cfg)))
    out = []
    for wset, special in (("plain", False), ("special", True)):
        w = _weights(cfg, special, seed=len(cfg) + special)
        for i, kinds in enumerate(batches()):
            a = np.stack([act_row(kd, k, rng) for kd in kinds])
            feeds = {"A": a, **w}
            if act == "int8_static":
                feeds["act_scale"] = np.array(0.02, F32)
            out.append((f"{cfg}/{wset}/{i}", feeds))
    w = _weights(cfg, False, seed=7)
    # Scaled weights times huge rows would overflow in both directions (order-dependent): the
    # special global scales meet at most one huge activation per row.
    calm = [kd for kd in KINDS if kd not in ("huge_row", "big", "pninf")]
    short = [["normal"], ["huge1"], ["tiny"], ["denorm_row", "normal", "maxval"],
             [calm[i % len(calm)] for i in range(17)]]
    for g in GLOBAL_VARIANTS:
        for i, kinds in enumerate(short):
            a = np.stack([act_row(kd, k, rng) for kd in kinds])
            feeds = {"A": a, **w, "global_scale": np.array(g, F32)}
            if act == "int8_static":
                feeds["act_scale"] = np.array(0.02, F32)
            out.append((f"{cfg}/global{g}/{i}", feeds))
    if act == "int8_static":  # 127 * act_scale overflows / tiny act_scale
        for s in (3e36, 1e-38):
            for i, kinds in enumerate(short):
                a = np.stack([act_row(kd, k, rng) for kd in kinds])
                out.append((f"{cfg}/act{s}/{i}", {"A": a, **w, "act_scale": np.array(s, F32)}))
    return out


def bug_cases() -> list[tuple[str, str, dict[str, np.ndarray]]]:
    """The two reported bugs as (config, case id, feeds): the same activation row repeated
    M = 1..17 times against mixed weights with NaN FP8 codes; int8_dynamic rows with a NaN."""
    out = []
    w = _weights("mixed_u8", False, seed=3)
    w["fp8_codes"] = w["fp8_codes"].copy()
    w["fp8_codes"][0, 5] = 0x7F  # row 0's first FP8 block
    w["fp8_codes"][-1, 2] = 0xFF  # the last row's last FP8 block
    row = np.random.default_rng(5).standard_normal(272).astype(F32)
    for m in range(1, 18):
        out.append(("mixed_u8", f"bug1/{m}", {"A": np.tile(row, (m, 1)), **w}))
    w = _weights("dint4_b32_f32_i8dyn", False, seed=4)
    rng = np.random.default_rng(6)
    for m in range(1, 18):
        a = rng.standard_normal((m, 288)).astype(F32)
        a[0, 17] = np.nan
        out.append(("dint4_b32_f32_i8dyn", f"bug2/{m}", {"A": a, **w}))
    return out


# Finite scales whose decode value * s is a denormal (or huge but finite: an Inf weight would
# make I @ W NaN): the decode must give the fallback's float32 product bit for bit (mult * s
# first would round a denormal s).
FINITE_SPECIAL_SCALES = [0.0, -0.0, 1e-40, 1e-45, 3e-45, 2.0 ** -130 * 3, 2.0 ** -126, 1e35, -7e-42]


def identity_cases(cfg: str) -> list[tuple[str, dict[str, np.ndarray]]]:
    """A = rows of the identity: Y = the decoded weights (M = K: GEMM; M = 1, 3: GEMV)."""
    fmt, block, sd, act, fp8, k = MM_CONFIGS[cfg]
    assert act == "float32"
    w = _weights(cfg, False, seed=21)
    nb = k // block
    if sd == "float32":
        w["scales"] = w["scales"].copy()
        w["scales"].reshape(-1)[: 4 * len(FINITE_SPECIAL_SCALES)] = FINITE_SPECIAL_SCALES * 4
    else:  # E4M3 / E8M0 scale bytes with the smallest values, times a tiny global below
        w["scales"] = w["scales"].copy()
        w["scales"][:, : min(nb, 3)] = [0x01, 0x00, 0x09][: min(nb, 3)]
    if fp8:
        w["fp8_scales"] = w["fp8_scales"].copy()
        w["fp8_scales"][: len(FINITE_SPECIAL_SCALES)] = FINITE_SPECIAL_SCALES
    out = []
    for g in (1.0, 1e-36, 0.37):
        for m in (k, 3, 1):
            out.append((f"{cfg}/eye{m}/g{g}", {"A": np.eye(k, dtype=F32)[:m], **w,
                                               "global_scale": np.array(g, F32)}))
    return out


IDENTITY_CONFIGS = [c for c, v in MM_CONFIGS.items() if v[3] == "float32"]

GATHER_CONFIGS = {  # id: (fmt, block, scale_dtype)
    "dint4_b32_f32": ("dint4", 32, "float32"), "nvfp4_b16_u8": ("nvfp4", 16, "uint8"),
    "nvfp4_b16_f32": ("nvfp4", 16, "float32"), "int4_b64_f32": ("int4", 64, "float32"),
    "mxfp4_b32_u8": ("mxfp4", 32, "uint8"), "mxfp4_b64_f32": ("mxfp4", 64, "float32"),
}


def gather_cases(cfg: str) -> list[tuple[str, dict[str, np.ndarray]]]:
    fmt, block, sd = GATHER_CONFIGS[cfg]
    rng = np.random.default_rng(sum(map(ord, cfg)))
    v, d = 24, 128
    table = rng.integers(0, 256, (v, d // 2), dtype=np.uint8)
    if sd == "uint8":
        specials = NVFP4_SPECIAL_BYTES if fmt == "nvfp4" else MXFP4_SPECIAL_BYTES
        scales = rng.integers(0, 256, (v, d // block), dtype=np.uint8)
    else:
        specials = F32_SPECIAL_SCALES
        scales = np.exp2(rng.uniform(-10, 10, (v, d // block))).astype(F32)
    scales.reshape(-1)[: len(specials)] = specials
    ids = np.concatenate([np.arange(v), -np.arange(1, v + 1)]).astype(np.int64).reshape(2, v)
    return [(f"{cfg}/g{g}", {"table": table, "scales": scales, "global_scale": np.array(g, F32),
                             "indices": ids}) for g in [1.0, 0.37] + GLOBAL_VARIANTS]


NORM_CONFIGS = {f"{kind}_{'beta' if beta else 'nobeta'}_eps{eps}": (kind, beta, eps)
                for kind in ("rms", "layer") for beta in (False, True) for eps in (1e-5, 0.0)}
NORM_C = 48


def norm_rows(rng: np.random.Generator) -> np.ndarray:
    rows = [act_row(kd, NORM_C, rng) for kd in KINDS]
    rows += [np.full(NORM_C, 1e19, F32),  # squares fine, their sum overflows float32
             np.full(NORM_C, 5e36, F32),  # the layer mean's sum overflows
             (rng.standard_normal(NORM_C) * 1e-25).astype(F32),  # squares underflow
             np.full(NORM_C, -0.0, F32), np.full(NORM_C, 3.0, F32)]
    return np.stack(rows)


def norm_cases(cfg: str) -> list[tuple[str, dict[str, np.ndarray]]]:
    _, beta, _ = NORM_CONFIGS[cfg]
    rng = np.random.default_rng(sum(map(ord, cfg)))
    x = norm_rows(rng)
    perms = {"perm": rng.permutation(NORM_C).astype(np.int64),
             "dup": rng.integers(-NORM_C, NORM_C, NORM_C).astype(np.int64)}  # repeats, negatives
    gammas = {"g": rng.uniform(0.5, 2, NORM_C).astype(F32)}
    gs = gammas["g"].copy()
    gs[:6] = [np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-40]
    gammas["gspecial"] = gs
    out = []
    for pn, perm in perms.items():
        for gn, gamma in gammas.items():
            feeds = {"x": x[None], "perm": perm, "gamma": gamma}
            if beta:
                feeds["beta"] = rng.standard_normal(NORM_C).astype(F32)
            out.append((f"{cfg}/{pn}/{gn}", feeds))
    return out


FGMP_CONFIGS = {"dynamic": False, "static": True}
FGMP_C = 64


def fgmp_tensors(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """x [3, 64] per case: normal rows plus one special pattern each."""
    def base():
        return (rng.standard_normal((3, FGMP_C)) * np.exp(rng.uniform(-4, 4, FGMP_C))).astype(F32)
    out = {"normal": base()}
    for pos in (0, 1, 7, 9, 15):  # a NaN at several places of a block (ORT's ReduceMax would care)
        x = base()
        x[1, 16 + pos] = np.nan
        out[f"nan{pos}"] = x
    for name, val in (("pinf", np.inf), ("ninf", -np.inf), ("huge", 3e38), ("max", FMAX),
                      ("denorm", 1e-42), ("negzero", -0.0)):
        x = base()
        x[0, 33] = val
        out[name] = x
    x = base()
    x[2, 16:32] = 0.0
    x[2, 32:48] = -0.0
    x[0, :16] *= F32(1e-40)  # a denormal block
    x[1, 48:] *= F32(1e-30)  # a block whose NVFP4 scale underflows E4M3
    out["blocks"] = x
    x = base()
    x[1, :] = np.inf
    out["infrow"] = x
    return out


def fgmp_cases(cfg: str) -> list[tuple[str, dict[str, np.ndarray]]]:
    from lowbit.runtime_ext import reference as ref

    static = FGMP_CONFIGS[cfg]
    rng = np.random.default_rng(11 + static)
    g2 = rng.uniform(0, 3, FGMP_C).astype(F32)
    g2s = g2.copy()
    g2s[[3, 20, 40]] = [np.nan, np.inf, 0.0]
    out = []
    for name, x in fgmp_tensors(rng).items():
        globals_ = [None]
        if static:
            finite = np.abs(x[np.isfinite(x)])
            globals_ = [float(finite.max()) / 2688 * 1.5, 1e-30, 1e30]
        for gi, gs in enumerate(globals_):
            for wi, w in enumerate((g2, g2s)):
                for thr in (-1.0, 0.0, np.inf, _mid_threshold(ref, x, w, gs)):
                    feeds = {"x": x, "g2": w, "thr": np.array(thr, F32)}
                    if static:
                        feeds["gs"] = np.array(gs, F32)
                    out.append((f"{cfg}/{name}/g{gi}/w{wi}/t{thr:.3g}", feeds))
    return out


def _mid_threshold(ref, x, g2, gs) -> float:
    """A threshold in the widest gap between the blocks' finite positive perturbations (float32,
    so that the op sees the same value), so no block sits near it."""
    with np.errstate(all="ignore"):
        q4, _ = ref.fgmp_act_quant(x, g2, np.inf, gs)
        q8, _ = ref.fgmp_act_quant(x, g2, -np.inf, gs)
        p = (np.asarray(g2, np.float64) * (q4.astype(np.float64) - q8) ** 2).reshape(-1, 16).sum(-1)
    p = np.unique(p[np.isfinite(p) & (p > 1e-30) & (p < 1e30)])
    if len(p) < 2:
        return 1.0
    lp = np.log(p)
    i = int(np.argmax(np.diff(lp)))
    return float(F32(np.exp((lp[i] + lp[i + 1]) / 2)))


# ---- models and sessions ----------------------------------------------------------------------

def _model(node, inputs):
    from onnx import TensorProto, helper

    from lowbit import runtime_ext as rx

    graph = helper.make_graph([node], "t", [helper.make_tensor_value_info(n, t, None) for n, t in inputs],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 21)])
    return rx.attach_functions(model)


def build_model(op: str, cfg: str):
    from onnx import TensorProto as T

    from lowbit import runtime_ext as rx

    if op == "mm":
        fmt, block, sd, act, fp8, _ = MM_CONFIGS[cfg]
        spec = rx.MatMulSpec(fmt, block, sd, act, fp8_blocks=fp8, act_group=I8G_GROUPS.get(cfg))
        node = rx.make_matmul_node("A", "codes", "scales", "global_scale", "Y", spec,
                                   act_scale="act_scale" if act == "int8_static" else None,
                                   fp8=("fp8_mask", "fp8_codes", "fp8_scales") if fp8 else None)
        ins = [("A", T.FLOAT), ("codes", T.UINT8), ("scales", T.UINT8 if sd == "uint8" else T.FLOAT),
               ("global_scale", T.FLOAT)]
        ins += [("act_scale", T.FLOAT)] if act == "int8_static" else []
        ins += [("fp8_mask", T.UINT8), ("fp8_codes", T.UINT8), ("fp8_scales", T.FLOAT)] if fp8 else []
    elif op == "gather":
        fmt, block, sd = GATHER_CONFIGS[cfg]
        node = rx.make_gather_node("table", "scales", "global_scale", "indices", "Y",
                                   rx.GatherSpec(fmt, block, sd))
        ins = [("table", T.UINT8), ("scales", T.UINT8 if sd == "uint8" else T.FLOAT),
               ("global_scale", T.FLOAT), ("indices", T.INT64)]
    elif op == "norm":
        kind, beta, eps = NORM_CONFIGS[cfg]
        node = rx.make_reorder_norm_node("x", "perm", "gamma", "Y", kind=kind, epsilon=eps,
                                         beta="beta" if beta else None)
        ins = [("x", T.FLOAT), ("perm", T.INT64), ("gamma", T.FLOAT)] + ([("beta", T.FLOAT)] if beta else [])
    else:
        static = FGMP_CONFIGS[cfg]
        node = rx.make_fgmp_node("x", "g2", "thr", "Y", global_scale="gs" if static else None)
        ins = [("x", T.FLOAT), ("g2", T.FLOAT), ("thr", T.FLOAT)] + ([("gs", T.FLOAT)] if static else [])
    return _model(node, ins)


def session(op: str, cfg: str, native: bool):
    import onnxruntime as ort

    from lowbit import runtime_ext as rx

    opts = rx.session_options() if native else ort.SessionOptions()
    opts.intra_op_num_threads = 2
    return ort.InferenceSession(build_model(op, cfg).SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])


def all_cases():
    """(op, config, case id, feeds) of every case, in a fixed order."""
    for cfg in MM_CONFIGS:
        for cid, feeds in matmul_cases(cfg):
            yield "mm", cfg, cid, feeds
    for cfg, cid, feeds in bug_cases():
        yield "mm", cfg, cid, feeds
    for cfg in IDENTITY_CONFIGS:
        for cid, feeds in identity_cases(cfg):
            yield "mm", cfg, cid, feeds
    for cfg in GATHER_CONFIGS:
        for cid, feeds in gather_cases(cfg):
            yield "gather", cfg, cid, feeds
    for cfg in NORM_CONFIGS:
        for cid, feeds in norm_cases(cfg):
            yield "norm", cfg, cid, feeds
    for cfg in FGMP_CONFIGS:
        for cid, feeds in fgmp_cases(cfg):
            yield "fgmp", cfg, cid, feeds


def run_all(native: bool) -> dict[str, np.ndarray]:
    sessions: dict[tuple[str, str], object] = {}
    out = {}
    for op, cfg, cid, feeds in all_cases():
        if (op, cfg) not in sessions:
            sessions[(op, cfg)] = session(op, cfg, native)
        out[f"{op}:{cid}"] = sessions[(op, cfg)].run(None, feeds)[0]
    return out


# ---- checks -----------------------------------------------------------------------------------

FIN, NAN, PINF, NINF, AMBIG = range(5)


def sum_oracle(a: np.ndarray, w: np.ndarray):
    """(kind, S, bound) of Y = a @ w.T in float32, whatever the summation order (module doc).

    Every partial sum of any order (FMA or not) is a subset sum of the exact products e, up to
    the rounding slack `bound`: it lies between the sum of the negative and the sum of the
    positive products. A side that cannot reach FLT_MAX can never overflow."""
    k = a.shape[-1]
    with np.errstate(all="ignore"):
        e = a.astype(np.float64)[:, None, :] * w.astype(np.float64)[None, :, :]
        nan = np.isnan(e).any(-1) | (np.isposinf(e).any(-1) & np.isneginf(e).any(-1))
        pinf, ninf = np.isposinf(e).any(-1), np.isneginf(e).any(-1)
        fin = np.where(np.isfinite(e), e, 0.0)
        pos, neg = np.where(fin > 0, fin, 0.0).sum(-1), np.where(fin < 0, fin, 0.0).sum(-1)
    s, bound = pos + neg, (2 * k + 16) * U * (pos - neg) + (2 * k + 16) * TINY
    lim, past = FMAX * (1 - 2.0 ** -20), FMAX * (1 + 2.0 ** -20)
    pos_ok, neg_ok = pos + bound < lim, -neg + bound < lim
    finite = ~pinf & ~ninf
    kind = np.full(s.shape, AMBIG)
    kind[finite & pos_ok & neg_ok] = FIN
    kind[finite & neg_ok & (s - bound > past)] = PINF  # every order overflows, to +Inf
    kind[finite & pos_ok & (s + bound < -past)] = NINF
    kind[pinf & ~ninf & neg_ok] = PINF
    kind[ninf & ~pinf & pos_ok] = NINF
    kind[nan] = NAN
    return kind, s, bound


def kind_of(y: np.ndarray) -> np.ndarray:
    k = np.full(y.shape, FIN)
    k[np.isnan(y)] = NAN
    k[np.isposinf(y)] = PINF
    k[np.isneginf(y)] = NINF
    return k


def assert_sum_agrees(y, kind, s, bound, what: str) -> int:
    """y against the oracle; returns how many elements were checked."""
    names = ["finite", "NaN", "+Inf", "-Inf"]
    check = kind != AMBIG
    got = kind_of(y)
    bad = check & (got != kind)
    if bad.any():
        idx = [tuple(int(i) for i in t) for t in np.argwhere(bad)[:6]]
        raise AssertionError(f"{what}: {int(bad.sum())} results of the wrong kind, e.g. " + ", ".join(
            f"{i}: got {names[got[i]]} ({y[i]!r}), expected {names[kind[i]]} ({s[i]!r})" for i in idx))
    fin = check & (kind == FIN)
    err = np.abs(y.astype(np.float64) - s)
    over = fin & ~(err <= bound)
    if over.any():
        i = tuple(int(v) for v in np.argwhere(over)[0])
        raise AssertionError(f"{what}: {int(over.sum())} values off by more than the bound, e.g. "
                             f"{i}: got {y[i]!r}, exact {s[i]!r}, bound {bound[i]!r}")
    return int(check.sum())


def assert_bitwise(y: np.ndarray, want: np.ndarray, what: str, zero_sign: bool = True) -> None:
    """Same shape, same NaN positions, every other float32 identical (sign of zero included
    unless not `zero_sign`)."""
    assert y.shape == want.shape, f"{what}: shape {y.shape} != {want.shape}"
    yn, wn = np.isnan(y), np.isnan(want)
    if not np.array_equal(yn, wn):
        i = tuple(int(v) for v in np.argwhere(yn != wn)[0])
        raise AssertionError(f"{what}: NaN positions differ, e.g. {i}: got {y[i]!r}, want {want[i]!r}")
    yb = np.where(yn | (~zero_sign & (y == 0)), 0, y).astype(F32).view(np.uint32)
    wb = np.where(wn | (~zero_sign & (want == 0)), 0, want).astype(F32).view(np.uint32)
    if not np.array_equal(yb, wb):
        i = tuple(int(v) for v in np.argwhere(yb != wb)[0])
        raise AssertionError(f"{what}: {int((yb != wb).sum())} values differ bitwise, e.g. {i}: "
                             f"got {y[i]!r}, want {want[i]!r}")


def decoded_weight(cfg: str, feeds: dict) -> np.ndarray:
    """The fallback's float32 weights [N, K] (reference.decode_weight; FP8 blocks E4M3 * scale)."""
    from lowbit.runtime_ext import reference as ref

    fmt, block, _, _, fp8, _ = MM_CONFIGS[cfg]
    with np.errstate(all="ignore"):
        w = ref.decode_weight(feeds["codes"], feeds["scales"], feeds["global_scale"], fmt, block)
        if fp8:
            n, k = w.shape
            mask = np.unpackbits(feeds["fp8_mask"], axis=1, bitorder="little")[:, : k // 16].astype(bool)
            vals = (ref.e4m3_to_float(feeds["fp8_codes"]) * feeds["fp8_scales"][:, None]).astype(F32)
            blocks = w.reshape(n, -1, 16)
            blocks[mask] = vals  # row-major (n, b) order, as the packing
            w = blocks.reshape(n, k)
    return w


def effective_activations(cfg: str, feeds: dict) -> np.ndarray:
    """What the fallback multiplies: A, for int8_group GroupQuant(A) (qmax 127), or for the other
    int8 modes clip(rint(A / s), -127, 127) * s."""
    from lowbit.encode.activations import dynamic_fake_quant
    from lowbit.runtime_ext import reference as ref

    act = MM_CONFIGS[cfg][3]
    a = feeds["A"]
    if act == "float32":
        return a
    if act == "int8_group":
        group = I8G_GROUPS[cfg]
        with np.errstate(all="ignore"):
            return dynamic_fake_quant(a, group, np.full(a.shape[-1] // group, 127.0))
    with np.errstate(all="ignore"):
        q, s = ref.quantize_rows_int8(a, float(feeds["act_scale"]) if act == "int8_static" else None)
        return (q * s).astype(F32)


# ---- the child process per ISA, and the fallback here ---------------------------------------

@functools.lru_cache(maxsize=None)
def native_outputs(isa: str) -> dict[str, np.ndarray]:
    import tempfile

    env = dict(os.environ, OMP_NUM_THREADS="1")
    if isa in ("scalar", "avx2"):
        env["LOWBIT_ORT_ISA"] = isa
    else:
        env.pop("LOWBIT_ORT_ISA", None)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "native.npz"
        proc = subprocess.run([sys.executable, __file__, str(out)], env=env, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, (f"native child ({isa}) died with {proc.returncode}: "
                                      f"{proc.stderr[-3000:]}")
        with np.load(out) as z:
            assert str(z["kernel_set"]) == isa, (str(z["kernel_set"]), isa)
            return {k: z[k] for k in z.files if k != "kernel_set"}


@functools.lru_cache(maxsize=None)
def fallback_outputs() -> dict[str, np.ndarray]:
    return run_all(native=False)


@pytest.fixture(scope="module")
def fallback():
    return fallback_outputs()


@pytest.fixture(scope="module", params=ISAS)
def native(request, native_lib):
    return request.param, native_outputs(request.param)


@pytest.fixture(scope="module")
def native_lib():
    from lowbit.runtime_ext import build

    return build.build()


def test_isa_paths_cover_this_cpu():
    assert "scalar" in ISAS
    with open("/proc/cpuinfo") as f:
        flags = set(next((ln for ln in f if ln.startswith("flags")), ":").split(":", 1)[1].split())
    assert ("avx2" in ISAS) == ({"avx2", "fma"} <= flags)
    assert ("avx512vnni" in ISAS) == ({"avx2", "fma"} | VNNI_FLAGS <= flags)


@pytest.mark.parametrize("cfg", list(MM_CONFIGS))
def test_matmul_agrees_with_fallback(native, fallback, cfg):
    isa, nat = native
    checked = total = 0
    for cid, feeds in matmul_cases(cfg):
        key = f"mm:{cid}"
        kind, s, bound = sum_oracle(effective_activations(cfg, feeds), decoded_weight(cfg, feeds))
        checked += assert_sum_agrees(fallback[key], kind, s, bound, f"fallback {cid}")
        assert_sum_agrees(nat[key], kind, s, bound, f"native[{isa}] {cid}")
        total += kind.size
    # The oracle leaves only order-dependent overflows unchecked: they must stay rare.
    assert checked >= 0.97 * total, (checked, total)


def test_mixed_fp8_nan_codes_do_not_depend_on_batch_size(native, fallback):
    """Bug 1: E4M3 codes 0x7F / 0xFF are NaN; the AVX2 one-row path decoded them as 480 / -480."""
    isa, nat = native
    first = nat["mm:bug1/1"][0]
    assert np.isnan(first[0]) and np.isnan(first[-1]), first[[0, -1]]
    assert np.isfinite(first[1:-1]).all()
    for m in range(1, 18):
        y, yf = nat[f"mm:bug1/{m}"], fallback[f"mm:bug1/{m}"]
        np.testing.assert_array_equal(np.isnan(y), np.isnan(yf), err_msg=f"{isa} M={m}")
        for r in range(m):
            np.testing.assert_allclose(y[r], first, rtol=1e-5, atol=1e-5 * np.nanmax(np.abs(first)),
                                       err_msg=f"{isa} M={m} row {r}")


def test_int8_dynamic_nan_activation_gives_a_nan_row(native, fallback):
    """Bug 2: int8_dynamic quantized a NaN activation to 0; the fallback's row is all NaN."""
    isa, nat = native
    for m in range(1, 18):
        y, yf = nat[f"mm:bug2/{m}"], fallback[f"mm:bug2/{m}"]
        assert np.isnan(yf[0]).all()
        assert np.isnan(y[0]).all(), f"{isa} M={m}: {y[0, :4]}"
        assert not np.isnan(y[1:]).any() and not np.isnan(yf[1:]).any()


@pytest.mark.parametrize("cfg", IDENTITY_CONFIGS)
def test_matmul_decodes_tiny_and_huge_scales_bit_exactly(native, fallback, cfg):
    """Y = I @ W: every kernel path returns the fallback's decoded weights value * fl(s * g) bit
    for bit, denormal products included (the sign of a zero sum is left open: 0 + -0 = +0)."""
    isa, nat = native
    denormals = 0
    for cid, feeds in identity_cases(cfg):
        want = decoded_weight(cfg, feeds).T[: feeds["A"].shape[0]]
        assert_bitwise(fallback[f"mm:{cid}"], want, f"fallback {cid}", zero_sign=False)
        assert_bitwise(nat[f"mm:{cid}"], want, f"native[{isa}] {cid}", zero_sign=False)
        denormals += int(((want != 0) & (np.abs(want) < 2.0 ** -126)).sum())
    assert denormals > 0


@pytest.mark.parametrize("cfg", list(GATHER_CONFIGS))
def test_gather_is_bit_exact(native, fallback, cfg):
    from lowbit.runtime_ext import reference as ref

    isa, nat = native
    fmt, block, _ = GATHER_CONFIGS[cfg]
    for cid, feeds in gather_cases(cfg):
        with np.errstate(all="ignore"):
            want = ref.decode_weight(feeds["table"], feeds["scales"], feeds["global_scale"], fmt,
                                     block)[feeds["indices"]]
        assert_bitwise(fallback[f"gather:{cid}"], want, f"fallback {cid}")
        assert_bitwise(nat[f"gather:{cid}"], want, f"native[{isa}] {cid}")


@pytest.mark.parametrize("cfg", list(NORM_CONFIGS))
def test_reorder_norm_agrees_with_fallback(native, fallback, cfg):
    """Elementwise float32 steps are the fallback's; the two sums may differ by rounding."""
    isa, nat = native
    kind, beta, eps = NORM_CONFIGS[cfg]
    c = NORM_C
    outcomes = set()
    for cid, feeds in norm_cases(cfg):
        y, yf = nat[f"norm:{cid}"], fallback[f"norm:{cid}"]
        np.testing.assert_array_equal(kind_of(y), kind_of(yf), err_msg=f"{isa} {cid}")
        with np.errstate(all="ignore"):
            x = feeds["x"][..., feeds["perm"]].astype(np.float64)
            mean = x.mean(-1, keepdims=True) if kind == "layer" else 0.0
            denom = np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + eps)
            g = np.abs(feeds["gamma"].astype(np.float64))
            b = np.abs(feeds.get("beta", np.zeros(c, F32)).astype(np.float64))
            bound = (c + 16) * U * (np.abs(yf) + b + np.abs(x).mean(-1, keepdims=True) / denom * g)
            bound = np.where(np.isfinite(bound), bound, np.inf) + 16 * TINY
            fin = np.isfinite(yf)
            err = np.abs(y.astype(np.float64) - yf)
        bad = fin & ~(err <= bound)
        assert not bad.any(), (f"{isa} {cid}: {int(bad.sum())} values, e.g. got "
                               f"{y[bad][:3]}, fallback {yf[bad][:3]}")
        outcomes.update(kind_of(y).reshape(-1).tolist())
        if "beta" not in feeds and ((y == 0) & (np.abs(x) > 1e18)).any():
            outcomes.add("x/Inf")
    # The special rows did reach the special outcomes: NaN (0 / 0, Inf / Inf), +-Inf (x / 0 when
    # eps = 0 and the squares underflow), 0 (x / Inf when the squares overflow).
    want = {FIN, NAN} | ({PINF, NINF} if eps == 0 else set()) | (set() if beta else {"x/Inf"})
    assert want <= outcomes, (want, outcomes)


@pytest.mark.parametrize("cfg", list(FGMP_CONFIGS))
def test_fgmp_is_bit_exact(native, fallback, cfg):
    from lowbit.runtime_ext import reference as ref

    isa, nat = native
    for cid, feeds in fgmp_cases(cfg):
        gs = float(feeds["gs"]) if "gs" in feeds else None
        thr = float(feeds["thr"])
        with np.errstate(all="ignore"):
            want, _ = ref.fgmp_act_quant(feeds["x"], feeds["g2"], thr, gs)
            if 0 < abs(thr) < np.inf:  # no block within 1e-9 of the threshold: order-proof
                for t in (thr * (1 - 1e-9), thr * (1 + 1e-9)):
                    assert np.array_equal(ref.fgmp_act_quant(feeds["x"], feeds["g2"], t, gs)[0],
                                          want, equal_nan=True), cid
        assert_bitwise(fallback[f"fgmp:{cid}"], want, f"fallback {cid}")
        assert_bitwise(nat[f"fgmp:{cid}"], want, f"native[{isa}] {cid}")


def kernel_set() -> str:
    """The kernel set the native library runs in this process (its LowbitKernelSet export)."""
    import ctypes

    from lowbit.runtime_ext import library_path

    lib = ctypes.CDLL(str(library_path()))
    lib.LowbitKernelSet.restype = ctypes.c_char_p
    return lib.LowbitKernelSet().decode()


if __name__ == "__main__":  # the child: native outputs of every case with this process's ISA
    np.savez(sys.argv[1], **run_all(native=True), kernel_set=np.array(kernel_set()))
