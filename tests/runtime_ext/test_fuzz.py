"""Bad shapes, dtypes, attributes and block sizes give a clear ORT error, never a crash.

All cases run in one child process (a segfault there fails the test instead of killing pytest);
the child prints one JSON line per case: "ok <output shape>" or the ORT error message. The same
cases run again with special values (NaN, +-Inf, -0.0, FLT_MAX, a denormal) in every float input;
their values (not their agreement with the fallbacks: tests/adversarial/
test_native_special_values.py) are checked there.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

CHILD = r'''
import json, sys
import numpy as np, onnxruntime as ort
from onnx import helper, TensorProto
from lowbit import runtime_ext as rx

def run(op, attrs, feeds):
    names = [n for n, _ in feeds]
    node = helper.make_node(op, names, ["Y"], domain="lowbit", **attrs)
    inputs = [helper.make_tensor_value_info(
        n, helper.np_dtype_to_tensor_dtype(a.dtype), list(a.shape)) for n, a in feeds if n]
    graph = helper.make_graph([node], "f", inputs, [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("lowbit", 1)])
    try:
        sess = ort.InferenceSession(model.SerializeToString(), rx.session_options(), providers=["CPUExecutionProvider"])
        y = sess.run(None, {n: a for n, a in feeds if n})[0]
        return "ok " + "x".join(map(str, y.shape))
    except Exception as e:
        return "err " + str(e).replace("\n", " ")

for case in json.loads(sys.stdin.read()):
    fill = np.float32(case.get("fill", 1.0))
    feeds = [(n, np.zeros(s, dtype=d) if d != "float32" else np.full(s, fill, np.float32)) if n else ("", None)
             for n, s, d in case["feeds"]]
    print(json.dumps(run(case["op"], case["attrs"], feeds)), flush=True)
'''


def _mm(a=(2, 64), codes=(8, 32), scales=(8, 2), g=(1,), attrs=None, sd="float32", cd="uint8",
        ad="float32", act=None):
    feeds = [["A", list(a), ad], ["codes", list(codes), cd], ["scales", list(scales), sd],
             ["g", list(g), "float32"]]
    if act is not None:
        feeds.append(["act", list(act), "float32"])
    base = {"format": "dint4", "block_size": 32}
    return {"op": "MatMulLowbit", "attrs": {**base, **(attrs or {})}, "feeds": feeds}


FIXED = [  # (case, expected substring of the outcome)
    (_mm(), "ok 2x8"),
    (_mm(a=(3, 5, 64)), "ok 3x5x8"),
    (_mm(a=(0, 64)), "ok 0x8"),
    (_mm(attrs={"format": "fp4"}), "attribute 'format' must be one of dint4, nvfp4, int4, mxfp4"),
    (_mm(attrs={"block_size": 24}), "'block_size' must be 16 or a positive multiple of 32, got 24"),
    (_mm(attrs={"block_size": -32}), "'block_size' must be 16 or a positive multiple of 32"),
    (_mm(attrs={"block_size": 0}), "'block_size' must be 16 or a positive multiple of 32"),
    ({**_mm(), "attrs": {"format": "dint4"}}, "missing required int attribute 'block_size'"),
    ({**_mm(), "attrs": {"block_size": 32}}, "missing required attribute 'format'"),
    (_mm(attrs={"act_mode": "int4"}), "'act_mode' must be float32, int8_dynamic, int8_static or int8_group"),
    (_mm(attrs={"act_mode": "int8_group", "act_group": 64}), "ok 2x8"),
    (_mm(scales=(8, 4), attrs={"act_mode": "int8_group", "act_group": 32, "block_size": 16}), "ok 2x8"),
    (_mm(sd="uint8", attrs={"format": "nvfp4", "act_mode": "int8_group", "act_group": 32}), "ok 2x8"),
    (_mm(a=(2, 0), codes=(8, 0), scales=(8, 0), attrs={"act_mode": "int8_group", "act_group": 64}), "ok 2x8"),
    (_mm(attrs={"act_mode": "int8_group"}), "missing required int attribute 'act_group'"),
    (_mm(attrs={"act_mode": "int8_group", "act_group": 48}),
     "act_mode=int8_group needs 'act_group' a positive multiple of 32 and of a power-of-two block_size, "
     "got act_group=48, block_size=32"),
    (_mm(attrs={"act_mode": "int8_group", "act_group": -64}), "got act_group=-64"),
    (_mm(a=(2, 192), codes=(8, 96), scales=(8, 2), attrs={"block_size": 96, "act_mode": "int8_group",
                                                          "act_group": 96}), "power-of-two block_size"),
    (_mm(attrs={"act_group": 64}), "attribute 'act_group' is only used with act_mode=int8_group, not float32"),
    (_mm(a=(2, 96), codes=(8, 48), scales=(8, 3), attrs={"act_mode": "int8_group", "act_group": 64}),
     "A's last dimension 96 must be a multiple of act_group=64"),
    (_mm(codes=(256,)), "codes must be 2-D [N, K/2], got [256]"),
    (_mm(codes=(8, 31), scales=(8, 2)), "codes [8, 31] do not match the unpacked length 64"),
    (_mm(scales=(8, 3)), "scales must have shape [8, 2], got [8, 3]"),
    (_mm(scales=(2, 8)), "scales must have shape [8, 2], got [2, 8]"),
    (_mm(sd="int32"), "scales must be float32 (any format) or uint8"),
    (_mm(sd="uint8"), "scales must be float32 (any format) or uint8"),  # uint8 needs nvfp4/mxfp4
    (_mm(sd="uint8", attrs={"format": "nvfp4"}), "ok 2x8"),
    (_mm(g=(2,)), "input 'global_scale' must hold one value, got shape [2]"),
    (_mm(a=(2, 48), codes=(8, 24), scales=(8, 1)), "length 48 must be a multiple of 16 and of block_size=32"),
    (_mm(a=(2, 8), codes=(8, 4), scales=(8, 1), attrs={"block_size": 16}), "multiple of 16"),
    (_mm(a=()), "A must have rank >= 1"),
    (_mm(ad="int64"), "tensor(int64)"),
    (_mm(cd="int8"), "tensor(int8)"),
    (_mm(attrs={"act_mode": "int8_static"}), "act_mode=int8_static needs input 4 (act_scale)"),
    (_mm(attrs={"act_mode": "int8_static"}, act=(1,)), "ok 2x8"),
    (_mm(a=(2, 0), codes=(8, 0), scales=(8, 0)), "ok 2x8"),
    (_mm(codes=(0, 32), scales=(0, 2)), "ok 2x0"),
    ({"op": "GatherLowbit", "attrs": {"format": "nvfp4", "block_size": 16},
      "feeds": [["t", [10, 16], "uint8"], ["s", [10, 2], "uint8"], ["g", [], "float32"],
                ["i", [3], "int64"]]}, "ok 3x32"),
    ({"op": "GatherLowbit", "attrs": {"format": "nvfp4", "block_size": 16},
      "feeds": [["t", [10, 16], "uint8"], ["s", [10, 2], "uint8"], ["g", [], "float32"],
                ["i", [3], "float32"]]}, "indices must be int64 or int32"),
    ({"op": "GatherLowbit", "attrs": {"format": "nvfp4", "block_size": 16},
      "feeds": [["t", [0, 16], "uint8"], ["s", [0, 2], "uint8"], ["g", [], "float32"],
                ["i", [3], "int64"]]}, "index 0 is out of range for 0 table rows"),
    ({"op": "GatherLowbit", "attrs": {"format": "nvfp4", "block_size": 16},
      "feeds": [["t", [10, 16], "uint8"], ["s", [10, 3], "uint8"], ["g", [], "float32"],
                ["i", [3], "int32"]]}, "scales must have shape [10, 2], got [10, 3]"),
    ({"op": "ReorderNorm", "attrs": {"kind": "rms", "epsilon": 1e-5},
      "feeds": [["x", [2, 8], "float32"], ["p", [8], "int64"], ["w", [8], "float32"]]}, "ok 2x8"),
    ({"op": "ReorderNorm", "attrs": {"kind": "batch"},
      "feeds": [["x", [2, 8], "float32"], ["p", [8], "int64"], ["w", [8], "float32"]]},
     "attribute 'kind' must be rms or layer, got 'batch'"),
    ({"op": "ReorderNorm", "attrs": {"kind": "layer", "epsilon": -1.0},
      "feeds": [["x", [2, 8], "float32"], ["p", [8], "int64"], ["w", [8], "float32"]]},
     "'epsilon' must be finite and >= 0"),
    ({"op": "ReorderNorm", "attrs": {"kind": "layer"},
      "feeds": [["x", [2, 8], "float32"], ["p", [7], "int64"], ["w", [8], "float32"]]},
     "perm must have shape [8] (x's last dimension), got [7]"),
    ({"op": "ReorderNorm", "attrs": {"kind": "rms"},
      "feeds": [["x", [2, 8], "float32"], ["p", [8], "int64"], ["w", [8], "float32"],
                ["b", [9], "float32"]]}, "beta must have shape [8]"),
    ({"op": "ReorderNorm", "attrs": {"kind": "rms"},
      "feeds": [["x", [2, 8], "float32"], ["p", [8], "int32"], ["w", [8], "float32"]]},
     "tensor(int32)"),
    ({"op": "FgmpActQuant", "attrs": {},
      "feeds": [["x", [2, 32], "float32"], ["w", [32], "float32"], ["t", [], "float32"]]},
     "ok 2x32"),
    ({"op": "FgmpActQuant", "attrs": {},
      "feeds": [["x", [2, 24], "float32"], ["w", [24], "float32"], ["t", [], "float32"]]},
     "last dimension 24 must be a multiple of 16"),
    ({"op": "FgmpActQuant", "attrs": {},
      "feeds": [["x", [2, 32], "float32"], ["w", [16], "float32"], ["t", [], "float32"]]},
     "g2 must have shape [32], got [16]"),
    ({"op": "FgmpActQuant", "attrs": {},
      "feeds": [["x", [2, 32], "float32"], ["w", [32], "float32"], ["t", [2], "float32"]]},
     "input 'threshold' must hold one value"),
    ({"op": "FgmpActQuant", "attrs": {},
      "feeds": [["x", [2, 32], "float32"], ["w", [32], "float32"], ["t", [], "float32"],
                ["gs", [1], "int64"]]}, "tensor(int64)"),
]


def _random_cases(n: int, seed: int):
    """Random MatMulLowbit geometry; valid exactly when the documented rules hold."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        k = int(rng.choice([0, 8, 16, 32, 48, 64, 96, 128]))
        nn = int(rng.choice([0, 1, 5]))
        block = int(rng.choice([-16, 0, 8, 16, 24, 32, 64, 96]))
        fmt = str(rng.choice(["dint4", "nvfp4", "int4", "mxfp4", "nf4"]))
        sd = str(rng.choice(["float32", "uint8", "int32"]))
        half = k // 2 + int(rng.choice([0, 0, 0, 1]))
        nb = k // block if block > 0 and k % block == 0 else max(k // 16, 1)
        nb += int(rng.choice([0, 0, 0, 1]))
        valid = (fmt != "nf4" and (block == 16 or (block >= 32 and block % 32 == 0))
                 and half * 2 == k and k % 16 == 0 and k % block == 0 and nb == k // block
                 and (sd == "float32" or (sd == "uint8" and fmt in ("nvfp4", "mxfp4"))))
        case = _mm(a=(3, k), codes=(nn, half), scales=(nn, nb), sd=sd,
                   attrs={"format": fmt, "block_size": block})
        out.append((case, f"ok 3x{nn}" if valid else "err "))
    return out


def _random_group_cases(n: int, seed: int):
    """Random int8_group geometry; valid exactly when the documented rules hold (G a multiple of
    32 and of a power-of-two block, K a multiple of G)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        k = int(rng.choice([0, 32, 64, 96, 128, 192, 256]))
        block = int(rng.choice([16, 32, 64, 96, 128]))
        group = int(rng.choice([0, 16, 32, 48, 64, 96, 128, 256]))
        nb = k // block if k % block == 0 else max(k // 16, 1)
        valid = (k % block == 0 and block & (block - 1) == 0 and group >= 32 and group % 32 == 0
                 and group % block == 0 and k % group == 0)
        case = _mm(a=(3, k), codes=(5, k // 2), scales=(5, nb),
                   attrs={"block_size": block, "act_mode": "int8_group", "act_group": group})
        out.append((case, "ok 3x5" if valid else "err "))
    return out


def _run_in_child(cases: list[dict]) -> list[str]:
    """One outcome line per case from a child process (a crash kills the child, not the suite);
    the child must survive every case."""
    proc = subprocess.run([sys.executable, "-c", CHILD], input=json.dumps(cases),
                          capture_output=True, text=True, timeout=300)
    lines = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.strip()]
    assert proc.returncode == 0, f"child died after {len(lines)} cases: {proc.stderr[-1500:]}"
    assert len(lines) == len(cases)
    return lines


def test_bad_inputs_raise_clear_errors_without_crashing(native_lib):
    cases = FIXED + _random_cases(60, seed=11) + _random_group_cases(40, seed=13)
    lines = _run_in_child([c for c, _ in cases])
    for (case, want), got in zip(cases, lines):
        assert want in got, f"{case}: expected {want!r}, got {got!r}"
        if got.startswith("err"):
            assert "[ONNXRuntimeError]" in got


@pytest.mark.parametrize("op", ["MatMulLowbit", "GatherLowbit", "ReorderNorm", "FgmpActQuant"])
def test_errors_name_the_op(native_lib, op):
    case = next(c for c, want in FIXED if c["op"] == op and not want.startswith("ok"))
    proc = subprocess.run([sys.executable, "-c", CHILD], input=json.dumps([case]),
                          capture_output=True, text=True, timeout=120)
    assert op in json.loads(proc.stdout.splitlines()[0])


SPECIAL_FILLS = [float("nan"), float("inf"), float("-inf"), -0.0, 3.4028234663852886e38, 1e-45]


def _expected_with_fill(case, want: str, fill: float) -> str:
    """The outcome with every float input equal to `fill`: the same, except that an int8_static
    act_scale must be positive and finite."""
    static = case["op"] == "MatMulLowbit" and case["attrs"].get("act_mode") == "int8_static"
    if static and want.startswith("ok") and not (0 < fill < float("inf")):
        return "act_scale must be positive and finite"
    return want


def test_special_values_in_every_float_input_never_crash(native_lib):
    cases = FIXED + _random_cases(30, seed=12) + _random_group_cases(20, seed=14)
    runs = [({**c, "fill": f}, _expected_with_fill(c, want, f)) for f in SPECIAL_FILLS
            for c, want in cases]
    lines = _run_in_child([c for c, _ in runs])
    for (case, want), got in zip(runs, lines):
        assert want in got, f"fill {case['fill']}: {case}: expected {want!r}, got {got!r}"
